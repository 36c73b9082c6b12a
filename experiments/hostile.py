"""Table of what each defense does with each kind of hostile update (NaN, +-Inf, 1e30, zeros,
a copy of a benign update): malicious participations flagged (and expelled) or excluded
from the aggregate (weight 0) or aggregated, whether the global model stayed finite, and
the test accuracy after the rounds.

    python experiments/hostile.py --data_dir=../shared/data/fashion_mnist --rounds=3

Every malicious participant sends the hostile row every round (attacks ``hostile_*``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import app, flags

from fedredefense_jax import attacks, defenses, runner, simulation, training

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Fashion-MNIST IDX directory.")
flags.DEFINE_integer("num_clients", 100, "Clients.")
flags.DEFINE_integer("num_malicious", 28, "Malicious clients.")
flags.DEFINE_float("participation_rate", 0.1, "Fraction of clients per round.")
flags.DEFINE_integer("rounds", 3, "Rounds per (defense, kind).")
flags.DEFINE_list("defenses", None, "Defenses (unset: all registered).")
flags.DEFINE_list("kinds", ["hostile_nan", "hostile_inf", "hostile_neg_inf", "hostile_huge", "hostile_zero",
                            "hostile_copy"], "Hostile attacks.")


def main(argv):
    del argv
    rows = []
    for defense in FLAGS.defenses or sorted(defenses.names()):
        cfg = runner.ExperimentConfig(data_dir=FLAGS.data_dir, num_clients=FLAGS.num_clients,
                                      num_malicious=FLAGS.num_malicious, defense=defense,
                                      participation_rate=FLAGS.participation_rate)
        setup = runner.build(cfg)
        fed = setup.federation
        ctx = attacks.AttackContext(cfg.num_clients, cfg.num_malicious, fed.init_params, defense, {})
        for kind in FLAGS.kinds:
            f = dataclasses.replace(fed, attack=attacks.make(kind, ctx))
            state = simulation.init_state(f)
            mal = flagged = excluded = 0
            finite = True
            try:
                for _ in range(FLAGS.rounds):
                    state, rec = simulation.step(f, state)
                    mal += len(rec["malicious"])
                    flagged += len(set(rec["flagged"]) & set(rec["malicious"]))
                    aggregated = dict(zip(rec["participants"], rec["aggregated"]))
                    excluded += sum(not aggregated[c] for c in rec["malicious"])
                    finite &= rec["global_finite"]
                acc = training.accuracy(setup.predict, state.params, setup.dataset.test_x, setup.dataset.test_y)
                outcome = (f"flagged and expelled {flagged}/{mal}" if flagged else
                           f"excluded (weight 0) {excluded}/{mal}" if excluded else "aggregated") + \
                          (", model finite" if finite else ", MODEL NOT FINITE")
            except Exception as e:  # noqa: BLE001  the table reports any failure
                acc, outcome = float("nan"), f"error: {type(e).__name__}: {str(e)[:80]}"
            rows.append((defense, kind, outcome, acc))
            print(f"| {defense} | {kind} | {outcome} | {acc:.4f} |", flush=True)
    print("\n| defense | hostile update | outcome | test accuracy |\n| --- | --- | --- | --- |")
    for d, k, o, a in rows:
        print(f"| {d} | {k} | {o} | {a:.4f} |")


if __name__ == "__main__":
    app.run(main)
