"""A name -> factory registry, shared by attacks and defenses.

Each entry declares its settings class (a :class:`~fedredefense_jax.settings.Settings`
dataclass; :class:`~fedredefense_jax.settings.NoSettings` when it takes none). ``make``
hands the factory a context whose ``config`` is an instance of it, parsed from the given
``{name: value}`` mapping, so that an unknown or bad setting stops the build in one line.
"""

from __future__ import annotations

from typing import Callable

from fedredefense_jax.settings import NoSettings


class Registry:
    """Maps names to ``(factory, settings class)``; ``load_builtins`` imports the package's
    own entries lazily (on first lookup) so that registering modules may import the
    registry freely."""

    def __init__(self, kind: str, load_builtins: Callable[[], None]):
        self.kind = kind
        self._load_builtins = load_builtins
        self._factories: dict[str, Callable] = {}
        self._settings: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str, settings: type = NoSettings):
        """Decorator registering ``factory`` under ``name`` (a name can be taken once) with
        its ``settings`` class."""

        def wrap(factory):
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            self._settings[name] = settings
            return factory

        return wrap

    def unregister(self, name: str) -> None:
        """Removes ``name`` (KeyError when it is not registered), e.g. an entry registered
        for a test or a notebook cell run again."""
        del self._factories[name], self._settings[name]

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._loaded = True
            self._load_builtins()

    def names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._factories)

    def _check_name(self, name: str) -> None:
        self._ensure_loaded()
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")

    def settings(self, name: str) -> type:
        """The settings class of ``name``; ValueError listing the registered names if unknown."""
        self._check_name(name)
        return self._settings[name]

    def parse_settings(self, name: str, given, dataset: str | None = None):
        """``name``'s settings from ``given`` (a mapping, None or already an instance)."""
        return self.settings(name).parse(given, owner=f"{self.kind} {name}", dataset=dataset)

    def make(self, name: str, ctx):
        """Builds ``name`` from ``ctx`` (its ``config`` parsed into the settings class);
        ValueError listing the registered names if unknown, ConfigError for bad settings."""
        self._check_name(name)
        if ctx is not None:
            ctx = ctx._replace(config=self.parse_settings(name, ctx.config, getattr(ctx, "dataset", None)))
        return self._factories[name](ctx)
