"""Tests of the baseline rules Krum, Median, Trimmed Mean, Norm Bound
(fedredefense_jax/defenses/robust.py) and FLAME (flame.py) on tiny synthetic update
matrices, and of FedREDefense's registered-rule aggregators."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedredefense_jax import defenses
from fedredefense_jax.config import ConfigError, ExperimentConfig, validate
from fedredefense_jax.defenses import flame as flame_lib
from fedredefense_jax.defenses import robust
from fedredefense_jax.defenses.redefense import defense as redefense_lib

P = 24


def ctx(num_clients=10, num_malicious=3, config=None):
    return defenses.DefenseContext(
        apply_fn=None, unravel=None, num_clients=num_clients, num_malicious=num_malicious,
        num_classes=10, input_shape=(8, 8, 1), dataset="fashion_mnist",
        init_params=jnp.zeros((P,)), config=dict(config or {}))


def run_rule(name, updates, valid, ids=None, c=None, global_params=None, seed=0):
    rule = defenses.make(name, c or ctx())
    updates = jnp.asarray(updates, jnp.float32)
    s = updates.shape[0]
    ids = np.arange(s, dtype=np.int32) if ids is None else np.asarray(ids, np.int32)
    w0 = jnp.zeros((updates.shape[1],)) if global_params is None else jnp.asarray(global_params)
    inp = defenses.DefenseInput(w0, updates, jnp.asarray(ids), jnp.asarray(valid, bool), 1,
                                jax.random.PRNGKey(seed))
    out, _ = rule.apply(rule.init(s, jax.random.PRNGKey(0)), inp)
    assert not np.asarray(out.flagged).any()
    return out


def random_round(seed, s=9, p=P, pad=(7, 8), nan=(3,)):
    """``[s, p]`` N(0, 1) updates; padding slots hold 1e6 (must be ignored), NaN rows."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(s, p)).astype(np.float32)
    valid = np.ones(s, bool)
    valid[list(pad)] = False
    u[list(pad)] = 1e6
    u[list(nan)] = np.nan
    cand = valid.copy()
    cand[list(nan)] = False
    return u, valid, cand


def np_trimmed_mean(x, q):
    s = np.sort(x, axis=0)
    return s[q: x.shape[0] - q].mean(axis=0)


# ----------------------------------------------------------------------------- q


@pytest.mark.parametrize("n_valid,num_clients,num_malicious,q", [
    (100, 100, 28, 28), (50, 100, 28, 14), (10, 100, 28, 3), (9, 20, 5, 2),
    (2, 4, 1, 1), (3, 10, 3, 1), (0, 10, 3, 0), (4, 4, 0, 0)])
def test_scaled_num_malicious_rounds_half_up(n_valid, num_clients, num_malicious, q):
    assert int(robust.scaled_num_malicious(n_valid, num_clients, num_malicious)) == q


# ----------------------------------------------------------------------------- Median / TM


