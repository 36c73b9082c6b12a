"""Byzantine-robust aggregation rules compared in FedREDefense (Xie et al., ICML 2024),
Section 2.2 and Appendix A.3: Krum, Median, Trimmed Mean and Norm Bound.

* Krum (Blanchard et al., NeurIPS 2017), ``'krum'``;
* coordinate-wise Median and Trimmed Mean (Yin et al., ICML 2018), ``'median'`` and
  ``'trimmed_mean'``;
* Norm Bound (Sun et al., "Can you really backdoor federated learning?", 2019),
  ``'norm_bound'``.

All four act on the ``[S, P]`` update matrix of one round. A slot is a *candidate* when it
is valid (not padding) and its row is finite; padding slots and rows holding NaN/Inf are
ignored entirely (they count neither in ``p`` nor in any distance, median or mean). None
of these rules expels clients (``flagged`` is all False); ``weights`` tells which slots
entered the aggregate (Krum: 1 for the selected slot; the others: 1 for every candidate).

``q``: the paper gives Krum and Trimmed Mean the number ``q`` of malicious clients. With
partial participation the server is told the count scaled to the round's participants::

    q = round(num_malicious * n_valid / num_clients)      (halves rounded up)

with ``n_valid`` the number of valid slots (participants, non-finite rows included), see
:func:`scaled_num_malicious`. Each rule then clamps ``q`` so that it is defined for the
``p`` candidates (see the rule's docstring).

Every kernel is a jitted pure ``jnp`` function with static shapes; the number of
candidates is a traced value, so a round never recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from fedredefense_jax.defenses import register
from fedredefense_jax.defenses.base import (
    Defense,
    DefenseContext,
    DefenseInput,
    DefenseOutput,
    no_state,
    nonfinite_rows,
)
from fedredefense_jax.settings import Settings, setting

# --------------------------------------------------------------------------------------
# Shared pure helpers
# --------------------------------------------------------------------------------------


def candidates(updates: jax.Array, valid: jax.Array) -> jax.Array:
    """``[S]`` bool: valid slots whose row ``[P]`` is finite."""
    return valid & ~nonfinite_rows(updates)


def scaled_num_malicious(n_valid: jax.Array, num_clients: int, num_malicious: int) -> jax.Array:
    """``q = round(num_malicious * n_valid / num_clients)`` (int32, halves rounded up),
    computed exactly in integers: ``(2 q_tot n_valid + p_tot) // (2 p_tot)``."""
    n_valid = jnp.asarray(n_valid, jnp.int32)
    num_clients = max(int(num_clients), 1)
    return (2 * int(num_malicious) * n_valid + num_clients) // (2 * num_clients)


def sorted_candidates(updates: jax.Array, cand: jax.Array) -> jax.Array:
    """``[S, P]`` per-coordinate ascending sort of the candidate rows, non-candidate rows
    set to ``+inf`` first, so that rows ``0..p-1`` of the result hold the ``p`` candidate
    values of each coordinate."""
    x = jnp.where(cand[:, None], updates, jnp.inf)
    return jnp.sort(x, axis=0)


