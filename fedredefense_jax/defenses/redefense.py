"""FedREDefense (Xie et al., ICML 2024): expel clients whose update cannot be reconstructed.

For every participating client ``i`` the server keeps a small *distilled local knowledge*
``K_i = (X_i, Y_i, alpha_i)``: ``n = images_per_class * K`` synthetic images ``X_i``, their
label logits ``Y_i`` (soft labels ``softmax(Y_i)``) and an inner learning rate ``alpha_i``.
Training the global model ``w_0`` for ``N`` full-batch gradient steps on ``K_i`` should
reproduce the client's update ``g_i``. A bi-level optimisation (Algorithm 2) refines ``K_i``
to minimise the reconstruction loss; the client is expelled when the error stays above
``gamma``.

Math (one client, everything flat ``[P]``)::

    f(w; X, Y)   = -1/(n K) sum_{b,k} softmax(Y)_{bk} log_softmax(apply(w, X))_{bk}
    d_0 = 0,  d_{n+1} = d_n - alpha * grad_w f(w_0 + d_n; X, Y)      (n = 0..N-1)
    L(X, Y, alpha) = ||d_N - g||^2 / ||g||^2          (= ||w_N - w_0 - g||^2 / ||g||^2)
    m_p <- mu m_p + dL/dp ;  p <- p - lr_p m_p       (p in {X, Y, alpha}, mu = 0.5)

The inner loop tracks the displacement ``d_n = w_n - w_0`` instead of ``w_n`` so that the
small reconstructed update does not lose float32 precision against the large ``w_0``.

Dynamic optimisation (Section 4.4, the default ``variant='dynamic'``): each outer iteration
first evaluates ``L``; if ``L < gamma`` the client stops and its error is that ``L``;
otherwise one outer SGD-momentum step is taken. At most ``first_cap`` iterations when the
client is seen for the first time, ``later_cap`` afterwards; if ``L`` never went below
``gamma`` the error is the last ``L`` computed. ``iterations`` counts the loss evaluations
(as the authors' ``true_iter``): a client already below ``gamma`` costs 1 iteration.
Appendix B.3's variants: ``'continuous'`` (fixed ``first_cap``=500 / ``later_cap``=60 steps,
no early stop, error = ``L`` after the steps) and ``'intermittent'`` (500 steps at the first
participation, 500 steps again once ``interval``=10 rounds passed since the client's last
optimisation, otherwise inference only: error = ``L`` with the current knowledge).

Decision: a slot is flagged when its update holds a NaN/Inf, when ``||g||^2`` is zero or
overflows (the ratio is undefined: a zero update cannot be "reconstructed" and carries no
training, so it is flagged rather than silently kept), or when its error is ``> gamma`` or
non-finite. Reconstruction never runs on such updates. The kept slots are aggregated with
FedAvg (equal weights) unless the setting ``redefense_aggregator`` is a callable ``(updates[S,P],
weights[S]) -> [P]`` or the name of a registered rule ('median', 'trimmed_mean',
'norm_bound', 'krum'; see ``robust.py``), which then sees the kept slots only.

Execution: all participating clients run in ONE compiled program per chunk of outer
iterations, either ``jax.vmap`` over clients (GPU/TPU) or ``lax.map`` over clients (CPU),
``layout`` in {'vmap', 'map', 'auto'}. Inside a chunk each client runs a
``lax.while_loop`` that stops when it is done (under ``lax.map`` finished clients cost
nothing; under ``vmap`` they are masked). Between chunks the host keeps only the clients
still active and pads their number up to a power of two (capped at the slot count ``S``),
so the chunk program is compiled at most ``ceil(log2 S) + 1`` times (once per bucket size;
chunk length and early stopping are traced values). Chunks start at ``first_chunk``
iterations and double up to ``chunk``, so a round in which everyone finishes in 1-2
iterations costs one short chunk, while the few clients that need the cap run in long
chunks. (Measured on XLA:CPU: a conv model's outer step runs ~2.5x slower inside any loop,
``while_loop``/``lax.map``/``scan``, than as a loop-free program; GPU/TPU are the target.)

Facts from the authors' public code (xyq7/FedREDefense) followed here: images initialised
as standard-normal noise in normalised input space (``torch.randn``; the paper says
"uniform noise", available as ``init_noise='uniform'``), label logits zero,
momentum 0.5 on all three optimisers, full batch (``batch_syn = n``), the CE averaged over
samples and classes, and fresh optimisers (zero momentum) at every participation
(``reset_momentum=True``; the buffers are still kept in the state so a chunked run and a
later ``reset_momentum=False`` run can carry them).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from fedredefense_jax import mesh as mesh_lib
from fedredefense_jax.defenses import register
from fedredefense_jax.defenses.base import (
    Defense,
    DefenseContext,
    DefenseInput,
    DefenseOutput,
    fedavg,
    nonfinite_rows,
)
from fedredefense_jax.settings import ConfigError, Settings, setting

# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------

#: Table 7 of the paper, per dataset.
TABLE7 = {
    "fashion_mnist": dict(lr_images=0.5, lr_labels=0.2, alpha_init=0.1, lr_alpha=5e-6,
                          first_cap=800, later_cap=2000),
    "cifar10": dict(lr_images=0.1, lr_labels=0.05, alpha_init=0.05, lr_alpha=5e-5,
                    first_cap=500, later_cap=1500),
    "cinic10": dict(lr_images=0.1, lr_labels=0.05, alpha_init=0.05, lr_alpha=5e-5,
                    first_cap=2000, later_cap=4000),
}

_DATASET_ALIASES = {
    "fashion_mnist": "fashion_mnist", "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10", "cifar": "cifar10",
    "cinic10": "cinic10", "cinic-10": "cinic10", "cinic": "cinic10",
}

#: A reconstruction still running after this many seconds logs its progress after every
#: chunk (a first participation of a large model can take an hour on a CPU).
PROGRESS_AFTER_S = 30.0

#: Appendix B.3 iteration counts of the fixed-count variants: (first, later).
VARIANT_CAPS = {"continuous": (500, 60), "intermittent": (500, 500)}
DEFAULT_VARIANT = "dynamic"

VARIANTS = (DEFAULT_VARIANT, "continuous", "intermittent")
LAYOUTS = ("vmap", "map", "auto")


#: Registered rules that can aggregate the kept slots (setting ``redefense_aggregator``).
AGGREGATORS = ("fedavg", "median", "trimmed_mean", "norm_bound", "krum")


def _unroll(value):
    """``inner_unroll`` from a bool, an int or their text."""
    if isinstance(value, (bool, int)):
        return value
    text = str(value).lower()
    if text in ("true", "false"):
        return text == "true"
    return int(text)


def _table7(name: str, help: str, **spec):
    """A setting whose unset value is Table 7's for the dataset (CIFAR-10's default here)."""
    return setting(TABLE7["cifar10"][name], f"{help} (Table 7's for the dataset).", **spec)


@dataclasses.dataclass(frozen=True)
class RedefenseConfig(Settings):
    """Settings of FedREDefense (defaults: Section 5.1.4, Table 7, Appendix B.3).

    Setting names are the attribute names, with ``redefense_`` before the attributes from
    ``variant`` on (``redefense_variant``, ``redefense_layout``, ...), which would be
    ambiguous among all plug-ins' settings.

    Attributes:
      gamma: reconstruction-error threshold (0.6).
      inner_steps: ``N``, full-batch steps of the virtual model (5).
      images_per_class: synthetic images per class (1, i.e. 10 images for 10 classes).
      lr_images, lr_labels, lr_alpha: outer SGD learning rates (Table 7).
      alpha_init: initial inner learning rate (Table 7 "Virtual Model LR").
      first_cap: max outer iterations at a client's first participation (dynamic), or the
        fixed count ``M`` of the other variants.
      later_cap: max outer iterations later (dynamic), or ``M'`` of the other variants.
      variant: 'dynamic' | 'continuous' | 'intermittent'.
      interval: ``T_I`` of the intermittent variant (10 rounds).
      momentum: SGD momentum of the three outer optimisers (0.5).
      reset_momentum: zero the momentum buffers at every participation (authors' code).
      layout: 'vmap' | 'map' | 'auto' (map on CPU, vmap elsewhere).
      chunk: largest number of outer iterations per compiled chunk.
      first_chunk: iterations of the first chunk; doubles up to ``chunk``.
      map_batch_size: ``batch_size`` of ``lax.map`` (None: one client at a time).
      init_noise: 'normal' (N(0,1), the authors') or 'uniform' (U[-1, 1]).
      inner_unroll: ``lax.scan`` unroll of the inner loop (True: fully unrolled, the
        default: on CPU a rolled scan ran the Table 5 CNN's outer step ~2x slower; 1:
        rolled, faster to compile).
      aggregator: rule aggregating the kept slots: a name of :data:`AGGREGATORS` or a
        callable ``(updates[S, P], weights[S]) -> [P]``.
      reject_at, reject_above: early rejection (off when unset): a reconstruction whose
        loss after ``reject_at`` outer iterations is above ``reject_above`` (>= gamma) stops
        there, its error that loss, so it is flagged without running to the cap.
    """

    gamma: float = setting(0.6, "FedREDefense: reconstruction-error threshold (paper: 0.6).", above=0)
    inner_steps: int = setting(5, "FedREDefense: inner GD steps N of the virtual model (paper: 5).", low=1)
    images_per_class: int = setting(1, "FedREDefense: synthetic images per class (paper: 1).", low=1)
    lr_images: float = _table7("lr_images", "FedREDefense: outer LR of the synthetic images", low=0)
    lr_labels: float = _table7("lr_labels", "FedREDefense: outer LR of the label logits", low=0)
    lr_alpha: float = _table7("lr_alpha", "FedREDefense: outer LR of alpha", low=0)
    alpha_init: float = _table7("alpha_init", "FedREDefense: initial virtual-model LR alpha", above=0)
    first_cap: int = _table7("first_cap", "FedREDefense: outer-iteration cap at a client's first participation",
                             low=1)
    later_cap: int = _table7("later_cap", "FedREDefense: outer-iteration cap later", low=1)
    variant: str = setting(DEFAULT_VARIANT, "FedREDefense: optimisation schedule of Appendix B.3.",
                           choices=VARIANTS, name="redefense_variant")
    interval: int = setting(10, "FedREDefense: rounds T_I between the intermittent variant's optimisations.",
                            low=1, name="redefense_interval")
    momentum: float = setting(0.5, "FedREDefense: SGD momentum of the outer optimisers.", low=0,
                              name="redefense_momentum")
    reset_momentum: bool = setting(True, "FedREDefense: zero the momentum buffers at every participation "
                                   "(the authors' code).", name="redefense_reset_momentum")
    layout: str = setting("auto", "FedREDefense: reconstruction batching over clients (auto = map on CPU, "
                          "vmap elsewhere).", choices=LAYOUTS, name="redefense_layout")
    chunk: int = setting(128, "FedREDefense: largest number of outer iterations per compiled chunk.", low=1,
                         name="redefense_chunk")
    first_chunk: int = setting(8, "FedREDefense: outer iterations of the first chunk (doubling up to "
                               "redefense_chunk).", low=1, name="redefense_first_chunk")
    map_batch_size: Optional[int] = setting(None, "FedREDefense: batch_size of lax.map over clients (unset: one "
                                            "at a time).", low=1, name="redefense_map_batch_size")
    init_noise: str = setting("normal", "FedREDefense: initial synthetic images, normal N(0, 1) (the authors') "
                              "or uniform U[-1, 1].", choices=("normal", "uniform"), name="redefense_init_noise")
    inner_unroll: Any = setting(True, "FedREDefense: lax.scan unroll of the inner loop (true: fully unrolled; "
                                "1: rolled, faster to compile).", parse=_unroll, name="redefense_inner_unroll")
    aggregator: Any = setting("fedavg", "FedREDefense: rule aggregating the kept updates.", choices=AGGREGATORS,
                              name="redefense_aggregator")
    reject_at: Optional[int] = setting(None, "FedREDefense: early rejection: after this many outer iterations a "
                                       "reconstruction whose loss is above redefense_reject_above stops (and is "
                                       "flagged); unset: off.", low=1, name="redefense_reject_at")
    reject_above: Optional[float] = setting(None, "FedREDefense: the loss bound of early rejection (at least "
                                            "gamma).", above=0, name="redefense_reject_above")

    def check(self, experiment) -> None:
        if (self.reject_at is None) != (self.reject_above is None):
            given = "redefense_reject_at" if self.reject_at is not None else "redefense_reject_above"
            raise ConfigError(given, "early rejection needs both redefense_reject_at and redefense_reject_above")
        if self.reject_above is not None and self.reject_above < self.gamma:
            raise ConfigError("redefense_reject_above", f"{self.reject_above} is below gamma ({self.gamma}): it "
                                                        "would flag reconstructions the paper's rule keeps")

    @classmethod
    def defaults(cls, given, dataset):
        """Table 7 for ``dataset`` (CIFAR-10's when unknown), then the caps of the given
        ``redefense_variant`` (Appendix B.3)."""
        base = dict(TABLE7.get(canonical_dataset(dataset) or "cifar10"))
        variant = given.get("redefense_variant", DEFAULT_VARIANT)
        if variant in VARIANT_CAPS:
            base["first_cap"], base["later_cap"] = VARIANT_CAPS[variant]
        return base


def canonical_dataset(name: str) -> Optional[str]:
    """Table 7 key of a dataset name (aliases accepted), None when unknown."""
    return _DATASET_ALIASES.get(str(name).lower())


def make_config(dataset: str, overrides: Optional[dict] = None) -> RedefenseConfig:
    """Config with Table 7 defaults for ``dataset`` (CIFAR-10's when unknown), the variant's
    Appendix B.3 iteration counts, then ``overrides`` (``{setting name: value}``; None
    values count as unset; an unknown name raises ConfigError)."""
    return RedefenseConfig.parse(overrides, owner="defense fedredefense", dataset=dataset)


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


# --------------------------------------------------------------------------------------
# Batched, chunked reconstruction
# --------------------------------------------------------------------------------------


#: Outer iterations at which each reconstruction's loss is recorded (its trajectory).
BUDGETS = (10, 25, 50, 100, 200, 400)


class _Carry(NamedTuple):
    images: jax.Array
    label_logits: jax.Array
    alpha: jax.Array
    mom_images: jax.Array
    mom_labels: jax.Array
    mom_alpha: jax.Array
    iters: jax.Array  # int32, outer iterations (loss evaluations) done this round
    err: jax.Array  # float32, last loss computed (NaN before the first)
    done: jax.Array  # bool
    to_gamma: jax.Array  # int32, the first iteration whose loss was below gamma (0: none yet)
    loss_at: jax.Array  # float32 [len(BUDGETS)], the loss of iteration b of each budget b (NaN: not reached)


class ReconstructionResult(NamedTuple):
    """Output of :meth:`Reconstructor.reconstruct` for ``S`` slots.

    Attributes:
      errors: ``[S]`` float32 numpy, NaN where the slot did not run.
      iterations: ``[S]`` int32 numpy, outer iterations used (0 where not run).
      knowledge: :class:`Knowledge` ``[S, ...]`` after the round (``seen`` copied from input).
      chunks: list of ``(bucket_size, chunk_len)`` executed, for diagnostics.
      to_gamma: ``[S]`` int32 numpy, the first outer iteration whose loss was below gamma
        (0: none, or not run).
      loss_at: ``[S, len(BUDGETS)]`` float32 numpy, the loss computed at outer iteration
        ``b`` for each budget ``b`` of :data:`BUDGETS` (NaN where not reached).
    """

    errors: np.ndarray
    iterations: np.ndarray
    knowledge: Knowledge
    chunks: list
    to_gamma: np.ndarray
    loss_at: np.ndarray


def resolve_layout(layout: str) -> str:
    """'auto' -> 'map' on CPU, 'vmap' on GPU/TPU."""
    if layout == "auto":
        return "map" if jax.default_backend() == "cpu" else "vmap"
    return layout


def bucket_size(n: int, total: int) -> int:
    """Smallest power of two ``>= n``, capped at ``total`` (so buckets: 1, 2, 4, ..., total)."""
    if n <= 0:
        return 0
    return min(1 << (n - 1).bit_length(), total)


class Reconstructor:
    """Runs Algorithm 2 for many clients at once; holds the compiled programs.

    Args:
      apply_fn: ``apply_fn(params_pytree, x[B, H, W, C]) -> logits[B, K]``.
      unravel: flat ``[P]`` -> params pytree.
      cfg: :class:`RedefenseConfig` (gamma, inner_steps, learning rates, momentum, layout,
        chunk, first_chunk, map_batch_size are used).
      mesh: a ``mesh.ClientMesh``; with several devices the slots are padded to a multiple
        of the device count and split over the devices, each device running the
        single-device chunk program (``layout`` over its clients) on its own slots
        (``mesh.map_blocks``), and the still-active clients are dealt out again evenly over
        the devices between chunks (:meth:`_bucket`).
    """

    def __init__(self, apply_fn: Callable, unravel: Callable, cfg: RedefenseConfig, mesh=None):
        self.apply_fn = apply_fn
        self.unravel = unravel
        self.cfg = cfg
        self.layout = resolve_layout(cfg.layout)
        self.mesh = mesh = mesh_lib.active(mesh)
        if mesh is None:
            # The per-slot carry is donated (updated in place between chunks).
            self._chunk_jit = jax.jit(self._chunk_program, donate_argnums=(0,))
            self._gather_jit = jax.jit(self._gather)
            self._scatter_jit = jax.jit(self._scatter, donate_argnums=(0,))
            self._eval_jit = jax.jit(self._eval_program)
            return
        split, whole = mesh.sharded, mesh.replicated
        # Each device runs the single-device programs on its own slots (mesh.map_blocks);
        # no donation: a device's block is a view of the split carry.
        chunk_one = jax.jit(self._chunk_program)
        eval_one = jax.jit(self._eval_program)

        def chunk(sub, w0, g, gsq, caps, chunk_len, early_stop):
            return mesh.map_blocks(chunk_one, (w0, chunk_len, early_stop), (sub, g, gsq, caps),
                                   lambda r, b: ((b[0], r[0], *b[1:], r[1], r[2]), {}))

        def evaluate(carry, w0, updates, gsq):
            return mesh.map_blocks(eval_one, (w0,), (carry, updates, gsq),
                                   lambda r, b: ((b[0], r[0], *b[1:]), {}))

        self._chunk_jit = chunk
        self._gather_jit = mesh.jit(self._gather, out_shardings=split)
        self._scatter_jit = mesh.jit(self._scatter, out_shardings=split)
        self._eval_jit = evaluate
        self._place_jit = mesh.jit(_place_slots, static_argnums=(5,), out_shardings=split)
        self._head_jit = mesh.jit(lambda tree, n: jax.tree_util.tree_map(lambda a: a[:n], tree),
                                  static_argnums=(1,), out_shardings=whole)
        self._split_rows_jit = mesh.jit(_pad_rows, static_argnums=(1,), out_shardings=split)
        self._gather_clients_jit = mesh.jit(_gather_clients_impl, static_argnums=(2,), out_shardings=whole)
        self._scatter_clients_jit = mesh.jit(_scatter_clients_impl, out_shardings=(split, whole))

    # -- the clients' knowledge, split over the mesh -----------------------------------
    def init_knowledge(self, key, num_clients: int, input_shape, num_classes: int,
                       images_per_class: int = 1, alpha_init: float = 0.05,
                       noise: str = "normal") -> Knowledge:
        """:func:`init_knowledge`; with a mesh of several devices (drawn on one device as
        without a mesh, then) its rows padded to a multiple of the device count with zeros
        (rows of no client) and split over the devices."""
        kn = init_knowledge(key, num_clients, input_shape, num_classes, images_per_class, alpha_init, noise)
        if self.mesh is None:
            return kn
        return self._split_rows_jit(kn, self.mesh.pad(num_clients))

    def gather_clients(self, knowledge: Knowledge, ids, reset_momentum: bool) -> Knowledge:
        """Rows ``ids`` of ``knowledge`` (:func:`_gather_clients`), on one device (with a mesh:
        gathered from the devices to the process's first one)."""
        if self.mesh is None:
            return _gather_clients(knowledge, ids, reset_momentum)
        return jax.tree_util.tree_map(self.mesh.local, self._gather_clients_jit(knowledge, ids, reset_momentum))

    def scatter_clients(self, knowledge: Knowledge, last_opt_round, slots: Knowledge, write_ids,
                        opt_ids, round_):
        """:func:`_scatter_clients`, the knowledge kept split over the devices."""
        if self.mesh is None:
            return _scatter_clients(knowledge, last_opt_round, slots, write_ids, opt_ids, round_)
        knowledge, last_opt_round = self._scatter_clients_jit(knowledge, last_opt_round, slots, write_ids,
                                                              opt_ids, round_)
        return knowledge, self.mesh.local(last_opt_round)

    # -- per-client pieces ------------------------------------------------------------
    def _value_and_grad(self, w0, g, gsq, images, labels, alpha):
        return outer_value_and_grad(self.apply_fn, self.unravel, w0, g, images, labels, alpha,
                                    self.cfg.inner_steps, gsq, self.cfg.inner_unroll)

    def _client_chunk(self, c: _Carry, w0, g, gsq, cap, chunk_len, early_stop) -> _Carry:
        """Up to ``chunk_len`` outer iterations of one client (stops when done)."""
        cfg = self.cfg
        end = jnp.minimum(c.iters + chunk_len, cap)
        lrs = (cfg.lr_images, cfg.lr_labels, cfg.lr_alpha)

        def cond(c):
            return (~c.done) & (c.iters < end)

        def body(c):
            loss, grads = self._value_and_grad(w0, g, gsq, c.images, c.label_logits, c.alpha)
            params, moms = sgd_momentum_step(
                (c.images, c.label_logits, c.alpha), (c.mom_images, c.mom_labels, c.mom_alpha),
                grads, lrs, cfg.momentum)
            iters = c.iters + 1
            below = loss < cfg.gamma
            # Diverged (NaN/Inf loss): stop, the error is non-finite -> flagged. Early
            # rejection: stop a loss still above reject_above after reject_at iterations.
            stop = ~jnp.isfinite(loss) | (early_stop & below)
            if cfg.reject_at is not None:
                stop = stop | ((iters == cfg.reject_at) & (loss > cfg.reject_above))
            keep = lambda new, old: jnp.where(stop, old, new)
            loss = loss.astype(jnp.float32)
            return _Carry(
                keep(params[0], c.images), keep(params[1], c.label_logits),
                keep(params[2], c.alpha), keep(moms[0], c.mom_images),
                keep(moms[1], c.mom_labels), keep(moms[2], c.mom_alpha),
                iters, loss, stop | (iters >= cap),
                jnp.where((c.to_gamma == 0) & below, iters, c.to_gamma),
                jnp.where(iters == jnp.asarray(BUDGETS), loss, c.loss_at))

        return lax.while_loop(cond, body, c)

    def _over_clients(self, f, xs):
        if self.layout == "vmap":
            return jax.vmap(f)(*xs)
        return lax.map(lambda a: f(*a), xs, batch_size=self.cfg.map_batch_size)

    # -- compiled programs ------------------------------------------------------------
    def _chunk_program(self, sub: _Carry, w0, g, gsq, caps, chunk_len, early_stop) -> _Carry:
        """One chunk for ``B`` gathered slots (compiled once per bucket size ``B``; the
        chunk length and the early-stop switch are traced, so they never recompile)."""

        def one(c, g, gs, cap):
            return self._client_chunk(c, w0, g, gs, cap, chunk_len, early_stop)

        return self._over_clients(one, (sub, g, gsq, caps))

    @staticmethod
    def _gather(carry: _Carry, updates, gsq, caps, idx):
        """Slots ``idx`` (index ``S`` = padding, gathered as a done copy of slot S-1)."""
        s = updates.shape[0]
        take = lambda x: jnp.take(x, idx, axis=0, mode="clip")
        sub = jax.tree_util.tree_map(take, carry)
        sub = sub._replace(done=sub.done | (idx >= s))
        return sub, take(updates), take(gsq), take(caps)

    @staticmethod
    def _scatter(carry: _Carry, sub: _Carry, idx):
        """Writes ``sub`` back into ``carry`` at ``idx`` (padding ``S`` dropped)."""
        return jax.tree_util.tree_map(lambda a, o: a.at[idx].set(o, mode="drop"), carry, sub)

    def _eval_program(self, carry: _Carry, w0, updates, gsq):
        """``[S]`` reconstruction loss with the current knowledge (no update)."""

        def one(x, y, a, g, gs):
            return outer_loss(self.apply_fn, self.unravel, w0, g, x, y, a,
                              self.cfg.inner_steps, gs, self.cfg.inner_unroll)

        return self._over_clients(one, (carry.images, carry.label_logits, carry.alpha,
                                        updates, gsq))

    # -- host driver --------------------------------------------------------------------
    def reconstruct(self, knowledge: Knowledge, w0, updates, caps, run, *,
                    early_stop: bool = True, final_eval: bool = False,
                    compact: bool = True) -> ReconstructionResult:
        """Algorithm 2 for ``S`` slots in one compiled program per chunk.

        Args:
          knowledge: :class:`Knowledge` with leading axis ``S`` (the slots' clients).
          w0: ``[P]`` global model. updates: ``[S, P]``.
          caps: ``[S]`` int, max outer iterations per slot (0: inference only).
          run: ``[S]`` bool, slots to process; their updates must be finite and non-zero.
          early_stop: stop a slot once its loss is ``< gamma`` (dynamic optimisation).
          final_eval: error = loss after the iterations (fixed-count variants); otherwise
            error = last loss computed.
          compact: between chunks, run only still-active slots (padded to a power of two).
            ``compact=False`` runs all ``S`` slots each chunk (same results; for testing).
        """
        cfg = self.cfg
        w0 = jnp.asarray(w0, jnp.float32)
        run = np.asarray(run, bool)
        caps = np.where(run, np.asarray(caps, np.int64), 0).astype(np.int32)
        carry, updates, gsq, caps_d, s, rows = self._start(knowledge, updates, caps, run)
        stop_flag = jnp.asarray(bool(early_stop))
        done, most = self._status(carry)
        chunk_len = min(cfg.first_chunk, cfg.chunk)
        chunks = []
        t_start = time.perf_counter()
        while not done.all():
            if compact:
                b, idx = self._bucket(np.nonzero(~done)[0], rows)
            else:
                b, idx = rows, np.arange(rows, dtype=np.int32)
            carry = self._run_chunk(carry, w0, updates, gsq, caps_d, b, idx, rows, chunk_len, stop_flag)
            chunks.append((b, chunk_len))
            done, most = self._status(carry)
            elapsed = time.perf_counter() - t_start
            if elapsed >= PROGRESS_AFTER_S and mesh_lib.is_writer():
                logging.info("FedREDefense reconstruction: %d/%d clients done, at most %d "
                             "outer iterations so far (cap %d), %.0f s", int((done[:s] & run).sum()),
                             int(run.sum()), most(), int(caps.max()), elapsed)
            chunk_len = min(2 * chunk_len, cfg.chunk)

        if final_eval and run.any():
            errors = self._host(self._eval_jit(carry, w0, updates, gsq))[:s]
        else:
            errors = self._host(carry.err)[:s]
        errors = np.where(run, errors, np.nan).astype(np.float32)
        iters = np.where(run, self._host(carry.iters)[:s], 0).astype(np.int32)
        to_gamma = np.where(run, self._host(carry.to_gamma)[:s], 0).astype(np.int32)
        loss_at = np.where(run[:, None], self._host(carry.loss_at)[:s], np.nan).astype(np.float32)
        fields = (carry.images, carry.label_logits, carry.alpha, carry.mom_images, carry.mom_labels,
                  carry.mom_alpha)
        if rows != s:
            fields = self._head_jit(fields, s)
        new_k = Knowledge(*fields, jnp.asarray(knowledge.seen))
        return ReconstructionResult(errors, iters, new_k, chunks, to_gamma, loss_at)

    def compile_buckets(self, knowledge: Knowledge, w0, updates) -> int:
        """Compiles the programs of every bucket that :meth:`reconstruct` can meet for these
        ``S`` slots, running each for zero iterations (the chunk length is a traced value);
        returns how many buckets. For benchmarks that time a round without compilation (with
        a mesh every device compiles its own copy)."""
        s = int(np.shape(updates)[0])
        run = np.ones(s, bool)
        carry, updates, gsq, caps_d, s, rows = self._start(knowledge, updates, np.ones(s, np.int32), run)
        w0, stop_flag = jnp.asarray(w0, jnp.float32), jnp.asarray(True)
        buckets: dict = {}
        for n in range(1, s + 1):
            b, idx = self._bucket(np.arange(n), rows)
            buckets.setdefault(b, idx)
        for b, idx in sorted(buckets.items()):
            carry = self._run_chunk(carry, w0, updates, gsq, caps_d, b, idx, rows, 0, stop_flag)
        jax.block_until_ready(carry)
        return len(buckets)

    def _start(self, knowledge: Knowledge, updates, caps: np.ndarray, run: np.ndarray):
        """``(carry, updates, gsq, caps, S, rows)`` of a reconstruction: ``rows = S``, or with a
        mesh ``S`` padded to a multiple of the devices (padding done) and split over them."""
        updates = jnp.asarray(updates, jnp.float32)
        s = updates.shape[0]
        gsq = jnp.sum(jnp.square(updates), axis=1)
        gsq = jnp.where(jnp.asarray(run), gsq, 1.0)
        fields = (knowledge.images, knowledge.label_logits, knowledge.alpha, knowledge.mom_images,
                  knowledge.mom_labels, knowledge.mom_alpha)
        if self.mesh is None:
            # jnp.array copies: the carry is donated, the caller's arrays must not be.
            carry = _Carry(*(jnp.array(a, jnp.float32) for a in fields),
                           jnp.zeros((s,), jnp.int32), jnp.full((s,), jnp.nan, jnp.float32),
                           jnp.asarray(~run | (caps <= 0)), jnp.zeros((s,), jnp.int32),
                           jnp.full((s, len(BUDGETS)), jnp.nan, jnp.float32))
            return carry, updates, gsq, jnp.asarray(caps), s, s
        rows = self.mesh.pad(s)
        carry, updates, gsq, caps_d = self._place_jit(fields, updates, gsq, jnp.asarray(caps),
                                                      jnp.asarray(~run | (caps <= 0)), rows)
        return carry, updates, gsq, caps_d, s, rows

    def _run_chunk(self, carry, w0, updates, gsq, caps_d, b, idx, rows, chunk_len, stop_flag):
        """One chunk of up to ``chunk_len`` iterations for the bucket ``idx`` of ``b`` slots
        (all ``rows`` slots in place when ``b == rows``)."""
        if b < rows:
            idx_d = jnp.asarray(idx)
            sub, g_sub, gsq_sub, caps_sub = self._gather_jit(carry, updates, gsq, caps_d, idx_d)
            sub = self._chunk_jit(sub, w0, g_sub, gsq_sub, caps_sub, jnp.int32(chunk_len), stop_flag)
            return self._scatter_jit(carry, sub, idx_d)
        # all slots, in place: no gather/scatter copies
        return self._chunk_jit(carry, w0, updates, gsq, caps_d, jnp.int32(chunk_len), stop_flag)

    def _status(self, carry: _Carry):
        """``(done[rows] numpy, most())``, ``most()`` the largest iteration count so far. With
        a mesh both come in one transfer every chunk, so that every process runs the same
        collectives whatever its clock says."""
        if self.mesh is None:
            return np.asarray(carry.done), lambda: int(np.asarray(carry.iters).max())
        done, iters = self._host((carry.done, carry.iters))
        return done, lambda: int(iters.max())

    def _host(self, x) -> np.ndarray:
        """``x`` as a numpy array on every process."""
        return np.asarray(x) if self.mesh is None else self.mesh.to_host(x)

    def _bucket(self, active: np.ndarray, rows: int) -> tuple[int, np.ndarray]:
        """``(b, idx[b])``: the ``active`` slots padded (index ``rows``) to a bucket of ``b``
        slots. One device: the next power of two (capped at ``rows``). Several devices: the
        active slots are dealt out round-robin, ``idx`` holding one block of the same
        power-of-two size per device, so every device runs as many active clients as the
        others (give or take one) whichever device held them before."""
        if self.mesh is None:
            b = bucket_size(len(active), rows)
            idx = np.full((b,), rows, np.int32)
            idx[: len(active)] = active
            return b, idx
        d = self.mesh.size
        per = bucket_size(-(-len(active) // d), rows // d)
        idx = np.full((d, per), rows, np.int32)
        for k in range(d):
            mine = active[k::d]
            idx[k, : len(mine)] = mine
        return d * per, idx.reshape(-1)


def _pad_rows(tree, rows: int):
    """Every array of ``tree`` with its leading axis padded with zeros to ``rows``."""
    return jax.tree_util.tree_map(
        lambda a: jnp.concatenate([a, jnp.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)]), tree)


def _place_slots(fields, updates, gsq, caps, done, rows: int):
    """The reconstruction carry, updates, norms and caps of ``S`` slots padded to ``rows``
    (padding slots done, cap 0, zero update; compiled with the mesh's split sharding)."""
    s = updates.shape[0]
    extra = rows - s
    pad = lambda a, v: jnp.concatenate([a, jnp.full((extra,) + a.shape[1:], v, a.dtype)]) if extra else a
    carry = _Carry(*(pad(jnp.asarray(a, jnp.float32), 0) for a in fields),
                   jnp.zeros((rows,), jnp.int32), jnp.full((rows,), jnp.nan, jnp.float32), pad(done, True),
                   jnp.zeros((rows,), jnp.int32), jnp.full((rows, len(BUDGETS)), jnp.nan, jnp.float32))
    return carry, pad(updates, 0), pad(gsq, 1), pad(caps, 0)


_RECONSTRUCTORS: "dict[tuple, Reconstructor]" = {}
_MAX_CACHED = 8


def get_reconstructor(apply_fn: Callable, unravel: Callable,
                      cfg: RedefenseConfig, mesh=None) -> Reconstructor:
    """A :class:`Reconstructor` shared by equal ``(apply_fn, unravel, cfg, mesh)`` (so its
    compiled programs are reused when a defense is rebuilt); a small FIFO cache."""
    mesh = mesh_lib.active(mesh)
    key = (apply_fn, unravel, cfg, resolve_layout(cfg.layout)) + (() if mesh is None else (mesh,))
    try:
        return _RECONSTRUCTORS[key]
    except (KeyError, TypeError):  # TypeError: unhashable callables -> no caching
        pass
    rec = Reconstructor(apply_fn, unravel, cfg, mesh)
    try:
        if len(_RECONSTRUCTORS) >= _MAX_CACHED:
            _RECONSTRUCTORS.pop(next(iter(_RECONSTRUCTORS)))
        _RECONSTRUCTORS[key] = rec
    except TypeError:
        pass
    return rec


def reconstruct(apply_fn: Callable, unravel: Callable, cfg: RedefenseConfig,
                knowledge: Knowledge, w0, updates, caps, run, **kwargs) -> ReconstructionResult:
    """Functional form of :meth:`Reconstructor.reconstruct` (uses
    :func:`get_reconstructor`, so repeated calls reuse the compiled programs)."""
    return get_reconstructor(apply_fn, unravel, cfg).reconstruct(knowledge, w0, updates, caps,
                                                                 run, **kwargs)


def rejection_bound(rounds, reject_at: int, margin: float, gamma: float) -> dict:
    """Early rejection's bound from recorded trajectories (``rounds.jsonl`` records with
    ``loss_at``, ``to_gamma`` and ``error`` per participant).

    Over the participations that ran at least ``reject_at`` outer iterations (``reject_at``
    one of :data:`BUDGETS`), ``bound = max(max loss_at[reject_at] of those that reached gamma
    + margin, gamma)``: no recorded reconstruction that reached gamma would have been stopped.

    Returns:
      ``{'bound', 'reached', 'reached_max', 'unreached', 'unreached_min',
      'unreached_rejected'}``: counts of the participations that reached gamma and of those
      that never did, the largest loss of the first, the smallest of the second and how many
      of the second the bound rejects. ValueError when none reached gamma.
    """
    b = BUDGETS.index(reject_at)
    reached, unreached = [], []
    for rec in rounds:
        for loss_at, to_gamma, err in zip(rec.get("loss_at", []), rec.get("to_gamma", []), rec.get("error", [])):
            if loss_at is None or loss_at[b] is None:
                continue
            reaches = to_gamma is not None or (err is not None and err <= gamma)
            (reached if reaches else unreached).append(loss_at[b])
    if not reached:
        raise ValueError(f"no recorded reconstruction ran {reject_at} iterations or more and reached gamma")
    bound = max(max(reached) + margin, gamma)
    return {"bound": bound, "reached": len(reached), "reached_max": max(reached), "unreached": len(unreached),
            "unreached_min": min(unreached) if unreached else None,
            "unreached_rejected": sum(v > bound for v in unreached)}


# --------------------------------------------------------------------------------------
# The defense
# --------------------------------------------------------------------------------------


class RedefenseState(NamedTuple):
    """Defense state.

    Attributes:
      knowledge: :class:`Knowledge` of all ``C`` clients (with a mesh of several devices:
        rows padded to a multiple of the device count and split over the devices; the
        padding rows belong to no client).
      last_opt_round: ``[C]`` int32, last round whose reconstruction optimised the client's
        knowledge (0 = never); drives the intermittent variant's refinements.
    """

    knowledge: Knowledge
    last_opt_round: jax.Array


def invalid_updates(updates: jax.Array, valid) -> np.ndarray:
    """``[S]`` bool numpy: valid slots whose update is non-finite or has a zero/overflowing
    squared norm (the reconstruction ratio would be undefined)."""
    sq = np.asarray(jnp.sum(jnp.square(updates.astype(jnp.float32)), axis=1))
    bad = np.asarray(nonfinite_rows(updates)) | ~np.isfinite(sq) | (sq <= 0)
    return np.asarray(valid, bool) & bad


def iteration_caps(cfg: RedefenseConfig, seen, last_opt_round, round_: int) -> np.ndarray:
    """``[S]`` outer-iteration caps of the slots' clients for ``cfg.variant``.

    dynamic / continuous: ``first_cap`` if not seen else ``later_cap``; intermittent:
    ``first_cap`` if not seen, ``later_cap`` if ``round - last_opt_round >= interval``,
    else 0 (inference only).
    """
    seen = np.asarray(seen, bool)
    caps = np.where(seen, cfg.later_cap, cfg.first_cap)
    if cfg.variant == "intermittent":
        due = (int(round_) - np.asarray(last_opt_round)) >= cfg.interval
        caps = np.where(seen, np.where(due, cfg.later_cap, 0), cfg.first_cap)
    return caps.astype(np.int32)


def _gather_clients_impl(knowledge: Knowledge, ids, reset_momentum: bool) -> Knowledge:
    """Knowledge rows ``ids`` (``[S]``), momentum zeroed when ``reset_momentum``."""
    kn = jax.tree_util.tree_map(lambda x: x[ids], knowledge)
    if reset_momentum:
        kn = kn._replace(mom_images=jnp.zeros_like(kn.mom_images),
                         mom_labels=jnp.zeros_like(kn.mom_labels),
                         mom_alpha=jnp.zeros_like(kn.mom_alpha))
    return kn


_gather_clients = jax.jit(_gather_clients_impl, static_argnums=(2,))


def _scatter_clients_impl(knowledge: Knowledge, last_opt_round, slots: Knowledge, write_ids,
                          opt_ids, round_):
    """Writes reconstructed slots back (ids ``C`` are dropped), marks them seen and sets
    ``last_opt_round`` of the optimised ones to ``round_``."""
    slots = slots._replace(seen=jnp.ones_like(slots.seen))
    knowledge = jax.tree_util.tree_map(lambda a, b: a.at[write_ids].set(b, mode="drop"),
                                       knowledge, slots)
    return knowledge, last_opt_round.at[opt_ids].set(round_, mode="drop")


_scatter_clients = jax.jit(_scatter_clients_impl)


def _resolve_aggregator(agg, ctx: DefenseContext):
    """``(updates[S, P], weights[S], inp) -> [P]`` from the setting ``redefense_aggregator``:
    None or 'fedavg' (equal weights), a callable ``(updates, weights) -> [P]``, or a
    registered rule name of :data:`AGGREGATORS`, built with ``ctx`` (and its own default
    settings) and applied to the kept slots only (``valid = inp.valid & (weights > 0)``)."""
    if agg is None or agg == "fedavg":
        return lambda updates, weights, inp: fedavg(updates, weights)
    if callable(agg):
        return lambda updates, weights, inp: agg(updates, weights)
    if agg in AGGREGATORS:
        from fedredefense_jax.defenses import make

        rule = make(agg, ctx._replace(config=None))
        rule_state = rule.init(ctx.num_clients, jax.random.PRNGKey(0))  # stateless rules

        def aggregate(updates, weights, inp):
            kept = jnp.asarray(inp.valid, bool) & (weights > 0)
            out, _ = rule.apply(rule_state, inp._replace(updates=updates, valid=kept))
            return out.aggregate

        return aggregate
    raise ValueError(f"aggregator must be None, a callable or one of {AGGREGATORS}, got {agg!r}")


@register("fedredefense", settings=RedefenseConfig)
def make_redefense(ctx: DefenseContext) -> Defense:
    """FedREDefense with the settings ``ctx.config`` (a :class:`RedefenseConfig`, Table 7's
    defaults for ``ctx.dataset`` where unset).

    ``apply`` returns ``info = {'error': [S], 'iterations': [S], 'to_gamma': [S],
    'loss_at': [S, len(BUDGETS)], 'invalid_update': [S]}``: ``error`` is NaN for slots that
    were not reconstructed; ``to_gamma`` the first outer iteration whose loss was below gamma
    (NaN: never); ``loss_at`` the loss at each of :data:`BUDGETS` outer iterations (NaN where
    the reconstruction stopped before).
    """
    cfg = ctx.config
    aggregator = _resolve_aggregator(cfg.aggregator, ctx)
    rec = get_reconstructor(ctx.apply_fn, ctx.unravel, cfg, ctx.mesh)

    def init(num_clients, key):
        kn = rec.init_knowledge(key, num_clients, ctx.input_shape, ctx.num_classes,
                                cfg.images_per_class, cfg.alpha_init, cfg.init_noise)
        return RedefenseState(kn, jnp.zeros((num_clients,), jnp.int32))

    def decide(errors, bad, valid) -> np.ndarray:
        """``[S]`` flagged: valid slots with an invalid update, or an error > gamma or NaN/Inf."""
        with np.errstate(invalid="ignore"):
            unreconstructible = ~(errors <= cfg.gamma)
        return valid & (bad | unreconstructible)

    def reconstruct_round(state: RedefenseState, inp: DefenseInput):
        """Algorithm 2 for the valid slots: ``(result, bad[S], run[S], ids[S])``."""
        valid = np.asarray(inp.valid, bool)
        ids = np.asarray(inp.client_ids, np.int32)
        if len(np.unique(ids[valid])) != valid.sum():
            raise ValueError("a client appears in two valid slots of one round")
        updates = jnp.asarray(inp.updates)
        bad = invalid_updates(updates, valid)
        run = valid & ~bad
        gather_ids = np.where(valid, ids, 0)
        kn = rec.gather_clients(state.knowledge, jnp.asarray(gather_ids), cfg.reset_momentum)
        last_opt = np.asarray(state.last_opt_round)[gather_ids]
        caps = iteration_caps(cfg, kn.seen, last_opt, inp.round)
        res = rec.reconstruct(kn, inp.global_params, jnp.where(run[:, None], updates, 0.0),
                              caps, run, early_stop=cfg.variant == "dynamic",
                              final_eval=cfg.variant != "dynamic")
        return res, bad, run, ids

    def probe(state: RedefenseState, inp: DefenseInput) -> dict:
        """What :func:`apply` would decide for the valid slots this round, ``state`` unchanged:
        ``{'error': [S]`` reconstruction errors (``inf`` for a non-finite or zero update, NaN
        for invalid slots), ``'flagged': [S]`` bool ``}``."""
        res, bad, _, _ = reconstruct_round(state, inp)
        errors = np.where(bad, np.inf, res.errors).astype(np.float32)
        return {"error": errors, "flagged": decide(res.errors, bad, np.asarray(inp.valid, bool))}

    def apply(state: RedefenseState, inp: DefenseInput):
        num_clients = state.last_opt_round.shape[0]
        valid = np.asarray(inp.valid, bool)
        updates = jnp.asarray(inp.updates)
        t0 = time.perf_counter()
        res, bad, run, ids = reconstruct_round(state, inp)
        detection_s = time.perf_counter() - t0

        errors = res.errors
        flagged = decide(errors, bad, valid)
        weights = (valid & ~flagged).astype(np.float32)
        aggregate = aggregator(updates, jnp.asarray(weights), inp)

        rows = state.knowledge.alpha.shape[0]  # num_clients, or padded to the devices
        knowledge, last_opt_round = rec.scatter_clients(
            state.knowledge, state.last_opt_round, res.knowledge,
            jnp.asarray(np.where(run, ids, rows)),
            jnp.asarray(np.where(run & (res.iterations > 0), ids, num_clients)),
            jnp.int32(inp.round))

        out = DefenseOutput(
            aggregate=aggregate,
            flagged=jnp.asarray(flagged),
            weights=jnp.asarray(weights),
            info={"error": jnp.asarray(errors), "iterations": jnp.asarray(res.iterations),
                  "to_gamma": np.where(res.to_gamma > 0, res.to_gamma, np.nan),
                  "loss_at": res.loss_at, "invalid_update": jnp.asarray(bad), "detection_s": detection_s},
        )
        return out, RedefenseState(knowledge, last_opt_round)

    return Defense("fedredefense", init, apply, probe=probe)
