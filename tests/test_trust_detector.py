"""Tests of FLTrust (fedredefense_jax/defenses/fltrust.py), FLDetector (fldetector.py), the
root-dataset sample and the simulator's restart hook, on tiny synthetic matrices and models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedredefense_jax import attacks, checkpoint, defenses, metrics, partition, simulation, training
from fedredefense_jax.config import ConfigError, ExperimentConfig, validate
from fedredefense_jax.defenses import fldetector as fd
from fedredefense_jax.defenses import fltrust as ft
from tiny import tiny_clients, tiny_setup

P = 24


def ctx(num_clients=10, config=None, init_params=None, **extra):
    return defenses.DefenseContext(
        apply_fn=None, unravel=None, num_clients=num_clients, num_malicious=3, num_classes=10,
        input_shape=(8, 8, 1), dataset="fashion_mnist",
        init_params=jnp.zeros((P,)) if init_params is None else jnp.asarray(init_params),
        config=dict(config or {}), **extra)


def np_fltrust(u, valid, g0):
    """Float64 reference of FLTrust's rule."""
    u = np.asarray(u, np.float64)
    g0 = np.asarray(g0, np.float64)
    cand = valid & np.all(np.isfinite(u), axis=1)
    ts = np.zeros(len(u))
    for i in np.flatnonzero(cand):
        n = np.linalg.norm(u[i])
        ts[i] = max(0.0, u[i] @ g0 / (n * np.linalg.norm(g0))) if n > 0 else 0.0
    if ts.sum() == 0:
        return np.zeros_like(g0), ts
    agg = sum(ts[i] * np.linalg.norm(g0) / np.linalg.norm(u[i]) * u[i] for i in np.flatnonzero(ts)) / ts.sum()
    return agg, ts / ts.sum()


