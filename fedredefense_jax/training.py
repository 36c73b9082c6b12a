"""Local SGD for all participating clients at once, and batched evaluation.

One client's local training (the authors' setup: ``E`` epochs of plain SGD, batch ``B``,
lr ``eta``, data reshuffled every epoch) from the global model ``w0``::

    for e in 1..E:  order = random permutation of the client's n samples
        for each batch b of B consecutive entries of order (the last one may be short):
            w <- w - eta * grad_w mean_{j in b} CE(f(w, x_j), y_j)
    update g = w - w0                                   # flat [P]

Client data are padded to a common ``n_max`` (see ``partition.ClientData``); every client
runs ``ceil(n_max / B)`` steps per epoch, steps past its own data are masked (zero
gradient, so plain SGD leaves ``w`` unchanged), which keeps shapes static and makes the
result equal to training that client alone.

The per-client function is written once and mapped over clients in one compiled program;
``layout`` chooses how: ``"vmap"`` (one wide batch), ``"map"`` (``lax.map``, a loop inside
the program) or ``"chunked"`` (``lax.map`` over chunks of ``chunk`` clients, vmapped inside).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

LAYOUTS = ("vmap", "map", "chunked")


def default_layout() -> str:
    """The layout measured fastest per backend (see experiments/benchmark.py)."""
    return "map" if jax.default_backend() == "cpu" else "vmap"


def normalize(x_uint8: jax.Array, mean, std) -> jax.Array:
    """uint8 ``[..., C]`` -> float32 ``(x / 255 - mean) / std``."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (x_uint8.astype(jnp.float32) / 255.0 - mean) / std


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the ``mask``-ed rows of softmax cross-entropy; 0 when the mask is empty."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    m = mask.astype(ce.dtype)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1.0)


def shuffled_order(key: jax.Array, count: jax.Array, n_max: int) -> jax.Array:
    """``[n_max]`` int32: a uniform permutation of ``0..count-1`` followed by the padding rows."""
    scores = jax.random.uniform(key, (n_max,))
    scores = jnp.where(jnp.arange(n_max) < count, scores, 2.0 + jnp.arange(n_max))
    return jnp.argsort(scores).astype(jnp.int32)


def make_client_update(apply_fn: Callable, unravel: Callable, mean, std, *, batch_size: int,
                       lr: float, epochs: int) -> Callable:
    """Returns ``client_update(w0[P], x[n,H,W,C] uint8, y[n], count, key) -> g[P]``."""
    opt = optax.sgd(lr)

    def loss_fn(params, xb, yb, mb):
        return masked_cross_entropy(apply_fn(params, normalize(xb, mean, std)), yb, mb)

    grad_fn = jax.grad(loss_fn)

    def client_update(w0, x, y, count, key):
        n_max = x.shape[0]
        steps = -(-n_max // batch_size)
        pad = steps * batch_size - n_max
        params = unravel(w0)
        opt_state = opt.init(params)

        def step(carry, s):
            params, opt_state, order = carry
            pos = s * batch_size + jnp.arange(batch_size)
            idx = jax.lax.dynamic_slice(order, (s * batch_size,), (batch_size,))
            grads = grad_fn(params, x[idx], y[idx], pos < count)
            upd, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, upd), opt_state, order), None

        def epoch(carry, ekey):
            params, opt_state = carry
            order = jnp.pad(shuffled_order(ekey, count, n_max), (0, pad))
            (params, opt_state, _), _ = jax.lax.scan(step, (params, opt_state, order), jnp.arange(steps))
            return (params, opt_state), None

        (params, _), _ = jax.lax.scan(epoch, (params, opt_state), jax.random.split(key, epochs))
        flat, _ = jax.flatten_util.ravel_pytree(params)
        return flat - w0

    return client_update


def map_clients(fn: Callable, layout: str, chunk: int = 8) -> Callable:
    """Maps ``fn(shared, *per_client)`` over the leading axis of the per-client arguments."""
    if layout == "vmap":
        return jax.vmap(fn, in_axes=(None, 0, 0, 0, 0))
    if layout == "map":
        return lambda w0, *xs: jax.lax.map(lambda a: fn(w0, *a), xs)
    if layout == "chunked":
        return lambda w0, *xs: jax.lax.map(lambda a: fn(w0, *a), xs, batch_size=chunk)
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def make_trainer(apply_fn: Callable, unravel: Callable, mean, std, *, batch_size: int = 32,
                 lr: float = 1e-3, epochs: int = 1, layout: str | None = None,
                 chunk: int = 8) -> Callable:
    """Jitted ``train(w0[P], client_x[p,n,...], client_y[p,n], counts[p], ids[S], keys[S]) -> [S, P]``.

    Gathers the ``S`` participating clients' data by id inside the program, trains them all
    from the same global model ``w0`` and returns their update matrix.
    """
    layout = layout or default_layout()
    one = make_client_update(apply_fn, unravel, mean, std, batch_size=batch_size, lr=lr, epochs=epochs)
    mapped = map_clients(one, layout, chunk)

    @jax.jit
    def train(w0, client_x, client_y, counts, ids, keys):
        return mapped(w0, client_x[ids], client_y[ids], counts[ids], keys)

    return train


def client_keys(round_key: jax.Array, ids: np.ndarray) -> jax.Array:
    """``[S]`` keys, one per client id (a client's key does not depend on its slot)."""
    return jax.vmap(lambda i: jax.random.fold_in(round_key, i))(jnp.asarray(ids, jnp.int32))


def make_predictor(apply_fn: Callable, unravel: Callable, mean, std, batch: int = 1000) -> Callable:
    """Jitted ``predict(w[P], x[N,H,W,C] uint8) -> [N] int32`` in batches of ``batch``."""

    @jax.jit
    def _predict(w, xb):
        params = unravel(w)
        return jax.lax.map(
            lambda b: jnp.argmax(apply_fn(params, normalize(b, mean, std)), -1).astype(jnp.int32), xb)

    def predict(w, x):
        n = x.shape[0]
        nb = -(-n // batch)
        xp = np.zeros((nb * batch, *x.shape[1:]), x.dtype)
        xp[:n] = x
        return np.asarray(_predict(w, xp.reshape(nb, batch, *x.shape[1:]))).reshape(-1)[:n]

    return predict


def accuracy(predict: Callable, w: jax.Array, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``x`` classified as ``y`` by the flat model ``w``."""
    return float(np.mean(predict(w, x) == np.asarray(y)))
