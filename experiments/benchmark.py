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

# --data_dir (unset: random uint8 data of the shape of Fashion-MNIST), --num_clients (trained per
# round), --model, --conv_impl, --first_cap and --later_cap (unset: Table 7's) are the shared flags.
FLAGS = cli.FLAGS
flags.DEFINE_list("layouts", ["loop", "vmap", "map", "chunked:4", "chunked:8", "chunked:16"],
                  "What to time; 'loop' is the baseline.")
flags.DEFINE_integer("repeats", 3, "Timed runs per layout (median reported).")
flags.DEFINE_string("output", "benchmark.json", "Where the JSON results go.")
flags.DEFINE_list("parts", ["training", "redefense"], "Which benchmarks to run: training, redefense, detection.")
flags.DEFINE_integer("redefense_clients", 16, "Clients reconstructed at once in the FedREDefense benchmark.")
flags.DEFINE_integer("redefense_iters", 8, "Outer iterations per client (fixed: early stop off).")
flags.DEFINE_list("redefense_layouts", ["loop", "map", "vmap"], "FedREDefense layouts; 'loop' is the baseline.")
flags.DEFINE_integer("detection_clients", 100, "Clients in the detection-round benchmark (part 'detection').")
flags.DEFINE_integer("detection_repeats", 1, "Timed runs per layout after the compiling run (detection part).")


def _client_data(num_clients: int, data_dir: str | None):
    if data_dir:
        ds = data_lib.load_dataset("fashion_mnist", data_dir)
        parts = partition.dirichlet_split(ds.train_y, num_clients, 0.1, 0)
        return partition.stack_clients(ds.train_x, ds.train_y, parts)
    rng = np.random.default_rng(0)
    n = 60000 // num_clients
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


def bench_local_training(num_clients, data_dir, model_name, conv_impl, layouts, repeats) -> dict:
    spec = data_lib.SPECS["fashion_mnist"]
    w0, unravel, apply_fn = _model(model_name, conv_impl)
    cd, cx, cy, cn, ids = _device_clients(num_clients, data_dir)
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
                                          chunk=int(chunk or 8))
            fn = lambda train=train: train(w0, cx, cy, cn, ids, keys)  # noqa: E731
        sec, first, _ = _median_time(fn, repeats)
        results[layout] = {"seconds_per_round": sec, "first_call_s": first,
                           "gflops_per_s": total_flops / sec / 1e9}
        print(f"  {layout:12s} {sec:8.2f} s/round  {total_flops / sec / 1e9:6.1f} GFLOP/s  "
              f"(first call {first:.1f} s)", flush=True)
    _add_speedups(results, "seconds_per_round")
    best = min((k for k in results if k != "loop"), key=lambda k: results[k]["seconds_per_round"], default=None)
    return {"num_clients": num_clients, "model": model_name, "conv_impl": models.resolve_conv_impl(conv_impl),
            "flops_per_client_epoch": flops, "flops_per_round": total_flops, "layouts": results,
            "fastest": best, "default_layout": training.default_layout()}


def bench_reconstruction(model_name, conv_impl, num_clients, iters, layouts, repeats) -> dict:
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
            cfg, layout="map" if layout == "loop" else layout, first_chunk=iters, chunk=iters))
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
            "flops_per_client_iteration": flops, "layouts": results}


def _stats(a) -> dict:
    a = np.asarray(a, np.float64)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "min": float(a.min()),
            "max": float(a.max())}


