"""The client mesh: runs on 1, 2, 4 and 8 (forced host) devices and on two processes give the
records of one device; every attack and defense runs with padded slots; a run killed on 4
devices resumes on 2 and on 1.

XLA_FLAGS must be set before JAX starts, so the runs happen in subprocesses
(``tests/mesh_driver.py``), several runs per process, sharing JAX's persistent compilation
cache. XLA:CPU's float results depend in the last bits on how many host devices a process is
started with (whatever mesh it then uses), so every process starts with 8 forced devices and
uses meshes of 1, 2, 4 or 8 of them, as ``--num_devices`` does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from fedredefense_jax import attacks, cli, defenses
from fedredefense_jax import mesh as mesh_lib
from fedredefense_jax.settings import ConfigError
from test_data import write_idx_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "mesh_driver.py")
TIMEOUT_S = 1200
# Wall times and where a run happened differ between runs; nothing else may.
TIMING = ("wall_s", "rounds_s_total", "seconds_per_round_median", "environment", "config", "mesh")

# Every registered attack once, every registered defense at least once (run on 4 devices).
PAIRS = [("none", "fldetector"), ("mpaf", "krum"), ("sign_flip", "median"), ("lie", "trimmed_mean"),
         ("min_max", "norm_bound"), ("min_sum", "flame"), ("fang", "krum"), ("fang", "trimmed_mean"),
         ("hostile_nan", "fltrust"), ("hostile_inf", "flcert"), ("hostile_neg_inf", "fedavg"),
         ("hostile_huge", "fedredefense"), ("hostile_zero", "flame"), ("hostile_copy", "fldetector"),
         ("label_flip", "flcert"), ("targeted_label_flip", "fltrust"), ("adaptive_label_flip", "fedredefense"),
         ("adaptive_targeted_label_flip", "fedredefense"), ("scaling", "norm_bound"), ("dba", "median")]


def _config(data, out, **kw):
    cfg = dict(data_dir=data, num_clients=5, num_malicious=2, rounds=3, eval_every=1, batch_size=16,
               attack="mpaf_and_sign_flip", output_dir=out)
    cfg.update(kw)
    return cfg


# gamma above the paper's 0.6: the small model on random images leaves errors near 1; two
# rolled inner steps compile faster
REDEFENSE = {"first_cap": 12, "later_cap": 12, "gamma": 1.5, "inner_steps": 2, "redefense_inner_unroll": 1}


def _env(devices: int, cache: str) -> dict:
    """A subprocess's environment: ``devices`` forced host devices; JAX's persistent
    compilation cache in ``cache``, shared by the subprocesses (each device compiles its own
    copy of a program, so runs of the same programs reuse them)."""
    return dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.path.join(ROOT, 'tests')}", JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_COMPILATION_CACHE_DIR=cache,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


def _start(tmp, name, jobs, devices=8, distributed=None):
    path = os.path.join(tmp, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"jobs": jobs, "distributed": distributed}, f)
    log = open(os.path.join(tmp, f"{name}.log"), "w")
    return subprocess.Popen([sys.executable, DRIVER, path], env=_env(devices, os.path.join(tmp, "jax_cache")),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(procs, timeout=TIMEOUT_S):
    """Waits for the processes (killing the lot on a timeout or when the test fails);
    returns their exit codes."""
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()


def _log(tmp, name) -> str:
    with open(os.path.join(tmp, f"{name}.log")) as f:
        return f.read()[-3000:]


def _records(out) -> list[dict]:
    with open(os.path.join(out, "rounds.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def _summary(out) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def _same_run(out, ref):
    """Records equal apart from timings, test accuracies within 1e-5, same summary."""
    a, b = _records(out), _records(ref)
    assert [r["flagged"] for r in a] == [r["flagged"] for r in b]
    assert [r.get("iterations") for r in a] == [r.get("iterations") for r in b]
    for x, y in zip(a, b):
        assert abs(x.get("test_acc", 0) - y.get("test_acc", 0)) <= 1e-5
    assert a == b
    sa, sb = _summary(out), _summary(ref)
    assert {k: v for k, v in sa.items() if k not in TIMING} == {k: v for k, v in sb.items() if k not in TIMING}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two processes of 8 forced devices, side by side: (a) FedAvg and FedREDefense on meshes
    of 1, 2 and 8 devices; (b) every attack and defense on 4 devices, then the FedREDefense
    run on 4 devices killed after round 1. Then (c) the killed run resumed on 2 devices."""
    tmp = str(tmp_path_factory.mktemp("mesh"))
    data = os.path.join(tmp, "fm")
    from pathlib import Path

    write_idx_dir(Path(data), n_train=200, n_test=40)
    out = {}
    jobs_a = []
    for n in (1, 2, 8):
        for name, extra in (("fedavg", {}), ("fedredefense", {"defense": "fedredefense", "defense_config": REDEFENSE})):
            out[name, n] = os.path.join(tmp, f"{name}_{n}")
            jobs_a.append({"kind": "run", "num_devices": n, "config": _config(data, out[name, n], **extra)})
    killed = os.path.join(tmp, "killed")
    matrix = os.path.join(tmp, "matrix.json")
    jobs_b = [{"kind": "matrix", "num_devices": 4, "rounds": 1, "pairs": PAIRS, "out": matrix,
               "config": _config(data, os.path.join(tmp, "matrix"), attack="none",
                                 defense_config={**REDEFENSE, "fldetector_cold_start": 0, "fldetector_window": 1})},
              {"kind": "run", "num_devices": 4, "kill_after": 1,
               "config": _config(data, killed, defense="fedredefense", defense_config=REDEFENSE)}]
    codes = _finish([_start(tmp, "a", jobs_a), _start(tmp, "b", jobs_b)])
    assert codes[0] == 0, _log(tmp, "a")
    assert codes[1] == -9, _log(tmp, "b")  # killed itself after round 1
    return {"tmp": tmp, "data": data, "out": out, "killed": killed, "matrix": matrix}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fedavg", "fedredefense"])
