"""Experiment files and sweeps: every cell of models x datasets x poolings x whitening x rerank.

An experiment file (YAML, see ``benchmarks/*.yaml``) names the grid and the fixed settings::

    name: table1
    results_dir: results/table1        # default results/<name>; relative to the working directory
    models: [resnet50, simclr2x, simclr2x+simclr4x, {model: gem_ap_r101, pooling: gem}]
    datasets: [oxford5k, paris6k, instre]
    poolings: [rmac]
    whiten: [512]                      # PCA-whitening dimensions; none (or null) = the true dimension
    rerank: [none, aqe, dba+aqe]
    fixed:                             # any other RunConfig field, the same for every cell
      image_size: null
      whiten_source: null

A model entry may be a mapping: ``model`` plus per-model settings (any RunConfig field); a
setting that is one of the grid axes (``pooling``, ``whiten``, ``rerank``, ``dataset``) replaces
that axis for this model (a scalar or a list). Unknown keys are errors, so a typo fails at once
instead of after hours of extraction; ``fixed`` accepts only fields that :class:`RunConfig` has.

:func:`sweep` runs each cell through :func:`retrbench.pipeline.run` with one backbone memo,
so a model is loaded once and each (model, dataset, image size, pooling) is extracted once
(the feature cache serves every other cell of it). Rows are appended to
``<results_dir>/results.jsonl`` after each cell; cells whose ``config_id`` is already there are
skipped, so a finished sweep re-runs in seconds and an interrupted one resumes where it stopped.

PCA-whitening dimensions are nested: whitening to ``d`` keeps the first ``d`` whitened components.
:class:`~retrbench.whitening.WhiteningMemo` (a drop-in for :func:`retrbench.whitening.postprocess`) fits the PCA once
per training set and truncates it for each dimension, and hands the same arrays to every rerank
variant of a cell, so the rerankers' database-side cache (kNN graphs, DBA) is shared too. The
sweep passes it to ``pipeline.run`` as ``postprocess_fn``.
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from .config import RunConfig, apply_preset, check_keys, config_id
from .specs import Pipeline, Step, parse_pipeline, parse_step
from .whitening import WhiteningMemo

__all__ = ["Experiment", "ModelEntry", "WhiteningMemo", "config_id", "load_experiment", "plan", "sweep"]

log = logging.getLogger(__name__)

AXES = ("dataset", "pooling", "whiten", "rerank")
# experiment-file key -> RunConfig field
_GRID_KEYS = {"models": "model", "datasets": "dataset", "poolings": "pooling", "whiten": "whiten", "rerank": "rerank"}
_TOP_KEYS = ("name", "description", "results_dir", "preset", "fixed", "labels", *_GRID_KEYS)
_LABEL_COLUMNS = ("model", "pooling", "dataset", "rerank")
_TRUE_DIM = ("none", "null", "true", "true_dim", "true dim", "off", "no")


def _config_fields() -> set[str]:
    return {f.name for f in fields(RunConfig)}


def _labels(value: Any, where: str) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """``labels: {rerank: {"DFS (offline)": "DFS"}}``: display names replaced in the rows' labels."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: 'labels' maps a column ({', '.join(_LABEL_COLUMNS)}) to {{label: new label}}, got {value!r}")
    check_keys(value, _LABEL_COLUMNS, f"{where} labels")
    out = []
    for col, mapping in value.items():
        if not isinstance(mapping, Mapping):
            raise ValueError(f"{where}: labels.{col} must map labels to new labels, got {mapping!r}")
        out.append((str(col), tuple((str(k), str(v)) for k, v in mapping.items())))
    return tuple(out)


def relabel(rows: list[dict[str, Any]], labels: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]) -> list[dict[str, Any]]:
    """Rows with every ``old`` label part replaced by ``new`` in their ``<column>_label`` (whole
    ``+``-separated parts, so ``G+DFS (offline)`` becomes ``G+DFS`` for ``DFS (offline): DFS``)."""
    if not labels:
        return rows
    out = []
    for row in rows:
        row = dict(row)
        for col, mapping in labels:
            key = f"{col}_label"
            if isinstance(row.get(key), str):
                table = dict(mapping)
                row[key] = "+".join(table.get(part, part) for part in row[key].split("+"))
        out.append(row)
    return out


