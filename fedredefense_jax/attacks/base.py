"""The attack protocol: ``init(num_clients, key) -> state``,
``apply(state, AttackInput) -> (updates[S, P], state)``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp


class AttackContext(NamedTuple):
    """What the attacker knows when the federation is built.

    Attributes:
      num_clients: ``p``; num_malicious: ``q`` (the last ``q`` client ids).
      init_params: flat ``[P]`` initial global model.
      aggregation: name of the server's defense / aggregation rule.
      config: attack settings from flags (e.g. ``scale``).
    """

    num_clients: int
    num_malicious: int
    init_params: jax.Array
    aggregation: str
    config: dict


class AttackInput(NamedTuple):
    """One round as the attacker sees it.

    Attributes:
      global_params: flat ``[P]`` current global model ``w^{t-1}``.
      updates: ``[S, P]`` genuine updates of every slot (rows of benign slots are not
        the attacker's to read; attacks use only ``updates[malicious]``).
      malicious: ``[S]`` bool, slots of compromised clients.
      valid: ``[S]`` bool, False for padding slots.
      client_ids: ``[S]`` int32.
      round: 1-based round; key: PRNG key.
    """

    global_params: jax.Array
    updates: jax.Array
    malicious: jax.Array
    valid: jax.Array
    client_ids: jax.Array
    round: int
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class Attack:
    name: str
    init: Callable[..., Any]
    apply: Callable[..., tuple]


def replace_malicious(inp: AttackInput, crafted: jax.Array) -> jax.Array:
    """Rows of ``crafted`` (``[S, P]`` or ``[P]``) for malicious slots, genuine rows elsewhere."""
    crafted = jnp.broadcast_to(crafted, inp.updates.shape)
    return jnp.where((inp.malicious & inp.valid)[:, None], crafted, inp.updates)
