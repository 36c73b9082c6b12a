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
    _run_dir(tmp_path / "e", [ROUND1], seed=1)
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
    assert "| scaling (2 of 4), seed 1 | 2 / 2 |" in page  # another draw is not merged with seed 0's
    assert (tmp_path / "page" / "sep.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "page" / "sep_scatter.png").stat().st_size > 1000
    assert (tmp_path / "page" / "sep_iterations.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, SCRIPT, str(tmp_path / "nothing")], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "no finished FedREDefense run" in bad.stderr


def test_budget_is_factor_times_slowest_benign_first_participation_rounded_up(tmp_path):
    ps = sep.participations(_run_dir(tmp_path / "r", [ROUND1, ROUND2]))
    # benign first participations reached gamma at 20 and 40 (later ones and malicious ignored)
    assert sep.budget(ps) == 120
    assert sep.budget(ps, factor=2.6, multiple=25) == 125
    assert sep.over_budget(ps, 30).tolist() == [False, True, True, True, False, False, False]
    assert sep.over_budget(ps, 40).tolist() == [False, False, True, True, False, False, False]
    with pytest.raises(ValueError, match="never reached gamma"):
        sep.budget([p._replace(malicious=False) for p in ps])
    with pytest.raises(ValueError, match="no benign first participation"):
        sep.budget([p for p in ps if p.malicious])


CALIBRATE = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "calibrate_rule.py")
COMPARE = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "compare_rules.py")


def test_loss_bound_is_the_largest_benign_loss_plus_margin(tmp_path):
    ps = sep.participations(_run_dir(tmp_path / "r", [ROUND1, ROUND2]))
    # loss after 25: benign 0.55 (reached gamma at 20: its error) and 0.7; malicious 0.9 ignored
    assert sep.loss_bound(ps, at=25, margin=0.05) == pytest.approx(0.75)
    assert sep.over_loss(ps, 25, 0.75).tolist() == [False, False, True, True, False, False, False]
    assert sep.over_loss(ps, 25, 0.65).tolist() == [False, True, True, True, False, False, False]
    with pytest.raises(ValueError, match="no benign participation with a loss after 50"):
        sep.loss_bound([p for p in ps if p.round == 2], at=50)


@pytest.mark.slow
def test_calibrate_rule_script_calibrates_and_checks(tmp_path):
    d = _run_dir(tmp_path / "r", [ROUND1, ROUND2])
    run = lambda *args: subprocess.run([sys.executable, CALIBRATE, *args], capture_output=True, text=True,  # noqa: E731
                                       timeout=60)
    out = run(d)
    assert out.returncode == 0, out.stderr
    assert f"| {d} | scaling | 2 | 30 / 40 | 0.590 |" in out.stdout and "--first_cap=120" in out.stdout
    # client 1 (benign, 40 iterations) is over the budget 30: exit code 1; the paper's rule flags
    # malicious client 2 (0.61) and the invalid client 3
    check = run("--threshold=30", d)
    assert check.returncode == 1 and f"| {d} | scaling | 2 | 30 / 40 | 0.590 | 1 / 2 | 2 / 2 | 0 / 2 | 2 / 2 |" \
        in check.stdout
    loss = run("--rule=loss", "--at=25", "--margin=0.05", d)
    assert loss.returncode == 0 and "--redefense_reject_at=25 --redefense_reject_above=0.7500" in loss.stdout
    judged = run("--rule=loss", "--at=25", "--threshold=0.8", d)  # every participation is judged
    assert judged.returncode == 0 and "| 0 / 4 | 2 / 3 | 0 / 4 | 2 / 3 |" in judged.stdout
    bad = run(str(tmp_path / "nothing"))
    assert bad.returncode != 0 and "nothing is not a finished run directory" in bad.stderr
    assert "the recorded losses are after" in run("--rule=loss", "--at=30", d).stderr


@pytest.mark.slow
def test_compare_rules_script_puts_rules_side_by_side(tmp_path):
    for rule, flagged in (("a", [2, 3]), ("b", [3])):
        d = _run_dir(tmp_path / rule / "scaling", [dict(ROUND1, flagged=flagged, detection_s=12.0, test_acc=0.5)])
        with open(os.path.join(d, "summary.json"), "w") as f:
            json.dump({"status": "done", "detection": {"dacc": 1.0 if rule == "a" else 0.75, "fpr": 0.0,
                                                       "fnr": 0.0 if rule == "a" else 0.5, "aar": 0}}, f)
    # without attack every client is benign: expelling client 0 of 4 is a false positive
    d = _run_dir(tmp_path / "a" / "none", [dict(ROUND1, flagged=[0], detection_s=3.0)], attack="none")
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump({"status": "done", "expelled": [0], "detection": {"dacc": 0.25, "fpr": 0.5, "fnr": 1.0}}, f)
    out = tmp_path / "page"
    res = subprocess.run([sys.executable, COMPARE, f"--out={out}", f"rule a={tmp_path / 'a'}",
                          f"rule b={tmp_path / 'b'}"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "page.md").read_text()
    assert "| Scaling | rule a | " in page and "| 100.0 / 0.0 / 0.0 / 0 | 2 / 2, 0 | 50.00 | 12 |" in page
    assert "| 75.0 / 0.0 / 50.0 / 0 | 1 / 2, 0 |" in page
    assert "| No attack | rule a | " in page and "| 75.0 / 25.0 / - / - | 0 / 0, 1 | - | 3 |" in page
    assert "| No attack | rule b | - | - | - | - | - |" in page
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([sys.executable, COMPARE, "rule a"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "is not LABEL=DIR" in bad.stderr
