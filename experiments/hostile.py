"""Table of what each defense does with each kind of hostile update (NaN, +-Inf, 1e30, zeros,
a copy of a benign update): malicious participations flagged (and expelled) or excluded
from the aggregate (weight 0) or aggregated, whether the global model stayed finite, and
the test accuracy after the rounds.

    python experiments/hostile.py --data_dir=../shared/data/fashion_mnist --rounds=3

Every malicious participant sends the hostile row every round (attacks ``hostile_*``). Takes the
experiment flags of ``experiments/run.py`` (``fedredefense_jax/cli.py``; ``--rounds`` per
defense and kind) plus ``--defenses`` and ``--kinds``.
"""

from __future__ import annotations

import dataclasses

from absl import flags

from fedredefense_jax import attacks, cli, defenses, experiment, simulation, training

FLAGS = cli.FLAGS
flags.DEFINE_list("defenses", None, "Defenses (unset: all registered).")
flags.DEFINE_list("kinds", ["hostile_nan", "hostile_inf", "hostile_neg_inf", "hostile_huge", "hostile_zero",
                            "hostile_copy"], "Hostile attacks.")
cli.set_defaults(participation_rate=0.1, rounds=3)


def main(argv):
    del argv
    rows = []
    for defense in FLAGS.defenses or sorted(defenses.names()):
        takes = defenses.settings(defense).fields()
        cfg = cli.experiment_config(defense=defense, defense_config={
            k: v for k, v in cli.plugin_config("defense").items() if k in takes})
        setup = experiment.build(cfg)
        fed = setup.federation
        ctx = attacks.AttackContext(cfg.num_clients, cfg.num_malicious, fed.init_params, defense, None)
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
    cli.run(main)
