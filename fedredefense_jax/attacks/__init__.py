"""Attack registry: name -> factory ``(AttackContext) -> Attack``.

An attack rewrites the rows of the ``[S, P]`` update matrix that belong to malicious
clients. It sees what the threat model grants: the genuine updates of the compromised
clients (honest local training on their own data), the global and initial models, and
the name of the server's aggregation rule. Register a new attack from outside the package,
with its typed settings (``--attack_config=my_factor=2`` sets them; an unknown name or a bad
value stops the run at start)::

    import dataclasses
    from fedredefense_jax import attacks
    from fedredefense_jax.settings import Settings, setting

    @dataclasses.dataclass(frozen=True)
    class MySettings(Settings):
        my_factor: float = setting(1.0, "Factor of the negated update.", above=0)

    @attacks.register("my_attack", settings=MySettings)
    def make_my_attack(ctx: attacks.AttackContext) -> attacks.Attack:
        def apply(state, inp):
            crafted = -ctx.config.my_factor * inp.updates     # anything [S, P]
            return attacks.replace_malicious(inp, crafted), state
        return attacks.Attack("my_attack", lambda num_clients, key: (), apply)
"""

from __future__ import annotations

from fedredefense_jax.attacks.base import (  # noqa: F401  (re-exported)
    AsrSpec,
    Attack,
    AttackContext,
    AttackInput,
    DataPoison,
    replace_malicious,
    trigger_mask,
)
from fedredefense_jax.registry import Registry


def _load_builtins() -> None:
    from fedredefense_jax.attacks import adaptive as _adaptive  # noqa: F401
    from fedredefense_jax.attacks import data_poisoning as _data_poisoning  # noqa: F401
    from fedredefense_jax.attacks import handcrafted as _handcrafted  # noqa: F401
    from fedredefense_jax.attacks import hostile as _hostile  # noqa: F401
    from fedredefense_jax.attacks import model_poisoning as _model_poisoning  # noqa: F401


_REGISTRY = Registry("attack", _load_builtins)
register = _REGISTRY.register
unregister = _REGISTRY.unregister
names = _REGISTRY.names
make = _REGISTRY.make
settings = _REGISTRY.settings
parse_settings = _REGISTRY.parse_settings
