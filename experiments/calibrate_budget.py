"""The budget rule's budget for a setting, from recorded FedREDefense runs; or a check of a budget.

    python experiments/calibrate_budget.py runs/sep/none_30                      # B from benign runs
    python experiments/calibrate_budget.py --budget=150 'runs/budget100/*'      # who B flags

The budget rule flags a client whose reconstruction has not reached gamma after B outer
iterations at its first participation; it runs as ``--first_cap=B`` (see
``fedredefense_jax.separability.budget``). Calibrate on runs of the setting the budget is for
(dataset, model, images per client, local epochs, beta), then check on other runs: one line
per run with its benign first participations' iterations to gamma (median / max), and, with
``--budget``, the first participations the rule flags (benign: false positives; malicious) and
the slowest benign client's headroom. Without ``--budget`` the last line is the budget from all
the runs given; the exit code is 1 when a checked budget flags a benign client.
"""

from __future__ import annotations

import glob
import os

import numpy as np
from absl import app, flags

from fedredefense_jax import records
from fedredefense_jax import separability as sep

flags.DEFINE_integer("budget", None, "Check this budget instead of calibrating one.", lower_bound=1)
flags.DEFINE_float("factor", 3.0, "Calibration: the budget is this many times the slowest benign first "
                   "participation's iterations.", lower_bound=1.0)
flags.DEFINE_integer("multiple", 10, "Calibration: the budget is rounded up to a multiple of this.", lower_bound=1)
FLAGS = flags.FLAGS


def run_dirs(patterns: list[str]) -> list[str]:
    """Finished run directories matching ``patterns`` (sorted); SystemExit naming the first that is not one."""
    dirs = sorted({d for p in patterns for d in (glob.glob(p) or [p])})
    for d in dirs:
        if records.finished(d) is None:
            raise SystemExit(f"calibrate_budget: {d} is not a finished run directory (no summary.json, status done)")
    return dirs


def line(run_dir: str, parts: list[sep.Participation], budget: int | None) -> tuple[str, int]:
    """One table row for ``run_dir`` and the number of benign first participations ``budget`` flags."""
    first = [p for p in parts if p.first and not p.invalid]
    ben = [p for p in first if not p.malicious]
    its = [p.iterations for p in ben if p.iterations is not None]
    never = len(ben) - len(its)
    spread = f"{np.median(its):g} / {max(its):g}" if its else "-"
    cells = [run_dir, parts[0].attack if parts else "-", str(len(ben)),
             spread + (f" ({never} never)" if never else "")]
    fp = 0
    if budget is not None:
        flagged = sep.over_budget(parts, budget)
        fp = sum(f for f, p in zip(flagged, parts) if p.first and not p.malicious)
        mal = [f for f, p in zip(flagged, parts) if p.first and p.malicious]
        head = f"{budget / max(its):.1f}x" if its else "-"
        cells += [f"{fp} / {len(ben)}", f"{sum(mal)} / {len(mal)}" if mal else "-", head]
    return "| " + " | ".join(cells) + " |", int(fp)


def main(argv):
    if len(argv) < 2:
        raise SystemExit("calibrate_budget: give run directories (or globs) of FedREDefense runs")
    dirs = run_dirs(argv[1:])
    head = ["run", "attack", "benign first participations", "iterations to gamma, median / max"]
    if FLAGS.budget is not None:
        head += [f"benign flagged by B = {FLAGS.budget}", "malicious flagged", "B / slowest benign"]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    pooled, fps = [], 0
    for d in dirs:
        try:
            parts = sep.participations(d)
        except ValueError as e:
            raise SystemExit(f"calibrate_budget: {e}") from None
        row, fp = line(os.path.normpath(d), parts, FLAGS.budget)
        print(row)
        pooled += parts
        fps += fp
    if FLAGS.budget is not None:
        return 1 if fps else 0
    try:
        b = sep.budget(pooled, FLAGS.factor, FLAGS.multiple)
    except ValueError as e:
        raise SystemExit(f"calibrate_budget: {e}") from None
    print(f"\nbudget: --first_cap={b} ({FLAGS.factor:g} x the slowest benign first participation, "
          f"rounded up to a multiple of {FLAGS.multiple})")
    return 0


if __name__ == "__main__":
    app.run(main)
