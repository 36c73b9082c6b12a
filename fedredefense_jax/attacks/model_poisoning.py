"""Untargeted model-poisoning attacks of FedREDefense (Xie et al., ICML 2024), Section 2.1 and
Appendix A.2: LIE, Min-Max, Min-Sum and Fang, as the paper's authors ran them.

Knowledge (partial, as in the paper's threat model): an attack reads only the *genuine*
updates of the compromised clients that take part in the round, i.e. the rows ``g_i`` of
``updates[S, P]`` whose slot is malicious and valid. Benign rows and padding slots are
masked out of every statistic with ``jnp.where`` (so not even a NaN in a benign row can
leak into the crafted update), and only malicious valid rows are rewritten. Updates are
model deltas ``w_local - w_start``. Notation: ``c`` = number of compromised participants
pooled together, ``p`` = number of participants they are pooled with, ``d = P``.

Pooling. Compromised participants pool their genuine updates with those that trained from
the same model: with one global model, all of the round's compromised participants; under
FLCert, whose clients train their group's model, the compromised participants of each group
(``AttackInput.groups``), as FLCert's own evaluation attacks each group (``p`` and ``c`` are
then counted within the group).

Shared statistics (over the ``c`` pooled genuine updates): ``mu = mean_i g_i`` and the
per-coordinate standard deviation ``sigma``. Min-Max, Min-Sum and Fang use the sample
standard deviation (``ddof = 1``, PyTorch's ``torch.std`` in the authors' code); LIE, which
the authors' code does not contain, keeps the population one (``ddof = 0``). Statistics are
computed in float32 and cast back to the updates' dtype. A round without a compromised
participant returns the updates unchanged.

A lone compromised participant (``c = 1``: no standard deviation to estimate). The authors'
code sends a zero update then (``mal_update = model_re - model_re`` in its Min-Max, Min-Sum,
Fang and Krum attacks), and so does every attack here by default (``lone_attacker='zero'``);
``lone_attacker='genuine'`` applies the formulas to the one update instead (``sigma = 0``:
LIE, Min-Max, Min-Sum and Fang's Trimmed-Mean attack then send the genuine update). With
partial participation this case is common (participation 0.1 at 100 / 28: about one round
in eight has exactly one compromised participant). Each round's record marks the
participants that sent the zero update (``attack_lone``).

* ``lie`` (Baruch et al., NeurIPS 2019, "A little is enough"): every malicious client sends
  ``mu - z_max * sigma`` with Appendix A.2's ``z_max = Phi^{-1}((p - q - s) / (p - q))``,
  ``s = floor(p/2 + 1) - q`` (``q = c``; the largest ``z`` with ``Phi(z) < r`` is
  ``Phi^{-1}(r)``, the supremum; ``jax.scipy.stats.norm.ppf``). Baruch et al.'s own ratio is
  ``(p - s) / p`` (``Phi^{-1}(77/100) = 0.74`` at ``p = 100, q = 28``, where Appendix A.2's
  gives 0.47). Degenerate rounds: the ratio ``r`` is clipped to ``[0, 1]`` (``r > 1`` when
  malicious clients are a majority, ``s < 0``; ``r = 0`` when ``p <= 2``), ``r := 1`` when
  every participant is malicious (``p = q``), and ``z_max`` is clipped to ``[-z_cap, z_cap]``
  (``lie_z_cap``, default 3) so that ``Phi^{-1}``'s infinities never reach the
  update. ``lie_z`` fixes ``z`` instead of the formula (used as given).

* ``min_max`` / ``min_sum`` (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the
  Byzantine", AGR-agnostic attacks, "std" perturbation): every malicious client sends
  ``g_m = mu - gamma * sigma`` with the largest ``gamma`` found by the paper's binary search
  (``gamma_init = 30``, ``tau = 1e-5``, the authors' ``threshold`` and ``threshold_diff``;
  settings ``gamma_init``, ``gamma_tau``) such that, over the pooled updates ``g_i``
  with ``r_i = sum_j ||g_i - g_j||^2``,

      Min-Max:  max_i ||g_m - g_i||^2    <= max_{i,j} ||g_i - g_j||^2
      Min-Sum:  sum_i ||g_m - g_i||^2    <= min_i r_i         (``min_sum_bound='min'``)
                                         or max_i r_i         (``min_sum_bound='max'``)

  Min-Sum's bound is the minimum in the authors' code and in Shejwalkar and Houmansadr's
  released code (the default); ``'max'`` is a looser reading of the paper's equation.
  Closed form of Min-Sum: the cross term vanishes around the mean, so
  ``sum_i ||g_m - g_i||^2 = sum_i ||g_i - mu||^2 + c gamma^2 ||sigma||^2`` and
  ``r_i = c ||g_i - mu||^2 + sum_j ||g_j - mu||^2``; with ``sigma_0`` the population std
  (``sum_j ||g_j - mu||^2 = c ||sigma_0||^2``) the bound ``R = min_i r_i`` (or ``max_i``)
  gives ``gamma^2 <= (R / c - ||sigma_0||^2) / ||sigma||^2 = ((c - 1) / c) min_i ||g_i - mu||^2
  / ||sigma_0||^2`` (``max_i`` for the other bound), i.e.
  ``gamma^2 <= ((c - 1) / c) (2 min_i r_i / mean_i r_i - 1)``.
  Search: ``gamma = gamma_init, step = gamma_init, succ = 0``; while ``step > tau``: if
  ``gamma`` satisfies the constraint, ``succ = gamma, gamma += step/2``, else
  ``gamma -= step/2``; ``step /= 2`` (the paper's ``|succ - gamma| > tau``: ``gamma - succ =
  step`` is invariant). Output ``gamma = succ``. Both constraints are convex in ``gamma``
  and hold at ``gamma = 0``, so the feasible set is an interval ``[a, b]`` with
  ``a <= 0 <= b`` and ``succ <= b < succ + 2 tau``, unless ``b`` exceeds the search range
  (``gamma`` then stops just below ``2 gamma_init``). ``jax.lax.while_loop``, at most 100
  iterations.

* ``fang`` (Fang et al., USENIX Security 2020, partial knowledge). ``s = sign(mu)``
  (``s_j = +1`` when ``mu_j > 0``, ``-1`` otherwise: the "changing direction" estimated from
  the compromised updates' mean).

  - Against every rule but Krum, the partial-knowledge Trimmed-Mean attack (the one the
    authors' code runs): each malicious client draws its own value per coordinate,
    uniformly (round key ``AttackInput.key``), from

        s_j < 0:  [mu_j + 3 sigma_j, mu_j + 4 sigma_j]
        s_j > 0:  [mu_j - 4 sigma_j, mu_j - 3 sigma_j]

    i.e. 3 to 4 standard deviations from the compromised mean, against the direction.
    (Fang et al.'s full-knowledge variant needs the benign updates' extremes, which this
    threat model does not grant; it is not offered.)
  - Against ``'krum'`` (``AttackContext.aggregation``), the Krum attack: every malicious
    client sends the same ``-lambda * s``. The upper bound is the paper's Eq. (3) evaluated
    on what the attacker knows (the compromised genuine updates stand in for the benign
    ones, ``m := p``, ``c := q``, ``D`` Euclidean distance)::

        lambda_ub = 1 / ((p - 2c - 1) sqrt(d)) * min_i sum_{l in Gamma_i} D(g_l, g_i)
                    + 1 / sqrt(d) * max_i D(g_i, 0)

    with ``Gamma_i`` the ``min(p - c - 2, c - 1)`` compromised updates closest to ``g_i``;
    the first term is dropped when ``p - 2c - 1 <= 0`` or ``Gamma_i`` is empty. Then
    ``lambda`` is halved until Krum, run over the ``c`` crafted copies plus the ``c``
    compromised genuine updates (the paper's partial-knowledge simulation), selects a
    crafted copy, or until ``lambda < tau_fang = 1e-5`` (setting ``fang_tau``). The
    simulated Krum scores each of the ``2c`` updates by the sum of its ``k`` smallest
    squared distances to the others, with the server's neighbour count
    ``k = clip(p - q_s - 2, 1, p - 1)`` (``q_s`` the malicious count the server's Krum is
    told, ``round(num_malicious * p / num_clients)``, as in ``defenses/robust.py``), clipped
    to the ``2c - 1`` available neighbours. A crafted copy is selected when its score is
    ``<=`` the smallest genuine score.

Each round's record holds the coefficient used, at the malicious participants (null at the
benign ones and at lone attackers): ``attack_z`` (LIE), ``attack_gamma`` (Min-Max /
Min-Sum), ``attack_lambda`` (Fang against Krum; the Trimmed-Mean attack has none), and
``attack_lone`` (bool) for every statistics attack.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedredefense_jax.attacks import register
from fedredefense_jax.attacks.base import Attack, AttackContext, AttackInput
from fedredefense_jax.settings import Settings, setting

LIE_Z_CAP = 3.0
GAMMA_INIT = 30.0
TAU = 1e-5
FANG_TAU = 1e-5
FANG_SIGMAS = (3.0, 4.0)  # Fang's Trimmed-Mean attack: values 3 to 4 standard deviations off the mean
MIN_SUM_BOUNDS = ("min", "max")
LONE_ATTACKER = ("zero", "genuine")
_MAX_ITER = 100      # Min-Max / Min-Sum bisection (needs ~log2(gamma_init / tau) = 22)
_FANG_MAX_ITER = 200  # Krum-attack halvings (lambda_ub up to ~1e55 still reaches 1e-5)


# --------------------------------------------------------------------------------------
# Statistics over the compromised genuine updates
# --------------------------------------------------------------------------------------


def _compromised(updates, malicious, valid):
    """``(x[S, P] float32 with non-compromised rows zeroed, mask[S], c)``."""
    m = jnp.asarray(malicious, bool) & jnp.asarray(valid, bool)
    x = jnp.where(m[:, None], jnp.asarray(updates, jnp.float32), 0.0)
    return x, m, jnp.sum(m.astype(jnp.int32))


def _mean_std(x, m, c, ddof: int = 0):
    """Per-coordinate mean and standard deviation (``ddof`` 0 or 1) of the masked rows; the
    std is 0 when ``c <= ddof`` and both are 0 when ``c = 0``."""
    mu = jnp.sum(x, axis=0) / jnp.maximum(c, 1).astype(jnp.float32)
    dev = jnp.where(m[:, None], x - mu, 0.0)
    sigma = jnp.sqrt(jnp.sum(jnp.square(dev), axis=0) / jnp.maximum(c - ddof, 1).astype(jnp.float32))
    return mu, sigma


def _pairwise_sq(x):
    """``[S, P] -> [S, S]`` squared distances, one row at a time (no Gram cancellation)."""
    return lax.map(lambda r: jnp.sum(jnp.square(x - r), axis=1), x)


def _sq_dist_to_rows(v, x):
    """``||v - x_i||^2`` for every row of ``x[S, P]`` (``[S]``)."""
    return jnp.sum(jnp.square(x - v[None, :]), axis=1)


# --------------------------------------------------------------------------------------
# LIE
# --------------------------------------------------------------------------------------


def lie_z_max(p, q, z_cap: float = LIE_Z_CAP):
    """``z_max = Phi^{-1}((p - q - s) / (p - q))``, ``s = floor(p/2 + 1) - q`` (module
    docstring for the clipping of degenerate rounds). ``p``, ``q`` may be traced."""
    p = jnp.asarray(p, jnp.float32)
    q = jnp.asarray(q, jnp.float32)
    s = jnp.floor(p / 2.0 + 1.0) - q
    denom = p - q
    r = jnp.where(denom > 0, (p - q - s) / jnp.where(denom > 0, denom, 1.0), 1.0)
    r = jnp.clip(r, 0.0, 1.0)
    z = jax.scipy.stats.norm.ppf(r)
    return jnp.clip(z, -z_cap, z_cap)


@functools.partial(jax.jit, static_argnames=("z_cap", "z_fixed"))
def lie_craft(updates, malicious, valid, z_cap: float = LIE_Z_CAP, z_fixed: float | None = None):
    """``(crafted[P] = mu - z * sigma, z)`` from the compromised rows (population std); ``z =
    z_max`` of the round (``p`` = valid slots), or ``z_fixed`` when given."""
    x, m, c = _compromised(updates, malicious, valid)
    p = jnp.sum(jnp.asarray(valid, bool).astype(jnp.int32))
    mu, sigma = _mean_std(x, m, c, ddof=0)
    z = lie_z_max(p, c, z_cap) if z_fixed is None else jnp.float32(z_fixed)
    return mu - z * sigma, z


# --------------------------------------------------------------------------------------
# Min-Max / Min-Sum
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("rule", "gamma_init", "tau", "max_iter", "bound"))
def min_max_sum_craft(updates, malicious, valid, rule: str = "min_max", gamma_init: float = GAMMA_INIT,
                      tau: float = TAU, max_iter: int = _MAX_ITER, bound: str = "min"):
    """``(crafted[P] = mu - gamma * sigma, gamma)`` for ``rule`` in ``{'min_max', 'min_sum'}``
    (module docstring: constraint, Min-Sum's ``bound`` and binary search)."""
    if rule not in ("min_max", "min_sum"):
        raise ValueError(f"rule must be 'min_max' or 'min_sum', got {rule!r}")
    if bound not in MIN_SUM_BOUNDS:
        raise ValueError(f"min_sum_bound must be one of {', '.join(MIN_SUM_BOUNDS)}, got {bound!r}")
    x, m, c = _compromised(updates, malicious, valid)
    mu, sigma = _mean_std(x, m, c, ddof=1)
    pair = m[:, None] & m[None, :]
    d2 = jnp.where(pair, _pairwise_sq(x), 0.0)
    if rule == "min_max":
        threshold = jnp.max(d2)

        def feasible(gamma):
            dist = _sq_dist_to_rows(mu - gamma * sigma, x)
            return jnp.max(jnp.where(m, dist, 0.0)) <= threshold
    else:
        r = jnp.sum(d2, axis=1)
        threshold = jnp.min(jnp.where(m, r, jnp.inf)) if bound == "min" else jnp.max(r)

        def feasible(gamma):
            dist = _sq_dist_to_rows(mu - gamma * sigma, x)
            return jnp.sum(jnp.where(m, dist, 0.0)) <= threshold

    def cond(carry):
        _, step, _, it = carry
        return (step > tau) & (it < max_iter)

    def body(carry):
        gamma, step, succ, it = carry
        ok = feasible(gamma)
        succ = jnp.where(ok, gamma, succ)
        gamma = jnp.where(ok, gamma + step / 2, gamma - step / 2)
        return gamma, step / 2, succ, it + 1

    g0 = jnp.float32(gamma_init)
    _, _, succ, _ = lax.while_loop(cond, body, (g0, g0, jnp.float32(0.0), jnp.int32(0)))
    return mu - succ * sigma, succ


# --------------------------------------------------------------------------------------
# Fang
# --------------------------------------------------------------------------------------


def _server_krum_neighbours(p, num_clients: int, num_malicious: int):
    """Krum's neighbour count as ``defenses/robust.py`` computes it for ``p`` valid slots."""
    n = max(int(num_clients), 1)
    q_s = (2 * int(num_malicious) * p + n) // (2 * n)
    return jnp.minimum(jnp.maximum(p - q_s - 2, 1), jnp.maximum(p - 1, 1))


def fang_lambda_upper_bound(x, m, c, p):
    """Fang's Eq. (3) on the compromised rows (module docstring). ``x`` zero outside ``m``."""
    s_rows = x.shape[0]
    d = x.shape[1]
    pair = m[:, None] & m[None, :] & ~jnp.eye(s_rows, dtype=bool)
    dist = jnp.sqrt(jnp.where(pair, _pairwise_sq(x), jnp.inf))
    dist = jnp.sort(dist, axis=1)
    n_nb = jnp.minimum(p - c - 2, c - 1)
    nb_sum = jnp.sum(jnp.where(jnp.arange(s_rows)[None, :] < n_nb, dist, 0.0), axis=1)
    nb_min = jnp.min(jnp.where(m, nb_sum, jnp.inf))
    denom = (p - 2 * c - 1).astype(jnp.float32)
    use_first = (denom > 0) & (n_nb >= 1) & (c >= 1)
    first = jnp.where(use_first, nb_min / (jnp.where(use_first, denom, 1.0) * math.sqrt(d)), 0.0)
    norms = jnp.sqrt(jnp.sum(jnp.square(x), axis=1))
    second = jnp.max(jnp.where(m, norms, 0.0)) / math.sqrt(d)
    return first + second


@functools.partial(jax.jit, static_argnames=("num_clients", "num_malicious", "tau", "max_iter"))
def fang_krum_craft(updates, malicious, valid, num_clients: int, num_malicious: int,
                    tau: float = FANG_TAU, max_iter: int = _FANG_MAX_ITER):
    """Fang's Krum attack, partial knowledge: ``(crafted[P] = -lambda * s, lambda,
    selected, lambda_ub)`` (module docstring)."""
    x, m, c = _compromised(updates, malicious, valid)
    s_rows = x.shape[0]
    p = jnp.sum(jnp.asarray(valid, bool).astype(jnp.int32))
    mu, _ = _mean_std(x, m, c)
    direction = jnp.where(mu > 0, 1.0, -1.0).astype(jnp.float32)
    lam_ub = fang_lambda_upper_bound(x, m, c, p)

    k = jnp.minimum(_server_krum_neighbours(p, num_clients, num_malicious), jnp.maximum(2 * c - 1, 1))
    d_gg = _pairwise_sq(x)
    # simulated set: rows [0, S) the crafted copies, rows [S, 2S) the genuine updates
    cand = jnp.concatenate([m, m])
    pair = cand[:, None] & cand[None, :] & ~jnp.eye(2 * s_rows, dtype=bool)
    col = jnp.arange(2 * s_rows)[None, :]

    def crafted_selected(lam):
        d_cg = _sq_dist_to_rows(-lam * direction, x)                       # [S]
        top = jnp.concatenate([jnp.zeros((s_rows, s_rows)), jnp.broadcast_to(d_cg[None, :], (s_rows, s_rows))], 1)
        bottom = jnp.concatenate([jnp.broadcast_to(d_cg[:, None], (s_rows, s_rows)), d_gg], 1)
        dist = jnp.sort(jnp.where(pair, jnp.concatenate([top, bottom], 0), jnp.inf), axis=1)
        scores = jnp.sum(jnp.where(col < k, dist, 0.0), axis=1)
        crafted_best = jnp.min(jnp.where(m, scores[:s_rows], jnp.inf))
        genuine_best = jnp.min(jnp.where(m, scores[s_rows:], jnp.inf))
        return crafted_best <= genuine_best

    def cond(carry):
        lam, sel, it = carry
        return (~sel) & (lam >= tau) & (it < max_iter)

    def body(carry):
        lam, _, it = carry
        sel = crafted_selected(lam)
        return jnp.where(sel, lam, lam / 2), sel, it + 1

    lam, sel, _ = lax.while_loop(cond, body, (lam_ub, jnp.bool_(False), jnp.int32(0)))
    return -lam * direction, lam, sel, lam_ub


def fang_trim_bounds(updates, malicious, valid):
    """``(lo[P], hi[P], direction[P])``: the partial-knowledge Trimmed-Mean attack's sampling
    interval, ``mu + [3, 4] sigma`` where ``mu <= 0`` and ``mu - [4, 3] sigma`` elsewhere
    (sample std of the compromised rows)."""
    x, m, c = _compromised(updates, malicious, valid)
    mu, sigma = _mean_std(x, m, c, ddof=1)
    direction = jnp.where(mu > 0, 1.0, -1.0)
    near, far = FANG_SIGMAS
    lo = jnp.where(direction < 0, mu + near * sigma, mu - far * sigma)
    hi = jnp.where(direction < 0, mu + far * sigma, mu - near * sigma)
    return lo, hi, direction


@jax.jit
def fang_trim_craft(updates, malicious, valid, key):
    """Fang's partial-knowledge Trimmed-Mean attack: ``crafted[S, P]``, one uniform draw per
    slot and coordinate in ``[lo, hi]`` (:func:`fang_trim_bounds`)."""
    lo, hi, _ = fang_trim_bounds(updates, malicious, valid)
    u = jax.random.uniform(key, updates.shape, jnp.float32)
    return lo[None, :] + u * (hi - lo)[None, :]


# --------------------------------------------------------------------------------------
# Pooling, lone attackers and the round record
# --------------------------------------------------------------------------------------


class CoefState(NamedTuple):
    """Per client (``[num_clients]``), what it did at its last malicious participation."""

    coef: jax.Array  # float32: the attack's coefficient (z, gamma, lambda); NaN = none
    lone: jax.Array  # bool: it was the only compromised participant of its pool and sent zero


def pooled_craft(inp: AttackInput, craft: Callable, lone_attacker: str = "zero"):
    """Crafts the malicious valid rows of ``inp.updates``, pool by pool (module docstring).

    Args:
      inp: the round; ``inp.groups`` (``[S]`` int32 or None = one pool) says which slots
        trained from the same model.
      craft: ``craft(malicious[S] bool, valid[S] bool) -> (crafted [P] or [S, P], coef)``,
        the attack for one pool (``coef`` a scalar, NaN when the attack has none).
      lone_attacker: ``'zero'``: a pool with one compromised participant sends the zero
        update; ``'genuine'``: ``craft`` runs for it too.

    Returns:
      ``(updates[S, P], coef[S] float32 NaN outside the crafted slots, lone[S] bool)``.
    """
    if lone_attacker not in LONE_ATTACKER:
        raise ValueError(f"lone_attacker must be one of {', '.join(LONE_ATTACKER)}, got {lone_attacker!r}")
    valid = np.asarray(inp.valid, bool)
    mal = np.asarray(inp.malicious, bool) & valid
    groups = np.zeros(mal.shape, np.int32) if inp.groups is None else np.asarray(inp.groups)
    out = inp.updates
    coef = np.full(mal.shape, np.nan, np.float32)
    lone = np.zeros(mal.shape, bool)
    for g in np.unique(groups[mal]):
        in_g = groups == g
        rows = mal & in_g
        if rows.sum() == 1 and lone_attacker == "zero":
            crafted = jnp.zeros(out.shape[1:], out.dtype)
            lone |= rows
        else:
            crafted, c = craft(jnp.asarray(rows), jnp.asarray(valid & in_g))
            coef[rows] = np.asarray(c, np.float32)
        crafted = jnp.broadcast_to(jnp.asarray(crafted, out.dtype), out.shape)
        out = jnp.where(jnp.asarray(rows)[:, None], crafted, out)
    return out, coef, lone


def _coef_init(num_clients, key):
    del key
    return CoefState(jnp.full((num_clients,), jnp.nan, jnp.float32), jnp.zeros((num_clients,), bool))


def _coef_store(state: CoefState, inp: AttackInput, coef, lone) -> CoefState:
    """Writes the round's per-slot ``coef[S]`` and ``lone[S]`` at the malicious valid slots'
    client ids."""
    ids = jnp.asarray(inp.client_ids)
    hit = jnp.asarray(inp.malicious, bool) & jnp.asarray(inp.valid, bool)
    return CoefState(state.coef.at[ids].set(jnp.where(hit, jnp.asarray(coef, jnp.float32), state.coef[ids])),
                     state.lone.at[ids].set(jnp.where(hit, jnp.asarray(lone, bool), state.lone[ids])))


def _statistics_attack(name: str, craft: Callable, key_name: str | None, lone_attacker: str) -> Attack:
    """An :class:`Attack` crafting pool by pool (:func:`pooled_craft`) whose round record
    holds ``attack_<key_name>`` (when the attack has a coefficient) and ``attack_lone``."""
    def apply(state, inp: AttackInput):
        out, coef, lone = pooled_craft(inp, lambda m, v: craft(inp, m, v), lone_attacker)
        return out, _coef_store(state, inp, coef, lone)

    def record(state, ids):
        ids = jnp.asarray(ids)
        rec = {"lone": state.lone[ids]}
        if key_name is not None:
            rec[key_name] = state.coef[ids]
        return rec

    return Attack(name, _coef_init, apply, record=record)


# --------------------------------------------------------------------------------------
# Settings and registry entries
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StatisticsSettings(Settings):
    """Settings shared by the attacks that pool compromised updates (module docstring)."""

    lone_attacker: str = setting(
        "zero", "LIE, Min-Max, Min-Sum, Fang with one compromised participant in its pool: zero = send the "
        "zero update (the authors' code); genuine = the formulas on one update (its genuine update).",
        choices=LONE_ATTACKER)


@dataclasses.dataclass(frozen=True)
class LieSettings(StatisticsSettings):
    lie_z: float | None = setting(None, "LIE's z, fixed; unset = z_max of Appendix A.2, Phi^-1((p - q - s) / "
                                  "(p - q)) with s = floor(p/2 + 1) - q, each round.")
    lie_z_cap: float = setting(LIE_Z_CAP, "LIE: z_max is clipped to [-lie_z_cap, lie_z_cap].", above=0)


@dataclasses.dataclass(frozen=True)
class MinMaxSettings(StatisticsSettings):
    gamma_init: float = setting(GAMMA_INIT, "Min-Max / Min-Sum: first gamma and step of the binary search.",
                                above=0)
    gamma_tau: float = setting(TAU, "Min-Max / Min-Sum: the search stops once its step is <= gamma_tau.", above=0)


@dataclasses.dataclass(frozen=True)
class MinSumSettings(MinMaxSettings):
    min_sum_bound: str = setting(
        "min", "Min-Sum's bound on the summed squared distances: min = the minimum over the compromised "
        "updates of their summed distances to the others (the authors' and Shejwalkar's code); max.",
        choices=MIN_SUM_BOUNDS)


@dataclasses.dataclass(frozen=True)
class FangSettings(StatisticsSettings):
    fang_tau: float = setting(FANG_TAU, "Fang against Krum: lambda is halved until below fang_tau.", above=0)


@register("lie", settings=LieSettings)
def make_lie(ctx: AttackContext) -> Attack:
    z_cap, z_fixed = ctx.config.lie_z_cap, ctx.config.lie_z

    def craft(inp, malicious, valid):
        return lie_craft(inp.updates, malicious, valid, z_cap=z_cap, z_fixed=z_fixed)

    return _statistics_attack("lie", craft, "z", ctx.config.lone_attacker)


def _make_min_max_sum(rule: str):
    def make(ctx: AttackContext) -> Attack:
        cfg = ctx.config
        bound = getattr(cfg, "min_sum_bound", "min")  # Min-Max has no bound to choose

        def craft(inp, malicious, valid):
            return min_max_sum_craft(inp.updates, malicious, valid, rule=rule, gamma_init=cfg.gamma_init,
                                     tau=cfg.gamma_tau, bound=bound)

        return _statistics_attack(rule, craft, "gamma", cfg.lone_attacker)

    return make


register("min_max", settings=MinMaxSettings)(_make_min_max_sum("min_max"))
register("min_sum", settings=MinSumSettings)(_make_min_max_sum("min_sum"))


@register("fang", settings=FangSettings)
def make_fang(ctx: AttackContext) -> Attack:
    tau = ctx.config.fang_tau
    num_clients, num_malicious = int(ctx.num_clients), int(ctx.num_malicious)
    lone = ctx.config.lone_attacker

    if ctx.aggregation == "krum":
        def craft(inp, malicious, valid):
            crafted, lam, _, _ = fang_krum_craft(inp.updates, malicious, valid, num_clients=num_clients,
                                                 num_malicious=num_malicious, tau=tau)
            return crafted, lam

        return _statistics_attack("fang", craft, "lambda", lone)

    def craft(inp, malicious, valid):
        return fang_trim_craft(inp.updates, malicious, valid, inp.key), np.nan

    return _statistics_attack("fang", craft, None, lone)