def masked_median(updates: jax.Array, cand: jax.Array) -> jax.Array:
    """Coordinate-wise median ``[P]`` of the candidate rows of ``updates[S, P]``.

    With the ``p`` candidate values of a coordinate sorted, ``v_(0) <= ... <= v_(p-1)``:
    ``v_((p-1)/2)`` for odd ``p``, ``(v_(p/2-1) + v_(p/2)) / 2`` for even ``p`` (as
    ``np.median``; the halves are added as ``a/2 + b/2`` so that no sum overflows). Zero
    when ``p = 0``.
    """
    s = sorted_candidates(updates, cand)
    p = jnp.sum(cand.astype(jnp.int32))
    lo = jnp.maximum((p - 1) // 2, 0)
    hi = jnp.maximum(p // 2, 0)
    a = lax.dynamic_index_in_dim(s, lo, axis=0, keepdims=False)
    b = lax.dynamic_index_in_dim(s, jnp.minimum(hi, s.shape[0] - 1), axis=0, keepdims=False)
    med = jnp.where(lo == hi, a, a / 2 + b / 2)
    return jnp.where(p > 0, med, jnp.zeros_like(med))


def trimmed_mean(updates: jax.Array, cand: jax.Array, q: jax.Array) -> jax.Array:
    """Coordinate-wise trimmed mean ``[P]`` of the candidate rows of ``updates[S, P]``.

    Per coordinate, drop the ``t`` largest and ``t`` smallest of the ``p`` candidate values
    and average the ``p - 2t`` others (each divided by ``p - 2t`` before the sum, so that
    huge values do not overflow)::

        TM_k = 1/(p - 2t) * sum_{j=t}^{p-t-1} v_(j),      t = clip(q, 0, floor((p-1)/2))

    (``t`` is clamped so that at least one value remains). Zero when ``p = 0``.
    """
    s = sorted_candidates(updates, cand)
    p = jnp.sum(cand.astype(jnp.int32))
    t = jnp.clip(jnp.asarray(q, jnp.int32), 0, jnp.maximum((p - 1) // 2, 0))
    idx = jnp.arange(s.shape[0])[:, None]
    keep = (idx >= t) & (idx < p - t)
    inv = 1.0 / jnp.maximum(p - 2 * t, 1).astype(s.dtype)
    return jnp.sum(jnp.where(keep, s * inv, 0.0), axis=0)  # zero when p = 0


def pairwise_sq_dists(x: jax.Array) -> jax.Array:
    """``[S, P] -> [S, S]`` squared Euclidean distances ``||x_i - x_j||^2``.

    Computed from the differences (one row at a time, ``lax.map``), not from the Gram
    matrix: no cancellation for close rows, and huge rows give ``+inf``, never NaN.
    """
    return lax.map(lambda r: jnp.sum(jnp.square(x - r), axis=1), x)


def scale_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x[S, P] -> (m[S], x / m[:, None])`` with ``m_i = max_k |x_ik|`` (zero rows stay zero).

    The division is done as two multiplications by ``rsqrt(m_i)``: XLA divides by
    multiplying with the reciprocal, and ``1 / m`` of an ``m`` near the float32 maximum is
    subnormal and flushed to zero, while ``rsqrt(m) >= 5e-20`` never is.
    """
    m = jnp.max(jnp.abs(x), axis=1)
    r = lax.rsqrt(jnp.where(m > 0, m, 1.0))[:, None]
    return m, jnp.where((m > 0)[:, None], (x * r) * r, 0.0)


def scaled_norms(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row norms of ``x[S, P]`` without overflow: ``(m, s)`` with ``m_i = max_k |x_ik|``
    and ``s_i = ||x_i / m_i||`` (``1 <= s_i <= sqrt(P)``; ``0`` for a zero row), so that
    ``||x_i|| = m_i s_i``. Squares of entries near ``1e30`` never appear."""
    m, xs = scale_rows(x)
    return m, jnp.sqrt(jnp.sum(jnp.square(xs), axis=1))


def clip_rows(x: jax.Array, bound: jax.Array) -> jax.Array:
    """``x_i * min(1, bound / ||x_i||)`` for each row of ``x[S, P]`` (``[S, P]``).

    Evaluated as ``(x_i / m_i) * min(m_i, bound / s_i)`` (see :func:`scaled_norms`) so that
    no intermediate overflows; rows already within the bound are returned unchanged.
    """
    m, xs = scale_rows(x)
    s = jnp.sqrt(jnp.sum(jnp.square(xs), axis=1))
    factor = jnp.where(s > 0, jnp.minimum(m, bound / jnp.where(s > 0, s, 1.0)), 0.0)
    within = m * s <= bound
    return jnp.where(within[:, None], x, xs * factor[:, None])


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean ``[P]`` of the rows of ``x[S, P]`` where ``mask``; zero when none. Each row is
    divided by the count before the sum, so rows near the float32 maximum do not overflow."""
    n = jnp.sum(mask.astype(jnp.int32))
    inv = 1.0 / jnp.maximum(n, 1).astype(x.dtype)
    return jnp.sum(jnp.where(mask[:, None], x * inv, 0.0), axis=0)


# --------------------------------------------------------------------------------------
# Krum
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(2, 3))
def krum(updates: jax.Array, valid: jax.Array, num_clients: int, num_malicious: int):
    """Krum: the candidate closest to its neighbours.

    With ``p`` candidates and ``q`` from :func:`scaled_num_malicious`::

        k         = clip(p - q - 2, 1, p - 1)       (at least one neighbour when p >= 2)
        score(i)  = sum of the k smallest ||g_i - g_j||^2 over candidates j != i
        aggregate = g_{i*},  i* = argmin_i score(i)  (first index on ties)

    Args: ``updates[S, P]``, ``valid[S]``; ``num_clients``, ``num_malicious`` static.
    Returns ``(aggregate[P], selected[S] bool, scores[S] (inf for non-candidates), q)``.
    A single candidate is selected (score 0); no candidate gives a zero aggregate.
    """
    cand = candidates(updates, valid)
    s = updates.shape[0]
    p = jnp.sum(cand.astype(jnp.int32))
    q = scaled_num_malicious(jnp.sum(valid.astype(jnp.int32)), num_clients, num_malicious)
    k = jnp.minimum(jnp.maximum(p - q - 2, 1), p - 1)
    x = jnp.where(cand[:, None], updates, 0.0)
    d = pairwise_sq_dists(x)
    pair = cand[:, None] & cand[None, :] & ~jnp.eye(s, dtype=bool)
    d = jnp.sort(jnp.where(pair, d, jnp.inf), axis=1)
    scores = jnp.sum(jnp.where(jnp.arange(s)[None, :] < k, d, 0.0), axis=1)
    scores = jnp.where(cand, scores, jnp.inf)
    # overflowing (inf) scores of candidates still rank before non-candidates
    rank = jnp.where(cand, jnp.minimum(scores, jnp.finfo(scores.dtype).max), jnp.inf)
    sel = jnp.argmin(rank)
    selected = (jnp.arange(s) == sel) & (p > 0)
    aggregate = jnp.where(p > 0, x[sel], jnp.zeros_like(x[0]))
    return aggregate, selected, scores, q


@register("krum")
def make_krum(ctx: DefenseContext) -> Defense:
    """Krum with ``q`` scaled to the participants (module docstring). ``info``:
    ``nonfinite`` ``[S]``, ``krum_score`` ``[S]`` (inf for non-candidates), ``q``."""
    num_clients, num_malicious = int(ctx.num_clients), int(ctx.num_malicious)

    def apply(state, inp: DefenseInput):
        valid = jnp.asarray(inp.valid, bool)
        agg, selected, scores, q = krum(inp.updates, valid, num_clients, num_malicious)
        out = DefenseOutput(
            aggregate=agg,
            flagged=jnp.zeros_like(valid),
            weights=selected.astype(jnp.float32),
            info={"nonfinite": nonfinite_rows(inp.updates) & valid, "krum_score": scores, "q": q},
        )
        return out, state

    return Defense("krum", no_state, apply)


# --------------------------------------------------------------------------------------
# Median and Trimmed Mean
# --------------------------------------------------------------------------------------


@jax.jit
def median_rule(updates: jax.Array, valid: jax.Array):
    """Coordinate-wise median of the candidates: ``(aggregate[P], candidates[S])``."""
    cand = candidates(updates, valid)
    return masked_median(updates, cand), cand


@functools.partial(jax.jit, static_argnums=(2, 3))
def trimmed_mean_rule(updates: jax.Array, valid: jax.Array, num_clients: int,
                      num_malicious: int):
    """Coordinate-wise trimmed mean of the candidates, trimming ``q`` (scaled,
    :func:`scaled_num_malicious`; clamped by :func:`trimmed_mean`) values on each side:
    ``(aggregate[P], candidates[S], q)``."""
    cand = candidates(updates, valid)
    q = scaled_num_malicious(jnp.sum(valid.astype(jnp.int32)), num_clients, num_malicious)
    return trimmed_mean(updates, cand, q), cand, q


@register("median")
def make_median(ctx: DefenseContext) -> Defense:
    """Coordinate-wise Median (Yin et al., 2018). ``weights``: 1 for every candidate."""
    del ctx

    def apply(state, inp: DefenseInput):
        valid = jnp.asarray(inp.valid, bool)
        agg, cand = median_rule(inp.updates, valid)
        out = DefenseOutput(agg, jnp.zeros_like(valid), cand.astype(jnp.float32),
                            {"nonfinite": valid & ~cand})
        return out, state

    return Defense("median", no_state, apply)


@register("trimmed_mean")
def make_trimmed_mean(ctx: DefenseContext) -> Defense:
    """Coordinate-wise Trimmed Mean (Yin et al., 2018) with ``q`` scaled to the
    participants. ``weights``: 1 for every candidate. ``info['q']``: the unclamped ``q``."""
    num_clients, num_malicious = int(ctx.num_clients), int(ctx.num_malicious)

    def apply(state, inp: DefenseInput):
        valid = jnp.asarray(inp.valid, bool)
        agg, cand, q = trimmed_mean_rule(inp.updates, valid, num_clients, num_malicious)
        out = DefenseOutput(agg, jnp.zeros_like(valid), cand.astype(jnp.float32),
                            {"nonfinite": valid & ~cand, "q": q})
        return out, state

    return Defense("trimmed_mean", no_state, apply)


# --------------------------------------------------------------------------------------
# Norm Bound
# --------------------------------------------------------------------------------------


@jax.jit
def norm_bound_rule(updates: jax.Array, valid: jax.Array, benign: jax.Array,
                    threshold: Optional[jax.Array] = None):
    """Norm Bound: clip every candidate to ``M``, then average::

        g = 1/p sum_i g_i * min(1, M / ||g_i||)

    ``M = threshold`` when given; otherwise, as Appendix A.3 of the paper, the mean norm
    of the *benign* candidates of the round (``benign[S]`` marks them), and the median norm
    of all candidates when no benign candidate participates.

    Returns ``(aggregate[P], candidates[S], M)``.
    """
    cand = candidates(updates, valid)
    m, s = scaled_norms(jnp.where(cand[:, None], updates, 0.0))
    norms = m * s
    if threshold is None:
        ben = cand & benign
        nb = jnp.sum(ben.astype(jnp.int32))
        mean_benign = jnp.sum(jnp.where(ben, norms, 0.0)) / jnp.maximum(nb, 1)
        fallback = masked_median(norms[:, None], cand)[0]
        threshold = jnp.where(nb > 0, mean_benign, fallback)
    threshold = jnp.asarray(threshold, updates.dtype)
    clipped = clip_rows(jnp.where(cand[:, None], updates, 0.0), threshold)
    return masked_mean(clipped, cand), cand, threshold


@dataclasses.dataclass(frozen=True)
class NormBoundSettings(Settings):
    norm_threshold: float | None = setting(None, "Norm Bound: fixed clipping norm M; unset = the mean norm of "
                                           "the round's benign updates (Appendix A.3).", above=0)


@register("norm_bound", settings=NormBoundSettings)
def make_norm_bound(ctx: DefenseContext) -> Defense:
    """Norm Bound (Sun et al., 2019) with the threshold of the paper's Appendix A.3: the
    average norm of the round's benign updates. The benign slots are known to the
    simulation only (an oracle, as in the paper's experiments): the malicious clients are
    the last ``num_malicious`` ids, so slot ``i`` is benign when
    ``client_ids[i] < num_clients - num_malicious``. The setting ``norm_threshold`` fixes
    ``M`` instead. ``info``: ``nonfinite`` ``[S]``, ``threshold``."""
    first_malicious = int(ctx.num_clients) - int(ctx.num_malicious)
    fixed = ctx.config.norm_threshold

    def apply(state, inp: DefenseInput):
        valid = jnp.asarray(inp.valid, bool)
        benign = jnp.asarray(inp.client_ids) < first_malicious
        thr = None if fixed is None else jnp.float32(fixed)
        agg, cand, thr = norm_bound_rule(inp.updates, valid, benign, thr)
        out = DefenseOutput(agg, jnp.zeros_like(valid), cand.astype(jnp.float32),
                            {"nonfinite": valid & ~cand, "threshold": thr})
        return out, state

    return Defense("norm_bound", no_state, apply)
