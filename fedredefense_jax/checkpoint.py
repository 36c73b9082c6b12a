"""Checkpoints of a simulation: the whole :class:`~fedredefense_jax.simulation.SimState`
(global params, PRNG key, expelled clients, the defense's and the attack's states, round
counter) saved with Orbax as a tree of named arrays::

    {"round": int64,
     "state": {"params": f32[P], "key": uint32[2], "expelled": bool[C],
               "defense_state": {"knowledge": {"images": ..., "seen": ...}, "last_opt_round": ...},
               "attack_state": {...}}}

Names follow the state's own structure (``jax.tree_util`` key paths): NamedTuple fields and
dict keys by name, tuple and list entries by position; empty containers hold nothing and are
not written; typed PRNG keys are saved as their raw ``uint32`` key data. A checkpoint can
thus be read without this code (``orbax`` item metadata lists ``state.defense_state.
knowledge.images`` and so on).

Restoring needs a template state of the same configuration (``simulation.init_state``). The
saved names must be the template's: a field added, removed or renamed since the save fails
with a :class:`CheckpointError` naming it, and a field moved within its NamedTuple is
restored by name into the right place. Shapes and dtypes must match, with one exception:
arrays split over the client mesh carry rows padded to a multiple of the device count
(``mesh.ClientMesh.pad``); rows past ``num_clients`` belong to no client, so the leading axis
of an array split over devices (when saved or in the template) that differs only in padding
(both sizes ``>= num_clients``) is cut or zero-padded by Orbax.
Arrays split over devices are written by every process (each its own rows) and read back
straight onto the template's shardings, so a checkpoint written on N devices (or processes)
restores on M; everything else is saved from host memory and restored the way a fresh state
holds it.

Checkpoints written before names were used (``{"round", "leaves": {"00000": ...}}``, the
leaves in ``jax.tree.flatten`` order) still restore, by position.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a
process killed during a save leaves the previous checkpoint usable.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from fedredefense_jax import mesh as mesh_lib
from fedredefense_jax import simulation


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the run's configuration."""


