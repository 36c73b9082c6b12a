import numpy as np
import pytest

from fedredefense_jax import partition


def _labels(n_per_class=600, k=10):
    return np.repeat(np.arange(k), n_per_class)


def test_doubly_stochastic_balances_rows_and_columns():
    rng = np.random.default_rng(0)
    m = partition.doubly_stochastic(rng.dirichlet(np.full(20, 0.1), size=10))
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(m.sum(0), 10 / 20, atol=1e-6)


def test_split_is_a_partition_and_deterministic():
    y = _labels()
    a = partition.dirichlet_split(y, 20, 0.1, seed=3)
    b = partition.dirichlet_split(y, 20, 0.1, seed=3)
    c = partition.dirichlet_split(y, 20, 0.1, seed=4)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))
    allidx = np.concatenate(a)
    assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)


def test_split_balanced_sizes_and_skewed_classes():
    y = _labels()
    parts = partition.dirichlet_split(y, 10, 0.1, seed=0)
    stats = partition.split_stats(y, parts)
    assert 590 <= stats["min"] and stats["max"] <= 610
    assert stats["classes_ge_share"] < 5  # beta 0.1 is strongly non-IID
    iid = partition.split_stats(y, partition.dirichlet_split(y, 10, 100.0, seed=0))
    assert iid["classes_ge_share"] > 9


def test_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        partition.dirichlet_split(_labels(), 10, 0.0, seed=0)


def test_stack_clients_pads():
    x = np.arange(10 * 2 * 2 * 1, dtype=np.uint8).reshape(10, 2, 2, 1)
    y = np.arange(10, dtype=np.int32)
    cd = partition.stack_clients(x, y, [np.array([0, 1, 2]), np.array([5])])
    assert cd.x.shape == (2, 3, 2, 2, 1) and cd.counts.tolist() == [3, 1]
    np.testing.assert_array_equal(cd.x[1, 0], x[5])
    assert cd.y[1].tolist() == [5, 0, 0] and not cd.x[1, 1:].any()


def test_fashion_mnist_split_matches_reference(shared_data):
    from fedredefense_jax import data

    ds = data.load_dataset("fashion_mnist", f"{shared_data}/fashion_mnist")
    parts = partition.dirichlet_split(ds.train_y, 100, 0.1, seed=0)
    s = partition.split_stats(ds.train_y, parts)
    print("fashion_mnist 100 clients beta 0.1:", s)
    assert 585 <= s["min"] and s["max"] <= 615 and s["total"] == 60000
    assert 2.0 <= s["classes_ge_share"] <= 3.5
