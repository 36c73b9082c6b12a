"""Batched, chunked reconstruction: Algorithm 2 for all participating clients at once.

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
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from fedredefense_jax import mesh as mesh_lib
from fedredefense_jax.defenses.redefense.distillation import (
    Knowledge,
    init_knowledge,
    outer_loss,
    outer_value_and_grad,
    sgd_momentum_step,
)
from fedredefense_jax.defenses.redefense.settings import RedefenseConfig

#: A reconstruction still running after this many seconds logs its progress after every
#: chunk (a first participation of a large model can take an hour on a CPU).
PROGRESS_AFTER_S = 30.0

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
