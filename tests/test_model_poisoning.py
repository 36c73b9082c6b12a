"""LIE, Min-Max, Min-Sum and Fang (fedredefense_jax/attacks/model_poisoning.py) on tiny
synthetic update matrices, checked against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from fedredefense_jax import attacks
from fedredefense_jax.attacks import model_poisoning as mp
from fedredefense_jax.config import ConfigError, ExperimentConfig, validate

TAU = mp.TAU


def _input(updates, malicious, valid=None, key=0):
    s = updates.shape[0]
    valid = np.ones(s, bool) if valid is None else np.asarray(valid, bool)
    return attacks.AttackInput(jnp.zeros(updates.shape[1]), jnp.asarray(updates, jnp.float32),
                               jnp.asarray(malicious, bool), jnp.asarray(valid), jnp.arange(s, dtype=jnp.int32),
                               1, jax.random.key(key))


def _ctx(num_clients, num_malicious, aggregation="fedavg", **config):
    return attacks.AttackContext(num_clients, num_malicious, jnp.zeros(1), aggregation, dict(config))


def _run(name, updates, malicious, valid=None, aggregation="fedavg", num_clients=None, num_malicious=None, key=0,
         groups=None, **config):
    s = updates.shape[0]
    ctx = _ctx(num_clients or s, num_malicious if num_malicious is not None else int(np.sum(malicious)), aggregation,
               **config)
    a = attacks.make(name, ctx)
    inp = _input(updates, malicious, valid, key)
    if groups is not None:
        inp = inp._replace(groups=jnp.asarray(groups, jnp.int32))
    out, _ = a.apply(a.init(s, None), inp)
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
    np.testing.assert_allclose(np.asarray(state.coef)[malicious], 1.5)    # recorded as the round's z
    assert not np.allclose(out, _run("lie", u, malicious, valid))    # the formula's z differs
    with pytest.raises(ConfigError, match=r"--lie_z: must be a finite number, got nan \(attack lie\)"):
        attacks.make("lie", _ctx(10, 4, lie_z=float("nan")))
    for bad in ("abc", float("inf")):    # as grid.py's --attack_config=lie_z=... can pass them
        with pytest.raises(ConfigError, match="--lie_z: must be a (finite )?number"):
            validate(ExperimentConfig(attack="lie", attack_config={"lie_z": bad}))


def test_lie_degenerate_rounds_are_finite():
    # every participant malicious (p = q), malicious majority (r > 1), p <= 2 (r = 0)
    for p_, q_ in [(5, 5), (10, 7), (2, 1), (1, 1)]:
        z = float(mp.lie_z_max(p_, q_))
        assert np.isfinite(z) and abs(z) <= mp.LIE_Z_CAP


# ---------------------------------------------------------------- Min-Max / Min-Sum


def _sq(a, b):
    return float(np.sum((np.asarray(a, np.float64) - b) ** 2))


def _minmax_threshold(g):
    return max(_sq(a, b) for a in g for b in g)


def _minsum_threshold(g, bound):
    r = [sum(_sq(gi, gj) for gj in g) for gi in g]
    return min(r) if bound == "min" else max(r)


def _minsum_closed_form(g, bound):
    """gamma_max from the docstring's closed form, in numpy (sample std, as the attack)."""
    c = len(g)
    mu, sigma0 = g.mean(0), g.std(0, ddof=0)
    dev = np.sum((g - mu) ** 2, axis=1)
    pick = dev.min() if bound == "min" else dev.max()
    r = np.array([sum(_sq(gi, gj) for gj in g) for gi in g])
    closed = np.sqrt((c - 1) / c * pick / np.sum(sigma0 ** 2))
    # the same number written with the bound's r_i only
    alt = np.sqrt((c - 1) / c * (2 * (r.min() if bound == "min" else r.max()) / r.mean() - 1))
    np.testing.assert_allclose(closed, alt, rtol=1e-9)
    return closed


