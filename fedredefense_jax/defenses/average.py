"""FedAvg (McMahan et al., 2017) with equal client weights: ``g = mean_i g_i``.

Non-finite rows are not averaged (a NaN from one client would poison the model); they are
recorded (``info['nonfinite']``), but FedAvg expels no one.
"""

from __future__ import annotations

import jax.numpy as jnp

from fedredefense_jax.defenses import register
from fedredefense_jax.defenses.base import (
    Defense,
    DefenseContext,
    DefenseInput,
    DefenseOutput,
    fedavg,
    no_state,
    nonfinite_rows,
)


@register("fedavg")
def make_fedavg(ctx: DefenseContext) -> Defense:
    del ctx

    init = no_state

    def apply(state, inp: DefenseInput):
        bad = nonfinite_rows(inp.updates) & inp.valid
        weights = (inp.valid & ~bad).astype(jnp.float32)
        out = DefenseOutput(
            aggregate=fedavg(inp.updates, weights),
            flagged=jnp.zeros_like(inp.valid),
            weights=weights,
            info={"nonfinite": bad},
        )
        return out, state

    return Defense("fedavg", init, apply)
