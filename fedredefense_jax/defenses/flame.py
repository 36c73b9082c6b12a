"""FLAME (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security
2022), a baseline of FedREDefense (Xie et al., ICML 2024), Section 2.2 and Appendix A.3.

One round, over the ``n`` candidate slots (valid, finite rows; padding and NaN/Inf rows are
ignored and get weight 0), local models ``W_i = w + g_i`` (``w`` the global model)::

    c_ij = 1 - cos(W_i, W_j)                               cosine distances  [n, n]
    labels = HDBSCAN(c, metric='precomputed', min_cluster_size = n//2 + 1,
                     min_samples = m, allow_single_cluster = True)
    A = members of the largest cluster (noise points, label -1, are excluded)
    e_i = ||W_i - w|| = ||g_i||,    S_t = median(e_1 .. e_n)         (all n candidates)
    g = 1/|A| sum_{i in A} g_i * min(1, S_t / e_i)  +  N(0, sigma^2 I),  sigma = lambda S_t

``lambda = 0.001``, FLAME's noise level factor for image classification (the paper's
datasets; FLAME uses 0.01 for word prediction), ``config['flame_lambda']`` overrides it.
``m = 1`` (single linkage on the distances themselves), ``config['flame_min_samples']``
overrides it (clamped to ``n``). The choice decides attacks that send one update from every
attacker: with ``m = 1`` the identical copies are admitted only through their distance to
the nearest benign model; with a large ``m`` their core distance stays 0 while the benign
core distances grow, so the copies outlast the benign models (Min-Sum at 30 clients: copies
dropped for ``m`` 1-4, admitted for 8 and 16; results/README.md, "FLAME's min_samples and
Table 8", where ``m = n//2 + 1`` matches the paper's Table 8 rates).
With ``min_cluster_size > n/2`` at most one cluster exists; ``allow_single_cluster`` lets
HDBSCAN return it (without it scikit-learn never selects the root cluster and would call
a single benign majority noise). When that single cluster is selected, scikit-learn labels
as noise the points that left it before it dissolved (a point is a member only if it stays
up to the cluster's largest lambda), so some benign models are dropped too: at least
``n//2 + 1`` models are admitted whenever a cluster is found. ``n = 1``: the lone candidate
is kept. When nothing is admitted the aggregate is zero (no noise): the global model does
not move.

HDBSCAN runs on the host (scikit-learn, float64); distances, clipping, averaging and noise
are jitted ``jnp``. Cosine distances are computed as ``||u_i - u_j||^2 / 2`` of unit
vectors (no ``1 - cos`` cancellation: the local models are dominated by ``w`` and their
cosines are all close to 1) and every norm is taken after scaling each row by its largest
entry, so a ``1e30`` row neither overflows nor poisons the others.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedredefense_jax.defenses import register
from fedredefense_jax.defenses.base import Defense, DefenseContext, DefenseInput, DefenseOutput, no_state
from fedredefense_jax.defenses.robust import (
    candidates,
    clip_rows,
    masked_mean,
    masked_median,
    pairwise_sq_dists,
    scaled_norms,
)
from fedredefense_jax.settings import Settings, setting

#: FLAME's noise level factor for image classification.
DEFAULT_LAMBDA = 0.001
#: HDBSCAN's min_samples (1: single linkage on the cosine distances).
DEFAULT_MIN_SAMPLES = 1


@dataclasses.dataclass(frozen=True)
class FlameSettings(Settings):
    flame_lambda: float = setting(DEFAULT_LAMBDA, "FLAME: noise level factor lambda (0.001 for image "
                                  "classification).", above=0)
    flame_min_samples: int = setting(
        DEFAULT_MIN_SAMPLES, "FLAME: HDBSCAN's min_samples (1 = single linkage; num_clients // 2 + 1 matches "
        "the paper's Table 8; large values let identical attacker updates outlast the benign ones).", low=1)


@jax.jit
def cosine_distances(global_params: jax.Array, updates: jax.Array, cand: jax.Array) -> jax.Array:
    """``[S, S]`` cosine distances ``1 - cos(W_i, W_j)`` of the local models
    ``W_i = w + g_i`` (``w``: ``[P]``, ``updates``: ``[S, P]``), in ``[0, 2]``.

    Each ``W_i`` is first divided by ``max(max|w|, max|g_i|)`` (so no entry exceeds 2), then
    normalised to a unit vector ``u_i``; ``1 - cos = ||u_i - u_j||^2 / 2``. Rows of
    non-candidates are zero vectors (their distances are meaningless; callers drop them).
    """
    x = jnp.where(cand[:, None], updates, 0.0)
    scale = jnp.maximum(jnp.max(jnp.abs(global_params)), jnp.max(jnp.abs(x), axis=1))
    r = lax.rsqrt(jnp.where(scale > 0, scale, 1.0))[:, None]  # see robust.scale_rows
    a = (global_params[None, :] * r) * r + (x * r) * r
    norm = jnp.sqrt(jnp.sum(jnp.square(a), axis=1))
    u = jnp.where((norm > 0)[:, None], a / jnp.where(norm > 0, norm, 1.0)[:, None], 0.0)
    u = jnp.where(cand[:, None], u, 0.0)
    return jnp.clip(pairwise_sq_dists(u) / 2, 0.0, 2.0)


def majority_cluster(dist: np.ndarray, min_samples: int = 1) -> np.ndarray:
    """``[n, n]`` precomputed distances -> ``[n]`` bool, members of the largest HDBSCAN
    cluster (``min_cluster_size = n//2 + 1``, ``min_samples`` clamped to ``n``,
    ``allow_single_cluster``). ``n = 0``: empty; ``n = 1``: ``[True]``."""
    from sklearn.cluster import HDBSCAN

    n = dist.shape[0]
    if n <= 1:
        return np.ones((n,), bool)
    d = np.asarray(dist, np.float64)
    d = np.clip((d + d.T) / 2, 0.0, None)
    np.fill_diagonal(d, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # sklearn's `copy` default change
        labels = HDBSCAN(min_cluster_size=n // 2 + 1, min_samples=min(min_samples, n), metric="precomputed",
                         allow_single_cluster=True).fit(d).labels_
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return np.zeros((n,), bool)
    return labels == np.bincount(clustered).argmax()


@jax.jit
def flame_aggregate(updates: jax.Array, cand: jax.Array, kept: jax.Array, key: jax.Array,
                    lam: jax.Array):
    """Clip, average, add noise (module docstring).

    Args: ``updates[S, P]``; ``cand[S]`` candidates (the median norm runs over them);
    ``kept[S]`` admitted slots (a subset of ``cand``); ``key`` PRNG key; ``lam`` lambda.
    Returns ``(aggregate[P], S_t, sigma)``; zero aggregate when nothing is admitted.
    """
    x = jnp.where(cand[:, None], updates, 0.0)
    m, s = scaled_norms(x)
    norms = jnp.minimum(m * s, jnp.finfo(x.dtype).max)  # a norm beyond float32 counts as max
    bound = masked_median(norms[:, None], cand)[0]
    mean = masked_mean(clip_rows(x, bound), kept)
    sigma = lam * bound
    noise = sigma * jax.random.normal(key, mean.shape, mean.dtype)
    agg = jnp.where(jnp.any(kept), mean + noise, jnp.zeros_like(mean))
    return agg, bound, sigma


@register("flame", settings=FlameSettings)
def make_flame(ctx: DefenseContext) -> Defense:
    """FLAME with ``lambda = flame_lambda`` (0.001) and HDBSCAN's ``min_samples =
    flame_min_samples`` (1). ``weights``: 1 for the admitted slots. ``info``: ``nonfinite``
    ``[S]``, ``clip_bound`` (``S_t``), ``noise_sigma``."""
    lam, min_samples = ctx.config.flame_lambda, ctx.config.flame_min_samples

    init = no_state

    def apply(state, inp: DefenseInput):
        valid = jnp.asarray(inp.valid, bool)
        updates = jnp.asarray(inp.updates)
        cand = candidates(updates, valid)
        cand_np = np.asarray(cand)
        idx = np.nonzero(cand_np)[0]
        kept = np.zeros(cand_np.shape, bool)
        if idx.size:
            dist = np.asarray(cosine_distances(jnp.asarray(inp.global_params), updates, cand))
            kept[idx] = majority_cluster(dist[np.ix_(idx, idx)], min_samples)
        agg, bound, sigma = flame_aggregate(updates, cand, jnp.asarray(kept), inp.key,
                                            jnp.float32(lam))
        out = DefenseOutput(
            aggregate=agg,
            flagged=jnp.zeros_like(valid),
            weights=jnp.asarray(kept, jnp.float32),
            info={"nonfinite": valid & ~cand, "clip_bound": bound, "noise_sigma": sigma},
        )
        return out, state

    return Defense("flame", init, apply)