@pytest.mark.parametrize("seed,nan", [(0, (3,)), (1, ()), (2, (0, 5))])
def test_median_matches_numpy_ignoring_padding_and_nan(seed, nan):
    u, valid, cand = random_round(seed, nan=nan)
    out = run_rule("median", u, valid)
    np.testing.assert_allclose(out.aggregate, np.median(u[cand], axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out.weights, cand.astype(np.float32))


@pytest.mark.parametrize("seed,nan", [(0, (3,)), (1, ()), (2, (0, 5))])
def test_trimmed_mean_matches_numpy_sort(seed, nan):
    u, valid, cand = random_round(seed, nan=nan)
    out = run_rule("trimmed_mean", u, valid, c=ctx(num_clients=20, num_malicious=5))
    q = int(round(5 * valid.sum() / 20))  # valid.sum() = 7: q = 2 (1.75)
    assert int(out.info["q"]) == q == 2
    np.testing.assert_allclose(out.aggregate, np_trimmed_mean(u[cand], q), rtol=1e-5, atol=1e-6)


def test_trimmed_mean_clamps_q_so_something_remains():
    u, valid, cand = random_round(4, s=4, pad=(), nan=())
    # q = round(4 * 4 / 4) = 4 > (p-1)/2 -> t = 1: the mean of the two middle values
    out = run_rule("trimmed_mean", u, valid, c=ctx(num_clients=4, num_malicious=4))
    np.testing.assert_allclose(out.aggregate, np_trimmed_mean(u, 1), rtol=1e-5, atol=1e-6)
    assert np.isfinite(np.asarray(out.aggregate)).all()


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_coordinatewise_rules_resist_outliers(name):
    rng = np.random.default_rng(5)
    u = rng.normal(size=(10, P)).astype(np.float32)
    u[7:] = 1e6  # 3 planted outliers, q = 3
    out = run_rule(name, u, np.ones(10, bool))
    assert np.abs(np.asarray(out.aggregate)).max() < 3.0


# ----------------------------------------------------------------------------- Krum


def np_krum(x, q):
    p = x.shape[0]
    k = min(max(p - q - 2, 1), p - 1)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    scores = [np.sort(np.delete(d[i], i))[:k].sum() for i in range(p)]
    return int(np.argmin(scores))


def test_krum_picks_the_planted_central_update():
    rng = np.random.default_rng(0)
    center = rng.normal(size=P).astype(np.float32)
    u = center + 0.3 * rng.normal(size=(9, P)).astype(np.float32)
    u[4] = center                     # planted central update
    u[6:8] = center + 50.0            # outliers (q = round(3 * 8 / 10) = 2)
    u[8] = center                     # padding slot at the center: must be ignored
    valid = np.ones(9, bool)
    valid[8] = False
    out = run_rule("krum", u, valid)
    np.testing.assert_array_equal(np.asarray(out.weights), np.eye(9)[4])
    np.testing.assert_allclose(out.aggregate, center)
    assert int(out.info["q"]) == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_krum_matches_numpy_reference(seed):
    u, valid, cand = random_round(seed)
    out = run_rule("krum", u, valid)
    idx = np.nonzero(cand)[0]
    q = int(round(3 * valid.sum() / 10))
    sel = idx[np_krum(u[cand].astype(np.float64), q)]
    assert int(np.argmax(out.weights)) == sel and float(np.sum(out.weights)) == 1.0
    np.testing.assert_array_equal(out.aggregate, u[sel])


def test_krum_single_and_no_candidate():
    u = np.ones((3, P), np.float32)
    out = run_rule("krum", u, np.array([False, True, False]))
    np.testing.assert_array_equal(out.weights, [0, 1, 0])
    out = run_rule("krum", u, np.zeros(3, bool))
    np.testing.assert_array_equal(out.aggregate, np.zeros(P))
    np.testing.assert_array_equal(out.weights, [0, 0, 0])


# ----------------------------------------------------------------------------- Norm Bound


def test_clip_rows_bounds_norms_and_keeps_short_rows():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, P)) * np.array([0.1, 1, 10, 100, 1e30, 0])[:, None]).astype(np.float32)
    c = np.asarray(robust.clip_rows(jnp.asarray(x), jnp.float32(5.0)))
    norms = np.linalg.norm(c.astype(np.float64), axis=1)
    assert np.isfinite(c).all() and (norms <= 5.0 * (1 + 1e-5)).all()
    np.testing.assert_array_equal(c[[0, 1, 5]], x[[0, 1, 5]])
    np.testing.assert_allclose(norms[2:5], 5.0, rtol=1e-5)


def test_norm_bound_threshold_is_mean_benign_norm_and_bounds_the_aggregate():
    rng = np.random.default_rng(1)
    u = rng.normal(size=(8, P)).astype(np.float32)
    u[5:7] *= 100.0                   # clients 8, 9 (malicious ids: the last 3 of 10)
    u[7] = np.nan                     # a NaN row from client 7 (benign id, dropped)
    ids = np.array([0, 1, 2, 3, 4, 8, 9, 7])
    valid = np.ones(8, bool)
    out = run_rule("norm_bound", u, valid, ids=ids)
    thr = np.linalg.norm(u[:5].astype(np.float64), axis=1).mean()
    np.testing.assert_allclose(float(out.info["threshold"]), thr, rtol=1e-5)
    assert np.linalg.norm(np.asarray(out.aggregate, np.float64)) <= thr * (1 + 1e-5)
    np.testing.assert_array_equal(out.weights, [1, 1, 1, 1, 1, 1, 1, 0])
    clipped = u[:7] * np.minimum(1, thr / np.linalg.norm(u[:7], axis=1))[:, None]
    np.testing.assert_allclose(out.aggregate, clipped.mean(0), rtol=1e-4, atol=1e-6)


