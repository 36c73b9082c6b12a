"""fedredefense_jax/separability.py and experiments/separability.py on made-up FedREDefense records."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedredefense_jax import separability as sep

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "separability.py")


def _run_dir(path, rounds, attack="scaling", defense="fedredefense", reject_at=None, done=True, **settings):
    os.makedirs(path)
    cfg = {"attack": attack, "defense": defense, "num_clients": 4, "num_malicious": 2, "train_subset": 2400,
           "defense_config": {"gamma": 0.6, "redefense_reject_at": reject_at}, **settings}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(path, "rounds.jsonl"), "w") as f:
        for r in rounds:
            f.write(json.dumps(r) + "\n")
    if done:
        with open(os.path.join(path, "summary.json"), "w") as f:
            json.dump({"status": "done"}, f)
    return str(path)


# Round 1: clients 0, 1 benign (reach gamma at 20 and 40), 2 malicious (never: 800 iterations), 3
# malicious and non-finite. Round 2: 0 and 1 again, benign; 2 reaches gamma at 300.
ROUND1 = {"round": 1, "participants": [0, 1, 2, 3], "malicious": [2, 3], "error": [0.55, 0.59, 0.61, None],
          "iterations": [20, 40, 800, 0], "to_gamma": [20, 40, None, None],
          "loss_at": [[0.9, None, None, None, None, None], [0.95, 0.7, None, None, None, None],
                      [0.99, 0.9, 0.8, 0.7, 0.65, 0.62], None]}
ROUND2 = {"round": 2, "participants": [0, 1, 2], "malicious": [2, 3], "error": [0.5, 0.58, 0.599],
          "iterations": [3, 7, 300]}


def test_participations_first_later_invalid_and_old_records(tmp_path):
    d = _run_dir(tmp_path / "r", [ROUND1, ROUND2])
    ps = sep.participations(d)
    assert [(p.round, p.client, p.malicious, p.first, p.invalid) for p in ps] == [
        (1, 0, False, True, False), (1, 1, False, True, False), (1, 2, True, True, False), (1, 3, True, True, True),
        (2, 0, False, False, False), (2, 1, False, False, False), (2, 2, True, False, False)]
    # round 2 has no to_gamma: a reconstruction that ended at or below gamma reached it when it stopped
    assert [p.iterations for p in ps] == [20, 40, None, None, 3, 7, 300]
    assert ps[4].loss_at is None


def test_scores_iterations_cap_plus_one_and_loss_at_falls_back_to_the_final_error(tmp_path):
    ps = sep.participations(_run_dir(tmp_path / "r", [ROUND1]))
    its = sep.scores(ps, "iterations")
    assert its[:3].tolist() == [20, 40, 801] and np.isnan(its[3])
    loss25 = sep.scores(ps, "loss@25")
    # client 0 reached gamma at 20 < 25: its final error stands in; client 1 ran past 25: recorded
    assert loss25[:3].tolist() == [0.55, 0.7, 0.9] and np.isnan(loss25[3])
    assert sep.scores(ps, "loss@50")[:3].tolist() == [0.55, 0.59, 0.8]
    with pytest.raises(ValueError, match="budgets"):
        sep.scores(ps, "loss@30")
    with pytest.raises(ValueError, match="unknown score"):
        sep.scores(ps, "norm")


def test_separation_auc_and_clean_catch():
    def p(mal, err, its):
        return sep.Participation("x", 1, 0, mal, True, err, its, its or 800, None)

    parts = [p(False, 0.5, 10), p(False, 0.59, 60), p(True, 0.58, None), p(True, 0.7, None), p(True, 0.55, 30)]
    s = sep.separation(parts, "error")
    # malicious 0.58 is below benign 0.59, 0.55 below both: 2 of 6 pairs misordered
    assert s.auc == pytest.approx(4 / 6) and s.clean_catch == pytest.approx(1 / 3)
    assert s.benign_max == 0.59 and s.malicious_min == 0.55 and s.used == 5
    t = sep.separation(parts, "iterations")  # 10, 60 | 801, 801, 30
    assert t.auc == pytest.approx(5 / 6) and t.clean_catch == pytest.approx(2 / 3)
    assert sep.paper_rule(parts, 0.6) == (pytest.approx(1 / 3), 0.0)
    assert sep.separation([x for x in parts if not x.malicious], "error").auc is None
    fpr, tpr = sep.roc(parts, "error")
    assert fpr[-1] == 1.0 and tpr[-1] == 1.0


def test_other_defenses_and_early_rejection_runs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a FedREDefense run"):
        sep.participations(_run_dir(tmp_path / "a", [ROUND1], defense="fedavg"))
    with pytest.raises(ValueError, match="early rejection"):
        sep.participations(_run_dir(tmp_path / "b", [ROUND1], reject_at=50))


@pytest.mark.slow
def test_script_writes_page_and_figures_and_merges_runs_of_one_setting(tmp_path):
    _run_dir(tmp_path / "a", [ROUND1, ROUND2])
    _run_dir(tmp_path / "b", [{k: v for k, v in ROUND1.items() if k not in ("to_gamma", "loss_at")}])
    _run_dir(tmp_path / "c", [ROUND1], done=False)
    _run_dir(tmp_path / "d", [ROUND1], beta=0.5, train_subset=None)
    out = tmp_path / "page" / "sep"
    res = subprocess.run([sys.executable, SCRIPT, f"--out={out}", str(tmp_path / "*")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "not a finished run" in res.stderr
    page = (tmp_path / "page" / "sep.md").read_text()
    # a and b are one row (same attack and counts); round 1 counted once, with a's trajectory
    first = [line for line in page.splitlines() if line.startswith("| scaling (2 of 4) |")]
    assert first[0].startswith("| scaling (2 of 4) | 2 / 2 | 1 | 100 / 0 | 30 / 40 | never / never | "
                               "1.000 / 100 | 1.000 / 100 |")
    assert first[1].startswith("| scaling (2 of 4) | 2 / 1 | 0 | 0 / 0 | 5 / 7 | 300 / 300 | 1.000 / 100 | "
                               "1.000 / 100 |")
    # settings other than the paper's make a row of their own
    assert "| scaling (2 of 4), 15000 images per client, beta 0.5 | 2 / 2 |" in page
    assert (tmp_path / "page" / "sep.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "page" / "sep_scatter.png").stat().st_size > 1000
    assert (tmp_path / "page" / "sep_iterations.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "nothing")], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "no finished FedREDefense run" in bad.stderr