def _whiten_value(v: Any) -> int | str | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in _TRUE_DIM):
        return None
    if isinstance(v, str) and (v.strip() == "shipped" or v.strip().startswith("shipped:")):
        return v.strip()
    if isinstance(v, bool):
        raise ValueError(f"whiten: expected a dimension or none, got {v!r}")
    try:
        d = int(v)
    except (TypeError, ValueError):
        raise ValueError(f"whiten: expected a dimension or none, got {v!r}") from None
    if d != v and str(d) != str(v).strip():
        raise ValueError(f"whiten: expected an integer dimension, got {v!r}")
    if d < 1:
        raise ValueError(f"whiten: dimensions must be positive, got {d}")
    return d


def _axis(key: str, value: Any) -> tuple[Any, ...]:
    """A grid axis as a tuple (a scalar is a one-value axis)."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError(f"experiment: {key!r} is empty")
    if key == "whiten":
        return tuple(_whiten_value(v) for v in values)
    if key == "rerank":
        return tuple(parse_pipeline(None if v is None else str(v), "experiment: rerank") for v in values)
    for v in values:
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"experiment: {key!r} entries must be non-empty strings, got {v!r}")
    if key in ("poolings", "pooling"):
        return tuple(parse_step(v, "experiment: pooling") for v in values)
    return tuple(v.strip() for v in values)


@dataclass(frozen=True)
class ModelEntry:
    """One model of the grid: a model spec (``a+b`` for an ensemble) and its own settings.

    ``overrides`` are ``(field, value)`` pairs; a grid-axis field (``pooling``, ``whiten``,
    ``rerank``, ``dataset``) carries a tuple of values replacing that axis for this model.
    """

    model: str
    overrides: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, item: Any) -> ModelEntry:
        if isinstance(item, str):
            return cls(_axis("models", item)[0])
        if not isinstance(item, Mapping) or "model" not in item:
            raise ValueError(f"experiment: a model entry is a name or a mapping with a 'model' key, got {item!r}")
        rest = {k: v for k, v in item.items() if k != "model"}
        check_keys(rest, sorted(_config_fields() - {"model"}), f"model entry {item['model']!r}")
        over = []
        for k, v in rest.items():
            over.append((k, _axis(k, v) if k in AXES else v))
        return cls(_axis("models", item["model"])[0], tuple(over))


@dataclass(frozen=True)
class Experiment:
    """A parsed experiment file: the grid, the fixed settings and where results go."""

    name: str
    models: tuple[ModelEntry, ...]
    datasets: tuple[str, ...]
    poolings: tuple[Step, ...] = (Step("rmac"),)
    whiten: tuple[int | None, ...] = (512,)
    rerank: tuple[Pipeline, ...] = (Pipeline(),)
    fixed: tuple[tuple[str, Any], ...] = ()
    results_dir: str | None = None
    description: str = ""
    preset: str | None = None
    labels: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()
    source: str | None = field(default=None, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str | None = None) -> Experiment:
        if not isinstance(d, Mapping):
            raise ValueError(f"experiment{f' {source}' if source else ''}: expected a mapping, got {type(d).__name__}")
        where = f"experiment {source}" if source else "experiment"
        check_keys(d, _TOP_KEYS, where)
        for key in ("models", "datasets"):
            if key not in d:
                raise ValueError(f"{where}: {key!r} is required")
        fixed = dict(d.get("fixed") or {})
        cfg_fields = _config_fields()
        grid_fields = set(_GRID_KEYS.values())
        preset = d.get("preset")
        preset_values = apply_preset(preset, {}) if preset else {}
        fixed = {**{k: v for k, v in preset_values.items() if k not in grid_fields}, **fixed}
        labels = _labels(d.get("labels") or {}, where)
        in_grid = sorted(set(fixed) & grid_fields)
        if in_grid:
            raise ValueError(f"{where}: {in_grid} are grid axes; list them at the top level ({', '.join(_GRID_KEYS)}), not under 'fixed'")
        missing = sorted(set(fixed) - cfg_fields)
        if missing:
            raise ValueError(
                f"{where}: fixed setting(s) {missing} are not RunConfig fields in this retrbench version; "
                f"known: {sorted(cfg_fields - grid_fields)}"
            )
        if "dataset_options" in fixed and isinstance(fixed["dataset_options"], Mapping):
            fixed["dataset_options"] = tuple(fixed["dataset_options"].items())
        models = d["models"] if isinstance(d["models"], (list, tuple)) else [d["models"]]
        if not models:
            raise ValueError(f"{where}: 'models' is empty")
        name = str(d.get("name") or (Path(source).stem if source else "experiment"))
        kw: dict[str, Any] = {}
        for key in ("poolings", "whiten", "rerank"):
            if key in d:
                kw[key] = _axis(key, d[key])
            elif _GRID_KEYS[key] in preset_values:
                kw[key] = _axis(key, preset_values[_GRID_KEYS[key]])
        exp = cls(
            name=name,
            models=tuple(ModelEntry.parse(m) for m in models),
            datasets=_axis("datasets", d["datasets"]),
            fixed=tuple(fixed.items()),
            results_dir=None if d.get("results_dir") is None else str(d["results_dir"]),
            description=str(d.get("description") or ""),
            preset=None if preset is None else str(preset),
            labels=labels,
            source=source,
            **kw,
        )
        exp.cells()  # every cell must be a valid RunConfig
        return exp

    def cells(self) -> list[RunConfig]:
        """Every cell as a RunConfig, model-major, then dataset, pooling, whitening, rerank.

        Duplicates (a value listed twice) are dropped, keeping the first.
        """
        out: dict[str, RunConfig] = {}
        base = dict(self.fixed)
        for m in self.models:
            over = dict(m.overrides)
            axes = {"dataset": self.datasets, "pooling": self.poolings, "whiten": self.whiten, "rerank": self.rerank}
            axes.update({k: v for k, v in over.items() if k in AXES})
            settings = {**base, **{k: v for k, v in over.items() if k not in AXES}}
            for dataset, pooling, whiten, rerank in itertools.product(*(axes[a] for a in AXES)):
                try:
                    cfg = RunConfig(**settings, model=m.model, dataset=dataset, pooling=pooling, whiten=whiten, rerank=rerank)
                except TypeError as e:
                    raise ValueError(f"experiment {self.name!r}: {e}") from None
                out.setdefault(config_id(cfg), cfg)
        return list(out.values())

    def default_results_dir(self) -> Path:
        return Path(self.results_dir) if self.results_dir else Path("results") / self.name


def load_experiment(source: str | Path | Mapping[str, Any] | Experiment) -> Experiment:
    """An :class:`Experiment` from a YAML file, a dict (parsed YAML) or an Experiment."""
    if isinstance(source, Experiment):
        return source
    if isinstance(source, Mapping):
        return Experiment.from_dict(source)
    import yaml

    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no experiment file at {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({e})") from None
    return Experiment.from_dict(data, source=str(path))


# ---------------------------------------------------------------------------------- validation


def _validate(cells: list[RunConfig]) -> None:
    """Fail before any work on names that cannot be built (unknown model, dataset, pooling,
    rerank, bad parameter): each distinct cell goes through the pipeline's own check."""
    from .pipeline import check_config

    seen: set[tuple[str, ...]] = set()
    for c in cells:
        key = (c.model, c.dataset, str(c.pooling), str(c.rerank), str(c.whiten_source))
        if key not in seen:
            seen.add(key)
            check_config(c)


