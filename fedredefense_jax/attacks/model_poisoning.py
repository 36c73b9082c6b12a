"""Untargeted model-poisoning attacks of FedREDefense (Xie et al., ICML 2024), Section 2.1 and
Appendix A.2: LIE, Min-Max, Min-Sum and Fang.

Knowledge (partial, as in the paper's threat model): an attack reads only the *genuine*
updates of the compromised clients that take part in the round, i.e. the rows ``g_i`` of
``updates[S, P]`` whose slot is malicious and valid. Benign rows and padding slots are
masked out of every statistic with ``jnp.where`` (so not even a NaN in a benign row can
leak into the crafted update), and only malicious valid rows are rewritten
(:func:`replace_malicious`). Updates are model deltas ``w_local - w_global``; the attacks
act on the deltas (the "reference" model of Fang's attacks is the current global model,
i.e. the zero delta). Notation: ``c`` = number of malicious valid slots in the round
(``q`` of LIE), ``p`` = number of valid slots (participants), ``d = P``.

Shared statistics (over the ``c`` compromised genuine updates):
``mu = mean_i g_i`` and ``sigma = sqrt(mean_i (g_i - mu)^2)`` per coordinate, i.e. the
population std (``ddof = 0``; PyTorch's ``std`` default in the original code is ``ddof = 1``).
With ``ddof = 0`` a single compromised participant (``c = 1``) gives ``sigma = 0`` without
NaN. A round without a malicious participant (``c = 0``) returns the updates unchanged.
All statistics are computed in float32 and cast back to the updates' dtype.

* ``lie`` (Baruch et al., NeurIPS 2019, "A little is enough"): every malicious client sends
  ``mu - z_max * sigma`` with ``z_max = Phi^{-1}((p - q - s) / (p - q))``,
  ``s = floor(p/2 + 1) - q`` (the largest ``z`` with ``Phi(z) < r`` is ``Phi^{-1}(r)``, the
  supremum; ``jax.scipy.stats.norm.ppf``). ``p`` and ``q`` are the round's participants and
  malicious participants. Degenerate rounds: the ratio ``r`` is clipped to ``[0, 1]``
  (``r > 1`` happens when malicious clients are a majority, ``s < 0``; ``r = 0`` when
  ``p <= 2``), ``r := 1`` when every participant is malicious (``p = q``), and ``z_max`` is
  clipped to ``[-z_cap, z_cap]`` (``config['lie_z_cap']``, default 3) so that ``Phi^{-1}``'s
  infinities at 0 and 1 never reach the update. ``c = 1`` gives ``sigma = 0``: the crafted
  update is the client's own genuine update. ``config['lie_z']`` fixes ``z`` instead of the
  formula (for studying the attack's strength; e.g. Baruch et al.'s own ratio
  ``(p - s) / p`` gives ``Phi^{-1}(77/100) = 0.74`` at ``p = 100, q = 28`` where Appendix
  A.2's gives 0.47); the fixed value is used as given, not clipped.

* ``min_max`` / ``min_sum`` (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the
  Byzantine", AGR-agnostic attacks, "std" perturbation): every malicious client sends
  ``g_m = mu - gamma * sigma`` with the largest ``gamma`` found by the paper's binary search
  (Algorithm 1; ``gamma_init = 10``, ``tau = 1e-5`` as in the authors' code;
  ``config['gamma_init']``, ``config['tau']``) such that, over the compromised genuine
  updates ``g_i``,

      Min-Max:  max_i ||g_m - g_i||      <= max_{i,j} ||g_i - g_j||
      Min-Sum:  sum_i ||g_m - g_i||^2    <= max_i sum_j ||g_i - g_j||^2

  (the paper's Eq.; squared distances are compared for Min-Max, which is equivalent).
  Search: ``gamma = gamma_init, step = gamma_init, succ = 0``; while ``step > tau``: if
  ``gamma`` satisfies the constraint, ``succ = gamma, gamma += step/2``, else
  ``gamma -= step/2``; ``step /= 2`` (the paper's ``|succ - gamma| > tau`` is the same test:
  ``gamma - succ = step`` is invariant). Output ``gamma = succ``. Both constraints are
  convex in ``gamma`` and hold at ``gamma = 0`` (the mean is inside the hull / minimises
  the sum of squares), so the feasible set is an interval ``[a, b]`` with ``a <= 0 <= b``
  and the result satisfies ``succ <= b < succ + 2 tau`` -- unless ``b`` exceeds the search
  range, in which case ``gamma`` stops just below ``2 gamma_init`` (the largest value the
  algorithm can reach). ``c = 1``: ``sigma = 0``, every ``gamma`` is feasible and the
  crafted update is the client's own genuine update. Implemented with
  ``jax.lax.while_loop`` (at most ``max_iter = 100`` iterations).

* ``fang`` (Fang et al., USENIX Security 2020, partial knowledge). ``s = sign(mu)``
  (``s_j = +1`` when ``mu_j > 0``, ``-1`` otherwise, the paper's "changing direction"
  estimated from the compromised updates' mean).

  - Against ``'krum'`` (``AttackContext.aggregation == 'krum'``), the Krum attack: every
    malicious client sends the same ``-lambda * s``. The upper bound is the paper's
    Eq. (3) evaluated on what the attacker knows (the compromised genuine updates stand in
    for the benign ones, ``m := p``, ``c := q``, ``D`` Euclidean distance)::

        lambda_ub = 1 / ((p - 2c - 1) sqrt(d)) * min_i sum_{l in Gamma_i} D(g_l, g_i)
                    + 1 / sqrt(d) * max_i D(g_i, 0)

    with ``Gamma_i`` the ``min(p - c - 2, c - 1)`` compromised updates closest to ``g_i``;
    the first term is dropped when ``p - 2c - 1 <= 0`` or ``Gamma_i`` is empty. Then
    ``lambda`` is halved until Krum, run over the ``c`` crafted copies plus the ``c``
    compromised genuine updates (the paper's partial-knowledge simulation), selects a
    crafted copy, or until ``lambda < tau_fang = 1e-5`` (``config['fang_tau']``; the last,
    sub-threshold ``lambda`` is then used). The simulated Krum scores each of the ``2c``
    updates by the sum of its ``k`` smallest squared distances to the others, with the
    server's neighbour count ``k = clip(p - q_s - 2, 1, p - 1)`` (``q_s`` the malicious
    count the server's Krum is told, ``round(num_malicious * p / num_clients)``, as in
    ``defenses/robust.py``), clipped to the ``2c - 1`` available neighbours. A crafted copy
    is selected when its score is ``<=`` the smallest genuine score (ties go to the crafted
    copies; with ``c = 1`` the two scores always tie, so ``lambda = lambda_ub``).
  - Against every other rule, the Trimmed-Mean attack (b = 2, ``config['fang_b']``): with
    ``w_max,j`` / ``w_min,j`` the max / min over the compromised genuine updates, each
    malicious client draws its own value per coordinate, uniformly (round key
    ``AttackInput.key``), from

        s_j = -1:  [w_max,j, b * w_max,j]  if w_max,j > 0,  else [w_max,j, w_max,j / b]
        s_j = +1:  [w_min,j / b, w_min,j]  if w_min,j > 0,  else [b * w_min,j, w_min,j]

    so every crafted value lies at or beyond the compromised extreme, against the
    direction ``s_j``; its sign is ``-s_j`` exactly when the interval lies on the other
    side of zero (``w_max,j > 0`` for ``s_j = -1``, ``w_min,j < 0`` for ``s_j = +1``).

Each round's record holds the coefficient used, at the malicious participants (null at the
benign ones): ``attack_z`` (LIE), ``attack_gamma`` (Min-Max / Min-Sum), ``attack_lambda``
(Fang against Krum; the Trimmed-Mean attack has none).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from fedredefense_jax.attacks import register
from fedredefense_jax.attacks.base import no_state, Attack, AttackContext, AttackInput, replace_malicious

LIE_Z_CAP = 3.0
GAMMA_INIT = 10.0
TAU = 1e-5
FANG_TAU = 1e-5
FANG_B = 2.0
_MAX_ITER = 100      # Min-Max / Min-Sum bisection (needs ~log2(gamma_init / tau) = 20)
_FANG_MAX_ITER = 200  # Krum-attack halvings (lambda_ub up to ~1e55 still reaches 1e-5)


# --------------------------------------------------------------------------------------
# Statistics over the compromised genuine updates
# --------------------------------------------------------------------------------------


def _compromised(updates, malicious, valid):
    """``(x[S, P] float32 with non-compromised rows zeroed, mask[S], c)``."""
    m = jnp.asarray(malicious, bool) & jnp.asarray(valid, bool)
    x = jnp.where(m[:, None], jnp.asarray(updates, jnp.float32), 0.0)
    return x, m, jnp.sum(m.astype(jnp.int32))


def _mean_std(x, m, c):
    """Per-coordinate mean and population std (ddof = 0) of the masked rows; zeros if c = 0."""
    inv = 1.0 / jnp.maximum(c, 1).astype(jnp.float32)
    mu = jnp.sum(x, axis=0) * inv
    dev = jnp.where(m[:, None], x - mu, 0.0)
    sigma = jnp.sqrt(jnp.sum(jnp.square(dev), axis=0) * inv)
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
    """``(crafted[P] = mu - z * sigma, z)`` from the compromised rows; ``z = z_max`` of the
    round, or ``z_fixed`` when given."""
    x, m, c = _compromised(updates, malicious, valid)
    p = jnp.sum(jnp.asarray(valid, bool).astype(jnp.int32))
    mu, sigma = _mean_std(x, m, c)
    z = lie_z_max(p, c, z_cap) if z_fixed is None else jnp.float32(z_fixed)
    return mu - z * sigma, z


# --------------------------------------------------------------------------------------
# Min-Max / Min-Sum
# --------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("rule", "gamma_init", "tau", "max_iter"))
def min_max_sum_craft(updates, malicious, valid, rule: str = "min_max", gamma_init: float = GAMMA_INIT,
                      tau: float = TAU, max_iter: int = _MAX_ITER):
    """``(crafted[P] = mu - gamma * sigma, gamma)`` for ``rule`` in ``{'min_max', 'min_sum'}``
    (module docstring: constraint and binary search)."""
    if rule not in ("min_max", "min_sum"):
        raise ValueError(f"rule must be 'min_max' or 'min_sum', got {rule!r}")
    x, m, c = _compromised(updates, malicious, valid)
    mu, sigma = _mean_std(x, m, c)
    pair = m[:, None] & m[None, :]
    d2 = jnp.where(pair, _pairwise_sq(x), 0.0)
    if rule == "min_max":
        threshold = jnp.max(d2)

        def feasible(gamma):
            dist = _sq_dist_to_rows(mu - gamma * sigma, x)
            return jnp.max(jnp.where(m, dist, 0.0)) <= threshold
    else:
        threshold = jnp.max(jnp.sum(d2, axis=1))

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


def fang_trmean_bounds(updates, malicious, valid, b: float = FANG_B):
    """``(lo[P], hi[P], direction[P])``: the Trimmed-Mean attack's sampling interval."""
    x, m, c = _compromised(updates, malicious, valid)
    mu, _ = _mean_std(x, m, c)
    direction = jnp.where(mu > 0, 1.0, -1.0)
    w_max = jnp.max(jnp.where(m[:, None], x, -jnp.inf), axis=0)
    w_min = jnp.min(jnp.where(m[:, None], x, jnp.inf), axis=0)
    w_max = jnp.where(c > 0, w_max, 0.0)
    w_min = jnp.where(c > 0, w_min, 0.0)
    # s = -1: push above w_max; s = +1: push below w_min
    lo_neg, hi_neg = w_max, jnp.where(w_max > 0, b * w_max, w_max / b)
    lo_pos, hi_pos = jnp.where(w_min > 0, w_min / b, b * w_min), w_min
    lo = jnp.where(direction < 0, lo_neg, lo_pos)
    hi = jnp.where(direction < 0, hi_neg, hi_pos)
    return lo, hi, direction


