"""Checkpoint and resume: a run killed (SIGKILL) or stopped (SIGTERM) and rerun ends with the
same summary as an uninterrupted run; a foreign or corrupt output directory is refused."""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedredefense_jax import checkpoint, simulation
from test_data import write_idx_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")
ROUNDS = 25
ARGS = ["--num_clients=4", "--num_malicious=2", "--attack=sign_flip", "--defense=fedredefense",
        "--first_cap=20", "--later_cap=20", "--eval_every=3", f"--rounds={ROUNDS}", "--batch_size=16"]
# Wall times differ between runs; everything else in the summary must not.
TIMING = ("wall_s", "rounds_s_total", "seconds_per_round_median", "environment", "config")


def _cmd(data, out, *extra):
    return [sys.executable, RUN, f"--data_dir={data}", f"--output_dir={out}", *ARGS, *extra]


def _env():
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def _rounds_written(out) -> int:
    try:
        with open(os.path.join(out, "rounds.jsonl")) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _start_and_wait(data, out, rounds_before_signal: int):
    proc = subprocess.Popen(_cmd(data, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while _rounds_written(out) < rounds_before_signal and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return proc


def _comparable(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in TIMING}


def _records(out) -> list[dict]:
    with open(os.path.join(out, "rounds.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fm")
    write_idx_dir(d, n_train=160, n_test=40)
    return str(d)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full") / "out")
    r = subprocess.run(_cmd(data, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out, "summary.json")) as f:
        return out, json.load(f)


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(data, uninterrupted, tmp_path):
    out = str(tmp_path / "out")
    proc = _start_and_wait(data, out, rounds_before_signal=4)
    proc.kill()
    proc.wait()
    killed_at = _rounds_written(out)
    assert 4 <= killed_at < ROUNDS, "the run was not killed mid-run"
    r = subprocess.run(_cmd(data, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from the checkpoint of round" in r.stderr
    with open(os.path.join(out, "summary.json")) as f:
        resumed = json.load(f)
    ref_out, ref = uninterrupted
    assert resumed["status"] == "done" and resumed["rounds_done"] == ROUNDS
    assert _comparable(resumed) == _comparable(ref)
    assert _records(out) == _records(ref_out)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops(data, uninterrupted, tmp_path):
    out = str(tmp_path / "out")
    proc = _start_and_wait(data, out, rounds_before_signal=3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "checkpoint saved" in err
    stopped_at = _rounds_written(out)
    with open(os.path.join(out, "summary.json")) as f:
        s = json.load(f)
    assert s["status"] == "stopped" and s["rounds_done"] == stopped_at < ROUNDS
    assert checkpoint.Checkpointer(os.path.join(out, "checkpoints")).latest_round() == stopped_at
    r = subprocess.run(_cmd(data, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out, "summary.json")) as f:
        assert _comparable(json.load(f)) == _comparable(uninterrupted[1])


@pytest.mark.slow
def test_output_dir_of_another_configuration_is_refused(data, uninterrupted, tmp_path):
    ref_out, _ = uninterrupted
    before = sorted(os.listdir(os.path.join(ref_out, "checkpoints")))
    r = subprocess.run(_cmd(data, ref_out, "--beta=0.5"), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "--output_dir" in lines[0] and "beta" in lines[0], r.stderr[-2000:]
    assert sorted(os.listdir(os.path.join(ref_out, "checkpoints"))) == before


@pytest.mark.slow
def test_overwrite_replaces_a_run_of_another_configuration(data, uninterrupted, tmp_path):
    import shutil

    out = str(tmp_path / "out")
    shutil.copytree(uninterrupted[0], out)
    cmd = _cmd(data, out, "--beta=0.5", "--overwrite")
    cmd[cmd.index(f"--rounds={ROUNDS}")] = "--rounds=2"
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["beta"] == 0.5
    assert _rounds_written(out) == 2


@pytest.mark.slow
def test_corrupt_checkpoint_gives_one_line_and_is_kept(data, uninterrupted, tmp_path):
    import shutil

    out = str(tmp_path / "out")
    shutil.copytree(uninterrupted[0], out)
    ckpts = os.path.join(out, "checkpoints")
    last = max(os.listdir(ckpts), key=int)
    for root, _, files in os.walk(os.path.join(ckpts, last)):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
    r = subprocess.run(_cmd(data, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "checkpoint" in lines[0] and last in lines[0], r.stderr[-2000:]
    assert os.path.isdir(os.path.join(ckpts, last))  # not overwritten or removed


def test_state_round_trip_keeps_keys_dtypes_and_structure(tmp_path):
    kn = {"images": jnp.ones((3, 2, 2), jnp.float32), "seen": np.array([True, False, True])}
    state = simulation.SimState(7, jnp.arange(5.0), jax.random.key(3), np.array([False, True, False]),
                                (kn, jnp.array([1, 2, 3], jnp.int32)), ())
    ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
    ck.save(state)
    template = simulation.SimState(0, jnp.zeros(5), jax.random.key(0), np.zeros(3, bool),
                                   ({"images": jnp.zeros((3, 2, 2)), "seen": np.zeros(3, bool)},
                                    jnp.zeros(3, jnp.int32)), ())
    back = ck.restore(template)
    assert back.round == 7
    assert np.array_equal(jax.random.key_data(back.key), jax.random.key_data(state.key))
    assert np.array_equal(back.expelled, state.expelled) and back.expelled.dtype == bool
    assert back.defense_state[0]["seen"].dtype == bool
    np.testing.assert_array_equal(back.defense_state[1], [1, 2, 3])
    wrong = simulation.SimState(0, jnp.zeros(6), template.key, template.expelled, template.defense_state, ())
    with pytest.raises(checkpoint.CheckpointError):
        ck.restore(wrong)
    ck.close()


def test_orbax_info_is_dropped_and_its_warnings_kept(tmp_path, caplog):
    state = simulation.SimState(1, jnp.arange(3.0), jax.random.key(0), np.zeros(2, bool), (), ())
    absl_logger = logging.getLogger("absl")

    def orbax_records():
        return [r for r in caplog.records if f"{os.sep}orbax{os.sep}" in r.pathname]

    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
        ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
        ck.save(state)
        assert not [r for r in orbax_records() if r.levelno < logging.WARNING]
        absl_logger.removeFilter(checkpoint._not_orbax_info)  # control: Orbax does log at INFO
        try:
            ck.save(dataclasses.replace(state, round=2))
        finally:
            checkpoint.quiet_orbax_logging()
        assert [r for r in orbax_records() if r.levelno == logging.INFO]
        ck.close()
    orbax_path = os.path.join("site-packages", "orbax", "checkpoint", "x.py")
    warn = logging.LogRecord("absl", logging.WARNING, orbax_path, 1, "w", None, None)
    ours = logging.LogRecord("absl", logging.INFO, os.path.join("fedredefense_jax", "runner.py"), 1, "i", None, None)
    assert checkpoint._not_orbax_info(warn) and checkpoint._not_orbax_info(ours)


class _Pair(NamedTuple):
    first: jax.Array
    second: jax.Array


class _Swapped(NamedTuple):
    second: jax.Array
    first: jax.Array


class _Renamed(NamedTuple):
    first: jax.Array
    other: jax.Array


def _pair_state(defense_state, round_=0):
    return simulation.SimState(round_, jnp.arange(3.0), jax.random.key(1), np.zeros(2, bool), defense_state, ())


def test_checkpoint_holds_named_arrays_and_restores_fields_by_name(tmp_path):
    ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
    ck.save(_pair_state(_Pair(jnp.ones(4), jnp.full(4, 2.0)), round_=5))
    saved = ck.saved_arrays()
    assert set(saved) == {"round", "state.params", "state.key", "state.expelled", "state.defense_state.first",
                          "state.defense_state.second"}
    assert saved["state.key"][:2] == ((2,), np.dtype(np.uint32))
    # the same fields in another order: each restored into its own name
    back = ck.restore(_pair_state(_Swapped(jnp.zeros(4), jnp.zeros(4))))
    assert back.round == 5 and isinstance(back.defense_state, _Swapped)
    np.testing.assert_array_equal(back.defense_state.first, np.ones(4))
    np.testing.assert_array_equal(back.defense_state.second, np.full(4, 2.0))
    # a renamed field: refused with both names
    with pytest.raises(checkpoint.CheckpointError, match="state.defense_state.other.*state.defense_state.second"):
        ck.restore(_pair_state(_Renamed(jnp.zeros(4), jnp.zeros(4))))
    with pytest.raises(checkpoint.CheckpointError, match=r"state.defense_state.first is float32\[4\].*float32\[5\]"):
        ck.restore(_pair_state(_Pair(jnp.zeros(5), jnp.zeros(4))))
    ck.close()


def test_numbered_checkpoint_of_earlier_versions_restores(tmp_path):
    import orbax.checkpoint as ocp

    state = _pair_state(_Pair(jnp.ones(4), jnp.full(4, 2.0)), round_=3)
    leaves = jax.tree.leaves((state.params, state.key, state.expelled, state.defense_state, state.attack_state))
    tree = {"round": np.asarray(3, np.int64),
            "leaves": {f"{i:05d}": np.asarray(jax.random.key_data(x) if x.dtype == state.key.dtype else x)
                       for i, x in enumerate(leaves)}}
    manager = ocp.CheckpointManager(str(tmp_path / "ck"), options=ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=False))
    manager.save(3, args=ocp.args.StandardSave(tree), force=True)
    manager.wait_until_finished()
    manager.close()
    ck = checkpoint.Checkpointer(str(tmp_path / "ck"))
    back = ck.restore(_pair_state(_Pair(jnp.zeros(4), jnp.zeros(4))))
    assert back.round == 3
    np.testing.assert_array_equal(back.defense_state.second, np.full(4, 2.0))
    assert np.array_equal(jax.random.key_data(back.key), jax.random.key_data(state.key))
    ck.save(dataclasses.replace(back, round=4))  # continues in the named format
    assert "state.defense_state.second" in ck.saved_arrays()
    ck.close()
