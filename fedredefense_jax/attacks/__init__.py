"""Attack registry: name -> factory ``(AttackContext) -> Attack``.

An attack rewrites the rows of the ``[S, P]`` update matrix that belong to malicious
clients. It sees what the threat model grants: the genuine updates of the compromised
clients (honest local training on their own data), the global and initial models, and
the name of the server's aggregation rule. Register a new attack from outside the package::

    from fedredefense_jax import attacks

    @attacks.register("my_attack")
    def make_my_attack(ctx: attacks.AttackContext) -> attacks.Attack:
        def apply(state, inp):
            crafted = -inp.updates            # anything [S, P]
            return attacks.replace_malicious(inp, crafted), state
        return attacks.Attack("my_attack", lambda num_clients, key: (), apply)
"""

from __future__ import annotations

from typing import Callable

from fedredefense_jax.attacks.base import (  # noqa: F401  (re-exported)
    Attack,
    AttackContext,
    AttackInput,
    replace_malicious,
)

_REGISTRY: dict[str, Callable[[AttackContext], Attack]] = {}


def register(name: str):
    """Decorator registering ``factory(ctx) -> Attack`` under ``name``."""

    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"attack {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return wrap


def names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def make(name: str, ctx: AttackContext) -> Attack:
    """Builds the registered attack ``name``; ValueError naming the valid ones if unknown."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown attack {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](ctx)


def _load_builtins() -> None:
    from fedredefense_jax.attacks import handcrafted as _handcrafted  # noqa: F401
