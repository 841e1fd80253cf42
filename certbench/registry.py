"""Name → plug-in registries, one class and one discovery rule for every kind of plug-in.

A registry belongs to a package (``methods``, ``certbench.models``, ``certbench.certificates``,
``certbench.attacks``, ``certbench.data``). Its plug-ins register themselves with a decorator when
their module is imported, and the registry imports every module of its package whose name does not
start with ``_`` on the first lookup (:mod:`pkgutil`), so a new file dropped into the folder is found
with no other edit, and importing a registry stays cheap for a job that never looks into it.
Modules of the package that hold shared code simply register nothing; ``_``-modules are never
imported by discovery. A plug-in module that fails to import is reported by name, never hidden.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that no module registered; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


class PluginImportError(ImportError):
    """A plug-in module of a registry's package that raised while it was imported."""


class Registry(Generic[T]):
    """The plug-ins of one kind, found in the modules of ``package``."""

    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self.package = package
        self._entries: dict[str, T] = {}

    def discover(self) -> None:
        """Import every not-yet-imported, non-``_`` module of the package (a listing of one folder)."""
        package = importlib.import_module(self.package)
        for info in pkgutil.iter_modules(package.__path__):
            module = f"{self.package}.{info.name}"
            if info.name.startswith("_") or module in sys.modules:
                continue
            try:
                importlib.import_module(module)
            except Exception as error:  # a broken plug-in is reported by name, never hidden
                raise PluginImportError(
                    f"{self.kind} module {module} failed to import: {type(error).__name__}: {error}"
                ) from error

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            if isinstance(obj, type):
                obj.name = name  # type: ignore[attr-defined]
            return obj

        return decorate

    def get(self, name: str) -> T:
        if name not in self._entries:
            self.discover()
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            self.discover()
        return name in self._entries
