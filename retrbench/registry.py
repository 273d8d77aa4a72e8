"""One registry pattern for everything pluggable (backbones, poolings, rerankers, datasets).

Each registry maps a name (plus optional aliases) to an :class:`Entry` holding a factory and
its metadata, an :class:`EntryInfo` (or a subclass per kind) carrying the display ``label``,
the sort ``order`` in tables and the ``help`` line shown by the CLI. Names are
case-insensitive. Registering a name twice raises; asking for an unknown name raises
``KeyError`` naming the closest known names.

Names that are not entries (``timm:resnet50``, ``folder:/photos``, ``net.pth``) go through
*resolvers*: a prefix (or a predicate) mapped to a factory that takes the rest of the name.
:meth:`Registry.create` is the one builder for both, so a notebook and the CLI build the
same thing from the same string.

Example::

    POOLINGS = Registry("pooling")

    @POOLINGS.register("gem", info=PoolingInfo(label="GeM", params={"p": 3.0}))
    def make_gem(p: float = 3.0) -> Pooling: ...

    pool = POOLINGS.create("gem", p=4.0)
    POOLINGS.list("g*")  # ['gem']

    @BACKBONES.resolver("timm:", help="any timm model by name")
    def build_timm(name: str, **kw) -> Backbone: ...

    BACKBONES.create("timm:resnet50")
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Entry", "EntryInfo", "Registry", "Resolver"]


@dataclass(frozen=True, kw_only=True)
class EntryInfo:
    """Metadata every registry entry carries; kinds subclass it with their own fields.

    Attributes:
        label: display name in tables and plots (default: the entry's name).
        order: sort key in tables (lower first; ties keep the name order).
        help: one line for ``--help`` and the listing commands (default: the factory's
            docstring's first line).
    """

    label: str = ""
    order: int = 0
    help: str = ""


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered factory with its metadata.

    Attributes:
        name: canonical (lower-case) name.
        factory: callable building the object; ``create`` passes keyword arguments through.
        aliases: other names that resolve to this entry.
        info: the entry's :class:`EntryInfo` (label, order and help always filled in).
    """

    name: str
    factory: Callable[..., T]
    aliases: tuple[str, ...] = ()
    info: Any = None

    @property
    def label(self) -> str:
        return getattr(self.info, "label", "") or self.name

    @property
    def help(self) -> str:
        return getattr(self.info, "help", "")


@dataclass(frozen=True)
class Resolver(Generic[T]):
    """Builds objects for names outside the registry.

    Attributes:
        prefix: names starting with it (case-insensitive) go to ``factory`` with the rest of
            the name as first argument; empty when ``match`` decides instead.
        factory: ``factory(rest, **kwargs) -> T``.
        help: one line, e.g. ``"timm:NAME  any timm model"``.
        match: predicate on the whole name, for resolvers without a prefix (files).
    """

    prefix: str
    factory: Callable[..., T]
    help: str = ""
    match: Callable[[str], bool] | None = field(default=None, compare=False)

    def accepts(self, name: str) -> bool:
        if self.prefix:
            return name.lower().startswith(self.prefix)
        return bool(self.match and self.match(name))

    def rest(self, name: str) -> str:
        return name[len(self.prefix) :] if self.prefix else name


class Registry(Generic[T]):
    """Name -> factory map with aliases, prefix resolvers, glob listing and helpful errors."""

    def __init__(self, kind: str, info_type: type = EntryInfo) -> None:
        self.kind = kind
        self.info_type = info_type
        self._entries: dict[str, Entry[T]] = {}
        self._alias: dict[str, str] = {}
        self._resolvers: list[Resolver[T]] = []

    # ------------------------------------------------------------------ registration

    def register(
        self,
        name: str,
        factory: Callable[..., T] | None = None,
        *,
        aliases: tuple[str, ...] | list[str] = (),
        info: Any = None,
    ) -> Callable[..., Any]:
        """Register ``factory`` under ``name``; usable as a decorator when ``factory`` is None.

        ``info`` defaults to ``info_type()``; an empty ``help`` is filled from the factory's
        docstring and an empty ``label`` from the name.
        """

        def add(fn: Callable[..., T]) -> Callable[..., T]:
            key = name.lower()
            for n in (key, *(a.lower() for a in aliases)):
                if n in self._alias:
                    raise ValueError(f"{self.kind} {n!r} is already registered")
            if any(r.prefix and key.startswith(r.prefix) for r in self._resolvers):
                raise ValueError(f"{self.kind} {key!r} would be shadowed by a resolver prefix")
            meta = info if info is not None else self.info_type()
            if dataclasses.is_dataclass(meta) and isinstance(meta, EntryInfo):
                doc = (fn.__doc__ or "").strip().splitlines()
                meta = dataclasses.replace(meta, label=meta.label or key, help=meta.help or (doc[0] if doc else ""))
            self._entries[key] = Entry(key, fn, tuple(a.lower() for a in aliases), meta)
            self._alias[key] = key
            for a in aliases:
                self._alias[a.lower()] = key
            return fn

        if factory is not None:
            add(factory)
            return factory
        return add

    def resolver(
        self, prefix: str = "", *, help: str = "", match: Callable[[str], bool] | None = None
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: names starting with ``prefix`` (or accepted by ``match``) are built by the
        decorated ``factory(rest, **kwargs)``. Resolvers are tried in registration order."""
        if not prefix and match is None:
            raise ValueError("a resolver needs a prefix or a match predicate")

        def add(fn: Callable[..., T]) -> Callable[..., T]:
            p = prefix.lower()
            if p and any(r.prefix == p for r in self._resolvers):
                raise ValueError(f"{self.kind} prefix {p!r} is already registered")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._resolvers.append(Resolver(p, fn, help or (doc[0] if doc else ""), match))
            return fn

        return add

    def unregister(self, name: str) -> None:
        """Remove an entry and its aliases (mainly for tests and user overrides)."""
        entry = self.get(name)
        del self._entries[entry.name]
        for n in (entry.name, *entry.aliases):
            self._alias.pop(n, None)

    # ------------------------------------------------------------------ lookup

    def find_resolver(self, name: str) -> Resolver[T] | None:
        """The resolver that builds ``name``, or None (registry names are never resolved)."""
        if name.lower() in self._alias:
            return None
        return next((r for r in self._resolvers if r.accepts(name)), None)

    def get(self, name: str) -> Entry[T]:
        """The entry for ``name`` or an alias; ``KeyError`` with close matches otherwise."""
        key = self._alias.get(name.lower())
        if key is None:
            close = difflib.get_close_matches(name.lower(), list(self._alias), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(sorted(self._entries))
            prefixes = [r.prefix + "..." for r in self._resolvers if r.prefix]
            also = f"; or {', '.join(prefixes)}" if prefixes else ""
            raise KeyError(f"unknown {self.kind} {name!r}{hint} (known: {known}{also})")
        return self._entries[key]

    def is_known(self, name: str) -> bool:
        """True for registry names, aliases and names a resolver accepts."""
        return name in self or self.find_resolver(name) is not None

    def create(self, name: str, /, **kwargs: Any) -> T:
        """Build the object for ``name``: a registry entry, or a resolved name (``timm:...``)."""
        res = self.find_resolver(name)
        if res is not None:
            return res.factory(res.rest(name), **kwargs)
        return self.get(name).factory(**kwargs)

    def label(self, name: str) -> str:
        """Display label of ``name`` (the name itself when unknown or resolved)."""
        key = self._alias.get(name.lower())
        return self._entries[key].label if key else name

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted canonical names matching the glob ``pattern``."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern.lower()))

    @property
    def resolvers(self) -> tuple[Resolver[T], ...]:
        return tuple(self._resolvers)

    def help_text(self, width: int = 0) -> str:
        """``name: help`` lines for every entry and resolver, for ``--help`` epilogs."""
        lines = [f"{e.name}: {e.help}" if e.help else e.name for e in self]
        lines += [f"{r.prefix}...: {r.help}" if r.prefix else r.help for r in self._resolvers]
        return "; ".join(lines) if width == 0 else "\n".join(lines)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._alias

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: (getattr(e.info, "order", 0), e.name)))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries, {len(self._resolvers)} resolvers)"