# ----------------------------------------------------------------------------------------- sweep


def _finished_ids(results_dir: Path) -> set[str]:
    from .results import RESULTS_FILE, load_results

    if not (results_dir / RESULTS_FILE).exists():
        return set()
    df = load_results(results_dir, skip_invalid=True)
    if "config_id" not in df.columns:
        return set()
    return set(df["config_id"].dropna().astype(str))


def _cell_label(cfg: RunConfig) -> str:
    w = "true dim" if cfg.whiten is None else f"whiten {cfg.whiten}"
    return f"{cfg.model} / {cfg.dataset} / {cfg.pooling} / {w} / rerank {cfg.rerank}"


def plan(experiment: str | Path | Mapping[str, Any] | Experiment, *, results_dir: str | Path | None = None) -> pd.DataFrame:
    """The cells of an experiment, one row each: model, dataset, pooling, whiten, rerank, the
    resolved image size and resize mode (the dataset's default when the file gives none), every
    other setting that differs from the defaults, config_id and whether it is done."""
    from .datasets import default_image_size, default_resize

    exp = load_experiment(experiment)
    out = Path(results_dir) if results_dir is not None else exp.default_results_dir()
    done = _finished_ids(out)
    shown = {"model", "dataset", "pooling", "whiten", "rerank", "image_size", "resize"}
    default = RunConfig().to_dict()
    rows = []
    for c in exp.cells():
        cid = config_id(c)
        d = c.to_dict()
        other = "; ".join(f"{k}={v}" for k, v in d.items() if k not in shown and v != default[k])
        resize = c.resize or default_resize(c.dataset)
        size = resize.partition(":")[2] if resize.startswith("fixed:") else (c.image_size or default_image_size(c.dataset))
        rows.append(
            {"model": c.model, "dataset": c.dataset, "pooling": str(c.pooling), "whiten": c.whiten, "rerank": str(c.rerank),
             "image_size": size, "resize": resize, "settings": other, "config_id": cid, "done": cid in done}
        )  # fmt: skip
    return pd.DataFrame(rows)