@functools.partial(jax.jit, static_argnames=("b",))
def fang_trmean_craft(updates, malicious, valid, key, b: float = FANG_B):
    """Fang's Trimmed-Mean attack: ``crafted[S, P]``, one uniform draw per slot and
    coordinate in ``[lo, hi]`` (module docstring)."""
    lo, hi, _ = fang_trmean_bounds(updates, malicious, valid, b)
    u = jax.random.uniform(key, updates.shape, jnp.float32)
    return lo[None, :] + u * (hi - lo)[None, :]


# --------------------------------------------------------------------------------------
# Registry entries
# --------------------------------------------------------------------------------------


def _finish(inp: AttackInput, crafted):
    return replace_malicious(inp, jnp.asarray(crafted, inp.updates.dtype))


def _coef_init(num_clients, key):
    """State of an attack that records its coefficient: ``[num_clients]``, NaN = never set."""
    del key
    return jnp.full((num_clients,), jnp.nan, jnp.float32)


def _coef_store(state, inp: AttackInput, value):
    """Writes the round's scalar coefficient at the malicious valid slots' client ids."""
    ids = jnp.asarray(inp.client_ids)
    hit = jnp.asarray(inp.malicious, bool) & jnp.asarray(inp.valid, bool)
    return state.at[ids].set(jnp.where(hit, jnp.asarray(value, jnp.float32), state[ids]))


