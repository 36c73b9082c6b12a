"""Benchmarks of the hot paths, as ratios against a baseline measured in the same process.

Local training: seconds per round of one local epoch for ``--num_clients`` Fashion-MNIST
clients (paper CNN, batch 32), batched layouts (``vmap``, ``lax.map``, ``lax.map`` over
chunks of clients) against a Python loop over clients calling the same jitted per-client
update. Each timing is the median of ``--repeats`` runs after a compile-and-warm-up run.
FLOPs come from XLA's cost analysis of the per-client program. Prints a table and writes
JSON to ``--output``.

    python experiments/benchmark.py --data_dir=../shared/data/fashion_mnist --output=bench.json
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree

from fedredefense_jax import data as data_lib
from fedredefense_jax import models, partition, runner, training

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Fashion-MNIST IDX directory (unset: random uint8 data of the same shape).")
flags.DEFINE_integer("num_clients", 100, "Clients trained per round.")
flags.DEFINE_string("model", "cnn", "cnn or convnet.")
flags.DEFINE_string("conv_impl", "auto", "auto, xla or matmul.")
flags.DEFINE_list("layouts", ["loop", "vmap", "map", "chunked:4", "chunked:8", "chunked:16"],
                  "What to time; 'loop' is the baseline.")
flags.DEFINE_integer("repeats", 3, "Timed runs per layout (median reported).")
flags.DEFINE_string("output", "benchmark.json", "Where the JSON results go.")
flags.DEFINE_list("parts", ["training", "redefense"], "Which benchmarks to run.")
flags.DEFINE_integer("redefense_clients", 16, "Clients reconstructed at once in the FedREDefense benchmark.")
flags.DEFINE_integer("redefense_iters", 8, "Outer iterations per client (fixed: early stop off).")
flags.DEFINE_list("redefense_layouts", ["loop", "map", "vmap"], "FedREDefense layouts; 'loop' is the baseline.")


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


def _median_time(fn, repeats: int) -> tuple[float, float]:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times), first


def _add_speedups(results: dict, time_key: str) -> None:
    """Adds ``speedup_vs_loop`` (loop time / layout time) to every layout when 'loop' ran."""
    base = results.get("loop", {}).get(time_key)
    if base:
        for r in results.values():
            r["speedup_vs_loop"] = base / r[time_key]


def bench_local_training(num_clients, data_dir, model_name, conv_impl, layouts, repeats) -> dict:
    spec = data_lib.SPECS["fashion_mnist"]
    cd = _client_data(num_clients, data_dir)
    model = models.build_model(model_name, "fashion_mnist", 10, conv_impl)
    w0, unravel = ravel_pytree(models.init_params(model, jax.random.key(0), spec.input_shape))
    apply_fn = models.make_apply_fn(model)
    cx, cy, cn = (jax.device_put(a) for a in (cd.x, cd.y, cd.counts))
    ids = np.arange(num_clients, dtype=np.int32)
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
        sec, first = _median_time(fn, repeats)
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
    model = models.build_model(model_name, "fashion_mnist", 10, conv_impl)
    w0, unravel = ravel_pytree(models.init_params(model, jax.random.key(0), spec.input_shape))
    apply_fn = models.make_apply_fn(model)
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
        sec, first = _median_time(fn, repeats)
        results[layout] = {"seconds": sec, "ms_per_client_iteration": 1e3 * sec / (num_clients * iters),
                           "gflops_per_s": total / sec / 1e9, "first_call_s": first}
        print(f"  {layout:6s} {1e3 * sec / (num_clients * iters):8.1f} ms per client-iteration  "
              f"{total / sec / 1e9:6.1f} GFLOP/s  (first call {first:.1f} s)", flush=True)
    _add_speedups(results, "seconds")
    return {"model": model_name, "num_clients": num_clients, "iterations": iters,
            "flops_per_client_iteration": flops, "layouts": results}


def main(argv):
    del argv
    out = {"environment": runner.environment(), "repeats": FLAGS.repeats}
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
    with open(FLAGS.output, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
