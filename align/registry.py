"""Registries of the methods a config chooses by name (allocators, advantage estimators, loss aggregations).

    ALLOCATORS = Registry("allocator", package="align.sampling.allocators")

    @ALLOCATORS.register("uniform", "num_generations completions for every prompt")
    def uniform(rows, index, ctx): ...

    ALLOCATORS.get("uniform").fn          # the function; an unknown name is a one-line ConfigError
    ALLOCATORS.names()                    # what a config may say, for validation and --help

A function's keyword-only parameters are its hyper-parameters: :meth:`Registry.bind` fixes them once, from
the settings a config offers. With ``package``, every module of that package is imported on first use, so
adding a method is one module (plus its test) and no other edit.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from align.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable
    summary: str
    params: dict[str, Any]  # keyword-only parameter -> default
    info: dict[str, Any] = field(default_factory=dict)  # what the registry's users declare per entry


class Registry:
    """Name -> :class:`Entry` for one kind of method (``kind`` names the config key in error messages)."""

    def __init__(self, kind: str, package: str | None = None):
        self.kind = kind
        self.package = package
        self.entries: dict[str, Entry] = {}
        self._loaded = package is None

    def register(self, name: str, summary: str = "", **info) -> Callable[[Callable], Callable]:
        """Decorator: register ``fn`` under ``name``; ``info`` is kept on the entry (e.g. a flag the caller reads)."""

        def deco(fn: Callable) -> Callable:
            if name in self.entries and self.entries[name].fn is not fn:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            params = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                      if p.kind is inspect.Parameter.KEYWORD_ONLY}
            self.entries[name] = Entry(name, fn, summary, params, dict(info))
            return fn

        return deco

    def load(self) -> None:
        """Import every module of ``package`` once, so that their decorators have run."""
        if self._loaded:
            return
        self._loaded = True
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{self.package}.{module.name}")

    def names(self) -> tuple[str, ...]:
        """Every registered name, in order of registration."""
        self.load()
        return tuple(self.entries)

    def get(self, name: str) -> Entry:
        """The entry of ``name``; a ConfigError naming the known ones if there is none."""
        self.load()
        if name not in self.entries:
            raise ConfigError(f"{self.kind}: unknown {self.kind} {name!r} (known: {', '.join(self.entries)})")
        return self.entries[name]

    def bind(self, name: str, **available) -> Callable:
        """``name``'s function with its hyper-parameters fixed from ``available`` (the settings it does not take
        are ignored; the ones it takes and ``available`` lacks keep their defaults)."""
        entry = self.get(name)
        return functools.partial(entry.fn, **{k: v for k, v in available.items() if k in entry.params})
