"""Malformed updates for robustness checks (not attacks of the paper): every malicious client
sends the same hostile row.

* ``hostile_nan``, ``hostile_inf``, ``hostile_neg_inf``: all entries NaN, +Inf or -Inf;
* ``hostile_huge``: all entries 1e30 (finite, but its square overflows float32);
* ``hostile_zero``: an all-zero update;
* ``hostile_copy``: an exact copy of the first benign participant's update (of the first
  participant when no benign client takes part).
"""

from __future__ import annotations

import jax.numpy as jnp

from fedredefense_jax.attacks import register
from fedredefense_jax.attacks.base import Attack, AttackContext, AttackInput, no_state, replace_malicious

_CONSTANT = {"hostile_nan": jnp.nan, "hostile_inf": jnp.inf, "hostile_neg_inf": -jnp.inf,
             "hostile_huge": 1e30, "hostile_zero": 0.0}


def _constant_attack(name: str, value: float):
    def make(ctx: AttackContext) -> Attack:
        del ctx

        def apply(state, inp: AttackInput):
            return replace_malicious(inp, jnp.full(inp.updates.shape[1:], value, inp.updates.dtype)), state

        return Attack(name, no_state, apply)

    return make


for _name, _value in _CONSTANT.items():
    register(_name)(_constant_attack(_name, _value))


@register("hostile_copy")
def make_copy(ctx: AttackContext) -> Attack:
    del ctx

    def apply(state, inp: AttackInput):
        benign = inp.valid & ~inp.malicious
        src = jnp.where(benign.any(), jnp.argmax(benign), jnp.argmax(inp.valid))
        return replace_malicious(inp, inp.updates[src]), state

    return Attack("hostile_copy", no_state, apply)
