"""experiments/grid.py: cells run one after another into ROOT/DEFENSE__ATTACK, the table is
rebuilt from the finished cells, bad cells fail in one line, and a SIGTERM stops the grid
(exit 130, table kept) so that the same command resumes it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from test_data import write_idx_dir
from test_resume import _env, _records, _rounds_written

pytestmark = pytest.mark.slow  # every test runs experiments/grid.py or run.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = os.path.join(ROOT, "experiments", "grid.py")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("fm")
    write_idx_dir(d, n_train=160, n_test=40)
    return str(d)


def _cmd(data, root, rounds, cells="fedavg:none,fedavg:mpaf"):
    return [sys.executable, GRID, f"--data_dir={data}", f"--root={root}", f"--cells={cells}",
            "--num_clients=4", "--num_malicious=1", f"--rounds={rounds}", "--eval_every=2"]


def _grid(*cmd):
    return subprocess.run(list(cmd), env=_env(), capture_output=True, text=True, timeout=600)


def _round_numbers(cell) -> list[int]:
    return [r["round"] for r in _records(cell)]


def test_grid_runs_every_cell_tabulates_and_skips_finished_cells(data, tmp_path):
    root = str(tmp_path / "grid")
    r = _grid(*_cmd(data, root, rounds=3))
    assert r.returncode == 0, r.stderr[-2000:]
    table = json.load(open(os.path.join(root, "table.json")))
    assert set(table) == {"none", "mpaf"} and set(table["none"]) == set(table["mpaf"]) == {"fedavg"}
    for attack in ("none", "mpaf"):
        s = json.load(open(os.path.join(root, f"fedavg__{attack}", "summary.json")))
        assert s["status"] == "done" and s["rounds_done"] == 3
        assert table[attack]["fedavg"]["tacc"] == s["test_acc"]
        assert _round_numbers(os.path.join(root, f"fedavg__{attack}")) == [1, 2, 3]
    md = open(os.path.join(root, "table.md")).read()
    assert "| mpaf | " in md and "[20.46]" in md  # the paper's Table 2 FedAvg value beside ours
    again = _grid(*_cmd(data, root, rounds=3))
    assert again.returncode == 0 and "cell 1/2" not in again.stderr  # both cells skipped
    assert _round_numbers(os.path.join(root, "fedavg__mpaf")) == [1, 2, 3]
    before = {a: _records(os.path.join(root, f"fedavg__{a}")) for a in ("none", "mpaf")}
    longer = _grid(*_cmd(data, root, rounds=5))  # a larger --rounds extends the finished cells
    assert longer.returncode == 0, longer.stderr[-2000:]
    for attack in ("none", "mpaf"):
        cell = os.path.join(root, f"fedavg__{attack}")
        assert json.load(open(os.path.join(cell, "summary.json")))["rounds_done"] == 5
        assert _round_numbers(cell) == [1, 2, 3, 4, 5] and _records(cell)[:3] == before[attack]


def test_run_py_resumes_a_grid_cell_and_refuses_other_settings(data, tmp_path):
    root = str(tmp_path / "grid")
    assert _grid(*_cmd(data, root, rounds=2, cells="fedavg:mpaf")).returncode == 0
    cell = os.path.join(root, "fedavg__mpaf")
    run = [sys.executable, os.path.join(ROOT, "experiments", "run.py"), f"--data_dir={data}", f"--output_dir={cell}",
           "--num_clients=4", "--num_malicious=1", "--eval_every=2", "--attack=mpaf", "--defense=fedavg"]
    # Neither driver passes the settings left at their defaults; config.json records them filled.
    cfg_path = os.path.join(cell, "config.json")
    cfg = json.load(open(cfg_path))
    assert cfg["attack_config"] == {"attack_scale": 3.0} and cfg["defense_config"] == {}
    # Older versions recorded them empty, or under old names with settings the plug-in never
    # read: such a cell still resumes, unless an old name holds another value.
    for attack_config, resumes in (({}, True), ({"scale": 3.0, "lone_attacker": "zero"}, True),
                                   ({"scale": 5.0}, False)):
        with open(cfg_path, "w") as f:
            json.dump({**cfg, "attack_config": attack_config, "defense_config": {"variant": "dynamic"}}, f)
        r = _grid(*run, "--rounds=3")
        assert (r.returncode == 0) == resumes, r.stderr[-2000:]
        if not resumes:
            assert "attack_config.attack_scale: 5.0 -> 3.0" in r.stderr, r.stderr[-2000:]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    assert _round_numbers(cell) == [1, 2, 3]
    other = _grid(*run, "--rounds=4", "--attack_scale=5")
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert "--output_dir" in other.stderr and "scale" in other.stderr, other.stderr[-2000:]
    assert _round_numbers(cell) == [1, 2, 3]


@pytest.mark.parametrize("cells,needle", [("fedavg", "--cells"),
                                          ("fedavg:no_such_attack", "cell fedavg:no_such_attack")])
def test_bad_cell_fails_in_one_line(data, tmp_path, cells, needle):
    r = _grid(*_cmd(data, str(tmp_path / "grid"), rounds=1, cells=cells))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert needle in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "grid" / "fedavg__none")


def test_sigterm_stops_the_running_cell_keeps_the_table_and_resumes(data, tmp_path):
    root = str(tmp_path / "grid")
    rounds = 20
    second = os.path.join(root, "fedavg__mpaf")
    log = tmp_path / "stderr.txt"
    # stderr goes to a file: the grid logs every checkpoint, which would fill an unread pipe and block it.
    with open(log, "w") as err_file:
        proc = subprocess.Popen(_cmd(data, root, rounds), env=_env(), stdout=subprocess.DEVNULL, stderr=err_file)
    deadline = time.time() + 300
    while _rounds_written(second) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = log.read_text()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    stopped_at = len(_round_numbers(second))
    assert 2 <= stopped_at < rounds, "the second cell was not stopped mid-run"
    assert f"cell fedavg:mpaf: stopped after round {stopped_at}" in err
    assert "finished cells are skipped on rerun" in err
    table = json.load(open(os.path.join(root, "table.json")))
    assert set(table) == {"none"}  # the finished cell is tabulated, the stopped one is not
    r = _grid(*_cmd(data, root, rounds))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from the checkpoint of round" in r.stderr
    assert _round_numbers(second) == list(range(1, rounds + 1))
    assert set(json.load(open(os.path.join(root, "table.json")))) == {"none", "mpaf"}
