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

Data poisoning (label flips, backdoors) stays inside the same program: a trainer built with
``poisoning`` takes one :class:`Poison` per client (a label map, a trigger mask, whether the
client follows a backdoor schedule). In a poisoned epoch the client trains on
``(stamp(x), label_map[y])``, where ``stamp`` sets the *normalised* value of the trigger
pixels to ``TRIGGER_VALUE``; benign clients get the identity map and an empty mask, so
benign and malicious slots run the same compiled program on different arrays and a benign
client's update is the one the plain trainer computes. ``poisoning="alternating"`` runs
``2E`` epoch passes: a client with ``backdoor`` trains ``E`` times a poisoned epoch
followed by a clean one (the Scaling / DBA backdoor of the authors' code); every other
client trains its ``E`` epochs in the first ``E`` passes (with the plain trainer's epoch
keys) and skips the rest (``lax.cond``: skipped under ``lax.map``, both branches computed
and one selected under ``vmap``). ``poisoning="mixed"``: a client with ``backdoor`` trains
each of its ``E`` epochs on the union of its data and a poisoned copy of it (``2n``
samples, shuffled together, so a batch mixes clean and poisoned samples; ``ceil(2n / B)``
steps), the paper's Appendix A.2 reading ("train using both the original and poisoned
datasets"); the other clients train their plain epochs.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from fedredefense_jax import mesh as mesh_lib

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


TRIGGER_VALUE = 1.0
POISONING_MODES = (None, "constant", "alternating", "mixed")


class Poison(NamedTuple):
    """Data poisoning of local training, one entry per client (a leading client axis in
    :func:`make_trainer`, none in :func:`make_client_update`).

    Attributes:
      label_map: ``[K]`` int32; in a poisoned epoch label ``y`` is trained as ``label_map[y]``.
      trigger: ``[H, W, C]`` bool; in a poisoned epoch these pixels of the *normalised*
        image are set to ``TRIGGER_VALUE``.
      backdoor: ``[]`` bool; the client follows the trainer's backdoor schedule: with
        ``poisoning="alternating"``, ``E`` times a poisoned epoch followed by a clean one; with
        ``"mixed"``, ``E`` epochs over its data plus a poisoned copy (module docstring).
    """

    label_map: jax.Array
    trigger: jax.Array
    backdoor: jax.Array


def clean_poison(num_classes: int, input_shape, num_clients: int | None = None) -> Poison:
    """The identity poisoning (numpy): identity label map, empty trigger, no backdoor schedule;
    with ``num_clients``, stacked along a leading client axis."""
    p = Poison(np.arange(num_classes, dtype=np.int32), np.zeros(tuple(input_shape), bool), np.asarray(False))
    if num_clients is None:
        return p
    return Poison(*(np.repeat(a[None], num_clients, axis=0) for a in p))


def stamp_trigger(x_normalized: jax.Array, trigger: jax.Array) -> jax.Array:
    """Sets the ``trigger``-masked entries (``[H, W, C]`` bool, broadcast over leading axes)
    of normalised images to ``TRIGGER_VALUE``."""
    return jnp.where(trigger, jnp.asarray(TRIGGER_VALUE, x_normalized.dtype), x_normalized)


class _Relabel(NamedTuple):
    """How a pass poisons its samples: virtual sample ``v`` is sample ``v`` when ``v < copies``,
    else the poisoned copy of sample ``v - copies`` (trained as ``(stamp(x), label_map[y])``);
    ``copies = 0``: every sample of the pass is poisoned."""

    copies: jax.Array
    label_map: jax.Array
    trigger: jax.Array


def _pass_order(key: jax.Array, count: jax.Array, n: int, batch_size: int) -> jax.Array:
    """A shuffled order of ``n`` virtual samples (``count`` real), padded to whole batches."""
    steps = -(-n // batch_size)
    return jnp.pad(shuffled_order(key, count, n), (0, steps * batch_size - n))


def make_client_update(apply_fn: Callable, unravel: Callable, mean, std, *, batch_size: int,
                       lr: float, epochs: int, poisoning: str | None = None) -> Callable:
    """Returns ``client_update(w0[P], x[n,H,W,C] uint8, y[n], count, key) -> g[P]``; with
    ``poisoning`` (``"constant"``, ``"alternating"`` or ``"mixed"``, see the module docstring) the
    signature is ``client_update(w0, x, y, count, key, poison: Poison)``.

    Every schedule is a sequence of passes of :func:`sgd_pass`-style SGD over a shuffled order
    of virtual samples: a clean pass, a poisoned pass (every sample poisoned) or a mixed pass
    (``2n`` virtual samples, the second ``n`` poisoned copies)."""
    if poisoning not in POISONING_MODES:
        raise ValueError(f"unknown poisoning {poisoning!r}; choose one of {POISONING_MODES}")
    opt = optax.sgd(lr)

    def loss_fn(params, xb, yb, mb, trigger, rows=None):
        """``rows[B]`` (bool): stamp ``trigger`` on these samples only (None: on all)."""
        xn = normalize(xb, mean, std)
        if trigger is not None:
            if rows is not None:
                trigger = trigger[None] & rows[:, None, None, None]
            xn = stamp_trigger(xn, trigger)
        return masked_cross_entropy(apply_fn(params, xn), yb, mb)

    grad_fn = jax.grad(loss_fn)

    def sgd_pass(carry, x, y, order, size, relabel: _Relabel | None):
        """SGD over ``order`` in batches of ``batch_size``; entries at positions ``>= size`` are
        masked (zero gradient); ``relabel`` None: a clean pass."""
        n_max = x.shape[0]

        def step(carry, s):
            params, opt_state = carry
            pos = s * batch_size + jnp.arange(batch_size)
            v = jax.lax.dynamic_slice(order, (s * batch_size,), (batch_size,))
            if relabel is None:
                grads = grad_fn(params, x[v], y[v], pos < size, None)
            else:
                pois = v >= relabel.copies
                idx = jnp.minimum(jnp.where(pois, v - relabel.copies, v), n_max - 1)
                yb = jnp.where(pois, relabel.label_map[y[idx]], y[idx])
                grads = grad_fn(params, x[idx], yb, pos < size, relabel.trigger, pois)
            upd, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, upd), opt_state), None

        carry, _ = jax.lax.scan(step, carry, jnp.arange(order.shape[0] // batch_size))
        return carry

    def client_update(w0, x, y, count, key, poison: Poison | None = None):
        if (poison is None) != (poisoning is None):
            raise ValueError("a poisoning client update needs a Poison, a plain one takes none")
        n_max = x.shape[0]
        params = unravel(w0)
        carry = (params, opt.init(params))

        def clean(carry, ekey):
            return sgd_pass(carry, x, y, _pass_order(ekey, count, n_max, batch_size), count, None)

        def poisoned(carry, ekey, label_map, trigger):
            relabel = _Relabel(jnp.int32(0), label_map, trigger)
            return sgd_pass(carry, x, y, _pass_order(ekey, count, n_max, batch_size), count, relabel)

        def mixed(carry, ekey):
            relabel = _Relabel(count, poison.label_map, poison.trigger)
            return sgd_pass(carry, x, y, _pass_order(ekey, 2 * count, 2 * n_max, batch_size), 2 * count, relabel)

        ekeys = jax.random.split(key, epochs)
        if poisoning is None:
            carry, _ = jax.lax.scan(lambda c, k: (clean(c, k), None), carry, ekeys)
        elif poisoning == "constant":
            carry, _ = jax.lax.scan(lambda c, k: (poisoned(c, k, poison.label_map, poison.trigger), None),
                                    carry, ekeys)
        elif poisoning == "mixed":
            carry, _ = jax.lax.scan(lambda c, k: (jax.lax.cond(poison.backdoor, mixed, clean, c, k), None),
                                    carry, ekeys)
        else:
            carry = _alternating(carry, key, ekeys, poison, poisoned)
        flat, _ = jax.flatten_util.ravel_pytree(carry[0])
        return flat - w0

    return client_update


def _alternating(carry, key, ekeys, poison: Poison, poisoned: Callable):
    """``2E`` passes: a client with ``backdoor`` trains a poisoned pass then a clean one per
    epoch (keys ``split(key, 2E)``); every other client trains its ``E`` epochs as poisoned
    passes (its identity map and empty trigger: clean) with the plain trainer's epoch keys,
    then skips ``E`` passes."""
    epochs = ekeys.shape[0]
    alt = poison.backdoor
    j = jnp.arange(2 * epochs)
    active = alt | (j < epochs)
    is_poisoned = ~alt | (j % 2 == 0)
    kd = jax.random.key_data
    pass_keys = jax.random.wrap_key_data(
        jnp.where(alt, kd(jax.random.split(key, 2 * epochs)), kd(jnp.concatenate([ekeys, ekeys]))),
        impl=jax.random.key_impl(key))
    identity = jnp.arange(poison.label_map.shape[0], dtype=poison.label_map.dtype)

    def one_pass(carry, xs):
        ekey, act, pois = xs
        label_map = jnp.where(pois, poison.label_map, identity)
        return jax.lax.cond(act, lambda c: poisoned(c, ekey, label_map, poison.trigger & pois), lambda c: c,
                            carry), None

    carry, _ = jax.lax.scan(one_pass, carry, (pass_keys, active, is_poisoned))
    return carry


def map_clients(fn: Callable, layout: str, chunk: int = 8) -> Callable:
    """Maps ``fn(shared, *per_client)`` over the leading axis of the per-client arguments."""
    if layout == "vmap":
        return lambda w0, *xs: jax.vmap(lambda *a: fn(w0, *a))(*xs)
    if layout == "map":
        return lambda w0, *xs: jax.lax.map(lambda a: fn(w0, *a), xs)
    if layout == "chunked":
        return lambda w0, *xs: jax.lax.map(lambda a: fn(w0, *a), xs, batch_size=chunk)
    raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def make_trainer(apply_fn: Callable, unravel: Callable, mean, std, *, batch_size: int = 32,
                 lr: float = 1e-3, epochs: int = 1, layout: str | None = None,
                 chunk: int = 8, poisoning: str | None = None, mesh=None) -> Callable:
    """Jitted ``train(w0[P], client_x[p,n,...], client_y[p,n], counts[p], ids[S], keys[S]) -> [S, P]``.

    Gathers the ``S`` participating clients' data by id inside the program, trains them all
    from the same global model ``w0`` (or, with ``w0[S, P]``, each slot from its own row)
    and returns their update matrix. With ``poisoning``
    (``"constant"`` / ``"alternating"`` / ``"mixed"``) the call takes ``poison=``, a :class:`Poison` of
    per-client arrays (``[p, K]``, ``[p, H, W, C]``, ``[p]``) gathered by id like the data.

    With a ``mesh`` (a ``mesh.ClientMesh`` of several devices) the client table may be split
    over it (``mesh.stack_clients``): the slots are padded to a multiple of the device count
    (padding slots repeat slot 0), their data gathered onto the slot axis split over the
    devices (one jitted program), every device trains its own slots with the single-device
    program above (``mesh.map_blocks``), and the ``[S, P]`` result (padding dropped) is
    all-gathered and handed back on the process's first device (``mesh.local``), so that what
    follows computes exactly as on one device.
    """
    layout = layout or default_layout()
    one = make_client_update(apply_fn, unravel, mean, std, batch_size=batch_size, lr=lr, epochs=epochs,
                             poisoning=poisoning)
    mapped = map_clients(one, layout, chunk)
    mapped_own = map_clients(lambda _, w, *a: one(w, *a), layout, chunk)
    mesh = mesh_lib.active(mesh)

    @jax.jit
    def train(w0, client_x, client_y, counts, ids, keys, poison: Poison | None = None):
        if (poison is None) != (poisoning is None):
            raise ValueError("a poisoning trainer needs poison=, a plain one takes none")
        per_slot = (client_x[ids], client_y[ids], counts[ids], keys)
        if poison is not None:
            per_slot += (Poison(*(jnp.asarray(a)[ids] for a in poison)),)
        if w0.ndim == 2:  # each slot starts from its own model (e.g. FLCert's group models)
            return mapped_own(None, w0, *per_slot)
        return mapped(w0, *per_slot)

    if mesh is None:
        return train

    def spread(w0, client_x, client_y, counts, ids, keys, poison):
        """The slots' rows (padded with copies of slot 0) split over the mesh."""
        ids = mesh_lib.pad_rows(ids, mesh.pad(ids.shape[0]))
        keys = mesh_lib.pad_rows(keys, ids.shape[0])
        rows = (client_x[ids], client_y[ids], counts[ids], keys)
        if poison is not None:
            rows += (Poison(*(jnp.asarray(a)[ids] for a in poison)),)
        if w0.ndim == 2:
            rows += (mesh_lib.pad_rows(w0, ids.shape[0]),)
        return rows

    spread_jit = mesh.jit(spread, out_shardings=mesh.sharded)
    gather_jit = mesh.jit(lambda u, s: u[:s], static_argnums=(1,), out_shardings=mesh.replicated)

    def train_on_mesh(w0, client_x, client_y, counts, ids, keys, poison: Poison | None = None):
        if (poison is None) != (poisoning is None):
            raise ValueError("a poisoning trainer needs poison=, a plain one takes none")
        s = int(np.shape(ids)[0])
        w0 = jnp.asarray(w0)
        rows = spread_jit(w0, client_x, client_y, counts, jnp.asarray(ids, jnp.int32), keys, poison)
        local = np.arange(mesh.pad(s) // mesh.size, dtype=np.int32)
        own = w0.ndim == 2

        def arrange(reps, block):  # the single-device train()'s arguments for one device
            x, y, n, k, *rest = block
            extra = {} if poison is None else {"poison": rest[0]}
            return (rest[-1] if own else reps[0], x, y, n, local, k), extra

        updates = mesh.map_blocks(train, () if own else (w0,), rows, arrange)
        return mesh.local(gather_jit(updates, s))

    return train_on_mesh


def client_keys(round_key: jax.Array, ids: np.ndarray) -> jax.Array:
    """``[S]`` keys, one per client id (a client's key does not depend on its slot)."""
    return jax.vmap(lambda i: jax.random.fold_in(round_key, i))(jnp.asarray(ids, jnp.int32))


def make_predictor(apply_fn: Callable, unravel: Callable, mean, std, batch: int = 1000,
                   trigger=None, mesh=None) -> Callable:
    """Jitted ``predict(w[P], x[N,H,W,C] uint8) -> [N] int32`` in batches of ``batch`` (``w[G, P]``:
    the :func:`majority_vote` of the ``G`` models' predictions); with
    ``trigger`` (``[H, W, C]`` bool) the images are stamped (:func:`stamp_trigger`) first.
    With a ``mesh`` of several devices and at least as many batches as devices, the batches
    are split over the devices, each running the single-device program on its own
    (``mesh.map_blocks``)."""
    trigger = None if trigger is None else jnp.asarray(trigger, bool)
    mesh = mesh_lib.active(mesh)

    def prepare(b):
        xn = normalize(b, mean, std)
        return xn if trigger is None else stamp_trigger(xn, trigger)

    @jax.jit
    def _predict(w, xb):
        params = unravel(w)
        return jax.lax.map(lambda b: jnp.argmax(apply_fn(params, prepare(b)), -1).astype(jnp.int32), xb)

    if mesh is not None:
        collect = jax.jit(lambda a: a, out_shardings=mesh.replicated)

    def predict(w, x):
        if np.ndim(w) == 2:  # an ensemble [G, P]: majority vote of its models
            return majority_vote(np.stack([predict(wg, x) for wg in w]))
        n = x.shape[0]
        nb = -(-n // batch)
        split = mesh is not None and nb >= mesh.size  # each device predicts its own batches
        if split:
            nb = mesh.pad(nb)
        xp = np.zeros((nb * batch, *x.shape[1:]), x.dtype)
        xp[:n] = x
        xp = xp.reshape(nb, batch, *x.shape[1:])
        if split:
            return np.asarray(collect(mesh.map_blocks(_predict, (w,), (mesh.put_sharded(xp),)))).reshape(-1)[:n]
        return np.asarray(_predict(w, xp)).reshape(-1)[:n]

    return predict


def majority_vote(preds: np.ndarray) -> np.ndarray:
    """``[G, N]`` int labels -> ``[N]``: per column the label most models predict; a tie
    goes to the smallest such label."""
    preds = np.asarray(preds)
    k = int(preds.max()) + 1 if preds.size else 1
    counts = np.zeros((k, preds.shape[1]), np.int32)
    np.add.at(counts, (preds, np.arange(preds.shape[1])[None, :]), 1)
    return counts.argmax(axis=0).astype(np.int32)


def accuracy(predict: Callable, w: jax.Array, x: np.ndarray, y: np.ndarray) -> float:
    """Fraction of ``x`` classified as ``y`` by the flat model ``w``."""
    return float(np.mean(predict(w, x) == np.asarray(y)))
