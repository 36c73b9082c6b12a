"""Study of FedREDefense's settings on real client updates: which settings separate benign
from malicious updates at a client's first participation.

For a few clients of the usual split (``--num_clients``, ``--beta``, ``--seed``), the global
model is the initial one or the FedAvg model after ``--warmup_rounds`` rounds of all
clients; their genuine updates ``G [k, P]`` and attack forms built from them are
reconstructed with fresh knowledge, one configuration after another, with the decision rule
of the defense (dynamic optimisation: stop once the loss is below gamma, else at the cap):

* ``benign``: ``G``;
* ``sign_flip``: ``-G``;
* ``lie``: ``mean(G) - z * std(G)`` per coordinate, z = 0.4686 (Appendix A.2, p=100, q=28);
* ``scaled``: ``3 G`` (a boosted genuine update);
* ``noise``: Gaussian noise with each row's norm;
* ``mpaf``: ``3 (w_init - w_R)`` (zero, hence skipped, when ``--warmup_rounds=0``).

A configuration is ``name:key=value,key=value`` with FedREDefense's setting names (e.g.
``images_per_class=2``, ``lr_images=0.25``, ``first_cap=400``, ``redefense_init_noise=uniform``) plus
``model=cnn|convnet`` and ``label_init=zeros|onehot`` (logit ``scale`` on the image's class,
scale 1 unless ``label_scale`` is given). Results (per form: error and iteration stats and
the fraction flagged, error > gamma) go to ``--output`` as JSON after every configuration.

    python experiments/settings_study.py --data_dir=../shared/data/fashion_mnist \\
        --configs="table7:;ipc2:images_per_class=2" --output=runs/study.json
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.flatten_util import ravel_pytree

from fedredefense_jax import cli, models, partition, records, training
from fedredefense_jax import data as data_lib
from fedredefense_jax.defenses import redefense
from fedredefense_jax.settings import ConfigError

# --dataset, --data_dir (required), --num_clients, --beta and --seed are the shared flags.
FLAGS = cli.FLAGS
flags.DEFINE_list("clients", ["0", "1", "2", "3", "4", "5", "6", "7"], "Client ids whose updates are used.")
flags.DEFINE_integer("warmup_rounds", 0, "FedAvg rounds of all clients before the studied round.")
flags.DEFINE_list("forms", ["benign", "sign_flip", "lie", "scaled", "noise", "mpaf"], "Update forms to reconstruct.")
flags.DEFINE_string("configs", "table7:", "Configurations, ';'-separated, each 'name:key=value,...'.")
flags.DEFINE_string("output", "runs/settings_study.json", "JSON results (rewritten after each configuration).")

LIE_Z = 0.4686  # max z with Phi(z) < (p - q - s) / (p - q), p = 100, q = 28, s = 23

_FIELDS = redefense.RedefenseConfig.fields()  # setting name -> field


def parse_configs(text: str) -> list[tuple[str, dict]]:
    """``"a:k=v,k=v;b:"`` -> ``[("a", {"k": v, ...}), ("b", {})]`` with typed values."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, body = part.partition(":")
        kv = {}
        for item in filter(None, (i.strip() for i in body.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise app.UsageError(f"--configs: '{item}' in '{name}' is not key=value")
            if key in ("model", "label_init"):
                kv[key] = value
            elif key == "label_scale":
                kv[key] = float(value)
            elif key in _FIELDS:
                try:
                    parsed = redefense.RedefenseConfig.parse({key: value}, owner=f"configuration {name}")
                except ConfigError as e:
                    raise app.UsageError(f"--configs: {e}") from None
                kv[key] = getattr(parsed, _FIELDS[key].name)
            else:
                raise app.UsageError(f"--configs: unknown key '{key}' in '{name}'")
        out.append((name, kv))
    return out


def _stats(a) -> dict:
    a = np.asarray(a, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
            "max": float(a.max())}


def build_updates(model, spec, cd, client_ids, warmup_rounds, seed):
    """Global model of the studied round and ``{form: [k, P]}`` updates."""
    w_init, unravel = ravel_pytree(models.init_params(model, jax.random.key(seed), spec.input_shape))
    apply_fn = models.make_apply_fn(model)
    train = training.make_trainer(apply_fn, unravel, spec.mean, spec.std)
    cx, cy, cn = (jax.device_put(a) for a in (cd.x, cd.y, cd.counts))
    all_ids = np.arange(cd.x.shape[0], dtype=np.int32)
    w = w_init
    for r in range(warmup_rounds):
        u = train(w, cx, cy, cn, all_ids, training.client_keys(jax.random.key(1000 + r), all_ids))
        w = w + u.mean(axis=0)
        logging.info("warm-up round %d/%d", r + 1, warmup_rounds)
    ids = np.asarray(client_ids, np.int32)
    g = train(w, cx, cy, cn, ids, training.client_keys(jax.random.key(999), ids))
    k = g.shape[0]
    norms = jnp.linalg.norm(g, axis=1, keepdims=True)
    noise = jax.random.normal(jax.random.key(7), g.shape)
    forms = {
        "benign": g,
        "sign_flip": -g,
        "lie": (g.mean(0) - LIE_Z * g.std(0))[None].repeat(k, 0),
        "scaled": 3.0 * g,
        "noise": noise / jnp.linalg.norm(noise, axis=1, keepdims=True) * norms,
    }
    if warmup_rounds > 0:
        forms["mpaf"] = (3.0 * (w_init - w))[None].repeat(k, 0)
    return w, apply_fn, unravel, forms


def run_config(name, kv, spec, cd, client_ids, warmup_rounds, seed, forms_wanted, cache):
    model_name = kv.get("model", "cnn")
    if model_name not in cache:
        model = models.build_model(model_name, FLAGS.dataset, 10)
        cache[model_name] = build_updates(model, spec, cd, client_ids, warmup_rounds, seed)
    w, apply_fn, unravel, forms = cache[model_name]
    cfg = redefense.make_config(FLAGS.dataset, {k: v for k, v in kv.items() if k in _FIELDS})
    names = [f for f in forms_wanted if f in forms]
    # LIE sends one vector from every malicious client: reconstruct it once.
    rows = [forms[f][:1] if f == "lie" else forms[f] for f in names]
    sizes = [r.shape[0] for r in rows]
    updates = jnp.concatenate(rows)
    n = updates.shape[0]
    kn = redefense.init_knowledge(jax.random.key(seed + 3), n, spec.input_shape, 10,
                                  cfg.images_per_class, cfg.alpha_init, cfg.init_noise)
    if kv.get("label_init", "zeros") == "onehot":
        classes = jnp.arange(kn.label_logits.shape[1]) % 10
        kn = kn._replace(label_logits=jnp.broadcast_to(
            kv.get("label_scale", 1.0) * jax.nn.one_hot(classes, 10), kn.label_logits.shape))
    rec = redefense.Reconstructor(apply_fn, unravel, cfg)
    t = time.perf_counter()
    res = rec.reconstruct(kn, w, updates, np.full(n, cfg.first_cap, np.int32), np.ones(n, bool))
    seconds = time.perf_counter() - t
    out = {"config": kv, "model": model_name, "gamma": cfg.gamma, "first_cap": cfg.first_cap,
           "seconds": seconds, "forms": {}}
    start = 0
    for f, size in zip(names, sizes):
        e, it = res.errors[start:start + size], res.iterations[start:start + size]
        start += size
        out["forms"][f] = {"errors": e.tolist(), "iterations": it.tolist(), "error": _stats(e),
                           "iters": _stats(it), "flagged": float(np.mean(e > cfg.gamma))}
    return out


def main(argv):
    del argv
    if not FLAGS.data_dir:
        raise app.UsageError("--data_dir is required")
    configs = parse_configs(FLAGS.configs)
    spec = data_lib.SPECS[FLAGS.dataset]
    ds = data_lib.load_dataset(FLAGS.dataset, FLAGS.data_dir)
    cd = partition.stack_clients(ds.train_x, ds.train_y,
                                 partition.dirichlet_split(ds.train_y, FLAGS.num_clients, FLAGS.beta, FLAGS.seed))
    client_ids = [int(c) for c in FLAGS.clients]
    results = {"environment": records.environment(), "dataset": FLAGS.dataset, "clients": client_ids,
               "warmup_rounds": FLAGS.warmup_rounds, "configs": {}}
    if os.path.exists(FLAGS.output):  # resume: keep finished configurations
        with open(FLAGS.output) as f:
            old = json.load(f)
        if old.get("clients") == client_ids and old.get("warmup_rounds") == FLAGS.warmup_rounds:
            results["configs"] = old.get("configs", {})
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
    cache = {}
    for name, kv in configs:
        if name in results["configs"] and results["configs"][name]["config"] == kv:
            logging.info("%s: already done", name)
            continue
        r = run_config(name, kv, spec, cd, client_ids, FLAGS.warmup_rounds, FLAGS.seed, FLAGS.forms, cache)
        results["configs"][name] = r
        line = "  ".join(f"{f} {v['error']['mean']:.3f}+-{v['error']['std']:.3f} "
                         f"(it {v['iters']['mean']:.0f}, flagged {100 * v['flagged']:.0f}%)"
                         for f, v in r["forms"].items())
        print(f"{name:14s} {r['seconds']:7.1f}s  {line}", flush=True)
        tmp = FLAGS.output + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, FLAGS.output)


if __name__ == "__main__":
    cli.run(main)
