"""A name -> factory registry, shared by attacks and defenses."""

from __future__ import annotations

from typing import Callable


class Registry:
    """Maps names to factories; ``load_builtins`` imports the package's own entries lazily
    (on first lookup) so that registering modules may import the registry freely."""

    def __init__(self, kind: str, load_builtins: Callable[[], None]):
        self.kind = kind
        self._load_builtins = load_builtins
        self._factories: dict[str, Callable] = {}
        self._loaded = False

    def register(self, name: str):
        """Decorator registering ``factory`` under ``name`` (a name can be taken once)."""

        def wrap(factory):
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return wrap

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._load_builtins()

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._factories)

    def make(self, name: str, ctx):
        """Builds ``name`` from ``ctx``; ValueError listing the registered names if unknown."""
        self._ensure_loaded()
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._factories[name](ctx)
