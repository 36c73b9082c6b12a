"""Distilled local knowledge and the math of reconstructing one client's update from it:
the virtual model's inner loop, the reconstruction loss and its gradient, the outer SGD step
(see the package docstring for the equations)."""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

# --------------------------------------------------------------------------------------
# Knowledge state
# --------------------------------------------------------------------------------------


class Knowledge(NamedTuple):
    """Distilled knowledge of many clients (leading axis ``C``; one client when absent).

    Attributes:
      images: ``[C, n, H, W, Cin]`` synthetic inputs (normalised input space).
      label_logits: ``[C, n, K]`` soft-label logits (targets are ``softmax``).
      alpha: ``[C]`` inner (virtual model) learning rate.
      mom_images, mom_labels, mom_alpha: SGD momentum buffers, shapes as above.
      seen: ``[C]`` bool, the client has been reconstructed before.
    """

    images: jax.Array
    label_logits: jax.Array
    alpha: jax.Array
    mom_images: jax.Array
    mom_labels: jax.Array
    mom_alpha: jax.Array
    seen: jax.Array


def init_knowledge(key: jax.Array, num_clients: int, input_shape, num_classes: int,
                   images_per_class: int = 1, alpha_init: float = 0.05,
                   noise: str = "normal") -> Knowledge:
    """Fresh knowledge for ``num_clients`` clients, deterministic in ``key``.

    Client ``i``'s images come from ``fold_in(key, i)``, so they do not depend on the number
    of clients. Images ``~ N(0, 1)`` (``noise='normal'``) or ``U[-1, 1]``; label logits 0;
    ``alpha = alpha_init``; momentum buffers 0; ``seen`` False.
    """
    return _init_knowledge(key, int(num_clients), tuple(int(d) for d in input_shape),
                           int(num_classes), int(images_per_class),
                           jnp.asarray(alpha_init, jnp.float32), noise)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 6))
def _init_knowledge(key, num_clients, input_shape, num_classes, images_per_class, alpha_init,
                    noise):
    n = images_per_class * num_classes
    shape = (n,) + input_shape

    def one(i):
        k = jax.random.fold_in(key, i)
        if noise == "normal":
            return jax.random.normal(k, shape, jnp.float32)
        return jax.random.uniform(k, shape, jnp.float32, -1.0, 1.0)

    images = jax.vmap(one)(jnp.arange(num_clients))
    labels = jnp.zeros((num_clients, n, num_classes), jnp.float32)
    alpha = jnp.full((num_clients,), alpha_init, jnp.float32)
    return Knowledge(images, labels, alpha, jnp.zeros_like(images), jnp.zeros_like(labels),
                     jnp.zeros_like(alpha), jnp.zeros((num_clients,), bool))


# --------------------------------------------------------------------------------------
# Pure kernels (one client)
# --------------------------------------------------------------------------------------


def soft_cross_entropy(logits: jax.Array, label_logits: jax.Array) -> jax.Array:
    """``-mean_{b,k} softmax(Y)_{bk} * log_softmax(logits)_{bk}`` over ``[B, K]``.

    Divided by ``B * K`` (not ``B``): the scale Table 7's learning rates were tuned for.
    """
    return -jnp.mean(jax.nn.softmax(label_logits, axis=-1) * jax.nn.log_softmax(logits, axis=-1))


def inner_loop(apply_fn: Callable, unravel: Callable, w0: jax.Array, images: jax.Array,
               label_logits: jax.Array, alpha: jax.Array, steps: int,
               unroll: int | bool = 1) -> jax.Array:
    """Reconstructed update ``d_N = w_N - w_0`` of ``steps`` full-batch GD steps.

    ``d_0 = 0``, ``d_{n+1} = d_n - alpha * grad_w f(w_0 + d_n)`` with ``f`` the
    :func:`soft_cross_entropy` of ``apply_fn(unravel(w), images)`` against ``label_logits``.

    Args:
      w0: ``[P]`` flat global model. images: ``[n, H, W, C]``. label_logits: ``[n, K]``.
      alpha: scalar inner learning rate. steps: ``N`` (static).
      unroll: ``lax.scan`` unroll factor (``True``: fully unrolled). Either way ``jax.grad``
        differentiates through every inner step (second order); a rolled scan compiles
        faster, an unrolled one runs faster (XLA optimises across the steps).
    Returns: ``[P]``.
    """

    def loss(delta):
        return soft_cross_entropy(apply_fn(unravel(w0 + delta), images), label_logits)

    grad = jax.grad(loss)
    delta, _ = lax.scan(lambda d, _: (d - alpha * grad(d), None), jnp.zeros_like(w0), None,
                        length=steps, unroll=unroll)
    return delta


def outer_loss(apply_fn: Callable, unravel: Callable, w0: jax.Array, g: jax.Array,
               images: jax.Array, label_logits: jax.Array, alpha: jax.Array, steps: int,
               g_sqnorm: Optional[jax.Array] = None, unroll: int | bool = 1) -> jax.Array:
    """Reconstruction loss ``||d_N - g||^2 / ||g||^2`` (scalar), ``d_N`` from :func:`inner_loop`.

    ``g``: ``[P]`` client update; ``g_sqnorm``: precomputed ``||g||^2`` (must be > 0).
    """
    if g_sqnorm is None:
        g_sqnorm = jnp.sum(jnp.square(g))
    r = inner_loop(apply_fn, unravel, w0, images, label_logits, alpha, steps, unroll) - g
    return jnp.sum(jnp.square(r)) / g_sqnorm


def outer_value_and_grad(apply_fn, unravel, w0, g, images, label_logits, alpha, steps,
                         g_sqnorm=None, unroll=1):
    """``(L, (dL/dimages, dL/dlabel_logits, dL/dalpha))`` by reverse mode through the
    unrolled inner loop (second-order: it differentiates the inner gradients)."""
    fn = lambda x, y, a: outer_loss(apply_fn, unravel, w0, g, x, y, a, steps, g_sqnorm, unroll)
    return jax.value_and_grad(fn, argnums=(0, 1, 2))(images, label_logits, alpha)


def sgd_momentum_step(params: tuple, moms: tuple, grads: tuple, lrs: tuple, momentum: float):
    """PyTorch-style SGD with momentum (no dampening), leaf by leaf::

        m <- momentum * m + grad ;  p <- p - lr * m

    Returns ``(new_params, new_moms)`` as tuples matching the inputs.
    """
    new_m = tuple(momentum * m + g for m, g in zip(moms, grads))
    new_p = tuple(p - lr * m for p, m, lr in zip(params, new_m, lrs))
    return new_p, new_m
