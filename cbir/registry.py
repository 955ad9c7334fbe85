"""A tiny name -> factory registry, so plugins are picked by name without if-chains."""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

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

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: Dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = factory
            return factory

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._items[name]
        except KeyError:
            raise CbirError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}") from None

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
