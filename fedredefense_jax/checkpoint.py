"""Checkpoints of a simulation: the whole :class:`~fedredefense_jax.simulation.SimState`
(global params, PRNG key, expelled clients, the defense's and the attack's states, round
counter) saved with Orbax.

The state is saved as a flat ``{"round": int, "leaves": {"00000": array, ...}}`` tree: its
leaves in ``jax.tree.flatten`` order, typed PRNG keys as their raw ``uint32`` data. Restoring
needs a template state of the same configuration (``simulation.init_state``), whose tree
structure, shapes and dtypes the saved leaves must match. Orbax writes each checkpoint to a
temporary directory and renames it when complete, so a process killed during a save leaves
the previous checkpoint usable.
"""

from __future__ import annotations

import logging
import os

import jax
import numpy as np

from fedredefense_jax import simulation


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the run's configuration."""


def _state_tree(state: simulation.SimState):
    return (state.params, state.key, state.expelled, state.defense_state, state.attack_state)


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_tree(state: simulation.SimState) -> dict:
    """``SimState`` -> a tree of numpy arrays Orbax can save."""
    leaves = jax.tree.leaves(_state_tree(state))
    arrays = {f"{i:05d}": np.asarray(jax.random.key_data(x) if _is_key(x) else x) for i, x in enumerate(leaves)}
    return {"round": np.asarray(state.round, np.int64), "leaves": arrays}


def from_tree(tree: dict, template: simulation.SimState) -> simulation.SimState:
    """Inverse of :func:`to_tree` given a ``template`` state of the same configuration."""
    leaves, treedef = jax.tree.flatten(_state_tree(template))
    saved = tree["leaves"]
    if len(saved) != len(leaves):
        raise CheckpointError(f"holds {len(saved)} arrays, this configuration's state has {len(leaves)}")
    out = []
    for i, ref in enumerate(leaves):
        x = np.asarray(saved[f"{i:05d}"])
        want = np.asarray(jax.random.key_data(ref) if _is_key(ref) else ref)
        if x.shape != want.shape or x.dtype != want.dtype:
            raise CheckpointError(f"array {i} is {x.dtype}{list(x.shape)}, this configuration "
                                  f"expects {want.dtype}{list(want.shape)}")
        if _is_key(ref):
            out.append(jax.random.wrap_key_data(x, impl=jax.random.key_impl(ref)))
        elif isinstance(ref, np.ndarray):
            out.append(x)
        else:
            out.append(jax.numpy.asarray(x))
    params, key, expelled, defense_state, attack_state = jax.tree.unflatten(treedef, out)
    return simulation.SimState(int(tree["round"]), params, key, np.asarray(expelled), defense_state, attack_state)


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
    Orbax's INFO logging is silenced (:func:`quiet_orbax_logging`)."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        quiet_orbax_logging()
        self._ocp = ocp
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest_round(self) -> int | None:
        """Round of the newest complete checkpoint, None when there is none."""
        return self._manager.latest_step()

    def save(self, state: simulation.SimState) -> None:
        self._manager.save(state.round, args=self._ocp.args.StandardSave(to_tree(state)), force=True)
        self._manager.wait_until_finished()

    def restore(self, template: simulation.SimState) -> simulation.SimState:
        """The newest checkpoint, shaped like ``template``; CheckpointError when unreadable."""
        step = self.latest_round()
        where = os.path.join(self.directory, str(step))
        ref = to_tree(template)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), ref)
        try:
            tree = self._manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001  Orbax/tensorstore raise many kinds
            raise CheckpointError(f"checkpoint {where} cannot be read ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
        try:
            return from_tree(tree, template)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {where} {e}") from e

    def close(self) -> None:
        self._manager.close()
