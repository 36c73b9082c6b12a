import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedredefense_jax import training
from tiny import tiny_clients, tiny_setup

pytestmark = pytest.mark.slow  # compiles and runs the batched trainer

MEAN, STD = (0.5,), (0.25,)


@pytest.fixture(scope="module")
def setup():
    m, w0, unravel, apply_fn = tiny_setup()
    x, y, n = tiny_clients([37, 64, 50, 1, 20])
    return w0, unravel, apply_fn, x, y, n


@pytest.mark.parametrize("layout", training.LAYOUTS)
def test_batched_equals_each_client_alone(setup, layout):
    """vmap / lax.map / chunks over clients == a Python loop over the jitted per-client update."""
    w0, unravel, apply_fn, x, y, n = setup
    ids = np.array([4, 0, 2, 1], np.int32)
    keys = training.client_keys(jax.random.key(7), ids)
    train = training.make_trainer(apply_fn, unravel, MEAN, STD, batch_size=8, lr=0.05, epochs=2,
                                  layout=layout, chunk=3)
    batched = np.asarray(train(w0, x, y, n, ids, keys))
    one = jax.jit(training.make_client_update(apply_fn, unravel, MEAN, STD, batch_size=8, lr=0.05, epochs=2))
    for s, i in enumerate(ids):
        alone = np.asarray(one(w0, x[i], y[i], n[i], keys[s]))
        assert np.max(np.abs(batched[s] - alone)) < 1e-5
        assert np.linalg.norm(alone) > 0


def test_padding_does_not_change_a_clients_update(setup):
    """Masked steps past a client's data leave the model unchanged."""
    w0, unravel, apply_fn, x, y, n = setup
    one = jax.jit(training.make_client_update(apply_fn, unravel, MEAN, STD, batch_size=8, lr=0.05, epochs=1))
    key = jax.random.key(3)
    padded = one(w0, x[0], y[0], n[0], key)  # 37 real rows padded to 64
    alone = one(w0, x[0, :37], y[0, :37], n[0], key)
    np.testing.assert_allclose(padded, alone, atol=1e-6)


def test_shuffled_order_is_a_permutation_of_the_real_rows():
    order = np.asarray(training.shuffled_order(jax.random.key(0), jnp.int32(5), 9))
    assert sorted(order[:5].tolist()) == [0, 1, 2, 3, 4]
    assert order[5:].tolist() == [5, 6, 7, 8]


def test_local_training_reduces_loss_and_predictor(setup):
    w0, unravel, apply_fn, x, y, n = setup
    train = training.make_trainer(apply_fn, unravel, MEAN, STD, batch_size=8, lr=0.1, epochs=10)
    ids = np.array([1], np.int32)
    upd = train(w0, x, y, n, ids, training.client_keys(jax.random.key(0), ids))
    predict = training.make_predictor(apply_fn, unravel, MEAN, STD, batch=16)
    before = training.accuracy(predict, w0, x[1], y[1])
    after = training.accuracy(predict, w0 + upd[0], x[1], y[1])
    assert after > before + 0.2
    assert predict(w0, x[1, :10]).shape == (10,)
