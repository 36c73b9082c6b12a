"""FLCert (Cao et al., "FLCert: Provably Secure Federated Learning against Poisoning
Attacks", IEEE TIFS 2022), the deterministic-grouping variant FLCert-D.

The ``p`` clients are split once into ``G`` disjoint groups (``G = 10`` in the paper's
comparison); each group trains its own global model ``w_g`` with a base FL rule, here the
coordinate-wise Median of the group's updates (Appendix A.3)::

    w_g <- w_g + Median{ g_i : i in group g, i participates, g_i finite }

A client trains from its own group's model. At prediction time the ``G`` models vote: the
label predicted by the most models wins (ties go to the smaller label); TACC and ASR of
FLCert are those of the vote. A malicious client can only corrupt the model of its own
group, so a bounded number of attackers flips a bounded number of votes.

Simulator hooks (see :class:`~fedredefense_jax.defenses.base.Defense`):
``client_models(state, global_params, ids) -> [S, P]`` gives each slot its group's model,
``client_groups(state, ids) -> [S]`` its group (attacks pool compromised updates within a
group, as FLCert's evaluation attacks each group) and ``ensemble(state) -> [G, P]`` the
voting models. The simulator's single global model is
kept at the mean of the group models (it is not used for prediction).

Groups: a random permutation of the client ids (from the defense's init key, so fixed by
the run's seed) cut into ``G`` near-equal blocks. FLCert-D groups clients by a hash of their
id; a random permutation is such a hash that also keeps the groups balanced (``p/G``
clients each; the attackers fall where the permutation puts them).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedredefense_jax.defenses import register
from fedredefense_jax.defenses.base import Defense, DefenseContext, DefenseInput, DefenseOutput
from fedredefense_jax.defenses.robust import candidates, masked_median
from fedredefense_jax.settings import ConfigError, Settings, setting

DEFAULT_GROUPS = 10


@dataclasses.dataclass(frozen=True)
class FLCertSettings(Settings):
    flcert_groups: int | None = setting(None, "FLCert: number of client groups, one Median-trained model each; "
                                        "unset = the paper's 10 (one per client below 10 clients).", low=1)

    def check(self, experiment) -> None:
        if self.flcert_groups is not None and self.flcert_groups > experiment.num_clients:
            raise ConfigError("flcert_groups", f"must be in [1, num_clients={experiment.num_clients}], got "
                              f"{self.flcert_groups} (defense flcert)")


class FLCertState(NamedTuple):
    """``models [G, P]``: the groups' global models; ``group [p]`` int32: each client's group."""

    models: jax.Array
    group: jax.Array


def assign_groups(key: jax.Array, num_clients: int, num_groups: int) -> jax.Array:
    """``[p]`` int32 group of each client: a random permutation of ``0..p-1`` (from ``key``)
    cut into ``num_groups`` blocks whose sizes differ by at most one."""
    if not 1 <= num_groups <= num_clients:
        raise ValueError(f"groups must be in [1, num_clients={num_clients}], got {num_groups}")
    perm = jax.random.permutation(key, num_clients)
    block = (jnp.arange(num_clients) * num_groups // num_clients).astype(jnp.int32)
    return jnp.zeros(num_clients, jnp.int32).at[perm].set(block)


@jax.jit
def group_medians(updates: jax.Array, cand: jax.Array, slot_group: jax.Array, num_groups_arr: jax.Array):
    """``[G, P]`` coordinate-wise median of each group's candidate slots (zero for a group
    without candidate) and ``[G]`` bool, whether the group had any.

    ``updates [S, P]``, ``cand [S]`` bool, ``slot_group [S]`` int32, ``num_groups_arr [G]``
    (only its length is used: ``jnp.arange(G)``)."""

    def one(g):
        mine = cand & (slot_group == g)
        return masked_median(updates, mine), jnp.any(mine)

    return jax.lax.map(one, num_groups_arr)


@register("flcert", settings=FLCertSettings)
def make_flcert(ctx: DefenseContext) -> Defense:
    """FLCert-D with ``flcert_groups`` groups (default 10, or one per client when there
    are fewer than 10 clients) of Median-trained models.

    ``weights``: 1 for every finite valid slot (the median uses them all); ``info``:
    ``group`` of each slot. Never flags (FLCert certifies, it does not expel).
    """
    num_groups = ctx.config.flcert_groups or min(DEFAULT_GROUPS, ctx.num_clients)
    if not 1 <= num_groups <= ctx.num_clients:
        raise ValueError(f"flcert groups must be in [1, num_clients={ctx.num_clients}], got {num_groups}")
    init_params = jnp.asarray(ctx.init_params, jnp.float32)

    def init(num_clients, key):
        models = jnp.tile(init_params[None], (num_groups, 1))
        return FLCertState(models, assign_groups(key, num_clients, num_groups))

    def client_models(state, global_params, ids):
        del global_params
        return state.models[state.group[jnp.asarray(ids)]]

    def client_groups(state, ids):
        return state.group[jnp.asarray(ids)]

    def ensemble(state):
        return state.models

    def apply(state, inp: DefenseInput):
        valid = jnp.asarray(inp.valid, bool)
        cand = candidates(inp.updates, valid)
        slot_group = state.group[jnp.asarray(inp.client_ids)]
        med, has = group_medians(inp.updates, cand, slot_group, jnp.arange(num_groups))
        models = state.models + jnp.where(has[:, None], med, 0.0)
        aggregate = jnp.mean(models, axis=0) - inp.global_params
        out = DefenseOutput(aggregate, jnp.zeros_like(valid), cand.astype(jnp.float32),
                            {"group": slot_group, "nonfinite": valid & ~cand})
        return out, FLCertState(models, state.group)

    return Defense("flcert", init, apply, client_models=client_models, client_groups=client_groups,
                   ensemble=ensemble)
