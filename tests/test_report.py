"""experiments/report.py --curves: the per-round table built from runs' rounds.jsonl."""

import json
import os
import subprocess
import sys

REPORT = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "report.py")


def _write_run(path, rows):
    os.makedirs(path)
    with open(os.path.join(path, "rounds.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _report(*args):
    return subprocess.run([sys.executable, REPORT, *args], capture_output=True, text=True, timeout=60)


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


def test_curves_errors_name_the_fault(tmp_path):
    missing = _report("--curves", str(tmp_path / "nope"))
    assert missing.returncode != 0 and "rounds.jsonl not found" in missing.stderr
    bad = _report("--curves=ten", str(tmp_path))
    assert bad.returncode != 0 and "--curves takes comma-separated round numbers" in bad.stderr
