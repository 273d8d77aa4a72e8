"""One registry pattern for everything pluggable (backbones, poolings, rerankers, datasets).

Each registry maps a name (plus optional aliases) to an :class:`Entry` holding a factory and
its metadata. Names are case-insensitive. Registering a name twice raises; asking for an
unknown name raises ``KeyError`` naming the closest known names.

Example::

    POOLINGS = Registry("pooling")

    @POOLINGS.register("gem", info={"params": "p"})
    def make_gem(p: float = 3.0) -> Callable[[Tensor], Tensor]: ...

    pool = POOLINGS.create("gem", p=4.0)
    POOLINGS.list("g*")  # ['gem']
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Entry", "Registry"]


@dataclass(frozen=True)
class Entry(Generic[T]):
    """A registered factory with its metadata.

    Attributes:
        name: canonical (lower-case) name.
        factory: callable building the object; ``create`` passes keyword arguments through.
        aliases: other names that resolve to this entry.
        info: free-form metadata carried on the entry (a dataclass or a dict).
    """

    name: str
    factory: Callable[..., T]
    aliases: tuple[str, ...] = ()
    info: Any = None
    doc: str = field(default="", compare=False)


class Registry(Generic[T]):
    """Name -> factory map with aliases, glob listing and helpful errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._alias: dict[str, str] = {}

    def register(
        self,
        name: str,
        factory: Callable[..., T] | None = None,
        *,
        aliases: tuple[str, ...] | list[str] = (),
        info: Any = None,
    ) -> Callable[..., Any]:
        """Register ``factory`` under ``name``; usable as a decorator when ``factory`` is None."""

        def add(fn: Callable[..., T]) -> Callable[..., T]:
            key = name.lower()
            for n in (key, *(a.lower() for a in aliases)):
                if n in self._alias:
                    raise ValueError(f"{self.kind} {n!r} is already registered")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[key] = Entry(key, fn, tuple(a.lower() for a in aliases), info, doc[0] if doc else "")
            self._alias[key] = key
            for a in aliases:
                self._alias[a.lower()] = key
            return fn

        if factory is not None:
            add(factory)
            return factory
        return add

    def unregister(self, name: str) -> None:
        """Remove an entry and its aliases (mainly for tests and user overrides)."""
        entry = self.get(name)
        del self._entries[entry.name]
        for n in (entry.name, *entry.aliases):
            self._alias.pop(n, None)

    def get(self, name: str) -> Entry[T]:
        """The entry for ``name`` or an alias; ``KeyError`` with close matches otherwise."""
        key = self._alias.get(name.lower())
        if key is None:
            close = difflib.get_close_matches(name.lower(), list(self._alias), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            known = ", ".join(sorted(self._entries))
            raise KeyError(f"unknown {self.kind} {name!r}{hint} (known: {known})")
        return self._entries[key]

    def create(self, name: str, /, **kwargs: Any) -> T:
        """Build the object registered under ``name`` with ``kwargs``."""
        return self.get(name).factory(**kwargs)

    def list(self, pattern: str = "*") -> list[str]:
        """Sorted canonical names matching the glob ``pattern``."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern.lower()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._alias

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self)} entries)"
