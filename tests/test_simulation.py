import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny
from fedredefense_jax import attacks, defenses, metrics, partition, simulation


def test_sampling_skips_expelled_and_pads_to_a_bucket():
    expelled = np.zeros(30, bool)
    expelled[[3, 7, 11]] = True
    for r in range(20):
        ids, valid = simulation.sample_participants(jax.random.key(r), expelled, num_slots=15)
        assert valid.sum() == 15 and len(ids) == 15  # 15 slots, capped by num_slots
        assert not expelled[ids[valid]].any() and len(set(ids[valid])) == 15
    expelled[:20] = True  # 10 active < 15 slots: all of them, padded to a multiple of 8
    ids, valid = simulation.sample_participants(jax.random.key(0), expelled, num_slots=15)
    assert sorted(ids[valid]) == list(range(20, 30)) and len(ids) == 15
    expelled[:26] = True
    ids, valid = simulation.sample_participants(jax.random.key(0), expelled, num_slots=15)
    assert len(ids) == simulation.SLOT_BUCKET and valid.sum() == 4


def test_sampling_is_uniform_enough():
    expelled = np.zeros(10, bool)
    counts = np.zeros(10)
    for r in range(400):
        ids, valid = simulation.sample_participants(jax.random.key(r), expelled, num_slots=3)
        counts[ids[valid]] += 1
    assert counts.sum() == 1200 and counts.min() > 80 and counts.max() < 160


@pytest.mark.slow
def test_a_tiny_weight_is_recorded_as_aggregated_not_excluded():
    """Weights are rounded to 6 decimals in the record; whether an update entered the
    aggregate is recorded apart, and the metrics (AAR, ADACC) read that."""
    _, w0, unravel, apply_fn = tiny.tiny_setup()
    x, y, counts = tiny.tiny_clients([8, 8, 8])
    avg = defenses.make("fedavg", defenses.DefenseContext(apply_fn, unravel, 3, 1, 10, (10, 10, 1),
                                                          "fashion_mnist", w0, {}))

    def apply(state, inp):
        out, state = avg.apply(state, inp)
        return out._replace(weights=jnp.asarray([1e-8, 0.0, 1e-9], jnp.float32)), state

    attack = attacks.make("none", attacks.AttackContext(3, 1, w0, "fedavg", {}))
    fed = simulation.build_federation(simulation.FLConfig(3, 1, batch_size=4, lr=0.1),
                                      partition.ClientData(x, y, counts), apply_fn, unravel, w0, 0.5, 0.25, attack,
                                      defenses.Defense("tiny_weights", avg.init, apply))
    state, rec = simulation.step(fed, simulation.init_state(fed))
    assert rec["participants"] == [0, 1, 2] and rec["weights"] == [0.0, 0.0, 0.0]
    assert rec["aggregated"] == [True, False, True]
    det = metrics.summarize([rec], fed.malicious, state.expelled)
    assert det["aar"] == 1.0                          # the malicious client 2 was aggregated
    assert det["afpr"] == 0.5                         # benign client 1 excluded, client 0 kept
