"""LIE, Min-Max, Min-Sum and Fang (fedredefense_jax/attacks/model_poisoning.py) on tiny
synthetic update matrices, checked against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from fedredefense_jax import attacks, runner
from fedredefense_jax.attacks import model_poisoning as mp

TAU = mp.TAU


def _input(updates, malicious, valid=None, key=0):
    s = updates.shape[0]
    valid = np.ones(s, bool) if valid is None else np.asarray(valid, bool)
    return attacks.AttackInput(jnp.zeros(updates.shape[1]), jnp.asarray(updates, jnp.float32),
                               jnp.asarray(malicious, bool), jnp.asarray(valid), jnp.arange(s, dtype=jnp.int32),
                               1, jax.random.key(key))


def _ctx(num_clients, num_malicious, aggregation="fedavg", **config):
    return attacks.AttackContext(num_clients, num_malicious, jnp.zeros(1), aggregation, dict(config))


def _run(name, updates, malicious, valid=None, aggregation="fedavg", num_clients=None, num_malicious=None, key=0):
    s = updates.shape[0]
    ctx = _ctx(num_clients or s, num_malicious if num_malicious is not None else int(np.sum(malicious)), aggregation)
    a = attacks.make(name, ctx)
    out, _ = a.apply(a.init(s, None), _input(updates, malicious, valid, key))
    return np.asarray(out)


def _planted(seed=0, s=10, p=12, mal=(1, 4, 6, 8), pad=(9,)):
    rng = np.random.default_rng(seed)
    u = rng.normal(0.3, 1.0, (s, p)).astype(np.float32)
    malicious = np.zeros(s, bool)
    malicious[list(mal)] = True
    valid = np.ones(s, bool)
    valid[list(pad)] = False
    return u, malicious, valid


# ---------------------------------------------------------------- LIE


def test_lie_z_max_paper_setting():
    z = float(mp.lie_z_max(100, 28))
    assert abs(z - 0.4686) < 1e-3
    assert abs(z - norm.ppf(49 / 72)) < 1e-4


def test_lie_matches_numpy_formula_and_ignores_benign_rows():
    rng = np.random.default_rng(1)
    s, p, q = 100, 7, 28
    u = rng.normal(0.0, 1.0, (s, p)).astype(np.float32)
    malicious = np.zeros(s, bool)
    malicious[rng.choice(s, q, replace=False)] = True
    out = _run("lie", u, malicious)
    g = u[malicious].astype(np.float64)
    sup = np.floor(s / 2 + 1) - q
    z = norm.ppf((s - q - sup) / (s - q))
    expected = g.mean(0) - z * g.std(0, ddof=0)
    np.testing.assert_allclose(out[malicious], np.broadcast_to(expected, (q, p)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[~malicious], u[~malicious])
    # a benign row changed (even to NaN) changes nothing in the crafted update
    u2 = u.copy()
    u2[np.flatnonzero(~malicious)[0]] = np.nan
    u2[np.flatnonzero(~malicious)[1]] *= 1000
    out2 = _run("lie", u2, malicious)
    np.testing.assert_array_equal(out2[malicious], out[malicious])


def test_lie_fixed_z_replaces_the_formula():
    u, malicious, valid = _planted()
    g = u[malicious].astype(np.float64)
    ctx = _ctx(10, 4, lie_z=1.5)
    a = attacks.make("lie", ctx)
    out, state = a.apply(a.init(10, None), _input(u, malicious, valid))
    np.testing.assert_allclose(np.asarray(out)[malicious], np.broadcast_to(g.mean(0) - 1.5 * g.std(0), (4, 12)),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(state)[malicious], 1.5)    # recorded as the round's z
    assert not np.allclose(out, _run("lie", u, malicious, valid))    # the formula's z differs
    with pytest.raises(ValueError, match="lie_z must be finite"):
        attacks.make("lie", _ctx(10, 4, lie_z=float("nan")))
    for bad in ("abc", float("inf")):    # as grid.py's --attack_config=lie_z=... can pass them
        with pytest.raises(runner.ConfigError, match="--lie_z: must be a finite number"):
            runner.validate(runner.ExperimentConfig(attack="lie", attack_config={"lie_z": bad}))


def test_lie_degenerate_rounds_are_finite():
    # every participant malicious (p = q), malicious majority (r > 1), p <= 2 (r = 0)
    for p_, q_ in [(5, 5), (10, 7), (2, 1), (1, 1)]:
        z = float(mp.lie_z_max(p_, q_))
        assert np.isfinite(z) and abs(z) <= mp.LIE_Z_CAP
    # one malicious participant: sigma = 0, the crafted update is its genuine update
    u, malicious, valid = _planted(mal=(3,))
    out = _run("lie", u, malicious, valid)
    np.testing.assert_allclose(out[3], u[3], rtol=1e-6)


# ---------------------------------------------------------------- Min-Max / Min-Sum


def _minmax_ok(gm, g):
    d_pair = max(np.sum((a - b) ** 2) for a in g for b in g)
    return max(np.sum((gm - gi) ** 2) for gi in g) <= d_pair * (1 + 1e-6), d_pair


def _minsum_ok(gm, g):
    thr = max(sum(np.sum((gi - gj) ** 2) for gj in g) for gi in g)
    return sum(np.sum((gm - gi) ** 2) for gi in g) <= thr * (1 + 1e-6), thr


@pytest.mark.parametrize("rule,check", [("min_max", _minmax_ok), ("min_sum", _minsum_ok)])
def test_min_max_sum_constraint_holds_and_gamma_is_maximal(rule, check):
    for seed in range(3):
        u, malicious, valid = _planted(seed)
        crafted, gamma = mp.min_max_sum_craft(u, malicious, valid, rule=rule)
        gamma = float(gamma)
        assert 0 < gamma < 2 * mp.GAMMA_INIT - 1   # inside the search range, not capped
        g = u[malicious & valid].astype(np.float64)
        mu, sigma = g.mean(0), g.std(0, ddof=0)
        np.testing.assert_allclose(np.asarray(crafted), mu - gamma * sigma, rtol=1e-5, atol=1e-5)
        assert check(mu - gamma * sigma, g)[0]
        # strictly: gamma + 2 tau violates the constraint (no tolerance)
        gm = mu - (gamma + 2 * TAU) * sigma
        if rule == "min_max":
            assert max(np.sum((gm - gi) ** 2) for gi in g) > check(gm, g)[1]
        else:
            assert sum(np.sum((gm - gi) ** 2) for gi in g) > check(gm, g)[1]
        # through the registry: every malicious valid row gets it, nothing else changes
        out = _run(rule, u, malicious, valid)
        mv = malicious & valid
        np.testing.assert_allclose(out[mv], np.broadcast_to(np.asarray(crafted), (mv.sum(), u.shape[1])))
        np.testing.assert_array_equal(out[~mv], u[~mv])


def test_min_max_sum_single_attacker_sends_its_genuine_update():
    u, malicious, valid = _planted(mal=(2,))
    for rule in ("min_max", "min_sum"):
        out = _run(rule, u, malicious, valid)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out[2], u[2], rtol=1e-6)   # sigma = 0


# ---------------------------------------------------------------- Fang (Trimmed Mean)


def test_fang_trmean_intervals_and_direction():
    # columns planted so that each interval lies on the far side of zero
    g = np.array([[-1.0, -3.0, 2.0, -0.5],
                  [0.5, -1.0, 3.0, -4.0],
                  [2.0, 1.0, -0.5, 0.25]], np.float32)
    benign = np.array([[9.0, 9.0, 9.0, 9.0], [-9.0, -9.0, -9.0, -9.0]], np.float32)
    u = np.concatenate([benign[:1], g[:2], benign[1:], g[2:], np.zeros((1, 4), np.float32)])
    malicious = np.array([False, True, True, False, True, False])
    valid = np.array([True, True, True, True, True, False])
    out = _run("fang", u, malicious, valid, aggregation="trimmed_mean")
    mean, w_max, w_min = g.mean(0), g.max(0), g.min(0)
    s = np.where(mean > 0, 1.0, -1.0)
    b = 2.0
    lo = np.where(s < 0, w_max, np.where(w_min > 0, w_min / b, b * w_min))
    hi = np.where(s < 0, np.where(w_max > 0, b * w_max, w_max / b), w_min)
    crafted = out[malicious]
    assert np.all(crafted >= lo - 1e-6) and np.all(crafted <= hi + 1e-6)
    assert np.all((crafted - mean) * s <= 0)           # against the mean direction
    assert np.all(np.sign(crafted) == -s)              # planted: the opposite sign
    assert not np.allclose(crafted[0], crafted[1])     # each malicious client draws its own
    np.testing.assert_array_equal(out[~malicious], u[~malicious])
    # another round key, another draw, same intervals
    out2 = _run("fang", u, malicious, valid, aggregation="trimmed_mean", key=1)
    assert not np.allclose(out2[malicious], crafted)
    # a benign row changed does not change the crafted updates
    u3 = u.copy()
    u3[0] = np.nan
    np.testing.assert_array_equal(_run("fang", u3, malicious, valid, aggregation="trimmed_mean")[malicious], crafted)


def test_fang_trmean_general_intervals():
    u, malicious, valid = _planted(4, s=12, p=50, mal=(0, 3, 5, 7, 10), pad=(11,))
    out = _run("fang", u, malicious, valid, aggregation="median")
    lo, hi, s = (np.asarray(v) for v in mp.fang_trmean_bounds(u, malicious, valid))
    g = u[malicious & valid]
    assert np.all(out[malicious] >= lo - 1e-6) and np.all(out[malicious] <= hi + 1e-6)
    assert np.all((out[malicious] - g.mean(0)) * s <= 1e-6)
    np.testing.assert_array_equal(np.where(s < 0, lo, hi), np.where(s < 0, g.max(0), g.min(0)))
    np.testing.assert_array_equal(out[~malicious], u[~malicious])
    assert np.all(np.isfinite(out))


# ---------------------------------------------------------------- Fang (Krum)


def _krum_selected_crafted(crafted, g, k):
    """numpy Krum over [c crafted copies; g] with k neighbours: is a crafted row picked?"""
    c = len(g)
    x = np.concatenate([np.repeat(crafted[None], c, 0), g]).astype(np.float64)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    scores = np.sort(d, axis=1)[:, :k].sum(1)
    return int(np.argmin(scores)) < c


def _fang_ub(g, p):
    c, d = g.shape
    dist = np.sqrt(((g[:, None] - g[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    n_nb = min(p - c - 2, c - 1)
    first = 0.0
    if p - 2 * c - 1 > 0 and n_nb >= 1:
        first = np.sort(dist, 1)[:, :n_nb].sum(1).min() / ((p - 2 * c - 1) * np.sqrt(d))
    return first + np.linalg.norm(g, axis=1).max() / np.sqrt(d)


def test_fang_krum_selects_a_crafted_update():
    rng = np.random.default_rng(3)
    s, p_dim = 10, 20
    u = rng.normal(0.0, 1.0, (s, p_dim)).astype(np.float32)
    malicious = np.zeros(s, bool)
    malicious[[2, 5, 7]] = True
    u[malicious] += 1.5                                     # compromised updates share a direction
    num_clients, num_malicious = 10, 3
    crafted, lam, sel, lam_ub = mp.fang_krum_craft(u, malicious, np.ones(s, bool), num_clients, num_malicious)
    lam, lam_ub, crafted = float(lam), float(lam_ub), np.asarray(crafted, np.float64)
    g = u[malicious].astype(np.float64)
    np.testing.assert_allclose(lam_ub, _fang_ub(g, s), rtol=1e-5)
    k = min(max(s - 3 - 2, 1), 2 * 3 - 1)                  # server Krum q = 3 -> k = 5
    s_dir = np.where(g.mean(0) > 0, 1.0, -1.0)
    np.testing.assert_allclose(crafted, -lam * s_dir, rtol=1e-6)
    assert bool(sel) and _krum_selected_crafted(crafted, g, k)
    assert lam < lam_ub                                     # planted so that halving was needed
    assert not _krum_selected_crafted(-2 * lam * s_dir, g, k)   # lambda is the first that works
    np.testing.assert_allclose(lam_ub / lam, 2.0 ** round(np.log2(lam_ub / lam)), rtol=1e-5)
    out = _run("fang", u, malicious, aggregation="krum", num_clients=num_clients, num_malicious=num_malicious)
    np.testing.assert_allclose(out[malicious], np.broadcast_to(crafted, (3, p_dim)), rtol=1e-6)
    np.testing.assert_array_equal(out[~malicious], u[~malicious])


# ---------------------------------------------------------------- all four


@pytest.mark.parametrize("name,aggregation", [("lie", "fedavg"), ("min_max", "fedavg"), ("min_sum", "median"),
                                              ("fang", "trimmed_mean"), ("fang", "krum")])
def test_only_malicious_valid_rows_change_and_benign_rows_are_unread(name, aggregation):
    u, malicious, valid = _planted(7)
    malicious[9] = True                                   # a padding slot flagged malicious: untouched
    out = _run(name, u, malicious, valid, aggregation=aggregation, num_clients=10, num_malicious=4)
    mv = malicious & valid
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[~mv], u[~mv])
    assert not np.allclose(out[mv], u[mv])
    # benign and padding rows replaced by NaN / huge values: the crafted rows do not move
    u2 = u.copy()
    u2[0] = np.nan
    u2[3] = 1e30
    u2[9] = np.inf
    out2 = _run(name, u2, malicious, valid, aggregation=aggregation, num_clients=10, num_malicious=4)
    np.testing.assert_array_equal(out2[mv], out[mv])
    np.testing.assert_array_equal(out2[~mv], u2[~mv])


@pytest.mark.parametrize("name,aggregation", [("lie", "fedavg"), ("min_max", "fedavg"), ("min_sum", "fedavg"),
                                              ("fang", "trimmed_mean"), ("fang", "krum")])
def test_no_malicious_participant_and_single_attacker(name, aggregation):
    u, _, valid = _planted(2)
    none = np.zeros(u.shape[0], bool)
    none[9] = True                                        # only on a padding slot
    np.testing.assert_array_equal(_run(name, u, none, valid, aggregation=aggregation, num_malicious=1), u)
    one = np.zeros(u.shape[0], bool)
    one[4] = True
    out = _run(name, u, one, valid, aggregation=aggregation, num_malicious=1)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(np.delete(out, 4, 0), np.delete(u, 4, 0))


@pytest.mark.parametrize("name,aggregation,key", [("lie", "fedavg", "z"), ("min_max", "fedavg", "gamma"),
                                                  ("min_sum", "fedavg", "gamma"), ("fang", "krum", "lambda")])
def test_round_record_holds_the_coefficient_at_malicious_slots(name, aggregation, key):
    u, malicious, valid = _planted(5)
    inp = _input(u, malicious, valid)
    if name == "lie":
        _, want = mp.lie_craft(inp.updates, inp.malicious, inp.valid)
    elif name == "fang":
        _, want, _, _ = mp.fang_krum_craft(inp.updates, inp.malicious, inp.valid, num_clients=10, num_malicious=4)
    else:
        _, want = mp.min_max_sum_craft(inp.updates, inp.malicious, inp.valid, rule=name)
    a = attacks.make(name, _ctx(10, 4, aggregation))
    _, state = a.apply(a.init(10, None), inp)
    rec = np.asarray(a.record(state, inp.client_ids)[key])
    mv = malicious & valid
    assert float(want) > 0
    np.testing.assert_allclose(rec[mv], float(want), rtol=1e-6)
    assert np.all(np.isnan(rec[~mv]))


def test_registered():
    for name in ("lie", "min_max", "min_sum", "fang"):
        assert name in attacks.names()
