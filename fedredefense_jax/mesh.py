"""Devices, the client mesh and multi-process start-up.

One mesh axis, ``"clients"``, over every device used (``--num_devices`` per process, default
all local devices; with several processes the mesh spans every process's devices, process by
process). What lies on it:

* the client table ``[p, n_max, ...]`` (rows padded to a multiple of the device count; each
  process stacks only the rows of its own devices, :func:`stack_clients`);
* the per-slot data ``[S, ...]`` of a round's local training and its update matrix
  ``[S, P]`` (slots padded to a multiple of the device count inside the training program,
  padding slots repeat the first slot's client and are dropped before anyone sees them);
* FedREDefense's knowledge ``[C, ...]`` of every client (rows padded likewise) and its
  reconstruction carry ``[S, ...]``.

Per-client work (local training, reconstruction, evaluation batches) runs where its rows
lie: :meth:`ClientMesh.map_blocks` dispatches the single-device program (``lax.map`` over
the clients on CPU, ``vmap`` on GPU / TPU) once per device on the device's block, and the
devices run concurrently; every client is computed by the very program one device runs, so
results do not depend on the device count. Rows move between devices (the slots' data out
of the client table, compaction between FedREDefense's chunks, the knowledge in and out) in
jitted programs with these shardings, i.e. through XLA's collectives. Cross-client reductions
(aggregation rules, the statistics attacks, FLDetector's distances, FedREDefense's norms)
run on the update matrix all-gathered after local training (one XLA all-gather) and handed
to each process's first device (:meth:`ClientMesh.local`), where the single-device programs
compute bitwise what one device computes. With one device (``ClientMesh.size == 1``) every
program is the single-device one, unchanged.

Processes: :func:`initialize` starts ``jax.distributed`` from ``--coordinator_address``,
``--num_processes`` and ``--process_id``, or from JAX's own detection on SLURM, Open MPI and
TPU VMs when they are unset. On CPU the collectives go through gloo. Every process runs the
same program on the same inputs (SPMD); only process 0 writes files and logs
(:func:`is_writer`). The four settings are :class:`DeviceSettings` (the flags of
``cli.define_device_flags``); :func:`start` starts the processes and builds the mesh.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedredefense_jax.settings import ConfigError, Settings, setting

AXIS = "clients"
#: Programs whose per-device executables a mesh keeps (FIFO).
_MAX_EXECUTABLES = 64

#: Environment variables that mark a multi-process job JAX can start by itself.
_CLUSTER_VARS = {
    "SLURM_NTASKS": ("SLURM_JOB_ID", "SLURM_PROCID"),
    "OMPI_COMM_WORLD_SIZE": ("OMPI_COMM_WORLD_RANK",),
}
_TPU_HOST_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


class MeshError(ConfigError):
    """A bad device or process setting; ``flag`` names the flag at fault."""


@dataclasses.dataclass(frozen=True)
class DeviceSettings(Settings):
    """The devices and processes a run's clients are split over. They do not change what a
    run computes, so they are not settings of the experiment (``config.json`` leaves them
    out, and a run resumes on other devices); ``summary.json`` records the mesh."""

    num_devices: int | None = setting(None, "Devices of each process on the client mesh; unset = all local "
                                      "devices.", low=1)
    coordinator_address: str | None = setting(None, "host:port of process 0 for several processes "
                                              "(jax.distributed); unset with --num_processes and --process_id = "
                                              "JAX's detection on SLURM, Open MPI and TPU VMs, else one process.")
    num_processes: int | None = setting(None, "Number of processes (jax.distributed).", low=1)
    process_id: int | None = setting(None, "This process's index in [0, num_processes).", low=0)


def start(settings: DeviceSettings | None = None) -> "ClientMesh":
    """Starts the processes (:func:`initialize`) and builds the client mesh of ``settings``
    (default: every local device, of every process of a cluster JAX detects); MeshError
    naming the setting when they are bad."""
    s = settings or DeviceSettings()
    initialize(s.coordinator_address, s.num_processes, s.process_id)
    return ClientMesh(s.num_devices)


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def cluster_detected(environ=None) -> bool:
    """Whether the environment describes a job of several processes that
    ``jax.distributed.initialize()`` can start without arguments: SLURM or Open MPI with
    more than one task, a multi-host TPU VM slice or a multislice TPU job."""
    env = os.environ if environ is None else environ
    for count, needed in _CLUSTER_VARS.items():
        try:
            if int(env.get(count, "1")) > 1 and all(v in env for v in needed):
                return True
        except ValueError:
            pass
    if "MEGASCALE_COORDINATOR_ADDRESS" in env:
        return True
    return any("," in env.get(v, "") for v in _TPU_HOST_VARS)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300, environ=None) -> bool:
    """Starts ``jax.distributed`` (before any other JAX call) and returns whether it did.

    With any of the three settings given, JAX starts from them (``num_processes=1`` alone
    means one process: nothing is started). With none, JAX's own detection starts it when
    :func:`cluster_detected`; otherwise the run is one process. On CPU the collectives use
    gloo."""
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if num_processes is not None and num_processes < 1:
        raise MeshError("num_processes", f"must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise MeshError("process_id", f"must be in [0, num_processes={num_processes}), got {process_id}")
    if explicit and num_processes == 1 and coordinator_address is None:
        return False
    if not explicit and not cluster_detected(environ):
        return False
    if jax.distributed.is_initialized():
        return True
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        missing = [n for n, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                                  ("process_id", process_id)) if v is None]
        if missing:
            raise MeshError(missing[0], "several processes need --coordinator_address, --num_processes and "
                                        "--process_id together (or none of them on SLURM / TPU VMs)")
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=int(timeout_s))
    else:
        jax.distributed.initialize(initialization_timeout=int(timeout_s))
    return True


def is_writer() -> bool:
    """Process 0 writes the run's files and logs its progress."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process got here (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """``flag`` or-ed over every process (the flag itself with one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


