"""A tiny name -> factory registry, so plugins are picked by name without if-chains."""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Generic, List, Sequence, TypeVar

from .errors import CbirError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories (classes or functions).

    >>> backbones = Registry("backbone")
    >>> @backbones.register("tiny")
    ... class Tiny: ...
    >>> backbones.get("tiny") is Tiny
    True
    """

    def __init__(self, kind: str, plugins: Sequence[str] = ()) -> None:
        """``plugins``: modules (dotted names) that register their factories here; imported on first lookup, so a
        module low in the package can build a plugin by name without importing the package that holds it."""
        self.kind = kind
        self._items: Dict[str, Callable[..., T]] = {}
        self._plugins = tuple(plugins)
        self._loaded = not self._plugins

    def load(self) -> None:
        """Import every plugin module (once) so that the registry is complete."""
        if not self._loaded:
            self._loaded = True
            for mod in self._plugins:
                importlib.import_module(mod)

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = factory
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            self.load()
        try:
            return self._items[name]
        except KeyError:
            raise CbirError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def names(self) -> List[str]:
        self.load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        if name not in self._items:
            self.load()
        return name in self._items
