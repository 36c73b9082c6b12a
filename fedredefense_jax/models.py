"""Flax linen models: the paper's CNNs (Tables 5 and 6) and the authors' ConvNet.

All models take normalised float32 images ``[B, H, W, C]`` and return logits ``[B, K]``
(the paper's "Softmax" layer is folded into the cross-entropy).

Convolutions come in two numerically equivalent implementations sharing one parameter
layout (kernel ``[3, 3, C_in, C_out]``, bias ``[C_out]``):

* ``"xla"``: ``lax.conv_general_dilated``, fastest on GPU/TPU;
* ``"matmul"``: the nine shifted ``3x3`` patches stacked on the channel axis then one
  matmul ``[B*H'*W', 9*C_in] @ [9*C_in, C_out]``; on XLA:CPU this is several times faster
  than the native convolution, especially under ``vmap`` and inside loops.

``conv_impl="auto"`` picks ``"matmul"`` on CPU and ``"xla"`` elsewhere.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODEL_NAMES = ("cnn", "convnet")


def resolve_conv_impl(conv_impl: str) -> str:
    """``"auto"`` -> ``"matmul"`` on CPU, ``"xla"`` on GPU/TPU."""
    if conv_impl == "auto":
        return "matmul" if jax.default_backend() == "cpu" else "xla"
    if conv_impl not in ("xla", "matmul"):
        raise ValueError(f"conv_impl must be auto, xla or matmul, got {conv_impl!r}")
    return conv_impl


def _torch_uniform(fan_in: int) -> Callable:
    """PyTorch's default init for conv/linear weights and biases: U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv3x3(x: jax.Array, kernel: jax.Array, padding: int, impl: str) -> jax.Array:
    """``[B, H, W, Ci] * [3, 3, Ci, Co] -> [B, H + 2p - 2, W + 2p - 2, Co]``, stride 1."""
    if impl == "xla":
        return jax.lax.conv_general_dilated(
            x, kernel, (1, 1), [(padding, padding)] * 2,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    h, w = x.shape[1] - 2, x.shape[2] - 2
    patches = jnp.concatenate(
        [x[:, dy:dy + h, dx:dx + w, :] for dy in range(3) for dx in range(3)], axis=-1)
    return patches @ kernel.reshape(-1, kernel.shape[-1])


def pool2x2(x: jax.Array, kind: str) -> jax.Array:
    """2x2 stride-2 pooling by reshape (floor on odd sizes, as PyTorch): ``[B,H,W,C] -> [B,H//2,W//2,C]``."""
    b, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :].reshape(b, h // 2, 2, w // 2, 2, c)
    return x.max(axis=(2, 4)) if kind == "max" else x.mean(axis=(2, 4))


class Conv3x3(nn.Module):
    """3x3 convolution, stride 1, symmetric zero padding, PyTorch-style init."""

    features: int
    padding: int = 0
    impl: str = "matmul"

    @nn.compact
    def __call__(self, x):
        fan_in = 9 * x.shape[-1]
        kernel = self.param("kernel", _torch_uniform(fan_in), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", _torch_uniform(fan_in), (self.features,))
        return conv3x3(x, kernel, self.padding, self.impl) + bias


class Linear(nn.Module):
    """Dense layer with PyTorch-style init."""

    features: int

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", _torch_uniform(fan_in), (fan_in, self.features))
        bias = self.param("bias", _torch_uniform(fan_in), (self.features,))
        return x @ kernel + bias


class PaperCNN(nn.Module):
    """Tables 5/6: conv3x3(c1)-ReLU-maxpool, conv3x3(c2)-ReLU-maxpool, FC(h)-ReLU, FC(K).

    Fashion-MNIST: (30, 50, 100), 28x28x1 -> 26 -> 13 -> 11 -> 5: 139,960 parameters.
    CIFAR-10/CINIC-10: (32, 64, 512), 32x32x3 -> 30 -> 15 -> 13 -> 6: 1,204,682 parameters.
    Valid (unpadded) convolutions.
    """

    channels: tuple = (30, 50)
    hidden: int = 100
    num_classes: int = 10
    conv_impl: str = "matmul"

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = pool2x2(nn.relu(Conv3x3(c, 0, self.conv_impl)(x)), "max")
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(Linear(self.hidden)(x))
        return Linear(self.num_classes)(x)


class ConvNet(nn.Module):
    """The authors' ConvNet: 3 x [conv3x3(128) - GroupNorm(128 groups) - ReLU - avgpool2x2] - FC(K).

    The first convolution pads by 3 on 28x28 inputs (making them 32x32) and by 1 otherwise.
    GroupNorm with one channel per group is instance norm with a learnt affine map.
    317,706 parameters on Fashion-MNIST.
    """

    width: int = 128
    depth: int = 3
    num_classes: int = 10
    conv_impl: str = "matmul"

    @nn.compact
    def __call__(self, x):
        for i in range(self.depth):
            pad = 3 if (i == 0 and x.shape[1] == 28) else 1
            x = Conv3x3(self.width, pad, self.conv_impl)(x)
            x = nn.GroupNorm(num_groups=self.width, epsilon=1e-5)(x)
            x = pool2x2(nn.relu(x), "avg")
        x = x.reshape(x.shape[0], -1)
        return Linear(self.num_classes)(x)


def build_model(name: str, dataset: str, num_classes: int = 10, conv_impl: str = "auto") -> nn.Module:
    """The model ``name`` ("cnn" = the paper's Table 5/6 CNN, "convnet") for ``dataset``."""
    impl = resolve_conv_impl(conv_impl)
    if name == "cnn":
        if dataset == "fashion_mnist":
            return PaperCNN((30, 50), 100, num_classes, impl)
        return PaperCNN((32, 64), 512, num_classes, impl)
    if name == "convnet":
        return ConvNet(num_classes=num_classes, conv_impl=impl)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def init_params(model: nn.Module, key: jax.Array, input_shape: tuple):
    """Parameter pytree of ``model`` for inputs ``[1, *input_shape]``."""
    return model.init(key, jnp.zeros((1, *input_shape), jnp.float32))["params"]


def unseen_pixels(apply_fn: Callable, params, input_shape: tuple, samples: int = 8, seed: int = 0):
    """``[H, W]`` bool numpy: pixels that no logit depends on (outside the receptive field).

    A pixel is unseen when the gradient of a random projection of the logits,
    ``d/dx sum_{b,k} r_bk f(params, x)_bk`` at ``samples`` Gaussian inputs ``x``, is exactly
    zero in every channel. The paper's Fashion-MNIST CNN (valid 3x3 convs, floor pooling:
    28 -> 26 -> 13 -> 11 -> 5) never reads rows or columns 26-27; the ConvNet reads every pixel.
    """
    kx, kr = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (samples, *input_shape), jnp.float32)
    logits_shape = jax.eval_shape(apply_fn, params, x).shape
    r = jax.random.normal(kr, logits_shape, jnp.float32)
    g = jax.grad(lambda x: jnp.sum(apply_fn(params, x) * r))(x)
    return np.asarray(jnp.all(g == 0, axis=(0, 3)))


def make_apply_fn(model: nn.Module) -> Callable:
    """``apply_fn(params, x[B,H,W,C]) -> logits[B,K]``."""

    def apply_fn(params, x):
        return model.apply({"params": params}, x)

    return apply_fn
