import jax
import numpy as np

from fedredefense_jax import simulation


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