def _coef_attack(name, apply, key_name):
    """An :class:`Attack` whose round record holds ``attack_<key_name>``: the coefficient the
    attack used this round for its malicious participants (null for benign ones)."""
    def record(state, ids):
        return {key_name: state[jnp.asarray(ids)]}

    return Attack(name, _coef_init, apply, record=record)


@register("lie")
def make_lie(ctx: AttackContext) -> Attack:
    z_cap = float(ctx.config.get("lie_z_cap", LIE_Z_CAP))
    z_fixed = ctx.config.get("lie_z")
    if z_fixed is not None:
        z_fixed = float(z_fixed)
        if not math.isfinite(z_fixed):
            raise ValueError(f"lie_z must be finite, got {z_fixed}")

    def apply(state, inp: AttackInput):
        crafted, z = lie_craft(inp.updates, inp.malicious, inp.valid, z_cap=z_cap, z_fixed=z_fixed)
        return _finish(inp, crafted), _coef_store(state, inp, z)

    return _coef_attack("lie", apply, "z")


def _make_min_max_sum(rule: str):
    def make(ctx: AttackContext) -> Attack:
        gamma_init = float(ctx.config.get("gamma_init", GAMMA_INIT))
        tau = float(ctx.config.get("tau", TAU))

        def apply(state, inp: AttackInput):
            crafted, gamma = min_max_sum_craft(inp.updates, inp.malicious, inp.valid, rule=rule,
                                               gamma_init=gamma_init, tau=tau)
            return _finish(inp, crafted), _coef_store(state, inp, gamma)

        return _coef_attack(rule, apply, "gamma")

    return make


register("min_max")(_make_min_max_sum("min_max"))
register("min_sum")(_make_min_max_sum("min_sum"))


@register("fang")
def make_fang(ctx: AttackContext) -> Attack:
    tau = float(ctx.config.get("fang_tau", FANG_TAU))
    b = float(ctx.config.get("fang_b", FANG_B))
    num_clients, num_malicious = int(ctx.num_clients), int(ctx.num_malicious)

    if ctx.aggregation == "krum":
        def apply(state, inp: AttackInput):
            crafted, lam, _, _ = fang_krum_craft(inp.updates, inp.malicious, inp.valid,
                                                 num_clients=num_clients, num_malicious=num_malicious, tau=tau)
            return _finish(inp, crafted), _coef_store(state, inp, lam)

        return _coef_attack("fang", apply, "lambda")

    def apply(state, inp: AttackInput):
        crafted = fang_trmean_craft(inp.updates, inp.malicious, inp.valid, inp.key, b=b)
        return _finish(inp, crafted), state

    return Attack("fang", no_state, apply)
