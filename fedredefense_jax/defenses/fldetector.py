"""FLDetector (Zhang et al., "FLDetector: Defending Federated Learning Against Model
Poisoning Attacks via Detecting Malicious Clients", KDD 2022), a baseline of FedREDefense
(Xie et al., ICML 2024), Section 2.2, Appendix A.3 and Table 1.

Idea: a benign client's update changes along the global-model trajectory as the Hessian
predicts; a malicious client's does not. Round ``t`` (``w^t`` the global model the clients
start from, ``g_i^t`` client ``i``'s update, ``g^t`` the aggregate)::

    H^t v   ~ L-BFGS estimate from the last N pairs (s_j, y_j) of the trajectory,
              s_j = w^j - w^{j-1},  y_j = g^j - g^{j-1}                    (N = 10)
    pred_i  = g_i^{t-1} + H^t (w^t - w^{t-1})                      predicted update
    d_i^t   = ||g_i^t - pred_i||,   dn_i^t = d_i^t / sum_j d_j^t    normalised distance
    s_i^t   = 1/W sum_{r=0}^{W-1} dn_i^{t-r}                        suspicious score (W = 10)

After a cold start of ``T_c = 50`` rounds (Appendix A.3; distances are computed from round
``T_c + 1`` on), as soon as the window holds ``W`` rounds of distances, the gap statistic
(Tibshirani et al., 2001) of the scores decides whether they form more than one cluster; if
so, 2-means splits them and the cluster with the larger mean score is flagged (the simulator
expels flagged clients) and the defense asks for a restart (``DefenseOutput.restart``): the
model is already poisoned, so, as in the paper's protocol, training starts again from the
initial model while the round counter keeps counting (the total number of rounds is fixed).
Detection is done once, as in FLDetector's algorithm, which returns the detected clients and
stops; afterwards the rule is plain FedAvg over the remaining clients. The basic aggregation
rule is FedAvg (Appendix A.3) over the candidate slots (valid, finite rows); ``weights`` are
1 for them.

Round accounting. The first detection can happen at round ``T_c + W`` (60): the round's
updates are aggregated first and judged after, as in FLDetector's code, whose round
aggregates every update and then runs the detection, so a detected attacker was aggregated
in rounds 1 to ``T_c + W`` (AAR 60: the paper's Table 1 for every attack FLDetector
catches). The restart then drops that aggregate. (FLDetector's released code scores from its
0-based round 51 and clusters once it holds 11 rows of distances, i.e. at the 62nd round;
the paper's 60 = cold start + window is what is followed here.) After the detection round
the flagged clients are expelled and never aggregated again.

The "updates" here are model differences ``w_local - w`` (about ``-lr`` times a gradient
summed over the local steps) rather than gradients; pairs and predictions use the same
quantity, so the estimated ``H`` is the Jacobian of the update map and the signs agree.

L-BFGS (the compact form of Byrd, Nocedal and Schnabel, 1994) with ``B_0 = sigma I``,
``sigma = y_k^T s_k / s_k^T s_k`` (the newest pair), ``S = [s_1..s_k]``, ``Y = [y_1..y_k]``,
``L`` the strictly lower triangle of ``S^T Y`` and ``D`` its diagonal::

    H v = sigma v - [sigma S, Y] M^{-1} [sigma S^T v; Y^T v],   M = [[sigma S^T S, L], [L^T, -D]]

evaluated on the host in float64 (``M`` is ``2k x 2k``); a singular ``M`` is solved by least
squares, and a non-finite result, or no pair yet, gives ``H v = 0`` (the prediction is the
previous update). Pairs holding NaN/Inf or a zero step are not stored.

Gap statistic: scores min-max normalised to ``[0, 1]``; ``W_k`` the within-cluster sum of
squares of scikit-learn's KMeans with ``k`` clusters (k-means++ starts: 3 for the scores, 1
for each reference sample, which keeps a round's check near 0.2 s for 100 clients; the
final 2-means uses 10; ``W_1`` is computed exactly); ``B = 10`` uniform
reference samples on ``[0, 1]``; ``Gap(k) = mean_b log W*_kb - log W_k``,
``s_k = std_b(log W*_kb) sqrt(1 + 1/B)``; the number of clusters is the smallest ``k`` with
``Gap(k) >= Gap(k+1) - s_{k+1}`` (``k <= 7``, FLDetector's range; ``7`` when none). Scores
that are all equal (spread <= 1e-6 of their largest magnitude, i.e. float rounding) form
one cluster. Seeds of KMeans and of the references come from the round's key.

Settings: ``fldetector_cold_start`` (50), ``fldetector_window`` (W = 10),
``fldetector_history`` (N = 10 pairs), ``fldetector_gap_refs`` (B = 10).

Robustness: a slot whose update, or previous update, holds NaN/Inf, or whose distance
overflows, gets the largest float32 distance (the least consistent); its update is not
averaged. Normalisation is done in float64, so such rows never make the others NaN.

Participation: FLDetector assumes every client takes part in every round (the paper does
not run it with partial participation, Appendix B.2), and its settings' ``check`` refuses
``participation_rate < 1``. Used directly with partial participation, a client that
did not take part in the previous round gets no distance this round, its score is the mean
of the distances it has in the window, and clients with none are neither clustered nor
flagged.

State (explicit, checkpointable): round counter, detected flag, previous global model and
aggregate, the ``N`` trajectory pairs ``[N, P]`` (host, float32), every client's previous
update ``[num_clients, P]`` (device) and whether it is from the previous round, and the
window of normalised distances ``[W, num_clients]`` (NaN = none that round).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedredefense_jax.defenses import register
from fedredefense_jax.defenses.base import (
    Defense,
    DefenseContext,
    DefenseInput,
    DefenseOutput,
    fedavg,
)
from fedredefense_jax.defenses.robust import candidates, scaled_norms
from fedredefense_jax.settings import ConfigError, Settings, setting

#: Appendix A.3 (following FLDetector): cold-start rounds, score window, L-BFGS pairs.
DEFAULT_COLD_START = 50
DEFAULT_WINDOW = 10
DEFAULT_HISTORY = 10
DEFAULT_GAP_REFS = 10
GAP_MAX_K = 7


class FLDetectorState(NamedTuple):
    """FLDetector's explicit state (module docstring). Host arrays are numpy."""

    rounds: np.ndarray          # int64 (): rounds seen
    detected: np.ndarray        # bool (): an attack was detected (detection is done once)
    prev_params: jax.Array      # [P] w^{t-1}
    prev_aggregate: jax.Array   # [P] g^{t-1}
    has_prev: np.ndarray        # bool (): prev_params / prev_aggregate are set
    pairs_s: np.ndarray         # float32 [N, P] model differences, oldest first
    pairs_y: np.ndarray         # float32 [N, P] aggregate differences
    num_pairs: np.ndarray       # int64 (): pairs stored (the last num_pairs rows)
    prev_updates: jax.Array     # [C, P] each client's last update
    has_update: np.ndarray      # bool [C]: the client's last update is from the previous round
    distances: np.ndarray       # float64 [W, C] normalised distances, oldest first, NaN = none
    num_scored: np.ndarray      # int64 (): rounds with distances