def bench_detection(data_dir, model_name, conv_impl, num_clients, layouts, repeats,
                    first_cap=None, later_cap=None) -> dict:
    """One FedREDefense detection round for ``num_clients`` real Fashion-MNIST clients
    (beta 0.1 split, seed 0), with dynamic optimisation (early stop at gamma, Table 7 caps):

    * first participation: fresh knowledge, the updates of round 1 (from the initial model);
    * steady state: the knowledge fitted in the first participation, round 2's updates (from
      the FedAvg of round 1's updates).

    Batched layouts (one compiled program per iteration chunk, finished clients compacted
    away) against a Python loop over clients calling the same reconstruction one client at a
    time. Each layout runs once to compile (``first_call_s``, which in the steady state only
compiles bucket sizes not met before) and then ``repeats`` timed times.
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
        cfg, layout="map" if layout == "loop" else layout)) for layout in layouts}
    phases = {}
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
            sec, first, (errors, iters, new_k) = _median_time(fn, repeats)
            work = flops * float(iters.sum())
            res[layout] = {"seconds": sec, "first_call_s": first, "gflops_per_s": work / sec / 1e9,
                           "total_iterations": int(iters.sum()), "iterations": _stats(iters),
                           "errors": _stats(errors), "flagged": int((errors > cfg.gamma).sum())}
            print(f"  {phase:19s} {layout:5s} {sec:8.2f} s/round (first call {first:.1f} s)  "
                  f"iterations {int(iters.sum())} (per client median {np.median(iters):.0f}, max {iters.max()})  "
                  f"{work / sec / 1e9:6.1f} GFLOP/s  flagged {int((errors > cfg.gamma).sum())}", flush=True)
            if phase == "first_participation" and fitted is None:
                fitted = new_k
        _add_speedups(res, "seconds")
        phases[phase] = res
    return {"model": model_name, "num_clients": num_clients, "gamma": cfg.gamma,
            "first_cap": cfg.first_cap, "later_cap": cfg.later_cap,
            "flops_per_client_iteration": flops, "phases": phases}


def main(argv):
    del argv
    out = {"environment": records.environment(), "repeats": FLAGS.repeats}
    if "training" in FLAGS.parts:
        print(f"local training, {FLAGS.num_clients} clients, model {FLAGS.model}, backend {jax.default_backend()}")
        out["local_training"] = bench_local_training(FLAGS.num_clients, FLAGS.data_dir, FLAGS.model,
                                                     FLAGS.conv_impl, FLAGS.layouts, FLAGS.repeats)
        lt = out["local_training"]
        for k, r in lt["layouts"].items():
            if "speedup_vs_loop" in r:
                print(f"  {k:12s} speed-up vs loop: {r['speedup_vs_loop']:.2f}x")
        print(f"  fastest batched layout: {lt['fastest']} (default on this backend: {lt['default_layout']})")
    if "redefense" in FLAGS.parts:
        print(f"FedREDefense reconstruction, {FLAGS.redefense_clients} clients x {FLAGS.redefense_iters} "
              f"outer iterations, model {FLAGS.model}")
        out["reconstruction"] = bench_reconstruction(FLAGS.model, FLAGS.conv_impl, FLAGS.redefense_clients,
                                                     FLAGS.redefense_iters, FLAGS.redefense_layouts, FLAGS.repeats)
        for k, r in out["reconstruction"]["layouts"].items():
            if "speedup_vs_loop" in r:
                print(f"  {k:6s} speed-up vs loop: {r['speedup_vs_loop']:.2f}x")
    if "detection" in FLAGS.parts:
        print(f"FedREDefense detection round, {FLAGS.detection_clients} Fashion-MNIST clients, model {FLAGS.model}")
        out["detection"] = bench_detection(FLAGS.data_dir, FLAGS.model, FLAGS.conv_impl, FLAGS.detection_clients,
                                           FLAGS.redefense_layouts, FLAGS.detection_repeats,
                                           FLAGS.first_cap, FLAGS.later_cap)
        for phase, res in out["detection"]["phases"].items():
            for k, r in res.items():
                if "speedup_vs_loop" in r:
                    print(f"  {phase:19s} {k:5s} speed-up vs loop: {r['speedup_vs_loop']:.2f}x")
    with open(FLAGS.output, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    cli.run(main)
