"""Adaptive scaling attacks against FedREDefense (the paper's Algorithm 3, Section 6.1).

A compromised client trains honestly on poisoned data (Label Flip or Targeted Label Flip,
:mod:`~fedredefense_jax.attacks.data_poisoning`) and then scales its update ``g_i`` by the
largest factor ``lambda_i`` that the defense does not flag, found by a binary search::

    lambda <- 1; delta <- delta_init
    while delta >= gamma_att:
        lambda <- lambda + delta
        if Reconstruction(lambda g_i, w^{t-1}, K_i^{t-1}) > gamma: lambda <- lambda - delta
        delta <- delta / 2

with ``delta_init = 2`` and ``gamma_att = 0.125`` (settings ``adaptive_delta_init``,
``adaptive_step_min``; so ``lambda`` lies in ``[1, 4.875]`` on a
grid of 0.125). The attacker knows FedREDefense's settings and the knowledge ``K_i^{t-1}`` the
server holds for it (the paper's threat model for this attack): the search asks the
defense's own reconstruction through ``AttackInput.probe``, for all malicious slots of the
round at once (one batched reconstruction per step of the search). If even ``lambda = 1``
is flagged the update is sent unscaled (the basic attack).

State: ``[p]`` float32, each client's last factor (0 before its first participation),
recorded every round as ``attack_scale``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from fedredefense_jax.attacks import register
from fedredefense_jax.attacks.base import Attack, AttackContext, AttackInput, replace_malicious
from fedredefense_jax.attacks.data_poisoning import make_label_flip, make_targeted_label_flip
from fedredefense_jax.settings import Settings, setting

DELTA_INIT = 2.0
STEP_MIN = 0.125


@dataclasses.dataclass(frozen=True)
class AdaptiveSettings(Settings):
    adaptive_delta_init: float = setting(DELTA_INIT, "Adaptive attacks (Algorithm 3): initial step delta_init "
                                         "of the scale search (the paper's 2).", above=0)
    adaptive_step_min: float = setting(STEP_MIN, "Adaptive attacks (Algorithm 3): the search stops once the step "
                                       "is below gamma_att (the paper's 0.125).", above=0)


def search_scale(probe, updates, slots: np.ndarray, delta_init: float = DELTA_INIT,
                 step_min: float = STEP_MIN) -> np.ndarray:
    """Algorithm 3 for every slot in ``slots`` at once: ``[S]`` float32 factors (1 elsewhere).

    ``probe(rows[S, P], slots[S]) -> {'flagged': [S] bool, ...}`` is the defense's decision;
    ``updates [S, P]`` the basic attack's updates ``g_i``.
    """
    slots = np.asarray(slots, bool)
    lam = np.ones(slots.shape, np.float32)
    delta = float(delta_init)
    while delta >= step_min and slots.any():
        trial = np.where(slots, lam + delta, lam).astype(np.float32)
        flagged = np.asarray(probe(jnp.asarray(trial)[:, None] * updates, slots)["flagged"], bool)
        lam = np.where(slots & ~flagged, trial, lam)
        delta /= 2
    return lam


def _adaptive(name: str, basic) -> Attack:
    def make(ctx: AttackContext) -> Attack:
        base = basic(ctx)
        delta_init, step_min = ctx.config.adaptive_delta_init, ctx.config.adaptive_step_min

        def init(num_clients, key):
            del key
            return jnp.zeros((num_clients,), jnp.float32)

        def apply(state, inp: AttackInput):
            if inp.probe is None:
                raise ValueError(f"{name} needs a defense that offers a probe (fedredefense)")
            slots = np.asarray(inp.malicious, bool) & np.asarray(inp.valid, bool)
            if not slots.any():
                return inp.updates, state
            lam = search_scale(inp.probe, inp.updates, slots, delta_init, step_min)
            ids = np.asarray(inp.client_ids)[slots]
            state = state.at[jnp.asarray(ids)].set(jnp.asarray(lam[slots]))
            return replace_malicious(inp, jnp.asarray(lam)[:, None] * inp.updates), state

        def record(state, ids):
            return {"scale": state[jnp.asarray(ids)]}

        return Attack(name, init, apply, poison=base.poison, asr=base.asr, record=record, needs_probe=True)

    return make


for _name, _basic in (("adaptive_label_flip", make_label_flip),
                      ("adaptive_targeted_label_flip", make_targeted_label_flip)):
    register(_name, settings=AdaptiveSettings)(_adaptive(_name, _basic))