# ------------------------------------------------------------------------------ L-BFGS


def lbfgs_hvp(pairs_s: np.ndarray, pairs_y: np.ndarray, v: np.ndarray) -> np.ndarray:
    """L-BFGS estimate ``B v`` of a Hessian-vector product (module docstring), float64.

    Args: ``pairs_s[k, P]``, ``pairs_y[k, P]`` the pairs, oldest first; ``v[P]``.
    Returns ``[P]`` float64; zeros when ``k = 0`` or when the estimate is not finite.
    """
    v = np.asarray(v, np.float64)
    k = int(pairs_s.shape[0])
    if k == 0:
        return np.zeros_like(v)
    S = np.asarray(pairs_s, np.float64)
    Y = np.asarray(pairs_y, np.float64)
    with np.errstate(all="ignore"):
        sy = S @ Y.T                      # sy[i, j] = s_i . y_j
        ss = S @ S.T
        sigma = sy[-1, -1] / ss[-1, -1]
        if not np.isfinite(sigma) or sigma == 0:
            return np.zeros_like(v)
        low = np.tril(sy, -1)
        mat = np.block([[sigma * ss, low], [low.T, -np.diag(np.diag(sy))]])
        rhs = np.concatenate([sigma * (S @ v), Y @ v])
        try:
            sol = np.linalg.solve(mat, rhs)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(mat, rhs, rcond=None)[0]
        out = sigma * v - (sigma * (S.T @ sol[:k]) + Y.T @ sol[k:])
    return out if np.all(np.isfinite(out)) else np.zeros_like(v)


