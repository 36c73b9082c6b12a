import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from fedredefense_jax import models


@pytest.mark.parametrize("name,dataset,shape,count", [
    ("cnn", "fashion_mnist", (28, 28, 1), 139_960),
    ("cnn", "cifar10", (32, 32, 3), 1_204_682),
    ("convnet", "fashion_mnist", (28, 28, 1), 317_706),
    ("convnet", "cifar10", (32, 32, 3), 320_010),
])
def test_parameter_counts(name, dataset, shape, count):
    m = models.build_model(name, dataset, conv_impl="matmul")
    params = jax.eval_shape(lambda k: models.init_params(m, k, shape), jax.random.key(0))
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)) == count
    out = jax.eval_shape(lambda p: m.apply({"params": p}, jnp.zeros((2, *shape))), params)
    assert out.shape == (2, 10)


@pytest.mark.parametrize("padding", [0, 1, 3])
def test_conv_impls_agree(padding):
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
    k = jax.random.normal(jax.random.key(2), (3, 3, 3, 5))
    a = jax.jit(models.conv3x3, static_argnums=(2, 3))(x, k, padding, "xla")
    b = jax.jit(models.conv3x3, static_argnums=(2, 3))(x, k, padding, "matmul")
    assert a.shape == b.shape == (2, 7 + 2 * padding, 7 + 2 * padding, 5)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make,shape", [
    (lambda impl: models.PaperCNN((6, 8), 16, 10, impl), (28, 28, 1)),
    (lambda impl: models.ConvNet(width=8, num_classes=10, conv_impl=impl), (28, 28, 1)),
    (lambda impl: models.ConvNet(width=8, num_classes=10, conv_impl=impl), (32, 32, 3)),
])
@pytest.mark.slow
def test_models_same_outputs_and_grads_for_both_conv_impls(make, shape):
    """Narrow versions of both architectures (same code paths, less compute)."""
    mx, mm = make("xla"), make("matmul")
    params = jax.jit(lambda k: models.init_params(mx, k, shape))(jax.random.key(0))
    x = jax.random.normal(jax.random.key(3), (4, *shape))
    y = jnp.arange(4) % 10

    def loss(m, p):
        return optax.softmax_cross_entropy_with_integer_labels(m.apply({"params": p}, x), y).mean()

    np.testing.assert_allclose(jax.jit(mx.apply)({"params": params}, x),
                               jax.jit(mm.apply)({"params": params}, x), rtol=1e-4, atol=1e-5)
    gx, _ = ravel_pytree(jax.jit(jax.grad(lambda p: loss(mx, p)))(params))
    gm, _ = ravel_pytree(jax.jit(jax.grad(lambda p: loss(mm, p)))(params))
    np.testing.assert_allclose(gx, gm, rtol=1e-3, atol=1e-5)


def test_unknown_model_and_impl_rejected():
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("resnet", "cifar10")
    with pytest.raises(ValueError, match="conv_impl"):
        models.resolve_conv_impl("fft")


def test_pool_floor_on_odd_sizes():
    x = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
    out = models.pool2x2(x, "max")
    assert out.shape == (2, 2, 2, 1)
    assert float(out[0, 0, 0, 0]) == float(x[0, 1, 1, 0])


@pytest.mark.parametrize("name,dataset,shape,blind_from", [
    ("cnn", "fashion_mnist", (28, 28, 1), 26),  # 28 -> 26 -> 13 -> 11 -> 5: rows/cols 26-27 dropped
    ("cnn", "cifar10", (32, 32, 3), 30),  # 32 -> 30 -> 15 -> 13 -> 6: rows/cols 30-31 dropped
    ("convnet", "fashion_mnist", (28, 28, 1), 28),  # padded convolutions read every pixel
])
@pytest.mark.slow
def test_unseen_pixels_are_the_rows_and_columns_floor_pooling_drops(name, dataset, shape, blind_from):
    m = models.build_model(name, dataset)
    params = models.init_params(m, jax.random.key(0), shape)
    blind = models.unseen_pixels(models.make_apply_fn(m), params, shape)
    rows, cols = np.indices(shape[:2])
    np.testing.assert_array_equal(blind, (rows >= blind_from) | (cols >= blind_from))
