"""A trajectory rule's threshold for a setting, from recorded FedREDefense runs; or a check of one.

    python experiments/calibrate_rule.py runs/sep/none_30                          # budget B from benign runs
    python experiments/calibrate_rule.py --threshold=150 'runs/budget100/*'        # whom B flags
    python experiments/calibrate_rule.py --rule=loss runs/budget_check/paper_cap800  # loss bound L after 50
    python experiments/calibrate_rule.py --rule=loss --threshold=0.75 runs/x       # whom L flags

Two rules beyond the paper's (``fedredefense_jax/separability.py``), both per client from its
own reconstruction:

* ``budget``: flag a first participation not reconstructed to gamma within B outer iterations;
  runs as ``--first_cap=B``. Calibrated as B = ``--factor`` x the slowest benign first
  participation, rounded up to a multiple of ``--multiple``.
* ``loss``: flag a reconstruction whose loss after ``--at`` iterations is above L; runs as
  ``--redefense_reject_at=AT --redefense_reject_above=L``. Calibrated as L = the largest benign
  loss after ``--at`` iterations + ``--margin``.

Calibrate on runs of the setting the threshold is for (dataset, model, images per client, local
epochs, beta), then check it on other runs. One line per run: its benign first participations'
iterations to gamma (median / max) and largest loss after ``--at``; with ``--threshold``, the
participations the rule flags (benign: false positives; malicious) and the paper's rule's flags.
Without ``--threshold`` the last line is the threshold from all the runs given; with it the exit
code is 1 when the rule flags a benign participation.
"""

from __future__ import annotations

import glob
import os

import numpy as np
from absl import app, flags

from fedredefense_jax import records
from fedredefense_jax import separability as sep

flags.DEFINE_enum("rule", "budget", ["budget", "loss"], "The rule: budget (iterations to gamma at the first "
                  "participation) or loss (the loss after --at iterations).")
flags.DEFINE_float("threshold", None, "Check this B (budget) or L (loss) instead of calibrating one.", lower_bound=0)
flags.DEFINE_float("factor", 3.0, "budget: B is this many times the slowest benign first participation.",
                   lower_bound=1.0)
flags.DEFINE_integer("multiple", 10, "budget: B is rounded up to a multiple of this.", lower_bound=1)
flags.DEFINE_integer("at", 50, "loss: outer iterations after which the loss is judged.", lower_bound=1)
flags.DEFINE_float("margin", 0.06, "loss: L is the largest benign loss after --at iterations plus this.",
                   lower_bound=0)
flags.DEFINE_float("gamma", 0.6, "The paper's rule's threshold (error > gamma).", lower_bound=0)
FLAGS = flags.FLAGS


def run_dirs(patterns: list[str]) -> list[str]:
    """Finished run directories matching ``patterns`` (sorted); SystemExit naming the first that is not one."""
    dirs = sorted({d for p in patterns for d in (glob.glob(p) or [p])})
    for d in dirs:
        if records.finished(d) is None:
            raise SystemExit(f"calibrate_rule: {d} is not a finished run directory (no summary.json, status done)")
    return dirs


def flagged_by_rule(parts: list[sep.Participation], threshold: float) -> np.ndarray:
    """``[len(parts)]`` bool: what ``--rule`` with ``threshold`` flags."""
    if FLAGS.rule == "budget":
        return sep.over_budget(parts, int(threshold))
    return sep.over_loss(parts, FLAGS.at, threshold)


def line(run_dir: str, parts: list[sep.Participation]) -> tuple[str, int]:
    """One table row for ``run_dir`` and the number of benign participations the rule flags."""
    first_benign = [p for p in parts if p.first and not p.malicious and not p.invalid]
    its = [p.iterations for p in first_benign if p.iterations is not None]
    never = len(first_benign) - len(its)
    spread = f"{np.median(its):g} / {max(its):g}" if its else "-"
    loss = sep.scores([p for p in parts if not p.malicious and not p.invalid], f"loss@{FLAGS.at}")
    cells = [run_dir, parts[0].attack if parts else "-", str(len(first_benign)),
             spread + (f" ({never} never)" if never else ""),
             f"{np.nanmax(loss):.3f}" if np.isfinite(loss).any() else "-"]
    fp = 0
    if FLAGS.threshold is not None:
        # the budget rule judges first participations only; the loss rule every participation
        judged = [p.first or FLAGS.rule == "loss" for p in parts]
        rule = flagged_by_rule(parts, FLAGS.threshold)
        paper = [p.invalid or p.error > FLAGS.gamma for p in parts]
        ben = [i for i, p in enumerate(parts) if judged[i] and not p.malicious]
        mal = [i for i, p in enumerate(parts) if judged[i] and p.malicious]
        fp = int(sum(rule[i] for i in ben))
        count = lambda idx, f: f"{sum(bool(f[i]) for i in idx)} / {len(idx)}" if idx else "-"  # noqa: E731
        cells += [count(ben, rule), count(mal, rule), count(ben, paper), count(mal, paper)]
    return "| " + " | ".join(cells) + " |", fp


def main(argv):
    if len(argv) < 2:
        raise SystemExit("calibrate_rule: give run directories (or globs) of FedREDefense runs")
    if FLAGS.rule == "loss" and FLAGS.at not in sep.BUDGETS:
        raise SystemExit(f"calibrate_rule: --at={FLAGS.at}: the recorded losses are after {sep.BUDGETS} iterations")
    dirs = run_dirs(argv[1:])
    judged = "first participations" if FLAGS.rule == "budget" else "participations"
    head = ["run", "attack", "benign first participations", "iterations to gamma, median / max",
            f"largest benign loss after {FLAGS.at}"]
    if FLAGS.threshold is not None:
        t = f"B = {FLAGS.threshold:g}" if FLAGS.rule == "budget" else f"L = {FLAGS.threshold:g}"
        head += [f"benign {judged} flagged by {t}", f"malicious {judged} flagged by {t}",
                 f"benign {judged} flagged by the paper's rule", f"malicious {judged} flagged by the paper's rule"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    pooled, fps = [], 0
    for d in dirs:
        try:
            parts = sep.participations(d)
        except ValueError as e:
            raise SystemExit(f"calibrate_rule: {e}") from None
        row, fp = line(os.path.normpath(d), parts)
        print(row)
        pooled += parts
        fps += fp
    if FLAGS.threshold is not None:
        return 1 if fps else 0
    try:
        if FLAGS.rule == "budget":
            b = sep.budget(pooled, FLAGS.factor, FLAGS.multiple)
            print(f"\nbudget: --first_cap={b} ({FLAGS.factor:g} x the slowest benign first participation, "
                  f"rounded up to a multiple of {FLAGS.multiple})")
        else:
            L = sep.loss_bound(pooled, FLAGS.at, FLAGS.margin)
            print(f"\nloss bound: --redefense_reject_at={FLAGS.at} --redefense_reject_above={L:.4f} (the largest "
                  f"benign loss after {FLAGS.at} iterations + {FLAGS.margin:g})")
    except ValueError as e:
        raise SystemExit(f"calibrate_rule: {e}") from None
    return 0


if __name__ == "__main__":
    app.run(main)
