"""Benchmarks of the hot paths, as ratios against a baseline measured in the same process.

Local training: seconds per round of one local epoch for ``--num_clients`` Fashion-MNIST
clients (paper CNN, batch 32), batched layouts (``vmap``, ``lax.map``, ``lax.map`` over
chunks of clients) against a Python loop over clients calling the same jitted per-client
update. Each timing is the median of ``--repeats`` runs after a compile-and-warm-up run.
FLOPs come from XLA's cost analysis of the per-client program. Prints a table and writes
JSON to ``--output``.

FedREDefense (``--parts=redefense``): outer iterations per client at a fixed count.
Detection round (``--parts=detection``): a whole round of dynamic reconstruction for
``--detection_clients`` real clients, first participation and steady state.
The batched layouts run on the client mesh of ``--num_devices`` devices (default: all local
devices), the loop baselines on one device.

Device sweep (``--parts=devices``): a local-training round and a FedREDefense
first-participation round of ``--sweep_clients`` clients on each of ``--device_counts``
forced host devices, each count in its own process (``XLA_FLAGS=
--xla_force_host_platform_device_count=N``, all N devices on the mesh), compilation
excluded; the parent prints the seconds and the speed-up over the first count::

    python experiments/benchmark.py --parts=devices --device_counts=1,2 \
        --data_dir=../shared/data/fashion_mnist --output=runs/bench_devices.json

    python experiments/benchmark.py --data_dir=../shared/data/fashion_mnist --output=bench.json
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.flatten_util import ravel_pytree

from fedredefense_jax import cli, models, partition, records, training
from fedredefense_jax import data as data_lib
from fedredefense_jax import mesh as mesh_lib

# --data_dir (unset: random uint8 data of the shape of Fashion-MNIST), --num_clients (trained per
# round), --model, --conv_impl, --first_cap and --later_cap (unset: Table 7's), --train_subset (for
# toy-size dry runs) and the device flags (--num_devices, ...) are the shared flags.
FLAGS = cli.FLAGS
cli.define_device_flags()
flags.DEFINE_list("layouts", ["loop", "vmap", "map", "chunked:4", "chunked:8", "chunked:16"],
                  "What to time; 'loop' is the baseline.")
flags.DEFINE_integer("repeats", 3, "Timed runs per layout (median reported).")
flags.DEFINE_string("output", "benchmark.json", "Where the JSON results go.")
flags.DEFINE_list("parts", ["training", "redefense"], "Which benchmarks to run: training, redefense, detection, "
                  "devices (the device sweep).")
flags.DEFINE_integer("redefense_clients", 16, "Clients reconstructed at once in the FedREDefense benchmark.")
flags.DEFINE_integer("redefense_iters", 8, "Outer iterations per client (fixed: early stop off).")
flags.DEFINE_list("redefense_layouts", ["loop", "map", "vmap"], "FedREDefense layouts; 'loop' is the baseline.")
flags.DEFINE_integer("detection_clients", 100, "Clients in the detection-round benchmark (part 'detection').")
flags.DEFINE_integer("detection_repeats", 1, "Timed runs per layout after the compiling run (detection part).")
flags.DEFINE_bool("detection_compile_first", False, "Detection part: compile every bucket of a layout before its "
                  "timed runs (Reconstructor.compile_buckets), so that a single run (--detection_repeats=0) "
                  "times the round without compilation.")
flags.DEFINE_list("device_counts", ["1", "2"], "Device sweep: forced host device counts, one process each.")
flags.DEFINE_integer("sweep_clients", 100, "Device sweep: clients trained and reconstructed per round.")


def _client_data(num_clients: int, data_dir: str | None):
    subset = FLAGS.train_subset
    if data_dir:
        ds = data_lib.load_dataset("fashion_mnist", data_dir)
        if subset:
            ds = partition.subset_train(ds, subset, 0)
        parts = partition.dirichlet_split(ds.train_y, num_clients, 0.1, 0)
        return partition.stack_clients(ds.train_x, ds.train_y, parts)
    rng = np.random.default_rng(0)
    n = (subset or 60000) // num_clients
    return partition.ClientData(rng.integers(0, 256, (num_clients, n, 28, 28, 1), dtype=np.uint8),
                                rng.integers(0, 10, (num_clients, n)).astype(np.int32),
                                np.full(num_clients, n, np.int32))


def _model(model_name: str, conv_impl: str):
    """``(w0[P], unravel, apply_fn)`` of the Fashion-MNIST model, initialised with key 0."""
    spec = data_lib.SPECS["fashion_mnist"]
    model = models.build_model(model_name, "fashion_mnist", 10, conv_impl)
    w0, unravel = ravel_pytree(models.init_params(model, jax.random.key(0), spec.input_shape))
    return w0, unravel, models.make_apply_fn(model)


def _device_clients(num_clients: int, data_dir: str | None):
    """``(ClientData, x, y, counts on device, ids[p])`` of all clients."""
    cd = _client_data(num_clients, data_dir)
    cx, cy, cn = (jax.device_put(a) for a in (cd.x, cd.y, cd.counts))
    return cd, cx, cy, cn, np.arange(num_clients, dtype=np.int32)


def _median_time(fn, repeats: int) -> tuple[float, float, object]:
    """``(median seconds of `repeats` timed calls, seconds of the first (compiling) call, the
    first call's result)``; with ``repeats == 0`` the median is the first call's time."""
    t = time.perf_counter()
    result = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return (statistics.median(times) if times else first), first, result


def _add_speedups(results: dict, time_key: str) -> None:
    """Adds ``speedup_vs_loop`` (loop time / layout time) to every layout when 'loop' ran."""
    base = results.get("loop", {}).get(time_key)
    if base:
        for r in results.values():
            r["speedup_vs_loop"] = base / r[time_key]


def bench_local_training(num_clients, data_dir, model_name, conv_impl, layouts, repeats, mesh=None) -> dict:
    spec = data_lib.SPECS["fashion_mnist"]
    w0, unravel, apply_fn = _model(model_name, conv_impl)
    cd, cx, cy, cn, ids = _device_clients(num_clients, data_dir)
    table = _table(mesh, cd, cx, cy, cn)
    keys = training.client_keys(jax.random.key(1), ids)
    one = jax.jit(training.make_client_update(apply_fn, unravel, spec.mean, spec.std,
                                              batch_size=32, lr=1e-3, epochs=1))
    flops = one.lower(w0, cx[0], cy[0], cn[0], keys[0]).compile().cost_analysis()
    # XLA's cost analysis counts a loop body once: scale by the steps of the epoch's scan.
    steps = -(-cd.x.shape[1] // 32)
    flops = (flops[0] if isinstance(flops, list) else flops).get("flops", float("nan")) * steps
    total_flops = flops * num_clients
    results = {}
    for layout in layouts:
        if layout == "loop":
            def fn():
                return [one(w0, cx[i], cy[i], cn[i], keys[i]) for i in range(num_clients)]
        else:
            name, _, chunk = layout.partition(":")
            train = training.make_trainer(apply_fn, unravel, spec.mean, spec.std, layout=name,
                                          chunk=int(chunk or 8), mesh=mesh)
            fn = lambda train=train: train(w0, *table, ids, keys)  # noqa: E731
        sec, first, _ = _median_time(fn, repeats)
        results[layout] = {"seconds_per_round": sec, "first_call_s": first,
                           "gflops_per_s": total_flops / sec / 1e9}
        print(f"  {layout:12s} {sec:8.2f} s/round  {total_flops / sec / 1e9:6.1f} GFLOP/s  "
              f"(first call {first:.1f} s)", flush=True)
    _add_speedups(results, "seconds_per_round")
    best = min((k for k in results if k != "loop"), key=lambda k: results[k]["seconds_per_round"], default=None)
    return {"num_clients": num_clients, "model": model_name, "conv_impl": models.resolve_conv_impl(conv_impl),
            "flops_per_client_epoch": flops, "flops_per_round": total_flops, "layouts": results,
            "fastest": best, "default_layout": training.default_layout(), "devices": _devices(mesh)}


def bench_reconstruction(model_name, conv_impl, num_clients, iters, layouts, repeats, mesh=None) -> dict:
    """FedREDefense's outer iterations (Algorithm 2, N=5 inner steps, 10 synthetic images)
    for ``num_clients`` clients at a fixed ``iters`` iterations each (no early stop, so all
    layouts do the same work), batched vs a Python loop over clients."""
    from fedredefense_jax.defenses import redefense

    spec = data_lib.SPECS["fashion_mnist"]
    w0, unravel, apply_fn = _model(model_name, conv_impl)
    updates = 1e-3 * jax.random.normal(jax.random.key(1), (num_clients, w0.size))
    kn = redefense.init_knowledge(jax.random.key(2), num_clients, spec.input_shape, 10)
    caps = np.full(num_clients, iters, np.int32)
    run = np.ones(num_clients, bool)
    cfg = redefense.make_config("fashion_mnist")
    fn1 = jax.jit(lambda x, y, a: redefense.outer_value_and_grad(
        apply_fn, unravel, w0, updates[0], x, y, a, cfg.inner_steps, None, cfg.inner_unroll))
    ca = fn1.lower(kn.images[0], kn.label_logits[0], kn.alpha[0]).compile().cost_analysis()
    flops = (ca[0] if isinstance(ca, list) else ca).get("flops", float("nan"))
    total = flops * num_clients * iters
    results = {}
    for layout in layouts:
        rec = redefense.Reconstructor(apply_fn, unravel, dataclasses.replace(
            cfg, layout="map" if layout == "loop" else layout, first_chunk=iters, chunk=iters),
            None if layout == "loop" else mesh)
        if layout == "loop":
            one = lambda i: jax.tree.map(lambda a: a[i:i + 1], kn)  # noqa: E731
            def fn(rec=rec):
                return [rec.reconstruct(one(i), w0, updates[i:i + 1], caps[:1], run[:1],
                                        early_stop=False).errors for i in range(num_clients)]
        else:
            def fn(rec=rec):
                return rec.reconstruct(kn, w0, updates, caps, run, early_stop=False).errors
        sec, first, _ = _median_time(fn, repeats)
        results[layout] = {"seconds": sec, "ms_per_client_iteration": 1e3 * sec / (num_clients * iters),
                           "gflops_per_s": total / sec / 1e9, "first_call_s": first}
        print(f"  {layout:6s} {1e3 * sec / (num_clients * iters):8.1f} ms per client-iteration  "
              f"{total / sec / 1e9:6.1f} GFLOP/s  (first call {first:.1f} s)", flush=True)
    _add_speedups(results, "seconds")
    return {"model": model_name, "num_clients": num_clients, "iterations": iters,
            "flops_per_client_iteration": flops, "layouts": results, "devices": _devices(mesh)}


def _stats(a) -> dict:
    a = np.asarray(a, np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "min": float(a.min()),
            "max": float(a.max())}


def bench_detection(data_dir, model_name, conv_impl, num_clients, layouts, repeats,
                    first_cap=None, later_cap=None, mesh=None, sink=None, compile_first=False) -> dict:
    """One FedREDefense detection round for ``num_clients`` real Fashion-MNIST clients
    (beta 0.1 split, seed 0), with dynamic optimisation (early stop at gamma, Table 7 caps):

    * first participation: fresh knowledge, the updates of round 1 (from the initial model);
    * steady state: the knowledge fitted in the first participation, round 2's updates (from
      the FedAvg of round 1's updates).

    Batched layouts (one compiled program per iteration chunk, finished clients compacted
    away) against a Python loop over clients calling the same reconstruction one client at a
    time. Each layout runs once to compile (``first_call_s``, which in the steady state only
compiles bucket sizes not met before) and then ``repeats`` timed times. The batched layouts
run on ``mesh`` (the loop on one device). ``sink(results so far)`` after each measurement.
    ``compile_first``: every bucket compiled before the timed runs (``compile_s``).
    """
    from fedredefense_jax.defenses import redefense

    spec = data_lib.SPECS["fashion_mnist"]
    w0, unravel, apply_fn = _model(model_name, conv_impl)
    cd, cx, cy, cn, ids = _device_clients(num_clients, data_dir)
    train = training.make_trainer(apply_fn, unravel, spec.mean, spec.std)
    u1 = train(w0, cx, cy, cn, ids, training.client_keys(jax.random.key(1), ids))
    w1 = w0 + u1.mean(axis=0)
    u2 = jax.block_until_ready(train(w1, cx, cy, cn, ids, training.client_keys(jax.random.key(2), ids)))
    cfg = redefense.make_config("fashion_mnist", {"first_cap": first_cap, "later_cap": later_cap})
    kn0 = redefense.init_knowledge(jax.random.key(3), num_clients, spec.input_shape, 10)
    run = np.ones(num_clients, bool)
    fn1 = jax.jit(lambda x, y, a: redefense.outer_value_and_grad(
        apply_fn, unravel, w0, u1[0], x, y, a, cfg.inner_steps, None, cfg.inner_unroll))
    ca = fn1.lower(kn0.images[0], kn0.label_logits[0], kn0.alpha[0]).compile().cost_analysis()
    flops = (ca[0] if isinstance(ca, list) else ca).get("flops", float("nan"))

    def one_client(k, i):
        return jax.tree.map(lambda a: a[i:i + 1], k)

    def stack(results):
        return (np.concatenate([r.errors for r in results]), np.concatenate([r.iterations for r in results]),
                jax.tree.map(lambda *a: jnp.concatenate(a), *[r.knowledge for r in results]))

    recs = {layout: redefense.Reconstructor(apply_fn, unravel, dataclasses.replace(
        cfg, layout="map" if layout == "loop" else layout), None if layout == "loop" else mesh)
            for layout in layouts}
    phases = {}
    result = {"model": model_name, "num_clients": num_clients, "gamma": cfg.gamma, "devices": _devices(mesh),
              "first_cap": cfg.first_cap, "later_cap": cfg.later_cap,
              "flops_per_client_iteration": flops, "phases": phases}
    fitted = None
    for phase, (w, u, cap) in {"first_participation": (w0, u1, cfg.first_cap),
                               "steady_state": (w1, u2, cfg.later_cap)}.items():
        caps = np.full(num_clients, cap, np.int32)
        res = {}
        for layout in layouts:
            rec = recs[layout]
            kn = kn0 if phase == "first_participation" else fitted
            if layout == "loop":
                def fn(rec=rec, kn=kn, w=w, u=u, caps=caps):
                    return stack([rec.reconstruct(one_client(kn, i), w, u[i:i + 1], caps[:1], run[:1])
                                  for i in range(num_clients)])
            else:
                def fn(rec=rec, kn=kn, w=w, u=u, caps=caps):
                    r = rec.reconstruct(kn, w, u, caps, run)
                    return r.errors, r.iterations, r.knowledge
            compile_s = None
            if compile_first:
                t = time.perf_counter()
                if layout == "loop":
                    rec.compile_buckets(one_client(kn, 0), w, u[:1])
                else:
                    rec.compile_buckets(kn, w, u)
                compile_s = time.perf_counter() - t
            sec, first, (errors, iters, new_k) = _median_time(fn, repeats)
            work = flops * float(iters.sum())
            res[layout] = {"seconds": sec, "first_call_s": first, "compile_s": compile_s,
                           "gflops_per_s": work / sec / 1e9,
                           "total_iterations": int(iters.sum()), "iterations": _stats(iters),
                           "errors": _stats(errors), "flagged": int((errors > cfg.gamma).sum())}
            print(f"  {phase:19s} {layout:5s} {sec:8.2f} s/round (first call {first:.1f} s)  "
                  f"iterations {int(iters.sum())} (per client median {np.median(iters):.0f}, max {iters.max()})  "
                  f"{work / sec / 1e9:6.1f} GFLOP/s  flagged {int((errors > cfg.gamma).sum())}", flush=True)
            if phase == "first_participation" and fitted is None:
                fitted = jax.tree.map(np.asarray, new_k)
            phases[phase] = res
            _add_speedups(res, "seconds")
            if sink is not None:
                sink(result)
    return result


def _devices(mesh) -> int:
    return 1 if mesh_lib.active(mesh) is None else mesh.size


def _table(mesh, cd, cx, cy, cn) -> tuple:
    """The client table for a trainer on ``mesh``: split over its devices when it has several."""
    if mesh_lib.active(mesh) is None:
        return cx, cy, cn
    split = mesh_lib.split_client_data(mesh, cd)
    return split.x, split.y, split.counts


def bench_device_round(data_dir, model_name, conv_impl, num_clients, repeats, first_cap, mesh) -> dict:
    """One local-training round (median of ``repeats`` after a compiling call) and one
    FedREDefense first-participation round (fresh knowledge, round-1 updates, dynamic
    optimisation with Table 7's caps or ``first_cap``; every bucket compiled beforehand) of
    ``num_clients`` clients on ``mesh``."""
    from fedredefense_jax.defenses import redefense

    spec = data_lib.SPECS["fashion_mnist"]
    w0, unravel, apply_fn = _model(model_name, conv_impl)
    cd, cx, cy, cn, ids = _device_clients(num_clients, data_dir)
    table = _table(mesh, cd, cx, cy, cn)
    train = training.make_trainer(apply_fn, unravel, spec.mean, spec.std, mesh=mesh)
    keys = training.client_keys(jax.random.key(1), ids)
    train_s, train_first, u1 = _median_time(lambda: train(w0, *table, ids, keys), repeats)
    cfg = redefense.make_config("fashion_mnist", {"first_cap": first_cap})
    rec = redefense.Reconstructor(apply_fn, unravel, cfg, mesh)
    kn = rec.gather_clients(rec.init_knowledge(jax.random.key(3), num_clients, spec.input_shape, 10),
                            jnp.asarray(ids), True)
    t = time.perf_counter()
    buckets = rec.compile_buckets(kn, w0, u1)
    compile_s = time.perf_counter() - t
    caps = np.full(num_clients, cfg.first_cap, np.int32)
    t = time.perf_counter()
    res = rec.reconstruct(kn, w0, u1, caps, np.ones(num_clients, bool))
    jax.block_until_ready(res.knowledge)
    detection_s = time.perf_counter() - t
    return {"devices": _devices(mesh), "num_clients": num_clients, "model": model_name,
            "train_s": train_s, "train_first_call_s": train_first, "detection_s": detection_s,
            "detection_compile_s": compile_s, "buckets": buckets, "first_cap": cfg.first_cap,
            "total_iterations": int(res.iterations.sum()), "iterations": _stats(res.iterations),
            "flagged": int((res.errors > cfg.gamma).sum()), "chunks": len(res.chunks)}


def bench_devices(counts) -> dict:
    """:func:`bench_device_round` on each of ``counts`` forced host devices, each in its own
    process; speed-ups over the first count."""
    import os
    import subprocess
    import sys
    import tempfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    passed = ["data_dir", "model", "conv_impl", "sweep_clients", "repeats", "first_cap", "train_subset"]
    rows = {}
    for n in counts:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        kept = [f for f in env.get("XLA_FLAGS", "").split()
                if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={n}"])
        with tempfile.TemporaryDirectory() as tmp:
            child_out = os.path.join(tmp, "round.json")
            args = [f"--{k}={FLAGS[k].value}" for k in passed if FLAGS[k].value is not None]
            cmd = [sys.executable, os.path.abspath(__file__), "--parts=device_round", f"--num_devices={n}",
                   f"--output={child_out}", *args]
            print(f"  {n} device(s): {' '.join(cmd[1:])}", flush=True)
            subprocess.run(cmd, env=env, check=True)
            with open(child_out) as f:
                rows[str(n)] = json.load(f)["device_round"]
    base = rows[str(counts[0])]
    print(f"{'devices':>8s} {'train s':>9s} {'speed-up':>9s} {'detect s':>9s} {'speed-up':>9s} {'iterations':>11s}")
    for n, r in rows.items():
        r["train_speedup"] = base["train_s"] / r["train_s"]
        r["detection_speedup"] = base["detection_s"] / r["detection_s"]
        print(f"{n:>8s} {r['train_s']:9.2f} {r['train_speedup']:8.2f}x {r['detection_s']:9.2f} "
              f"{r['detection_speedup']:8.2f}x {r['total_iterations']:11d}")
    return {"counts": [int(c) for c in counts], "rounds": rows}


def main(argv):
    del argv
    mesh = cli.client_mesh()
    out = {"environment": records.environment(), "repeats": FLAGS.repeats, "mesh": records.mesh_record(mesh)}
    if "training" in FLAGS.parts:
        print(f"local training, {FLAGS.num_clients} clients, model {FLAGS.model}, backend {jax.default_backend()}")
        out["local_training"] = bench_local_training(FLAGS.num_clients, FLAGS.data_dir, FLAGS.model,
                                                     FLAGS.conv_impl, FLAGS.layouts, FLAGS.repeats, mesh)
        _write(out)
        lt = out["local_training"]
        for k, r in lt["layouts"].items():
            if "speedup_vs_loop" in r:
                print(f"  {k:12s} speed-up vs loop: {r['speedup_vs_loop']:.2f}x")
        print(f"  fastest batched layout: {lt['fastest']} (default on this backend: {lt['default_layout']})")
    if "redefense" in FLAGS.parts:
        print(f"FedREDefense reconstruction, {FLAGS.redefense_clients} clients x {FLAGS.redefense_iters} "
              f"outer iterations, model {FLAGS.model}")
        out["reconstruction"] = bench_reconstruction(FLAGS.model, FLAGS.conv_impl, FLAGS.redefense_clients,
                                                     FLAGS.redefense_iters, FLAGS.redefense_layouts, FLAGS.repeats,
                                                     mesh)
        _write(out)
        for k, r in out["reconstruction"]["layouts"].items():
            if "speedup_vs_loop" in r:
                print(f"  {k:6s} speed-up vs loop: {r['speedup_vs_loop']:.2f}x")
    if "detection" in FLAGS.parts:
        print(f"FedREDefense detection round, {FLAGS.detection_clients} Fashion-MNIST clients, model {FLAGS.model}")
        out["detection"] = bench_detection(FLAGS.data_dir, FLAGS.model, FLAGS.conv_impl, FLAGS.detection_clients,
                                           FLAGS.redefense_layouts, FLAGS.detection_repeats,
                                           FLAGS.first_cap, FLAGS.later_cap, mesh,
                                           sink=lambda d: (out.__setitem__("detection", d), _write(out)),
                                           compile_first=FLAGS.detection_compile_first)
        for phase, res in out["detection"]["phases"].items():
            for k, r in res.items():
                if "speedup_vs_loop" in r:
                    print(f"  {phase:19s} {k:5s} speed-up vs loop: {r['speedup_vs_loop']:.2f}x")
        _write(out)
    if "device_round" in FLAGS.parts:  # one count of the device sweep (started by "devices")
        out["device_round"] = bench_device_round(FLAGS.data_dir, FLAGS.model, FLAGS.conv_impl, FLAGS.sweep_clients,
                                                 FLAGS.repeats, FLAGS.first_cap, mesh)
        _write(out)
    if "devices" in FLAGS.parts:
        print(f"device sweep, {FLAGS.sweep_clients} clients, model {FLAGS.model}: {', '.join(FLAGS.device_counts)} "
              "forced host devices")
        out["device_sweep"] = bench_devices(FLAGS.device_counts)
        _write(out)
    _write(out)
    print(f"wrote {FLAGS.output}")


def _write(out: dict) -> None:
    """Writes the results so far (a run cut short keeps what it measured)."""
    with open(FLAGS.output, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    cli.run(main)
