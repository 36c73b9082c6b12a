"""Runs experiments on a client mesh in a fresh process (tests/test_mesh.py starts it with
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which must be set before JAX starts).

    python tests/mesh_driver.py JOBS.json

``JOBS.json``: ``{"distributed": {"coordinator", "num_processes", "process_id"} (optional),
"jobs": [...]}``; each job is

* ``{"kind": "run", "num_devices": n, "config": {...}, "kill_after": k}``: ``runner.run`` of
  ``config.ExperimentConfig(**config)`` on the first ``n`` devices of each process; with
  ``kill_after`` the process kills itself (SIGKILL) when round ``k + 1`` starts, i.e. after
  round ``k``'s record and checkpoint;
* ``{"kind": "matrix", "num_devices": n, "config": {...}, "pairs": [[attack, defense], ...],
  "rounds": r, "out": path}``: ``r`` rounds of ``simulation.step`` for every pair (one more
  for FLDetector, whose detection needs a previous round), the federation built by
  ``experiment.build`` (one local-training program per data-poisoning kind; of the
  ``defense_config`` settings each defense gets those it takes);
  writes ``{"attack/defense": {"finite": ..., "participants": ..., "flagged": ...}}`` to ``out``.

The models are small versions of the paper's CNN (``models.build_model`` is replaced) so
that the programs compile quickly; the attack ``mpaf_and_sign_flip`` (odd malicious ids send
MPAF's update, even ones their negated update) is registered here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time


def _register_attack():
    import jax.numpy as jnp

    from fedredefense_jax import attacks

    if "mpaf_and_sign_flip" in attacks.names():
        return

    @attacks.register("mpaf_and_sign_flip")
    def make(ctx):
        plain = ctx._replace(config=None)  # each with its own default settings
        mpaf, flip = attacks.make("mpaf", plain), attacks.make("sign_flip", plain)

        def apply(state, inp):
            a, _ = mpaf.apply((), inp)
            b, _ = flip.apply((), inp)
            return jnp.where((jnp.asarray(inp.client_ids) % 2 == 1)[:, None], a, b), state

        return attacks.Attack("mpaf_and_sign_flip", lambda num_clients, key: (), apply)


def small_model(name, dataset, num_classes=10, conv_impl="auto"):
    """A small paper CNN, whatever the model asked for (replaces ``models.build_model``)."""
    from fedredefense_jax import models

    del name, dataset
    return models.PaperCNN((4, 6), 16, num_classes, models.resolve_conv_impl(conv_impl))


def _run(job, mesh):
    from fedredefense_jax import config, runner, simulation

    cfg = config.ExperimentConfig(**job["config"])
    kill_after = job.get("kill_after")
    if kill_after is not None:
        step = simulation.step

        def step_or_die(fed, state):
            if state.round >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(fed, state)

        simulation.step = step_or_die
    runner.run(cfg, progress=0, mesh=mesh)


def _matrix(job, mesh):
    import numpy as np

    from fedredefense_jax import config, defenses, experiment, simulation

    base = dict(job["config"])
    trainers, out = {}, {}
    for attack, defense in job["pairs"]:
        takes = defenses.settings(defense).fields()
        cfg = config.ExperimentConfig(**{
            **base, "attack": attack, "defense": defense,
            "defense_config": {k: v for k, v in base.get("defense_config", {}).items() if k in takes},
            "output_dir": os.path.join(base["output_dir"], f"{attack}__{defense}")})
        fed = experiment.build(cfg, mesh).federation
        kind = None if fed.attack.poison is None else fed.attack.poison.schedule
        fed = dataclasses.replace(fed, train=trainers.setdefault(kind, fed.train))
        state = simulation.init_state(fed)
        rows = []
        t = time.perf_counter()
        for _ in range(job["rounds"] + (defense == "fldetector")):
            state, rec = simulation.step(fed, state)
            rows.append(rec)
        out[f"{attack}/{defense}"] = {
            "finite": bool(np.all(np.isfinite(np.asarray(state.params)))),
            "participants": [r["participants"] for r in rows],
            "flagged": [r["flagged"] for r in rows],
            "invalid_update": [r.get("invalid_update") for r in rows],
        }
        print(f"  {attack}/{defense}: {time.perf_counter() - t:.1f} s", flush=True)
    with open(job["out"], "w") as f:
        json.dump(out, f)


def main(path):
    with open(path) as f:
        spec = json.load(f)
    from fedredefense_jax import mesh as mesh_lib

    dist = spec.get("distributed")
    if dist:
        mesh_lib.initialize(dist["coordinator"], dist["num_processes"], dist["process_id"], timeout_s=120)
    from fedredefense_jax import models

    models.build_model = small_model
    _register_attack()
    for job in spec["jobs"]:
        t = time.perf_counter()
        mesh = mesh_lib.ClientMesh(job.get("num_devices"))
        {"run": _run, "matrix": _matrix}[job["kind"]](job, mesh)
        print(f"{job['kind']} on {mesh.size} device(s): {time.perf_counter() - t:.1f} s", flush=True)
    print("driver done", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1])