# ------------------------------------------------------------------------------ gap statistic


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int):
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer distinct points than clusters
        return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x[:, None])


def _within_ss(x: np.ndarray, k: int, seed: int, n_init: int) -> float:
    """``W_k``: within-cluster sum of squares of ``k``-means of the 1-D points ``x``
    (exact for ``k = 1``)."""
    if k == 1:
        w = float(np.sum(np.square(x - x.mean())))
    else:
        w = float(_kmeans(x, k, seed, n_init).inertia_)
    return max(w, np.finfo(np.float64).tiny)  # log W of a perfect clustering stays finite


def gap_statistic(scores: np.ndarray, seed: int, refs: int = DEFAULT_GAP_REFS,
                  max_k: int = GAP_MAX_K) -> int:
    """Number of clusters of the 1-D ``scores`` chosen by the gap statistic (module
    docstring): the smallest ``k`` with ``Gap(k) >= Gap(k+1) - s_{k+1}``; ``min(max_k, n)``
    when no ``k`` qualifies; 1 for fewer than 2 scores or equal scores."""
    x = np.asarray(scores, np.float64).reshape(-1)
    n = x.size
    if n < 2:
        return 1
    lo, hi = float(x.min()), float(x.max())
    if not hi - lo > 1e-6 * max(abs(lo), abs(hi)):
        return 1
    x = (x - lo) / (hi - lo)
    kmax = min(int(max_k), n)
    rng = np.random.default_rng(seed)
    ref = rng.uniform(0.0, 1.0, (int(refs), n))

    def gap(k):
        log_ref = np.log([_within_ss(r, k, seed, n_init=1) for r in ref])
        log_w = np.log(_within_ss(x, k, seed, n_init=3))
        return log_ref.mean() - log_w, log_ref.std() * np.sqrt(1.0 + 1.0 / refs)

    g_k, _ = gap(1)
    for k in range(1, kmax):
        g_next, s_next = gap(k + 1)
        if g_k >= g_next - s_next:
            return k
        g_k = g_next
    return kmax


def two_means_high(scores: np.ndarray, seed: int) -> np.ndarray:
    """``[n]`` bool: members of the 2-means cluster of ``scores`` with the larger mean."""
    x = np.asarray(scores, np.float64).reshape(-1)
    labels = _kmeans(x, 2, seed, n_init=10).labels_
    means = [x[labels == c].mean() if np.any(labels == c) else -np.inf for c in (0, 1)]
    return labels == int(np.argmax(means))


# ------------------------------------------------------------------------------ device kernels


@jax.jit
def prediction_distances(updates: jax.Array, prev_updates: jax.Array, ids: jax.Array,
                         hvp: jax.Array) -> jax.Array:
    """``[S]`` distances ``||g_i - (g_i^{prev} + hvp)||`` of the slots' updates to their
    predictions; NaN/Inf/overflow give the float32 maximum."""
    diff = updates - (prev_updates[ids] + hvp[None, :])
    m, s = scaled_norms(diff)
    d = m * s
    big = jnp.finfo(d.dtype).max
    return jnp.where(jnp.isfinite(d), d, big)


