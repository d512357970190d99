"""A name -> entry table filled by modules that register themselves when imported (families, stages)."""

from __future__ import annotations

import importlib
from typing import Any, Generic, TypeVar

from .errors import VlmedgeError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, package: str, modules: tuple[str, ...], what: str):
        self.package, self.modules, self.what = package, modules, what
        self.entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        self.entries[name] = entry
        return entry

    def all(self) -> dict[str, T]:
        """Every entry, in the order of `modules` (importing them registers them; cheap after the first call)."""
        for module in self.modules:
            importlib.import_module(f".{module}", self.package)
        return self.entries

    def get(self, name: str, shown: Any = None) -> T:
        entries = self.all()
        if name not in entries:
            raise VlmedgeError(f"unknown {self.what} {name!r}; expected one of: {', '.join(shown or entries)}")
        return entries[name]