# ----------------------------------------------------------------------------- FLTrust


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fltrust_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    g0 = rng.normal(size=P).astype(np.float32)
    u = (rng.normal(size=(9, P)) + 0.5 * g0).astype(np.float32) * rng.uniform(0.1, 10, (9, 1)).astype(np.float32)
    valid = np.ones(9, bool)
    valid[[7, 8]] = False
    u[[7, 8]] = 1e6  # padding: ignored
    u[3] = np.nan
    agg, weights, trust, cosine, n0 = ft.fltrust_rule(jnp.asarray(u), jnp.asarray(valid), jnp.asarray(g0))
    ref_agg, ref_w = np_fltrust(u, valid, g0)
    np.testing.assert_allclose(agg, ref_agg, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(weights, ref_w, rtol=2e-5, atol=1e-7)
    assert float(n0) == pytest.approx(np.linalg.norm(g0), rel=1e-6)
    assert float(weights[3]) == 0 and np.isnan(cosine[3]) and float(trust[3]) == 0


def test_fltrust_excludes_opposite_updates_and_rescales_to_server_norm():
    rng = np.random.default_rng(0)
    g0 = rng.normal(size=P).astype(np.float32)
    orth = rng.normal(size=P).astype(np.float32)
    orth -= (orth @ g0) / (g0 @ g0) * g0
    u = np.stack([5 * g0, -2 * g0, 0.01 * g0, -g0 + 0.1 * orth, orth]).astype(np.float32)
    agg, weights, trust, _, _ = ft.fltrust_rule(jnp.asarray(u), jnp.ones(5, bool), jnp.asarray(g0))
    # only the two updates along g0 count, both rescaled to ||g0||: the aggregate is g0
    np.testing.assert_allclose(weights, [0.5, 0, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(agg, g0, rtol=1e-5, atol=1e-6)
    # all opposite: nothing is trusted, the global model does not move
    agg, weights, _, _, _ = ft.fltrust_rule(jnp.asarray(-u[[0, 2]]), jnp.ones(2, bool), jnp.asarray(g0))
    assert not np.asarray(weights).any() and not np.asarray(agg).any()


def test_fltrust_hostile_rows_stay_finite():
    rng = np.random.default_rng(1)
    g0 = rng.normal(size=P).astype(np.float32)
    u = np.stack([g0 + 0.1 * rng.normal(size=P), np.full(P, np.nan), np.full(P, np.inf),
                  np.sign(g0) * 1e30, np.zeros(P), np.full(P, 3e38)]).astype(np.float32)
    agg, weights, trust, cosine, _ = ft.fltrust_rule(jnp.asarray(u), jnp.ones(6, bool), jnp.asarray(g0))
    agg, weights = np.asarray(agg), np.asarray(weights)
    assert np.isfinite(agg).all() and np.isfinite(weights).all()
    assert weights[[1, 2, 4]].tolist() == [0, 0, 0] and weights[0] > 0 and weights[3] > 0
    assert np.linalg.norm(agg) <= np.linalg.norm(g0) * (1 + 1e-5)  # 1e30 counts as a unit vector
    ref_agg, ref_w = np_fltrust(u, np.ones(6, bool), g0)
    np.testing.assert_allclose(weights, ref_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(agg, ref_agg, rtol=1e-4, atol=1e-6)
    # a non-finite server update trusts no one
    agg, weights, _, _, n0 = ft.fltrust_rule(jnp.asarray(u), jnp.ones(6, bool), jnp.full(P, jnp.nan))
    assert not np.asarray(weights).any() and not np.asarray(agg).any() and np.isnan(n0)


@pytest.mark.slow
def test_fltrust_trains_the_server_update_on_the_root_data():
    _, w0, unravel, apply_fn = tiny_setup()
    x, y, counts = tiny_clients([20])
    local = training.make_client_update(apply_fn, unravel, 0.5, 0.25, batch_size=8, lr=0.1, epochs=1)
    rule = defenses.make("fltrust", ctx(init_params=w0, server_data=(x[0], y[0]), local_update=local))
    key = jax.random.PRNGKey(3)
    g0 = np.asarray(jax.jit(local)(w0, jnp.asarray(x[0]), jnp.asarray(y[0]), jnp.int32(20), key))
    assert np.linalg.norm(g0) > 0
    u = jnp.asarray(np.stack([3 * g0, -g0]))
    out, _ = rule.apply(rule.init(2, key), defenses.DefenseInput(w0, u, jnp.arange(2), jnp.ones(2, bool), 1, key))
    np.testing.assert_allclose(out.aggregate, g0, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(out.weights, [1, 0])
    assert float(out.info["server_norm"]) == pytest.approx(np.linalg.norm(g0), rel=1e-5)
    assert not np.asarray(out.flagged).any() and not out.restart
    with pytest.raises(ValueError, match="server_data"):
        defenses.make("fltrust", ctx())


def test_root_sample_is_seeded_uniform_and_from_the_clients_data():
    parts = partition.dirichlet_split(np.repeat(np.arange(10), 100), 8, 0.5, seed=0)
    a = partition.server_sample(parts, 500, seed=0)
    assert len(a) == 500 and len(np.unique(a)) == 500
    assert np.isin(a, np.concatenate(parts)).all()
    np.testing.assert_array_equal(a, partition.server_sample(parts, 500, seed=0))
    assert not np.array_equal(a, partition.server_sample(parts, 500, seed=1))
    assert len(partition.server_sample(parts, 5000, seed=0)) == 1000  # capped by the data


# ----------------------------------------------------------------------------- L-BFGS


def test_lbfgs_is_exact_on_a_quadratic():
    """Pairs of a quadratic (y = H s exactly) along eigen-directions of H, the remaining
    eigenvalue equal to sigma: the compact L-BFGS matrix is H itself, for any v."""
    rng = np.random.default_rng(0)
    n, k = 12, 5
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = rng.uniform(0.5, 3, n)
    lam[k:] = lam[k - 1]
    h = q @ np.diag(lam) @ q.T
    s = q[:, :k].T * rng.uniform(0.5, 2, (k, 1))
    for sign in (1, -1):  # updates are -lr * gradients: negative curvature works too
        for _ in range(3):
            v = rng.normal(size=n)
            np.testing.assert_allclose(fd.lbfgs_hvp(s, s @ (sign * h), v), sign * h @ v, rtol=1e-10, atol=1e-10)


def test_lbfgs_matches_dense_bfgs_recursion():
    rng = np.random.default_rng(1)
    n, k = 15, 6
    m = rng.normal(size=(n, n))
    h = m @ m.T + n * np.eye(n)
    s = rng.normal(size=(k, n))
    y = s @ h
    b = (y[-1] @ s[-1]) / (s[-1] @ s[-1]) * np.eye(n)
    for sj, yj in zip(s, y):
        bs = b @ sj
        b = b - np.outer(bs, bs) / (sj @ bs) + np.outer(yj, yj) / (yj @ sj)
    v = rng.normal(size=n)
    np.testing.assert_allclose(fd.lbfgs_hvp(s, y, v), b @ v, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fd.lbfgs_hvp(s, y, s[-1]), y[-1], rtol=1e-9, atol=1e-9)  # secant
    assert not fd.lbfgs_hvp(s[:0], y[:0], v).any()
    assert not fd.lbfgs_hvp(np.zeros((2, n)), np.zeros((2, n)), v).any()  # no curvature: zero


# ----------------------------------------------------------------------------- gap statistic


def test_gap_statistic_one_cluster_for_homogeneous_scores():
    rng = np.random.default_rng(1)
    for seed in range(8):
        assert fd.gap_statistic(rng.normal(0.1, 0.01, 30), seed) == 1
    assert fd.gap_statistic(np.full(20, 0.05), 0) == 1
    assert fd.gap_statistic(np.full(20, 0.05) + 1e-12 * np.arange(20), 0) == 1  # float noise
    two = np.r_[rng.normal(0.02, 0.002, 22), rng.normal(0.09, 0.002, 8)]
    assert fd.gap_statistic(two, 0) >= 2
    np.testing.assert_array_equal(fd.two_means_high(two, 0), np.arange(30) >= 22)


# ----------------------------------------------------------------------------- FLDetector


def planted_run(seed, rounds, num_clients=10, q=3, attack="noise", config=None, noise=1e-3):
    """Clients of a quadratic: benign ``g_i(w) = -0.1 A (w - c_i)`` (+ small noise), which
    the trajectory predicts; the last ``q`` send fresh random vectors (``attack='noise'``)
    or NaN. Returns the per-round outputs and the final state."""
    rng = np.random.default_rng(seed)
    n = 20
    m = rng.normal(size=(n, n))
    a = m @ m.T / n + 0.5 * np.eye(n)
    c = rng.normal(size=(num_clients, n))
    w0 = rng.normal(size=n).astype(np.float32)
    cfg = config or {"fldetector_cold_start": 5, "fldetector_window": 3, "fldetector_history": 4}
    rule = defenses.make("fldetector", ctx(num_clients, cfg, init_params=w0))
    state = rule.init(num_clients, jax.random.PRNGKey(0))
    w = w0.copy()
    ids = jnp.arange(num_clients, dtype=jnp.int32)
    outs = []
    for t in range(1, rounds + 1):
        g = -0.1 * (w[None] - c) @ a + noise * rng.normal(size=(num_clients, n))
        if q and attack == "noise":
            g[-q:] = rng.normal(size=(q, n)) * np.linalg.norm(g[0]) / np.sqrt(n)
        elif q:
            g[-q:] = np.nan
        inp = defenses.DefenseInput(jnp.asarray(w), jnp.asarray(g, jnp.float32), ids, jnp.ones(num_clients, bool),
                                    t, jax.random.PRNGKey(t))
        out, state = rule.apply(state, inp)
        outs.append((g, out))
        w = w0.copy() if out.restart else w + np.asarray(out.aggregate)
    return outs, state


@pytest.mark.slow
def test_fldetector_flags_inconsistent_clients_after_cold_start():
    outs, state = planted_run(0, rounds=10)
    for t, (g, out) in enumerate(outs, start=1):
        flagged = np.asarray(out.flagged)
        if t < 8:  # cold start 5, then 3 rounds of distances fill the window
            assert not flagged.any() and not out.restart
            np.testing.assert_allclose(out.aggregate, g.mean(0), rtol=1e-5, atol=1e-6)  # FedAvg
            assert np.isnan(out.info["suspicious_score"]).all()
            assert np.isnan(out.info["distance"]).all() == (t <= 5)
        elif t == 8:
            np.testing.assert_array_equal(flagged, np.arange(10) >= 7)
            assert out.restart and bool(out.info["attack_detected"])
            # the detection round aggregates before judging (FLDetector's code); the restart drops it
            np.testing.assert_array_equal(out.weights, np.ones(10))
            score = np.asarray(out.info["suspicious_score"])
            assert score[7:].min() > score[:7].max()
        else:  # detection is done once; plain FedAvg afterwards
            assert not flagged.any() and not out.restart
    assert bool(state.detected)


@pytest.mark.slow
def test_fldetector_first_detection_at_cold_start_plus_window_gives_aar_60():
    """The paper's defaults (cold start 50, window 10): detection at round 60, and a caught
    attacker was aggregated in rounds 1-60 (Table 1's AAR 60), then never again."""
    outs, _ = planted_run(0, rounds=63, config={"fldetector_cold_start": 50})     # default window, history
    detected = [t for t, (_, out) in enumerate(outs, start=1) if out.restart]
    assert detected == [fd.DEFAULT_COLD_START + fd.DEFAULT_WINDOW] == [60]
    np.testing.assert_array_equal(outs[59][1].flagged, np.arange(10) >= 7)
    weights = np.stack([np.asarray(out.weights) for _, out in outs])        # [T, C], ids = slots here
    weights[60:, 7:] = 0                                                    # expelled: no longer participate
    assert metrics.aar(weights, np.arange(10) >= 7) == 60


@pytest.mark.slow
def test_fldetector_no_detection_without_attack():
    outs, _ = planted_run(0, rounds=20, num_clients=20, q=0,
                          config={"fldetector_cold_start": 5, "fldetector_window": 10, "fldetector_history": 4})
    assert not any(np.asarray(out.flagged).any() or out.restart for _, out in outs)
    assert np.isfinite(outs[-1][1].info["suspicious_score"]).all()


@pytest.mark.slow
def test_fldetector_nan_rows_are_least_consistent_and_never_averaged():
    outs, _ = planted_run(1, rounds=5, attack="nan",
                          config={"fldetector_cold_start": 2, "fldetector_window": 2, "fldetector_history": 4})
    for t, (g, out) in enumerate(outs, start=1):
        assert np.isfinite(np.asarray(out.aggregate)).all()
        np.testing.assert_array_equal(out.weights[7:], 0)
        if t == 4:
            np.testing.assert_array_equal(out.flagged, np.arange(10) >= 7)
            assert out.restart


def test_fldetector_state_survives_a_checkpoint_round_trip():
    outs, st = planted_run(0, rounds=7)
    rule = defenses.make("fldetector", ctx(10, {"fldetector_cold_start": 5, "fldetector_window": 3,
                                                "fldetector_history": 4}, init_params=np.zeros(20)))
    template = simulation.SimState(0, jnp.zeros(20), jax.random.key(0), np.zeros(10, bool),
                                   rule.init(10, jax.random.PRNGKey(0)), ())
    saved = simulation.SimState(7, jnp.zeros(20), jax.random.key(0), np.zeros(10, bool), st, ())
    back = checkpoint.from_tree(checkpoint.to_tree(saved), template).defense_state
    for a, b in zip(st, back):
        assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_fldetector_refuses_partial_participation():
    with pytest.raises(ConfigError, match="full participation") as e:
        validate(ExperimentConfig(defense="fldetector", participation_rate=0.5))
    assert e.value.flag == "participation_rate"
    validate(ExperimentConfig(defense="fldetector"))
    with pytest.raises(ValueError, match="fldetector_window"):
        defenses.make("fldetector", ctx(config={"fldetector_window": 0}))


# ----------------------------------------------------------------------------- restart hook


@pytest.mark.slow
def test_restart_resets_the_global_model_and_keeps_counting_rounds():
    _, w0, unravel, apply_fn = tiny_setup()
    x, y, counts = tiny_clients([12, 12, 12])
    avg = defenses.make("fedavg", ctx(3, init_params=w0))

    def apply(state, inp):
        out, state = avg.apply(state, inp)
        return out._replace(restart=inp.round == 2), state

    attack = attacks.make("none", attacks.AttackContext(3, 0, w0, "fedavg", {}))
    f = simulation.build_federation(simulation.FLConfig(3, 0, batch_size=4, lr=0.1),
                                    partition.ClientData(x, y, counts), apply_fn, unravel, w0, 0.5, 0.25, attack,
                                    defenses.Defense("restart_at_2", avg.init, apply))
    state = simulation.init_state(f)
    state, rec1 = simulation.step(f, state)
    assert not np.array_equal(state.params, w0) and "restart" not in rec1
    state, rec2 = simulation.step(f, state)
    assert state.round == 2 and rec2["restart"] is True
    np.testing.assert_array_equal(state.params, w0)
    state, rec3 = simulation.step(f, state)
    assert state.round == 3 and "restart" not in rec3
    assert not np.array_equal(state.params, w0)