@jax.jit
def store_updates(prev_updates: jax.Array, updates: jax.Array, ids: jax.Array,
                  valid: jax.Array) -> jax.Array:
    """``prev_updates`` with the rows of the valid slots' clients replaced by their updates."""
    idx = jnp.where(valid, ids, prev_updates.shape[0])
    return prev_updates.at[idx].set(updates, mode="drop")


def _round_seed(key: jax.Array) -> int:
    return int(jax.random.randint(jax.random.fold_in(key, 0xF1D), (), 0, 2**31 - 1))


@dataclasses.dataclass(frozen=True)
class FLDetectorSettings(Settings):
    fldetector_cold_start: int = setting(DEFAULT_COLD_START, "FLDetector: rounds before distances are computed "
                                         "(T_c, the paper's 50).", low=0)
    fldetector_window: int = setting(DEFAULT_WINDOW, "FLDetector: rounds of distances averaged into the "
                                     "suspicious scores (W, 10).", low=1)
    fldetector_history: int = setting(DEFAULT_HISTORY, "FLDetector: trajectory pairs of the L-BFGS estimate "
                                      "(N, 10).", low=1)
    fldetector_gap_refs: int = setting(DEFAULT_GAP_REFS, "FLDetector: reference samples of the gap statistic "
                                       "(B, 10).", low=1)

    def check(self, experiment) -> None:
        if experiment.participation_rate < 1:
            raise ConfigError("participation_rate", "fldetector assumes full participation (it predicts each "
                              "client's update from the client's update of the previous round; the paper, "
                              f"Appendix B.2, does not run it otherwise), got {experiment.participation_rate}")


def _score(st: FLDetectorState, w, updates, ids, valid, history: int):
    """Distances of the round's slots to their predictions, normalised over the slots whose
    client has a previous update: ``(dist[S] NaN for the others, st with them appended to
    the window)``; ``st`` unchanged when no slot has a previous update."""
    dist = np.full(valid.shape[0], np.nan)
    scored = valid & st.has_update[ids]
    if not scored.any():
        return dist, st
    hvp = np.zeros((st.pairs_s.shape[1],))
    k = int(st.num_pairs)
    if bool(st.has_prev) and k > 0:
        v = np.asarray(w - st.prev_params, np.float64)
        hvp = lbfgs_hvp(st.pairs_s[history - k:], st.pairs_y[history - k:], v)
    d = np.asarray(prediction_distances(updates, st.prev_updates, jnp.asarray(ids),
                                        jnp.asarray(hvp, jnp.float32)), np.float64)
    total = d[scored].sum()
    dn = d / total if total > 0 else np.full_like(d, 1.0 / scored.sum())
    dist = np.where(scored, dn, np.nan)
    row = np.full(st.distances.shape[1], np.nan)
    row[ids[scored]] = dn[scored]
    return dist, st._replace(distances=np.concatenate([st.distances[1:], row[None]]),
                             num_scored=np.asarray(int(st.num_scored) + 1, np.int64))


def _judge(st: FLDetectorState, ids, valid, key, refs: int):
    """Suspicious scores (window means) of the slots and the gap-statistic decision:
    ``(score[S] NaN where none, flagged[S], detected)``."""
    flagged = np.zeros(valid.shape[0], bool)
    win = st.distances[:, ids]                       # [W, S]
    have = np.isfinite(win)
    count = have.sum(axis=0)
    mean = np.where(have, win, 0.0).sum(axis=0) / np.maximum(count, 1)
    judged = valid & (count > 0)
    score = np.where(judged, mean, np.nan)
    detected = False
    if judged.sum() >= 2:
        seed = _round_seed(key)
        if gap_statistic(score[judged], seed, refs=refs) > 1:
            flagged[judged] = two_means_high(score[judged], seed)
            detected = True
    return score, flagged, detected