def sweep(
    experiment: str | Path | Mapping[str, Any] | Experiment,
    *,
    results_dir: str | Path | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Run every cell of an experiment not yet in the results; return the experiment's rows.

    Args:
        experiment: an experiment file (YAML), its parsed dict, or an :class:`Experiment`.
        results_dir: where ``results.jsonl`` lives; default the file's ``results_dir``, else
            ``results/<name>`` (relative to the working directory).
        progress: show progress bars (cells and extraction).

    Returns:
        The tidy rows (one per cell and metric, see :func:`retrbench.results.load_results`) of
        every cell of the experiment, in cell order. ``df.attrs["sweep"]`` holds ``cells``,
        ``skipped`` (already done), ``ran``, ``seconds``, ``results_dir`` and ``notes``
        (whitening caps and other notes met on the way).

    An exception inside a cell propagates (with a note saying how to resume); the cells
    finished before it are already saved, so calling ``sweep`` again continues from there.
    """
    from tqdm.auto import tqdm

    from . import pipeline
    from .results import append_results, check_results_dir, load_results

    t0 = time.perf_counter()
    exp = load_experiment(experiment)
    cells = exp.cells()
    _validate(cells)
    out = Path(results_dir) if results_dir is not None else exp.default_results_dir()
    check_results_dir(out)
    done = _finished_ids(out)
    todo = [c for c in cells if config_id(c) not in done]
    log.info("sweep %s: %d cells, %d already in %s, %d to run", exp.name, len(cells), len(cells) - len(todo), out, len(todo))

    memo: dict[Any, Any] = {}
    whitening = WhiteningMemo()
    notes: list[str] = []
    ran = 0
    for cfg in tqdm(todo, desc=f"sweep {exp.name}", unit="cell", disable=not progress):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", pipeline.WhiteningNote)  # collected in notes below
                res = pipeline.run(cfg, results_dir=None, progress=progress, backbones=memo, postprocess_fn=whitening)
            append_results(relabel(res.rows, exp.labels), out)
        except Exception as e:
            if hasattr(e, "add_note"):
                e.add_note(
                    f"retrbench sweep {exp.name!r}: failed in cell {_cell_label(cfg)}; the {len(cells) - len(todo) + ran} "
                    f"cells finished before it are saved in {out}; run the sweep again to resume from here"
                )
            log.error("sweep %s: cell %s failed: %s", exp.name, _cell_label(cfg), e)
            raise
        ran += 1
        note = res.info.get("whitening", {}).get("note")
        if note:
            note = f"{cfg.model} on {cfg.dataset} ({cfg.pooling}): {note}"
            if note not in notes:
                notes.append(note)
                log.warning("%s", note)
        log.info("cell %s: %.1f s (extraction %.1f s)", _cell_label(cfg), res.info["total_s"], res.info["extract_s"])

    ids = {config_id(c): i for i, c in enumerate(cells)}
    try:
        df = load_results(out, skip_invalid=True)
    except FileNotFoundError:
        df = pd.DataFrame()
    if len(df) and "config_id" in df.columns:
        df = df[df["config_id"].isin(list(ids))]
        df = df.drop_duplicates(subset=["config_id", "split", "metric"], keep="last")
        df = df.assign(_cell=df["config_id"].map(ids)).sort_values("_cell", kind="stable").drop(columns="_cell")
        df = df.reset_index(drop=True)
        if "whitening" in df.columns:
            for w, m, ds, p in zip(df["whitening"], df["model"], df["dataset"], df["pooling"], strict=True):
                note = w.get("note") if isinstance(w, dict) else None
                if note and (n := f"{m} on {ds} ({p}): {note}") not in notes:
                    notes.append(n)
    else:
        df = pd.DataFrame()
    df.attrs["sweep"] = {
        "name": exp.name,
        "cells": len(cells),
        "skipped": len(cells) - len(todo),
        "ran": ran,
        "seconds": time.perf_counter() - t0,
        "results_dir": str(out),
        "notes": notes,
    }
    return df
