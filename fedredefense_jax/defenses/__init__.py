"""Defense registry: name -> factory ``(DefenseContext) -> Defense``.

Register a new defense from anywhere (no edit of this package needed)::

    from fedredefense_jax import defenses

    @defenses.register("my_rule")
    def make_my_rule(ctx: defenses.DefenseContext) -> defenses.Defense:
        ...
"""

from __future__ import annotations

from typing import Callable

from fedredefense_jax.defenses.base import (  # noqa: F401  (re-exported)
    Defense,
    DefenseContext,
    DefenseInput,
    DefenseOutput,
    fedavg,
    nonfinite_rows,
)

_REGISTRY: dict[str, Callable[[DefenseContext], Defense]] = {}


def register(name: str):
    """Decorator registering ``factory(ctx) -> Defense`` under ``name``."""

    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"defense {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def make(name: str, ctx: DefenseContext) -> Defense:
    """Builds the registered defense ``name``; ValueError naming the valid ones if unknown."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown defense {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](ctx)


def _load_builtins() -> None:
    # Imported lazily so that the registry module has no import cycle with the rules.
    from fedredefense_jax.defenses import average as _average  # noqa: F401

    try:
        from fedredefense_jax.defenses import redefense as _redefense  # noqa: F401
    except ImportError as e:  # pragma: no cover - only while the module is absent
        if "redefense" not in str(e):
            raise