@pytest.mark.parametrize("rule,bound", [("min_max", "min"), ("min_sum", "min"), ("min_sum", "max")])
def test_min_max_sum_constraint_holds_and_gamma_is_maximal(rule, bound):
    for seed in range(3):
        u, malicious, valid = _planted(seed)
        crafted, gamma = mp.min_max_sum_craft(u, malicious, valid, rule=rule, bound=bound)
        gamma = float(gamma)
        assert 0 < gamma < 2 * mp.GAMMA_INIT - 1   # inside the search range, not capped
        g = u[malicious & valid].astype(np.float64)
        mu, sigma = g.mean(0), g.std(0, ddof=1)      # the authors' torch.std
        np.testing.assert_allclose(np.asarray(crafted), mu - gamma * sigma, rtol=1e-5, atol=1e-5)
        thr = _minmax_threshold(g) if rule == "min_max" else _minsum_threshold(g, bound)

        def lhs(gm):
            d = [_sq(gm, gi) for gi in g]
            return max(d) if rule == "min_max" else sum(d)

        assert lhs(mu - gamma * sigma) <= thr * (1 + 1e-6)
        assert lhs(mu - (gamma + 2 * TAU) * sigma) > thr     # gamma + 2 tau violates it
        if rule == "min_sum":
            assert abs(gamma - _minsum_closed_form(g, bound)) <= 2 * TAU * (1 + 1e-3)
        # through the registry: every malicious valid row gets it, nothing else changes
        out = _run(rule, u, malicious, valid, **({"min_sum_bound": bound} if rule == "min_sum" else {}))
        mv = malicious & valid
        np.testing.assert_allclose(out[mv], np.broadcast_to(np.asarray(crafted), (mv.sum(), u.shape[1])))
        np.testing.assert_array_equal(out[~mv], u[~mv])


def test_min_sum_minimum_bound_keeps_the_update_closer_to_the_mean():
    u, malicious, valid = _planted(11, s=30, p=200, mal=tuple(range(0, 28, 2)), pad=())
    _, g_min = mp.min_max_sum_craft(u, malicious, valid, rule="min_sum", bound="min")
    _, g_max = mp.min_max_sum_craft(u, malicious, valid, rule="min_sum", bound="max")
    assert 0 < float(g_min) < float(g_max)
    with pytest.raises(ValueError, match="min_sum_bound"):
        attacks.make("min_sum", _ctx(10, 4, min_sum_bound="median"))


# ---------------------------------------------------------------- Fang (Trimmed Mean)