def _advance(st: FLDetectorState, w, aggregate, updates, ids, valid, history: int) -> FLDetectorState:
    """Stores this round's trajectory pair, global model, aggregate and updates."""
    if bool(st.has_prev):
        s = np.asarray(w - st.prev_params)
        y = np.asarray(aggregate - st.prev_aggregate)
        if np.all(np.isfinite(s)) and np.all(np.isfinite(y)) and np.any(s != 0):
            st = st._replace(pairs_s=np.concatenate([st.pairs_s[1:], s[None]]),
                             pairs_y=np.concatenate([st.pairs_y[1:], y[None]]),
                             num_pairs=np.asarray(min(int(st.num_pairs) + 1, history), np.int64))
    has_update = np.zeros_like(st.has_update)
    has_update[ids[valid]] = True
    return st._replace(
        rounds=np.asarray(int(st.rounds) + 1, np.int64), prev_params=w, prev_aggregate=aggregate,
        has_prev=np.asarray(True),
        prev_updates=store_updates(st.prev_updates, updates, jnp.asarray(ids), jnp.asarray(valid)),
        has_update=has_update)


@register("fldetector", settings=FLDetectorSettings)
def make_fldetector(ctx: DefenseContext) -> Defense:
    """FLDetector with FedAvg as the basic rule. ``info``: ``nonfinite`` ``[S]``,
    ``distance`` ``[S]`` (normalised, NaN when none this round), ``suspicious_score``
    ``[S]`` (NaN before the window is full), ``attack_detected``, ``detection_s``."""
    cfg = ctx.config
    cold_start, window, history = cfg.fldetector_cold_start, cfg.fldetector_window, cfg.fldetector_history
    num_params = int(np.shape(ctx.init_params)[0])

    def init(num_clients, key):
        del key
        zeros = jnp.zeros((num_params,), jnp.float32)
        return FLDetectorState(
            rounds=np.asarray(0, np.int64), detected=np.asarray(False), prev_params=zeros,
            prev_aggregate=zeros, has_prev=np.asarray(False),
            pairs_s=np.zeros((history, num_params), np.float32),
            pairs_y=np.zeros((history, num_params), np.float32), num_pairs=np.asarray(0, np.int64),
            prev_updates=jnp.zeros((num_clients, num_params), jnp.float32),
            has_update=np.zeros((num_clients,), bool),
            distances=np.full((window, num_clients), np.nan), num_scored=np.asarray(0, np.int64))

    def apply(state: FLDetectorState, inp: DefenseInput):
        t0 = time.perf_counter()
        valid = np.asarray(inp.valid, bool)
        ids = np.asarray(inp.client_ids, np.int32)
        updates = jnp.asarray(inp.updates)
        w = jnp.asarray(inp.global_params)
        cand = np.asarray(candidates(updates, jnp.asarray(valid)))
        flagged = np.zeros(valid.shape[0], bool)
        dist = score = np.full(valid.shape[0], np.nan)
        restart = False
        st = state
        if not bool(state.detected):
            if int(state.rounds) + 1 > cold_start:
                dist, st = _score(st, w, updates, ids, valid, history)
            if int(st.num_scored) >= window:
                score, flagged, restart = _judge(st, ids, valid, inp.key, cfg.fldetector_gap_refs)

        # the detection round aggregates its updates before judging them (module docstring);
        # the restart drops that aggregate
        weights = cand.astype(np.float32)
        aggregate = fedavg(updates, jnp.asarray(weights))
        if restart:
            st = st._replace(detected=np.asarray(True))
        elif not bool(state.detected):
            st = _advance(st, w, aggregate, updates, ids, valid, history)
        out = DefenseOutput(
            aggregate=aggregate,
            flagged=jnp.asarray(flagged),
            weights=jnp.asarray(weights),
            info={"nonfinite": jnp.asarray(valid & ~cand), "distance": jnp.asarray(dist, jnp.float32),
                  "suspicious_score": jnp.asarray(score, jnp.float32), "attack_detected": restart,
                  "detection_s": time.perf_counter() - t0},
            restart=restart,
        )
        return out, st

    return Defense("fldetector", init, apply)
