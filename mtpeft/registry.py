"""A small registry keyed by name, filled by a decorator: adding a method touches only its own file."""
from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import MtpeftError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise MtpeftError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def register_class(self, name: str) -> Callable[[T], T]:
        """Class decorator: register a class under ``name`` and set its ``name`` attribute to it."""
        def deco(cls: T) -> T:
            cls.name = name
            return self.register(name)(cls)

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            raise MtpeftError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(sorted(self._items))}")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