def _state_fields(state: simulation.SimState) -> dict:
    return {"params": state.params, "key": state.key, "expelled": state.expelled,
            "defense_state": state.defense_state, "attack_state": state.attack_state}


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_name(k) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def named_leaves(tree) -> list[tuple[tuple[str, ...], object]]:
    """``[(path, leaf)]`` of ``tree`` in ``jax.tree.flatten`` order; a path names each step:
    a NamedTuple field or dict key by name, a sequence entry by position."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(tuple(_key_name(k) for k in path), leaf) for path, leaf in flat]


def _nest(entries) -> dict:
    """``{(a, b): v}`` -> ``{a: {b: v}}``."""
    out: dict = {}
    for path, value in entries:
        node = out
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return out


def _get(tree: dict, path: tuple):
    for name in path:
        tree = tree[name]
    return tree


def _is_split(x) -> bool:
    """An array laid out over several devices, not one full copy on each."""
    return isinstance(x, jax.Array) and not _is_key(x) and not x.is_fully_replicated


def _saveable(x):
    """Arrays split over devices stay on them (every process writes its rows); everything
    else is saved from a host copy."""
    if _is_key(x):
        x = jax.random.key_data(x)
    return x if _is_split(x) else np.asarray(x)


def to_tree(state: simulation.SimState) -> dict:
    """``SimState`` -> the named tree Orbax saves (module docstring)."""
    entries = [(("state",) + path, _saveable(x)) for path, x in named_leaves(_state_fields(state))]
    return {"round": np.asarray(state.round, np.int64), **_nest(entries)}


def _shape_dtype(ref) -> tuple[tuple, np.dtype]:
    """Shape and dtype ``ref`` is saved with (a typed key: its key data)."""
    if _is_key(ref):
        ref = jax.random.key_data(ref)
    dtype = ref.dtype if hasattr(ref, "dtype") else np.asarray(ref).dtype
    return tuple(np.shape(ref)), np.dtype(dtype)


def from_tree(tree: dict, template: simulation.SimState) -> simulation.SimState:
    """Inverse of :func:`to_tree` (or of the numbered format) given a ``template`` state of the
    same configuration: arrays matched by name (by position for the numbered format) and
    held the way the template holds them; CheckpointError when one is missing or does not
    fit."""
    fields = named_leaves(_state_fields(template))
    if "leaves" in tree:
        order = named_leaves((template.params, template.key, template.expelled, template.defense_state,
                              template.attack_state))
        if len(tree["leaves"]) != len(order):
            raise CheckpointError(f"holds {len(tree['leaves'])} arrays, this configuration's state has {len(order)}")
        top = ("params", "key", "expelled", "defense_state", "attack_state")
        where = {(top[int(p[0])],) + p[1:]: ("leaves", f"{i:05d}") for i, (p, _) in enumerate(order)}
    else:
        where = {p: ("state",) + p for p, _ in fields}
    values = []
    for name, ref in fields:
        try:
            x = _get(tree, where[name])
        except (KeyError, TypeError):
            raise CheckpointError(f"lacks {'.'.join(where[name])}") from None
        if (tuple(np.shape(x)), np.dtype(x.dtype)) != _shape_dtype(ref):
            raise CheckpointError(f"{'.'.join(where[name])} is {_describe(np.shape(x), x.dtype)}, this "
                                  f"configuration expects {_describe(*_shape_dtype(ref))}")
        values.append(_held_like(x, ref, keep=False))
    restored = jax.tree.unflatten(jax.tree.structure(_state_fields(template)), values)
    return simulation.SimState(int(np.asarray(tree["round"])), restored["params"], restored["key"],
                               np.asarray(restored["expelled"]), restored["defense_state"], restored["attack_state"])


def _held_like(x, ref, keep: bool):
    """A restored array held the way ``ref`` is: a typed key, a numpy array, ``x`` itself
    (``keep``: already on the template's devices) or, like a fresh state, an array on the
    default device."""
    if _is_key(ref):
        return jax.random.wrap_key_data(jnp.asarray(np.asarray(x)), impl=jax.random.key_impl(ref))
    if isinstance(ref, np.ndarray) or not isinstance(ref, jax.Array):
        return np.asarray(x)
    return x if keep else jnp.asarray(np.asarray(x))


def _describe(shape, dtype) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


def _not_orbax_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_orbax_logging() -> None:
    """Drops Orbax's log records below WARNING (about 30 INFO lines per save, which would bury
    the run's own progress lines at ``--verbosity=0``); its warnings and errors still show.
    Orbax logs through absl's ``absl`` logger, so the filter sits there. Idempotent."""
    absl_logger = logging.getLogger("absl")
    if _not_orbax_info not in absl_logger.filters:
        absl_logger.addFilter(_not_orbax_info)


class Checkpointer:
    """Saves and restores ``SimState`` under ``directory`` (keeps the last ``max_to_keep``).
    Orbax's INFO logging is silenced (:func:`quiet_orbax_logging`). ``mesh``: the client
    mesh of the run (restored arrays that the template holds on it are placed on it)."""

    def __init__(self, directory: str, max_to_keep: int = 2, mesh: mesh_lib.ClientMesh | None = None):
        import orbax.checkpoint as ocp

        quiet_orbax_logging()
        self._ocp = ocp
        self.mesh = mesh
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False),
            item_handlers=ocp.PyTreeCheckpointHandler())

    def latest_round(self) -> int | None:
        """Round of the newest complete checkpoint, None when there is none."""
        return self._manager.latest_step()

    def save(self, state: simulation.SimState) -> None:
        self._manager.save(state.round, args=self._ocp.args.PyTreeSave(to_tree(state)), force=True)
        self._manager.wait_until_finished()

    def saved_arrays(self, step: int | None = None) -> dict:
        """``{"state.params": (shape, dtype, split), ...}`` of a checkpoint (default: the
        newest), read from its metadata; ``split``: the array was saved split over devices."""
        step = self.latest_round() if step is None else step
        meta = self._manager.item_metadata(step)
        tree = getattr(meta, "tree", meta)
        out = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name = ".".join(_key_name(k) for k in path)
            spec = getattr(getattr(leaf, "sharding", None), "partition_spec", None) or ()
            out[name] = (tuple(leaf.shape), np.dtype(leaf.dtype), any(p is not None for p in spec))
        return out

    def restore(self, template: simulation.SimState) -> simulation.SimState:
        """The newest checkpoint, shaped like ``template``; CheckpointError when unreadable
        or when its names, shapes or dtypes do not fit the template."""
        step = self.latest_round()
        where = os.path.join(self.directory, str(step))
        try:
            saved = self.saved_arrays(step)
        except Exception as e:  # noqa: BLE001  Orbax/tensorstore raise many kinds
            raise self._unreadable(where, e) from e
        fields = named_leaves(_state_fields(template))
        if any(name.startswith("leaves.") for name in saved):  # written before names were used
            if len(saved) - 1 != len(fields):
                raise CheckpointError(f"checkpoint {where} holds {len(saved) - 1} arrays, this configuration's "
                                      f"state has {len(fields)}")
            order = named_leaves((template.params, template.key, template.expelled, template.defense_state,
                                  template.attack_state))
            top = ("params", "key", "expelled", "defense_state", "attack_state")
            saved_path = {(top[int(p[0])],) + p[1:]: ("leaves", f"{i:05d}") for i, (p, _) in enumerate(order)}
        else:
            saved_path = {p: ("state",) + p for p, _ in fields}
            self._check_names(where, saved, list(saved_path.values()))
        num_clients = int(np.shape(template.expelled)[0])
        plan = []
        for name, ref in fields:
            path = saved_path[name]
            plan.append((path, ref, self._fit(where, path, ref, saved[".".join(path)], num_clients)))
        item, args = self._restore_request(plan)
        try:
            tree = self._manager.restore(step, args=self._ocp.args.PyTreeRestore(item=item, restore_args=args))
        except Exception as e:  # noqa: BLE001
            raise self._unreadable(where, e) from e
        values = [_held_like(_get(tree, path), ref, keep=self._target(ref) is not None) for path, ref, _ in plan]
        treedef = jax.tree.structure(_state_fields(template))
        restored = jax.tree.unflatten(treedef, values)
        return simulation.SimState(int(np.asarray(tree["round"])), restored["params"], restored["key"],
                                   np.asarray(restored["expelled"]), restored["defense_state"],
                                   restored["attack_state"])

    # -- restore helpers ------------------------------------------------------------
    @staticmethod
    def _unreadable(where: str, e: Exception) -> CheckpointError:
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return CheckpointError(f"checkpoint {where} cannot be read ({type(e).__name__}: {first})")

    @staticmethod
    def _check_names(where: str, saved: dict, paths: list) -> None:
        want = {".".join(p) for p in paths}
        have = set(saved) - {"round"}
        if want != have:
            extra, missing = sorted(have - want), sorted(want - have)
            parts = []
            if missing:
                parts.append(f"lacks {', '.join(missing[:6])}")
            if extra:
                parts.append(f"holds {', '.join(extra[:6])} that this state has not")
            raise CheckpointError(f"checkpoint {where} does not fit this configuration's state: {'; '.join(parts)} "
                                  "(saved by a state with other fields)")

    @staticmethod
    def _fit(where: str, path: tuple, ref, saved, num_clients: int) -> bool:
        """Whether the saved array needs its client axis cut or padded; CheckpointError
        when it does not fit ``ref`` at all."""
        shape, dtype = _shape_dtype(ref)
        saved_shape, saved_dtype, saved_split = saved
        name = ".".join(path) if path[0] == "state" else f"array {int(path[1])}"
        if saved_dtype != dtype:
            raise CheckpointError(f"checkpoint {where}: {name} is {_describe(saved_shape, saved_dtype)}, this "
                                  f"configuration expects {_describe(shape, dtype)}")
        if saved_shape == shape:
            return False
        padded = ((saved_split or _is_split(ref)) and len(shape) == len(saved_shape) >= 1
                  and shape[1:] == saved_shape[1:]
                  and min(shape[0], saved_shape[0]) >= num_clients and max(shape[0], saved_shape[0]) > num_clients)
        if not padded:
            raise CheckpointError(f"checkpoint {where}: {name} is {_describe(saved_shape, saved_dtype)}, this "
                                  f"configuration expects {_describe(shape, dtype)}")
        return True

    def _target(self, ref):
        """Where a restored array goes: the template's sharding when it lies on the mesh;
        None (host memory) otherwise."""
        mesh = mesh_lib.active(self.mesh)
        if mesh is None or _is_key(ref) or not isinstance(ref, jax.Array):
            return None
        sharding = ref.sharding
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh.mesh:
            return sharding
        return None

    def _restore_request(self, plan):
        ocp = self._ocp
        items, args = [], []
        for path, ref, resize in plan:
            shape, dtype = _shape_dtype(ref)
            target = self._target(ref)
            if target is None and resize:  # host array whose client axis is cut or padded
                target = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            if target is None:
                items.append((path, np.zeros(shape, dtype)))
                args.append((path, ocp.RestoreArgs(restore_type=np.ndarray)))
            else:
                items.append((path, jax.ShapeDtypeStruct(shape, dtype, sharding=target)))
                args.append((path, ocp.ArrayRestoreArgs(sharding=target, global_shape=shape, dtype=dtype,
                                                        strict=not resize)))
        items.append((("round",), np.zeros((), np.int64)))
        args.append((("round",), ocp.RestoreArgs(restore_type=np.ndarray)))
        return _nest(items), _nest(args)

    def close(self) -> None:
        self._manager.close()
