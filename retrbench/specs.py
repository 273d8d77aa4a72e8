"""Typed specs: the one grammar for every ``--pooling``, ``--rerank`` and ``--model`` string.

Grammar (one for all kinds)::

    step      := name [":" param ("," param)*]      gem:p=4   aqe:k=10,alpha=3
               | name "(" param ("," param)* ")"     gem(p=4.0)  (the canonical cache form)
    param     := key "=" value                       value: int, else float, else text
    pipeline  := step ("+" step)*                    dba+aqe:k=5+dfs
    models    := name ("+" name)*                    simclr2x+simclr4x (an ensemble)

Names and keys are case-insensitive (stored lower-case); a key given twice, an empty step
or a malformed parameter is a ``ValueError`` naming the spec and the part at fault. Whether a
name exists and which parameters it takes is checked by the registry that builds it.

The values are small frozen dataclasses: they compare and hash by value, ``str()`` gives the
canonical text (which round-trips through :func:`parse_step` / :func:`parse_pipeline`), and
they are what :class:`~retrbench.config.RunConfig` holds, so every stage gets parsed values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

__all__ = [
    "ModelRef",
    "Pipeline",
    "Step",
    "Value",
    "parse_models",
    "parse_pipeline",
    "parse_step",
    "parse_value",
]

Value = Union[int, float, str]  # noqa: UP007  (a runtime alias, kept py3.10-compatible)

_NAME = re.compile(r"^[a-z_][a-z0-9_\-.]*$")
_NONE = ("", "none", "g")  # pipelines meaning "no step" (``g`` is Table 1's global search)


def parse_value(text: str) -> Value:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"1e-3"`` -> 0.001, anything else stays text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _fmt(v: Value) -> str:
    return repr(v) if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Step:
    """One named step with parameters, e.g. ``gem:p=4`` or ``aqe:k=10,alpha=3``.

    Attributes:
        name: lower-case registry name (or alias) of the step.
        params: ``(key, value)`` pairs, sorted by key.
    """

    name: str
    params: tuple[tuple[str, Value], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.name.strip().lower())
        object.__setattr__(self, "params", tuple(sorted((str(k).lower(), v) for k, v in dict(self.params).items())))

    @property
    def kwargs(self) -> dict[str, Value]:
        return dict(self.params)

    def __str__(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt(v)}" for k, v in self.params)


@dataclass(frozen=True)
class Pipeline:
    """Steps run in the order written (``dba+aqe``); empty for ``none``."""

    steps: tuple[Step, ...] = ()

    def __str__(self) -> str:
        return "+".join(str(s) for s in self.steps) if self.steps else "none"

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __iter__(self):  # noqa: ANN204
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.steps)


@dataclass(frozen=True)
class ModelRef:
    """One backbone of a model spec: a registry or resolver name and its weights file."""

    name: str
    weights: str | None = None

    def __str__(self) -> str:
        return self.name


def parse_step(spec: str | Step, what: str = "spec") -> Step:
    """``"gem"``, ``"gem:p=4"`` or ``"gem(p=4.0)"`` -> :class:`Step`; a Step is returned as is."""
    if isinstance(spec, Step):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"{what}: expected a string such as 'name' or 'name:key=value', got {type(spec).__name__}")
    text = spec.strip()
    if text.endswith(")") and "(" in text:
        name, _, rest = text.partition("(")
        body = rest[:-1]
    else:
        name, _, body = text.partition(":")
    name = name.strip().lower()
    if not _NAME.match(name):
        raise ValueError(f"{what} {spec!r}: expected 'name' or 'name:key=value,...'")
    params: dict[str, Value] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"{what} {spec!r}: {item!r} is not of the form key=value")
        if key in params:
            raise ValueError(f"{what} {spec!r}: {key!r} given twice")
        params[key] = parse_value(value)
    return Step(name, tuple(params.items()))


def parse_pipeline(spec: str | Pipeline | None, what: str = "spec") -> Pipeline:
    """``"dba+aqe:k=5"`` -> :class:`Pipeline`; ``none``, ``g`` and ``""`` give no steps and
    ``g`` steps inside a pipeline (``g+dba``, the paper's naming) are dropped."""
    if isinstance(spec, Pipeline):
        return spec
    if spec is None:
        return Pipeline()
    if not isinstance(spec, str):
        raise TypeError(f"{what}: expected a string such as 'aqe' or 'dba+aqe', got {type(spec).__name__}")
    if spec.strip().lower() in _NONE:
        return Pipeline()
    steps = []
    for part in spec.split("+"):
        if not part.strip():
            raise ValueError(f"{what} {spec!r}: empty step")
        step = parse_step(part, what)
        if step.name == "g":
            if step.params:
                raise ValueError(f"{what} {spec!r}: 'g' (global search) takes no parameters")
            continue
        steps.append(step)
    return Pipeline(tuple(steps))


def parse_models(model: str | tuple[ModelRef, ...], weights: str | None = None) -> tuple[ModelRef, ...]:
    """``"a+b"`` with weights ``"wa+wb"`` -> two :class:`ModelRef`; one model keeps its weights
    whole (a path may contain ``+``)."""
    if isinstance(model, tuple):
        return model
    names = [m.strip() for m in str(model).split("+") if m.strip()]
    if not names:
        raise ValueError(f"model spec {model!r} names no model")
    if weights is None:
        return tuple(ModelRef(n) for n in names)
    parts = weights.split("+") if len(names) > 1 else [weights]
    if len(parts) != len(names):
        raise ValueError(
            f"ensemble {model!r} has {len(names)} models but weights {weights!r} gives {len(parts)} files (join them with '+')"
        )
    return tuple(ModelRef(n, w.strip() or None) for n, w in zip(names, parts, strict=True))