def test_device_counts_give_the_records_of_one_device(runs, name):
    out = runs["out"]
    for n in (2, 8):
        _same_run(out[name, n], out[name, 1])
    assert _summary(out[name, 8])["mesh"]["devices"] == 8
    if name == "fedredefense":  # MPAF's first update is zero: flagged on every mesh
        assert 3 in _records(out[name, 1])[0]["flagged"]


@pytest.mark.slow
def test_every_attack_and_defense_runs_with_padded_slots_on_four_devices(runs):
    assert {a for a, _ in PAIRS} >= set(attacks.names()) - {"mpaf_and_sign_flip"}
    assert {d for _, d in PAIRS} >= set(defenses.names())
    with open(runs["matrix"]) as f:
        res = json.load(f)
    assert set(res) == {f"{a}/{d}" for a, d in PAIRS}
    for pair, r in res.items():
        assert r["finite"], pair
        assert r["participants"][0] == [0, 1, 2, 3, 4], pair  # 5 clients in 8 slots: padding not recorded
    assert {3, 4} <= set(res["hostile_huge/fedredefense"]["flagged"][0])


@pytest.mark.slow
def test_run_killed_on_four_devices_resumes_on_two_or_one_like_one_device(runs):
    """The checkpoint of 4 devices (knowledge rows padded to 8) restores on 2 (6 rows) and on
    1 (5 rows)."""
    import shutil

    tmp, killed = runs["tmp"], runs["killed"]
    with open(os.path.join(killed, "rounds.jsonl")) as f:
        assert sum(1 for _ in f) == 1
    assert _summary(killed)["mesh"]["devices"] == 4
    copy = killed + "_copy"
    shutil.copytree(killed, copy)
    jobs = [{"kind": "run", "num_devices": n,
             "config": _config(runs["data"], out, defense="fedredefense", defense_config=REDEFENSE)}
            for n, out in ((2, killed), (1, copy))]
    (code,) = _finish([_start(tmp, "c", jobs)])
    assert code == 0, _log(tmp, "c")
    for out, n in ((killed, 2), (copy, 1)):
        _same_run(out, runs["out"]["fedredefense", 1])
        assert _summary(out)["mesh"]["devices"] == n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_records_of_one(runs):
    """Two processes (jax.distributed on 127.0.0.1, gloo collectives), one device of each on
    the mesh, against the 1-device FedREDefense run; two rounds, then the run extended to
    three: every process restores its part of round 2's checkpoint."""
    tmp = runs["tmp"]
    cfg = _config(runs["data"], os.path.join(tmp, "two"), defense="fedredefense", defense_config=REDEFENSE)
    jobs = [{"kind": "run", "num_devices": 1, "config": dict(cfg, rounds=2)},
            {"kind": "run", "num_devices": 1, "config": cfg}]
    address = f"127.0.0.1:{_free_port()}"
    procs = [_start(tmp, f"p{i}", jobs, distributed={"coordinator": address, "num_processes": 2, "process_id": i})
             for i in range(2)]
    codes = _finish(procs, timeout=600)
    assert codes == [0, 0], _log(tmp, "p0") + _log(tmp, "p1")
    mesh = _summary(cfg["output_dir"])["mesh"]
    assert (mesh["devices"], mesh["processes"]) == (2, 2)
    assert os.path.isdir(os.path.join(cfg["output_dir"], "checkpoints", "3", "default", "ocdbt.process_1"))
    _same_run(cfg["output_dir"], runs["out"]["fedredefense", 1])


def test_cluster_detection_reads_the_environment():
    assert not mesh_lib.cluster_detected({})
    assert mesh_lib.cluster_detected({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0"})
    assert not mesh_lib.cluster_detected({"SLURM_NTASKS": "1", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0"})
    assert mesh_lib.cluster_detected({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1"})
    assert mesh_lib.cluster_detected({"TPU_WORKER_HOSTNAMES": "host-0,host-1"})
    assert not mesh_lib.cluster_detected({"TPU_WORKER_HOSTNAMES": "host-0"})
    assert not mesh_lib.initialize(num_processes=1)  # one process: nothing to start


@pytest.mark.slow
@pytest.mark.parametrize("args,flag", [(["--num_devices=2"], "num_devices"),
                                       (["--num_processes=2"], "coordinator_address")])
def test_bad_device_flags_fail_in_one_line_from_run_py(args, flag, tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args,
                        f"--output_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and f"--{flag}" in lines[0], r.stderr


def _parse_device_flags(*argv):
    cli.define_device_flags()
    cli.FLAGS.unparse_flags()
    try:
        cli.parse_flags(["test", *argv])
        return cli.client_mesh()
    finally:
        cli.FLAGS.unparse_flags()


def test_device_flags_are_typed_and_checked_against_the_devices(capsys):
    import jax

    with pytest.raises(SystemExit) as e:
        _parse_device_flags("--num_devices=0")
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: --num_devices: 0 is not a positive integer"]
    local = len(jax.local_devices())
    with pytest.raises(ConfigError) as e:
        _parse_device_flags(f"--num_devices={local + 1}")
    assert e.value.flag == "num_devices" and f"[1, {local}]" in str(e.value)
    with pytest.raises(ConfigError) as e:
        _parse_device_flags("--num_processes=2", "--process_id=2")
    assert e.value.flag == "process_id"
    assert _parse_device_flags(f"--num_devices={local}").size == local
    assert "num_devices" not in cli.EXPERIMENT  # not a setting of the experiment: config.json leaves it out
