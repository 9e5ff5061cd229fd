"""The one registry mechanism: a decorator that files a function under a name, with its metadata."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable[..., Any]
    paper: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """A named dict of functions filled by ``@registry.register("name", paper=URL, ...)``.

    >>> methods = Registry("merge method")
    >>> @methods.register("linear", paper="https://arxiv.org/abs/2203.05482")
    ... def linear(tensors, weights): ...
    >>> methods.get("nope")
    Traceback (most recent call last):
    ValueError: unknown merge method 'nope'; known: linear
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._aliases: dict[str, str] = {}

    def register(
        self, name: str, *, paper: str = "", aliases: tuple[str, ...] = (), **meta: Any
    ) -> Callable[[Callable], Callable]:
        """``aliases``: older names that keep resolving to this entry (saved configs, scripts), never listed."""

        def decorate(fn: Callable) -> Callable:
            for key in (name, *aliases):
                if key in self:
                    raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._entries[name] = Entry(name, fn, paper, dict(meta))
            self._aliases.update(dict.fromkeys(aliases, name))
            return fn

        return decorate

    def get(self, name: str) -> Entry:
        """The entry registered as ``name`` or under one of its aliases (``Entry.name`` is the current name)."""
        try:
            return self._entries[self._aliases.get(name, name)]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._aliases
