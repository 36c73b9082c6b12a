"""FLCert: groups, per-group Median models, per-slot start models, majority vote."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from fedredefense_jax import attacks, defenses, partition, simulation, training
from fedredefense_jax.defenses import flcert

P = 12


def make(num_clients=20, groups=4):
    ctx = defenses.DefenseContext(
        apply_fn=None, unravel=None, num_clients=num_clients, num_malicious=4, num_classes=10,
        input_shape=(8, 8, 1), dataset="fashion_mnist", init_params=jnp.arange(P, dtype=jnp.float32),
        config={"flcert_groups": groups})
    rule = defenses.make("flcert", ctx)
    return rule, rule.init(num_clients, jax.random.PRNGKey(3))


def test_groups_are_balanced_and_fixed_by_the_key():
    g = np.asarray(flcert.assign_groups(jax.random.PRNGKey(1), 23, 5))
    counts = np.bincount(g, minlength=5)
    assert counts.sum() == 23 and counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(g, np.asarray(flcert.assign_groups(jax.random.PRNGKey(1), 23, 5)))
    assert not np.array_equal(g, np.asarray(flcert.assign_groups(jax.random.PRNGKey(2), 23, 5)))


def test_each_group_moves_by_the_median_of_its_own_members():
    rule, state = make()
    group = np.asarray(state.group)
    rng = np.random.default_rng(0)
    ids = np.arange(16, dtype=np.int32)  # clients 16..19 do not participate this round
    u = rng.normal(size=(16, P)).astype(np.float32)
    u[5] = np.nan  # a non-finite row is not a candidate
    valid = np.ones(16, bool)
    valid[15] = False  # padding
    u[15] = 1e6
    w = jnp.asarray(np.mean(np.asarray(state.models), 0))
    out, new = rule.apply(state, defenses.DefenseInput(w, jnp.asarray(u), jnp.asarray(ids),
                                                       jnp.asarray(valid), 1, jax.random.PRNGKey(0)))
    models0 = np.asarray(state.models)
    models = np.asarray(new.models)
    for g in range(4):
        mine = valid & (group[ids] == g) & np.isfinite(u).all(1)
        expect = models0[g] + (np.median(u[mine], 0) if mine.any() else 0.0)
        np.testing.assert_allclose(models[g], expect, rtol=1e-6, atol=1e-6)
    # the simulator's single model is kept at the mean of the group models
    np.testing.assert_allclose(np.asarray(w + out.aggregate), models.mean(0), rtol=1e-5, atol=1e-5)
    assert not np.asarray(out.flagged).any()
    np.testing.assert_array_equal(np.asarray(out.weights) > 0, valid & np.isfinite(u).all(1))


def test_a_group_without_participants_keeps_its_model():
    rule, state = make(groups=4)
    group = np.asarray(state.group)
    ids = np.flatnonzero(group != 2).astype(np.int32)
    u = np.ones((len(ids), P), np.float32)
    out, new = rule.apply(state, defenses.DefenseInput(jnp.zeros(P), jnp.asarray(u), jnp.asarray(ids),
                                                       jnp.ones(len(ids), bool), 1, jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(np.asarray(new.models)[2], np.asarray(state.models)[2])
    np.testing.assert_allclose(np.asarray(new.models)[0], np.asarray(state.models)[0] + 1)


def test_slots_start_from_their_groups_model():
    rule, state = make()
    models = np.asarray(state.models) + np.arange(4)[:, None] * 10.0
    state = state._replace(models=jnp.asarray(models))
    ids = np.array([3, 0, 17], np.int32)
    start = np.asarray(rule.client_models(state, jnp.zeros(P), jnp.asarray(ids)))
    np.testing.assert_array_equal(start, models[np.asarray(state.group)[ids]])
    np.testing.assert_array_equal(np.asarray(rule.ensemble(state)), models)


def test_majority_vote_matches_a_hand_count():
    preds = np.array([[1, 2, 3, 0, 5],
                      [1, 2, 4, 9, 6],
                      [2, 7, 4, 9, 7],
                      [1, 7, 3, 0, 8]])
    # column 0: 1 x3; col 1: 2 and 7 tie -> 2; col 2: 3 and 4 tie -> 3; col 3: 0 and 9 tie -> 0;
    # col 4: all different -> the smallest, 5
    np.testing.assert_array_equal(training.majority_vote(preds), [1, 2, 3, 0, 5])


@pytest.mark.slow
def test_trainer_with_per_slot_start_models_equals_one_call_per_model():
    _, w0, unravel, apply_fn = tiny.tiny_setup()
    x, y, counts = tiny.tiny_clients([12, 9, 15])
    train = training.make_trainer(apply_fn, unravel, (0.5,), (0.25,), batch_size=4, lr=0.05, layout="map")
    ids = np.array([2, 0], np.int32)
    keys = training.client_keys(jax.random.PRNGKey(0), ids)
    starts = jnp.stack([w0, w0 + 0.01])
    both = np.asarray(train(starts, jnp.asarray(x), jnp.asarray(y), jnp.asarray(counts), ids, keys))
    for s in range(2):
        one = np.asarray(train(starts[s], jnp.asarray(x), jnp.asarray(y), jnp.asarray(counts), ids, keys))
        np.testing.assert_allclose(both[s], one[s], rtol=1e-5, atol=1e-6)
    assert not np.allclose(both[0], both[1])


@pytest.mark.slow
def test_ensemble_predictor_votes():
    _, w0, unravel, apply_fn = tiny.tiny_setup()
    predict = training.make_predictor(apply_fn, unravel, (0.5,), (0.25,), batch=8)
    x, _, _ = tiny.tiny_clients([20])
    x = x[0]
    rng = np.random.default_rng(1)
    models = np.stack([np.asarray(w0) + rng.normal(0, 0.3, w0.shape) for _ in range(3)]).astype(np.float32)
    each = np.stack([predict(jnp.asarray(m), x) for m in models])
    np.testing.assert_array_equal(predict(jnp.asarray(models), x), training.majority_vote(each))


def _capturing(attack):
    """``attack`` whose ``apply`` also keeps its last input and output (for inspection)."""
    seen = {}

    def apply(state, inp):
        out, state = attack.apply(state, inp)
        seen.update(inp=inp, out=np.asarray(out))
        return out, state

    return dataclasses.replace(attack, apply=apply), seen


@pytest.mark.slow
def test_attacks_under_flcert_use_their_groups_model_and_pool_by_group():
    """MPAF crafts ``3 (w0 - w_g)`` from the slot's own group model, and the statistics
    attacks see each slot's group, as FLCert's evaluation attacks each group."""
    _, w0, unravel, apply_fn = tiny.tiny_setup()
    x, y, counts = tiny.tiny_clients([10] * 12)
    cfg = simulation.FLConfig(12, 6, batch_size=5, lr=0.1)
    ctx = defenses.DefenseContext(apply_fn, unravel, 12, 6, 10, (10, 10, 1), "fashion_mnist", w0, {"flcert_groups": 3})
    rule = defenses.make("flcert", ctx)
    mpaf, seen = _capturing(attacks.make("mpaf", attacks.AttackContext(12, 6, w0, "flcert", {})))
    fed = simulation.build_federation(cfg, partition.ClientData(x, y, counts), apply_fn, unravel, w0, (0.5,), (0.25,),
                                      mpaf, rule)
    state = simulation.init_state(fed)
    state, _ = simulation.step(fed, state)                # group models now differ
    models = np.asarray(state.defense_state.models)
    assert not np.allclose(models[0], models[1])
    group = np.asarray(state.defense_state.group)
    state, rec = simulation.step(fed, state)
    inp, out = seen["inp"], seen["out"]
    ids = np.asarray(inp.client_ids)
    np.testing.assert_array_equal(np.asarray(inp.groups), group[ids])
    np.testing.assert_array_equal(np.asarray(inp.start_params), models[group[ids]])
    mal = np.asarray(inp.malicious) & np.asarray(inp.valid)
    assert mal.sum() == 6
    np.testing.assert_allclose(out[mal], 3.0 * (np.asarray(w0)[None] - models[group[ids[mal]]]), rtol=1e-5, atol=1e-6)
    # the simulator's single model (the mean of the groups') is not what MPAF used
    assert not np.allclose(out[mal][0], 3.0 * (np.asarray(w0) - np.asarray(inp.global_params)), atol=1e-4)
