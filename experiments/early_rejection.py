"""Early rejection of FedREDefense reconstructions: the bound from recorded trajectories, then
the same run with and without it, its decisions compared record by record and the ratio of
the detection seconds printed.

    python experiments/early_rejection.py --data_dir=../shared/data/fashion_mnist --num_clients=100 \
        --num_malicious=28 --attack=fang --defense=fedredefense --rounds=1 --output_dir=runs/early_fang_100 \
        --calibrate=runs/early_fang_30/baseline --reject_at=50

The bound (``redefense_reject_above``) is chosen on the runs of ``--calibrate`` (their
``rounds.jsonl``): the largest loss after ``--reject_at`` outer iterations of any participation
that went on to reach gamma, plus ``--margin``; the calibration's participations that never
reached gamma and would be rejected by it are counted. Without ``--calibrate`` the given
``--redefense_reject_above`` is used. Then ``OUTPUT_DIR/baseline`` (the paper's rule, no early
rejection) and ``OUTPUT_DIR/early`` run (each resumes when already there); the script prints
every round's flagged clients, whether they are equal, and the detection seconds of both.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import flags, logging

from fedredefense_jax import cli, records, runner
from fedredefense_jax.defenses import redefense

FLAGS = cli.FLAGS
flags.DEFINE_list("calibrate", [], "Run directories whose FedREDefense trajectories choose the bound.")
flags.DEFINE_float("margin", 0.02, "Added to the largest loss at --reject_at of the calibration's "
                   "reconstructions that reached gamma.")
flags.DEFINE_integer("reject_at", 50, "Outer iterations after which a reconstruction is judged (one of "
                     f"{', '.join(map(str, redefense.BUDGETS))} to calibrate).", lower_bound=1)


def calibrate(run_dirs: list[str], reject_at: int, margin: float, gamma: float) -> dict:
    """:func:`redefense.rejection_bound` over the records of ``run_dirs``."""
    return redefense.rejection_bound([r for d in run_dirs for r in records.read_rounds(d)], reject_at, margin,
                                     gamma)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    base = cli.experiment_config()
    if base.defense != "fedredefense":
        print("error: --defense: early rejection is FedREDefense's (--defense=fedredefense)", file=sys.stderr)
        return 2
    settings = dict(base.defense_config)
    gamma = redefense.make_config(base.dataset, settings).gamma
    if FLAGS.calibrate:
        if FLAGS.reject_at not in redefense.BUDGETS:
            print(f"error: --reject_at: trajectories are recorded at {redefense.BUDGETS}", file=sys.stderr)
            return 2
        try:
            cal = calibrate(FLAGS.calibrate, FLAGS.reject_at, FLAGS.margin, gamma)
        except (OSError, ValueError) as e:
            print(f"error: --calibrate: {e}", file=sys.stderr)
            return 2
        print(f"calibration ({', '.join(FLAGS.calibrate)}): the {cal['reached']} reconstructions that reached "
              f"gamma had a loss of at most {cal['reached_max']:.4f} after {FLAGS.reject_at} iterations; bound "
              f"{cal['bound']:.4f}; the {cal['unreached']} that never did had at least {cal['unreached_min']}, "
              f"{cal['unreached_rejected']} of them above the bound")
        settings["redefense_reject_above"] = round(cal["bound"], 4)
    elif settings.get("redefense_reject_above") is None:
        print("error: --redefense_reject_above: give the bound or --calibrate", file=sys.stderr)
        return 2
    settings["redefense_reject_at"] = FLAGS.reject_at
    plain = {k: v for k, v in base.defense_config.items() if not k.startswith("redefense_reject")}
    runs = {"baseline": dataclasses.replace(base, defense_config=plain,
                                            output_dir=os.path.join(base.output_dir, "baseline")),
            "early": dataclasses.replace(base, defense_config=settings,
                                         output_dir=os.path.join(base.output_dir, "early"))}
    for cfg in runs.values():
        runner.run(cfg)
    a, b = (records.read_rounds(runs[n].output_dir) for n in ("baseline", "early"))
    equal = True
    print("\n| round | flagged (baseline) | flagged (early rejection) | equal | detection s baseline | early | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for ra, rb in zip(a, b):
        same = ra["flagged"] == rb["flagged"] and ra["aggregated"] == rb["aggregated"]
        equal &= same
        ratio = ra["detection_s"] / max(rb["detection_s"], 1e-9)
        print(f"| {ra['round']} | {len(ra['flagged'])} | {len(rb['flagged'])} | {'yes' if same else 'NO'} | "
              f"{ra['detection_s']:.1f} | {rb['detection_s']:.1f} | {ratio:.2f}x |")
    its_a = sum(sum(r["iterations"]) for r in a)
    its_b = sum(sum(r["iterations"]) for r in b)
    print(f"\ndecisions {'equal' if equal else 'DIFFER'} in {len(a)} round(s); outer iterations {its_a} -> {its_b}")
    return 0 if equal else 1


if __name__ == "__main__":
    cli.run(main)