def test_norm_bound_fixed_threshold_and_huge_rows():
    rng = np.random.default_rng(2)
    u = rng.normal(size=(5, P)).astype(np.float32) * 10
    u[4] = 1e30
    out = run_rule("norm_bound", u, np.ones(5, bool), c=ctx(config={"norm_threshold": 0.5}))
    agg = np.asarray(out.aggregate, np.float64)
    assert np.isfinite(agg).all() and np.linalg.norm(agg) <= 0.5 * (1 + 1e-5)


# ----------------------------------------------------------------------------- FLAME


def flame_round(seed=0):
    """10 benign updates around one direction, 3 pointing the opposite way, one NaN row
    and one padding slot; global model of the same scale as the updates."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=P).astype(np.float32)
    u = np.zeros((15, P), np.float32)
    u[:10] = d + 0.1 * rng.normal(size=(10, P))
    u[10:13] = -3 * d + 0.1 * rng.normal(size=(3, P))
    u[13] = np.nan
    u[14] = d  # padding
    valid = np.ones(15, bool)
    valid[14] = False
    w0 = 0.5 * rng.normal(size=P).astype(np.float32)
    return u, valid, w0


def test_flame_drops_the_far_cluster_and_keeps_the_majority():
    u, valid, w0 = flame_round()
    out = run_rule("flame", u, valid, global_params=w0, c=ctx(num_clients=15))
    w = np.asarray(out.weights)
    np.testing.assert_array_equal(w[10:], 0)
    # HDBSCAN admits at least min_cluster_size = 13 // 2 + 1 = 7 of the 13 candidates
    assert w[:10].sum() >= 7, w
    agg = np.asarray(out.aggregate)
    assert np.isfinite(agg).all()
    bound = float(out.info["clip_bound"])
    norms = np.linalg.norm(u[:13].astype(np.float64), axis=1)
    np.testing.assert_allclose(bound, np.median(norms), rtol=1e-5)
    np.testing.assert_allclose(float(out.info["noise_sigma"]), 0.001 * bound, rtol=1e-5)
    kept = w > 0
    clipped = u[kept] * np.minimum(1, bound / np.linalg.norm(u[kept], axis=1))[:, None]
    # the aggregate is the clipped mean plus N(0, sigma^2) noise
    resid = agg - clipped.mean(0)
    assert np.abs(resid).max() < 6 * 0.001 * bound


def test_flame_is_deterministic_in_the_key_and_lambda_configurable():
    u, valid, w0 = flame_round(1)
    a = run_rule("flame", u, valid, global_params=w0, seed=3).aggregate
    b = run_rule("flame", u, valid, global_params=w0, seed=3).aggregate
    np.testing.assert_array_equal(a, b)
    out = run_rule("flame", u, valid, global_params=w0, c=ctx(config={"flame_lambda": 0.01}))
    np.testing.assert_allclose(float(out.info["noise_sigma"]), 0.01 * float(out.info["clip_bound"]),
                               rtol=1e-5)


def test_flame_cosine_distances_match_float64():
    u, valid, w0 = flame_round(2)
    cand = valid & np.isfinite(u).all(1)
    d = np.asarray(flame_lib.cosine_distances(jnp.asarray(w0), jnp.asarray(u), jnp.asarray(cand)))
    x = (w0 + u[cand]).astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ref = 1 - x @ x.T
    np.testing.assert_allclose(d[np.ix_(cand, cand)], ref, atol=1e-5)


def test_majority_cluster_min_samples_decides_identical_copies():
    # 21 benign points chained 1 apart, 8 identical copies 1.2 off the chain's middle (the
    # shape of a Min-Sum round: benign updates chain tightly, the copies hang off them).
    pts = np.array([(i, 0.0) for i in range(21)] + [(10.0, 1.2)] * 8)
    d = np.linalg.norm(pts[:, None] - pts[None], axis=-1)
    single = flame_lib.majority_cluster(d)  # min_samples 1: the copies leave first
    assert single[:21].all() and not single[21:].any()
    dense = flame_lib.majority_cluster(d, min_samples=4)  # benign core distance 2 > 1.2
    assert dense[21:].all() and dense[:21].sum() < 21
    # min_samples above n is clamped, not an error
    np.testing.assert_array_equal(flame_lib.majority_cluster(np.zeros((3, 3)), min_samples=50), [True] * 3)


def test_flame_min_samples_from_the_config(monkeypatch):
    seen = []
    real = flame_lib.majority_cluster
    monkeypatch.setattr(flame_lib, "majority_cluster", lambda d, m=1: seen.append(m) or real(d, m))
    u, valid, w0 = flame_round(1)
    run_rule("flame", u, valid, global_params=w0, c=ctx(num_clients=15))
    run_rule("flame", u, valid, global_params=w0, c=ctx(num_clients=15, config={"flame_min_samples": 4}))
    assert seen == [1, 4]


def test_majority_cluster_edge_sizes():
    assert flame_lib.majority_cluster(np.zeros((0, 0))).shape == (0,)
    np.testing.assert_array_equal(flame_lib.majority_cluster(np.zeros((1, 1))), [True])
    np.testing.assert_array_equal(flame_lib.majority_cluster(np.zeros((2, 2))), [True, True])


# ----------------------------------------------------------------------------- hostile rows

RULES = ("krum", "median", "trimmed_mean", "norm_bound", "flame")


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 1e30, 3e38])
def test_hostile_rows_keep_the_aggregate_finite(name, value):
    rng = np.random.default_rng(0)
    u = rng.normal(size=(6, P)).astype(np.float32)
    u[4:] = value                      # clients 4, 5 (the last 2 of 6 are malicious)
    out = run_rule(name, u, np.ones(6, bool), c=ctx(num_clients=6, num_malicious=2),
                   global_params=rng.normal(size=P).astype(np.float32))
    assert np.isfinite(np.asarray(out.aggregate)).all(), (name, value)
    if not np.isfinite(value):
        np.testing.assert_array_equal(np.asarray(out.weights)[4:], 0)


@pytest.mark.parametrize("name", RULES)
def test_all_padding_gives_a_zero_aggregate(name):
    u = np.ones((3, P), np.float32)
    out = run_rule(name, u, np.zeros(3, bool))
    np.testing.assert_array_equal(out.aggregate, np.zeros(P))
    np.testing.assert_array_equal(out.weights, np.zeros(3))


# ----------------------------------------------------------------------------- FedREDefense


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "norm_bound", "krum"])
def test_redefense_aggregator_applies_the_rule_to_kept_slots(name):
    u, valid, cand = random_round(7, nan=())
    weights = np.array([1, 0, 1, 1, 1, 0, 1, 0, 0], np.float32)  # slots 1, 5 flagged
    c = ctx(config={"redefense_aggregator": name})
    agg_fn = redefense_lib._resolve_aggregator(name, c)
    inp = defenses.DefenseInput(jnp.zeros((P,)), jnp.asarray(u), jnp.arange(9), jnp.asarray(valid), 1,
                                jax.random.PRNGKey(0))
    got = agg_fn(jnp.asarray(u), jnp.asarray(weights), inp)
    kept = valid & (weights > 0)
    want = run_rule(name, u, kept).aggregate
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if name == "median":
        np.testing.assert_allclose(got, np.median(u[kept], axis=0), rtol=1e-6, atol=1e-6)


def test_redefense_aggregator_names_are_validated():
    with pytest.raises(ValueError, match="aggregator"):
        redefense_lib._resolve_aggregator("flame_typo", ctx())
    cfg = ExperimentConfig(defense="fedredefense", defense_config={"redefense_aggregator": "mean"})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert e.value.flag == "redefense_aggregator"
    validate(ExperimentConfig(defense="fedredefense", defense_config={"redefense_aggregator": "krum"}))
