"""Tiny models and data built in-test (shared by several test files)."""

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from fedredefense_jax import models


def tiny_cnn(conv_impl="matmul", num_classes=10):
    return models.PaperCNN(channels=(4, 6), hidden=16, num_classes=num_classes, conv_impl=conv_impl)


def tiny_setup(seed=0, shape=(10, 10, 1), conv_impl="matmul"):
    """(model, flat params w0, unravel, apply_fn)."""
    m = tiny_cnn(conv_impl)
    w0, unravel = ravel_pytree(models.init_params(m, jax.random.key(seed), shape))
    return m, w0, unravel, models.make_apply_fn(m)


def tiny_clients(counts, shape=(10, 10, 1), seed=0, num_classes=10):
    """Padded client arrays: uint8 x [p, n_max, *shape], int32 y [p, n_max], counts [p]."""
    rng = np.random.default_rng(seed)
    n_max = max(counts)
    x = np.zeros((len(counts), n_max, *shape), np.uint8)
    y = np.zeros((len(counts), n_max), np.int32)
    for i, n in enumerate(counts):
        lab = rng.integers(0, num_classes, n)
        # class-dependent brightness so that the data are learnable
        x[i, :n] = np.clip(rng.normal(lab[:, None, None, None] * 20 + 40, 30, (n, *shape)), 0, 255)
        y[i, :n] = lab
    return x, y, np.asarray(counts, np.int32)
