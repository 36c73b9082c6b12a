"""FLTrust (Cao et al., "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021), a baseline of FedREDefense (Xie et al., ICML 2024), Section 2.2
and Appendix A.3.

The server holds a small clean *root dataset* and, every round, trains the current global
model ``w`` on it exactly as a client would (same local epochs, batch size, learning rate
and optimizer; ``training.make_client_update``), giving the server update ``g_0``. Over the
``n`` candidate slots (valid, finite rows; padding and NaN/Inf rows get weight 0)::

    TS_i = ReLU(cos(g_i, g_0))                                  trust score
    g    = sum_i TS_i * (||g_0|| / ||g_i||) g_i  /  sum_i TS_i   (zero when all TS_i = 0)

i.e. every update is rescaled to the server update's norm and the rescaled updates are
averaged with the trust scores as weights. A zero update has no direction and gets
``TS = 0``; a non-finite ``g_0`` (a diverged model) gives every slot ``TS = 0`` and a zero
aggregate. ``weights`` are the normalised scores ``TS_i / sum_j TS_j`` (0 = excluded), the
per-round detection of Appendix B.1 / Table 8; FLTrust expels no one.

Root dataset (``DefenseContext.server_data``, filled by ``experiment.build``): 500 samples (the
paper's Appendix A.3, to match the clients' local data size; the setting
``fltrust_root_size`` overrides it) drawn uniformly without replacement from the union of the clients' training
data, deterministic in the seed (``partition.server_sample``). As in FLTrust's default
setting, they are clean samples of the training distribution and stay in the clients'
datasets too. The server's training key is the round's defense key.

Norms and cosines are taken after dividing each row by its largest entry
(``robust.scale_rows``), so rows of ``1e30`` neither overflow nor produce NaN: a row enters
the aggregate only as its unit vector times ``||g_0||``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fedredefense_jax.defenses import register
from fedredefense_jax.defenses.base import Defense, DefenseContext, DefenseInput, DefenseOutput, no_state
from fedredefense_jax.defenses.robust import candidates, scale_rows
from fedredefense_jax.settings import Settings, setting

#: The paper's root dataset size (Appendix A.3).
DEFAULT_ROOT_SIZE = 500


@dataclasses.dataclass(frozen=True)
class FLTrustSettings(Settings):
    fltrust_root_size: int = setting(DEFAULT_ROOT_SIZE, "FLTrust: samples of the server's root dataset (the "
                                     "paper's 500).", low=1)


def unit_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x[S, P] -> (u[S, P], norm[S])``: unit rows ``x_i / ||x_i||`` (zero rows stay zero)
    and the norms ``||x_i||`` (``inf`` past the float32 range), computed as
    ``m_i * ||x_i / m_i||`` with ``m_i = max_k |x_ik|`` so that no square overflows."""
    m, xs = scale_rows(x)
    s = jnp.sqrt(jnp.sum(jnp.square(xs), axis=1))
    u = jnp.where((s > 0)[:, None], xs / jnp.where(s > 0, s, 1.0)[:, None], 0.0)
    return u, m * s


@jax.jit
def fltrust_rule(updates: jax.Array, valid: jax.Array, server_update: jax.Array):
    """FLTrust's aggregation (module docstring) given the server update ``g_0``.

    Args: ``updates[S, P]``, ``valid[S]`` bool, ``server_update[P]``.
    Returns ``(aggregate[P], weights[S], trust[S], cosine[S], server_norm)``: ``weights``
    the normalised trust scores, ``trust`` the raw ``TS_i`` (0 for non-candidates),
    ``cosine`` the cosine similarities (NaN for non-candidates), ``server_norm = ||g_0||``.
    """
    cand = candidates(updates, valid)
    x = jnp.where(cand[:, None], updates, 0.0)
    g0_ok = jnp.all(jnp.isfinite(server_update))
    g0 = jnp.where(g0_ok, server_update, 0.0)
    u, _ = unit_rows(x)
    u0, n0 = unit_rows(g0[None, :])
    u0, n0 = u0[0], n0[0]
    cos = jnp.clip(u @ u0, -1.0, 1.0)
    trust = jnp.where(cand, jnp.maximum(cos, 0.0), 0.0)
    total = jnp.sum(trust)
    pos = total > 0
    weights = jnp.where(pos, trust / jnp.where(pos, total, 1.0), 0.0)
    aggregate = jnp.where(pos, n0 * (weights @ u), jnp.zeros_like(g0))
    cosine = jnp.where(cand, cos, jnp.nan)
    return aggregate, weights, trust, cosine, jnp.where(g0_ok, n0, jnp.nan)


@register("fltrust", settings=FLTrustSettings)
def make_fltrust(ctx: DefenseContext) -> Defense:
    """FLTrust with the root dataset ``ctx.server_data`` and the clients' local training
    ``ctx.local_update`` (both filled by ``experiment.build``). ``info``: ``nonfinite`` ``[S]``,
    ``trust_score`` ``[S]`` (raw ``TS_i``), ``cosine`` ``[S]``, ``server_norm``."""
    if ctx.server_data is None or ctx.local_update is None:
        raise ValueError("fltrust needs DefenseContext.server_data (the root dataset) and "
                         "DefenseContext.local_update (the clients' local training); experiment.build fills them")
    root_x, root_y = ctx.server_data
    root_x = jnp.asarray(np.asarray(root_x))
    root_y = jnp.asarray(np.asarray(root_y), jnp.int32)
    count = int(root_y.shape[0])
    if count < 1 or root_x.shape[0] != count:
        raise ValueError(f"fltrust: the root dataset must hold >= 1 sample with one label each, got "
                         f"{root_x.shape[0]} samples and {count} labels")
    server_train = jax.jit(ctx.local_update)

    init = no_state

    def apply(state, inp: DefenseInput):
        valid = jnp.asarray(inp.valid, bool)
        updates = jnp.asarray(inp.updates)
        g0 = server_train(jnp.asarray(inp.global_params), root_x, root_y, jnp.int32(count), inp.key)
        agg, weights, trust, cosine, n0 = fltrust_rule(updates, valid, g0)
        out = DefenseOutput(
            aggregate=agg,
            flagged=jnp.zeros_like(valid),
            weights=weights,
            info={"nonfinite": valid & ~candidates(updates, valid), "trust_score": trust,
                  "cosine": cosine, "server_norm": n0},
        )
        return out, state

    return Defense("fltrust", init, apply)