# --------------------------------------------------------------------------------------
# The mesh
# --------------------------------------------------------------------------------------


class ClientMesh:
    """A one-axis mesh over ``num_devices`` devices of every process (default: all local
    devices), and the shardings of the client axis.

    Attributes:
      mesh: the ``jax.sharding.Mesh`` (axis ``"clients"``).
      size: devices in the mesh (all processes).
      sharded: ``NamedSharding`` splitting the leading axis over the devices.
      replicated: ``NamedSharding`` with a copy on every device.
    """

    def __init__(self, num_devices: int | None = None, devices: Sequence[Any] | None = None):
        if devices is None:
            local = jax.local_devices()
            n = len(local) if num_devices is None else int(num_devices)
            if not 1 <= n <= len(local):
                raise MeshError("num_devices", f"must be in [1, {len(local)}] (the devices of this process: "
                                               f"{len(local)} x {local[0].platform}), got {num_devices}")
            by_process: dict[int, list] = {}
            for d in sorted(jax.devices(), key=lambda d: (d.process_index, d.id)):
                by_process.setdefault(d.process_index, []).append(d)
            devices = [d for p in sorted(by_process) for d in by_process[p][:n]]
        self.devices = list(devices)
        self.mesh = Mesh(np.asarray(self.devices, dtype=object), (AXIS,))
        self.size = len(self.devices)
        self.sharded = NamedSharding(self.mesh, P(AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        self._compiled: dict = {}
        self._gather_all = jax.jit(lambda *a: a, out_shardings=self.replicated)

    def __repr__(self) -> str:
        return f"ClientMesh({self.size} x {self.devices[0].platform}, {jax.process_count()} process(es))"

    def __hash__(self) -> int:
        return hash(tuple(d.id for d in self.devices))

    def __eq__(self, other) -> bool:
        return isinstance(other, ClientMesh) and [d.id for d in self.devices] == [d.id for d in other.devices]

    def pad(self, n: int) -> int:
        """``n`` rounded up to a multiple of the device count."""
        return -(-int(n) // self.size) * self.size

    # -- placing host data ----------------------------------------------------------
    def put_sharded(self, x: np.ndarray) -> jax.Array:
        """A host array (the same on every process) split over the devices along its leading
        axis (a multiple of :attr:`size`); each process copies only its own rows."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, self.sharded, lambda idx: x[idx])

    def put_replicated(self, x) -> jax.Array:
        """A host array (the same on every process) copied to every device."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])

    def replicate(self, x):
        """A copy of ``x`` on every device of the mesh: ``x`` itself when it already lies on
        the mesh (split or replicated); an array on one device or a host array (the same on
        every process) is copied device by device, without collectives."""
        if not isinstance(x, jax.Array):
            return self.put_replicated(x)
        if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == self.mesh:
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(self.replicate(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_single_device_arrays(
            x.shape, self.replicated, [jax.device_put(x, d) for d in self.local_devices])

    def local(self, x):
        """This process's copy of a replicated array, on the first of its mesh devices (the
        device that every computation over the whole update matrix runs on, as on one
        device)."""
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return _on_device(x, self.local_devices[0])
        return x

    def jit(self, fn: Callable, **kwargs) -> Callable:
        """``jax.jit(fn, **kwargs)`` whose array arguments are placed on the mesh first
        (:meth:`replicate` for those held on one device), so that arrays kept on this
        process's first device mix with arrays split over the mesh."""
        jitted = jax.jit(fn, **kwargs)
        static = kwargs.get("static_argnums", ())
        static = {static} if isinstance(static, int) else set(static or ())

        def call(*args):
            placed = [a if i in static else jax.tree.map(self._placed, a) for i, a in enumerate(args)]
            return jitted(*placed)

        return call

    def _placed(self, a):
        if isinstance(a, jax.Array) and len(a.sharding.device_set) == 1 and self.size > 1:
            return self.replicate(a)
        return a

    def to_host(self, x):
        """Numpy copies of the arrays of the pytree ``x`` on every process (arrays split over
        several processes are all-gathered first, in one program)."""
        leaves, tree = jax.tree.flatten(x)
        far = [i for i, a in enumerate(leaves)
               if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated]
        if far:
            near = self._gather_all(*(leaves[i] for i in far))
            for i, a in zip(far, near):
                leaves[i] = a
        return jax.tree.unflatten(tree, [np.asarray(a) for a in leaves])

    # -- programs -------------------------------------------------------------------
    @property
    def local_devices(self) -> list:
        """This process's devices of the mesh, in mesh order."""
        me = jax.process_index()
        return [d for d in self.devices if d.process_index == me]

    def map_blocks(self, fn: Callable, replicated: Sequence, split: Sequence, arrange: Callable | None = None):
        """``fn(*replicated, *block)`` on every device of this process, ``block`` being the
        device's rows of the arrays ``split`` (pytrees of arrays split over the mesh, e.g. by
        a program with ``out_shardings=self.sharded``); returns ``fn``'s outputs assembled
        into arrays split over the mesh (each device's output rows in mesh order).
        ``arrange(replicated, block) -> (args, kwargs)`` orders the arguments otherwise.

        ``fn`` is a single-device jitted program, dispatched once per device (the devices
        run concurrently): every device runs the very program one device runs, so a client's
        result does not depend on the device count. (A ``shard_map`` program goes through
        XLA's SPMD pipeline, which simplifies the per-client code in another order and
        changes float rounding.) Each device needs its own executable: they are compiled
        side by side in threads, once per argument signature."""
        split_leaves, split_tree = jax.tree.flatten(tuple(split))
        rep_leaves, rep_tree = jax.tree.flatten(tuple(replicated))
        blocks = [_shards_by_device(a) for a in split_leaves]
        calls = []
        for d in self.local_devices:
            reps = jax.tree.unflatten(rep_tree, [_on_device(a, d) for a in rep_leaves])
            mine = jax.tree.unflatten(split_tree, [b[d] for b in blocks])
            calls.append(arrange(reps, mine) if arrange is not None else ((*reps, *mine), {}))
        outs = [run(*args, **kwargs) for run, (args, kwargs) in zip(self._executables(fn, calls), calls)]
        leaves = [jax.tree.leaves(o) for o in outs]
        out_tree = jax.tree.structure(outs[0])
        glued = []
        for j, first in enumerate(leaves[0]):
            shape = (first.shape[0] * self.size,) + tuple(first.shape[1:])
            glued.append(jax.make_array_from_single_device_arrays(shape, self.sharded, [lv[j] for lv in leaves]))
        return jax.tree.unflatten(out_tree, glued)

    def _executables(self, fn: Callable, calls: list) -> list:
        """One executable of the jitted ``fn`` per call (per device), compiled in threads the
        first time an argument signature is met (``fn`` itself when it cannot be lowered)."""
        if not hasattr(fn, "lower") or len(calls) == 1:
            return [fn] * len(calls)
        key = (fn, _signature(calls[0]), tuple(d.id for d in self.local_devices))
        found = self._compiled.get(key)
        if found is None:
            from concurrent.futures import ThreadPoolExecutor

            lowered = [fn.lower(*args, **kwargs) for args, kwargs in calls]
            with ThreadPoolExecutor(len(lowered)) as pool:
                found = list(pool.map(lambda low: low.compile(), lowered))
            if len(self._compiled) >= _MAX_EXECUTABLES:  # the oldest program goes first
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[key] = found
        return found


def _signature(call) -> tuple:
    """Shapes, dtypes and weak types of a call's arguments, with their tree structure."""
    leaves, tree = jax.tree.flatten(call)
    return (tree,) + tuple((np.shape(a), str(getattr(a, "dtype", type(a))), bool(getattr(a, "weak_type", False)))
                           for a in leaves)


def _shards_by_device(x) -> dict:
    """``{device: rows}`` of an array split over a mesh (one shard per device)."""
    out = {}
    for sh in x.addressable_shards:
        if sh.replica_id == 0 or sh.device not in out:
            out[sh.device] = sh.data
    return out


def _on_device(x, device):
    """``x`` on ``device``: its copy there when it has one, else a transfer."""
    if isinstance(x, jax.Array):
        for sh in x.addressable_shards:
            if sh.device == device and sh.data.shape == x.shape:
                return sh.data
    return jax.device_put(x, device)


def active(mesh: ClientMesh | None) -> ClientMesh | None:
    """``mesh`` when it has several devices; None (the single-device programs) otherwise."""
    return mesh if mesh is not None and mesh.size > 1 else None


def pad_rows(x, rows: int):
    """``x`` (inside a jitted program) with its leading axis padded to ``rows`` by repeating
    its first row."""
    import jax.numpy as jnp

    extra = rows - x.shape[0]
    if extra <= 0:
        return x
    return jnp.concatenate([x, jnp.broadcast_to(x[:1], (extra,) + x.shape[1:])])


def stack_clients(mesh: ClientMesh, x: np.ndarray, y: np.ndarray, parts: list):
    """``partition.ClientData`` of global arrays split over ``mesh``: rows padded to
    ``mesh.pad(len(parts))`` (count 0), each process stacking only the clients of its own
    devices (``partition.stack_clients`` row by row)."""
    from fedredefense_jax import partition

    p = len(parts)
    rows = mesh.pad(p)
    counts = np.zeros(rows, np.int32)
    counts[:p] = [len(q) for q in parts]
    n_max = int(max(1, counts.max()))

    def block(index, arr, shape_tail, dtype):
        ids = range(rows)[index[0]]
        out = np.zeros((len(ids), n_max) + shape_tail, dtype)
        for j, i in enumerate(ids):
            if i < p:
                out[j, : counts[i]] = arr[parts[i]]
        return out[(slice(None),) + tuple(index[1:])]

    cx = jax.make_array_from_callback((rows, n_max) + x.shape[1:], mesh.sharded,
                                      lambda idx: block(idx, x, x.shape[1:], x.dtype))
    cy = jax.make_array_from_callback((rows, n_max), mesh.sharded, lambda idx: block(idx, y, (), np.int32))
    return partition.ClientData(cx, cy, mesh.put_sharded(counts))


def split_client_data(mesh: ClientMesh, clients):
    """``partition.ClientData`` of host arrays -> the same split over ``mesh`` (rows padded
    to ``mesh.pad(p)`` with empty clients); arrays already on devices are returned as they are."""
    from fedredefense_jax import partition

    if isinstance(clients.x, jax.Array):
        return clients
    rows = mesh.pad(clients.counts.shape[0])

    def padded(a):
        a = np.asarray(a)
        return np.concatenate([a, np.zeros((rows - a.shape[0],) + a.shape[1:], a.dtype)]) if rows > a.shape[0] else a

    return partition.ClientData(*(mesh.put_sharded(padded(a)) for a in (clients.x, clients.y, clients.counts)))