def test_fang_partial_knowledge_matches_the_reference_intervals():
    u, malicious, valid = _planted(4, s=12, p=400, mal=(0, 3, 5, 7, 10), pad=(11,))
    u[:, :100] -= 0.6                                    # both signs of the mean occur
    g = u[malicious & valid].astype(np.float64)
    mu, sigma = g.mean(0), g.std(0, ddof=1)              # torch.std in the authors' code
    lo = np.where(mu > 0, mu - 4 * sigma, mu + 3 * sigma)
    hi = np.where(mu > 0, mu - 3 * sigma, mu + 4 * sigma)
    assert (mu > 0).any() and (mu <= 0).any()
    out = _run("fang", u, malicious, valid, aggregation="median")
    mv = malicious & valid
    crafted = out[mv].astype(np.float64)
    tol = 1e-5 * (1 + np.abs(mu))
    assert np.all(crafted >= lo - tol) and np.all(crafted <= hi + tol)           # inside the interval
    assert np.all((crafted - mu) * np.where(mu > 0, 1.0, -1.0) < 0)                # against the direction
    # the draws fill the interval (uniform): both halves of it are hit, per client
    frac = (crafted - lo) / (hi - lo)
    assert 0.4 < frac.mean() < 0.6 and (frac < 0.1).any() and (frac > 0.9).any()
    assert len({tuple(np.round(r, 6)) for r in crafted}) == mv.sum()              # fresh per client
    out2 = _run("fang", u, malicious, valid, aggregation="median", key=1)
    assert not np.allclose(out2[mv], out[mv])                                      # and per round
    np.testing.assert_array_equal(out[~mv], u[~mv])
    lo_j, hi_j, s_j = (np.asarray(v) for v in mp.fang_trim_bounds(u, malicious, valid))
    np.testing.assert_allclose(lo_j, lo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hi_j, hi, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(s_j, np.where(mu > 0, 1.0, -1.0))


def test_fang_trim_ignores_benign_rows():
    u, malicious, valid = _planted(5)
    out = _run("fang", u, malicious, valid, aggregation="trimmed_mean")
    u3 = u.copy()
    u3[~malicious] = np.nan
    np.testing.assert_array_equal(_run("fang", u3, malicious, valid, aggregation="trimmed_mean")[malicious & valid],
                                  out[malicious & valid])


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


STATISTICS = [("lie", "fedavg"), ("min_max", "fedavg"), ("min_sum", "fedavg"), ("fang", "trimmed_mean"),
              ("fang", "krum")]


@pytest.mark.parametrize("name,aggregation", STATISTICS)
def test_no_malicious_participant_leaves_the_updates(name, aggregation):
    u, _, valid = _planted(2)
    none = np.zeros(u.shape[0], bool)
    none[9] = True                                        # only on a padding slot
    np.testing.assert_array_equal(_run(name, u, none, valid, aggregation=aggregation, num_malicious=1), u)


@pytest.mark.parametrize("name,aggregation", STATISTICS)
def test_a_lone_attacker_sends_zero_as_the_authors_code(name, aggregation):
    u, _, valid = _planted(2)
    one = np.zeros(u.shape[0], bool)
    one[4] = True
    a = attacks.make(name, _ctx(10, 1, aggregation))
    inp = _input(u, one, valid)
    out, state = a.apply(a.init(10, None), inp)
    out = np.asarray(out)
    np.testing.assert_array_equal(out[4], 0.0)                                   # the zero update
    np.testing.assert_array_equal(np.delete(out, 4, 0), np.delete(u, 4, 0))
    rec = a.record(state, inp.client_ids)
    np.testing.assert_array_equal(np.asarray(rec["lone"]), np.arange(10) == 4)   # recorded
    for k, v in rec.items():
        if k != "lone":
            assert np.isnan(np.asarray(v)).all()                                 # no coefficient
    # 'genuine': the formulas with one update (sigma = 0) send it unchanged, except Krum's attack
    genuine = _run(name, u, one, valid, aggregation=aggregation, num_malicious=1, lone_attacker="genuine")
    assert np.all(np.isfinite(genuine))
    if aggregation != "krum":
        np.testing.assert_allclose(genuine[4], u[4], rtol=1e-6)
    with pytest.raises(ValueError, match="lone_attacker"):
        attacks.make(name, _ctx(10, 1, aggregation, lone_attacker="skip"))


@pytest.mark.parametrize("name,aggregation", STATISTICS)
def test_attackers_pool_within_their_group(name, aggregation):
    """Under per-group start models (FLCert) each group's compromised updates are pooled on
    their own: the crafted rows of a group equal the attack run on that group alone."""
    u, malicious, valid = _planted(8, s=16, p=10, mal=(1, 2, 3, 9, 11, 12, 14), pad=(15,))
    groups = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    groups[14] = 2                                        # group 2: one attacker, alone
    out = _run(name, u, malicious, valid, aggregation=aggregation, num_clients=16, num_malicious=7, groups=groups)
    for g in (0, 1):
        alone = np.where(groups == g, malicious, False)
        ref = _run(name, u, alone, valid & (groups == g), aggregation=aggregation, num_clients=16, num_malicious=7)
        rows = alone & valid
        if name == "fang" and aggregation != "krum":      # a fresh draw per slot: same interval
            lo, hi, _ = (np.asarray(v) for v in mp.fang_trim_bounds(u, alone, valid & (groups == g)))
            assert np.all(out[rows] >= lo - 1e-5) and np.all(out[rows] <= hi + 1e-5)
        else:
            np.testing.assert_allclose(out[rows], ref[rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[14], 0.0)           # the lone attacker of group 2
    mv = malicious & valid
    np.testing.assert_array_equal(out[~mv], u[~mv])


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
    record = a.record(state, inp.client_ids)
    rec = np.asarray(record[key])
    mv = malicious & valid
    assert float(want) > 0
    np.testing.assert_allclose(rec[mv], float(want), rtol=1e-6)
    assert np.all(np.isnan(rec[~mv]))
    assert not np.asarray(record["lone"]).any()


def test_registered():
    for name in ("lie", "min_max", "min_sum", "fang"):
        assert name in attacks.names()
