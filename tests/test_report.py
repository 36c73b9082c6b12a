"""experiments/report.py: the per-run summary table and the --curves per-round table."""

import json
import os
import subprocess
import sys

import pytest

REPORT = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "report.py")


def _write_run(path, rows):
    os.makedirs(path)
    with open(os.path.join(path, "rounds.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _report(*args):
    return subprocess.run([sys.executable, REPORT, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_curves_table_rows_columns_and_cells(tmp_path):
    a, b = str(tmp_path / "fedavg__none"), str(tmp_path / "fedavg__scaling")
    _write_run(a, [{"round": 1}, {"round": 2, "test_acc": 0.5}, {"round": 4, "test_acc": 0.61234}])
    _write_run(b, [{"round": 2, "test_acc": 0.4, "asr": 0.9, "asr_base": 0.05}, {"round": 3}])
    out = _report("--curves", a, b)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "| run | round 2 | round 4 |"
    assert lines[2] == "| fedavg__none | 50.00 | 61.23 |"
    assert lines[3] == "| fedavg__scaling | 40.00 / 90.00 / 5.00 | - |"
    chosen = _report("--curves=4", a, b).stdout.strip().splitlines()
    assert chosen[0] == "| run | round 4 |" and chosen[3] == "| fedavg__scaling | - |"


@pytest.mark.slow
def test_curves_errors_name_the_fault(tmp_path):
    missing = _report("--curves", str(tmp_path / "nope"))
    assert missing.returncode != 0 and "rounds.jsonl not found" in missing.stderr
    bad = _report("--curves=ten", str(tmp_path))
    assert bad.returncode != 0 and "--curves takes comma-separated round numbers" in bad.stderr


@pytest.mark.slow
def test_summary_sums_round_times_over_a_resumed_run(tmp_path):
    """A resumed run's summary.json holds only the last process's wall time; the table
    must also give the time of every round, so that a 66-minute first round is not lost."""
    run = str(tmp_path / "fedredefense__scaling")
    row = {"participants": [0, 1, 2], "malicious": [2], "iterations": [3, 4, 800],
           "train_s": 1.0, "detection_s": 2.0}
    _write_run(run, [row | {"round": 1, "flagged": [2], "round_s": 3600.0},
                     row | {"round": 2, "flagged": [], "round_s": 60.0}])
    with open(os.path.join(run, "summary.json"), "w") as f:
        json.dump({"rounds_done": 2, "wall_s": 90.0, "seconds_per_round_median": 1830.0,
                   "detection": {"dacc": 1.0, "fpr": 0.0, "fnr": 0.0, "aar": 0,
                                 "adacc": 0.2667, "afpr": 0.6364, "afnr": 1.0}}, f)
    out = _report(run)
    assert out.returncode == 0, out.stderr
    cells = dict(line.strip("| ").split(" | ") for line in out.stdout.strip().splitlines()[2:])
    assert cells["round time (sum over rounds)"] == "61.0 min"
    assert cells["wall (last process)"] == "1.5 min"
    assert cells["malicious participations flagged"] == "1 / 2"
    assert cells["malicious iterations first (median / max)"] == "800 / 800"
    assert (cells["ADACC"], cells["AFPR"], cells["AFNR"]) == ("26.7 %", "63.6 %", "100.0 %")


def _module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("report", REPORT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plot_draws_every_evaluation_of_every_run(tmp_path):
    a, b = str(tmp_path / "x" / "fedavg__lie"), str(tmp_path / "y" / "fedavg__lie")
    _write_run(a, [{"round": 1}, {"round": 2, "test_acc": 0.5}, {"round": 4, "test_acc": 0.25}])
    _write_run(b, [{"round": 2, "test_acc": 0.4, "asr": 0.9, "asr_base": 0.05}, {"round": 3}])
    fig = _module().plot_curves([a, b], str(tmp_path / "out" / "f.png"))
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["x/fedavg__lie", "y/fedavg__lie", "y/fedavg__lie (ASR)"]
    assert list(lines[0].get_xdata()) == [2, 4] and list(lines[0].get_ydata()) == [50.0, 25.0]
    assert list(lines[2].get_ydata()) == [90.0] and lines[2].get_linestyle() == "--"
    with open(tmp_path / "out" / "f.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_plot_errors_name_the_flag(tmp_path):
    run = str(tmp_path / "r")
    _write_run(run, [{"round": 1, "test_acc": 0.5}])
    no_file = _report("--plot", run)
    assert no_file.returncode != 0 and "--plot needs a file" in no_file.stderr
    bad = _report(f"--plot={tmp_path / 'f.nope'}", run)
    assert bad.returncode != 0 and "--plot=" in bad.stderr and "nope" in bad.stderr
    ok = _report(f"--plot={tmp_path / 'f.svg'}", run)
    assert ok.returncode == 0 and os.path.getsize(tmp_path / "f.svg") > 0
