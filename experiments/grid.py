"""A grid of (defense, attack) runs with one set of federation settings, and its table.

    python experiments/grid.py --data_dir=../shared/data/fashion_mnist --num_clients=30 \
        --num_malicious=8 --train_subset=18000 --rounds=20 --root=runs/grid \
        --defenses=fedavg,median --attacks=none,fang,mpaf

Every experiment flag of ``experiments/run.py`` (``fedredefense_jax/cli.py``) applies to every
cell; an attack or defense setting applies to the cells whose plug-in takes it (and must be
taken by one of them). Every cell has the same ``num_malicious`` (the ``q`` that Krum and
Trimmed Mean are told); under ``--attacks=none`` those ``q`` clients are honest. Every cell
is an ordinary run of :func:`fedredefense_jax.runner.run` in ``ROOT/DEFENSE__ATTACK``
(checkpointed each round, so a stopped grid resumes where it stopped: rerun the same
command; finished cells are skipped, or extended from their last round when ``--rounds`` is
larger). ``--cells=defense:attack,...`` runs only those cells instead of the cross product.
After each cell, ``ROOT/table.md`` and ``ROOT/table.json`` are rewritten from every finished
cell: TACC (%) [/ ASR (%)] per cell, the paper's Table 2 Fashion-MNIST values beside them,
and the detection metrics of the cells whose defense labels clients (DACC / FPR / FNR /
AAR) or filters per round (ADACC / AFPR / AFNR). Cell directories, the settings each cell
takes and the table: ``fedredefense_jax/grid.py``.
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, flags, logging

from fedredefense_jax import cli, grid, records, runner
from fedredefense_jax.config import ConfigError, validate

FLAGS = cli.FLAGS
flags.DEFINE_string("root", "runs/grid", "Directory of the grid: one sub-directory per cell, table.md, table.json.")
flags.DEFINE_list("defenses", ["fedavg"], "Defenses (rows of the table are attacks, columns defenses).")
flags.DEFINE_list("attacks", ["none"], "Attacks.")
flags.DEFINE_list("cells", [], "Only these defense:attack cells (instead of defenses x attacks).")
flags.DEFINE_bool("table_only", False, "Only rewrite the table from the finished cells.")
cli.set_defaults(num_clients=30, num_malicious=8, rounds=20)
# Set per cell from --cells / --attacks / --defenses / --root.
_PER_CELL = ("attack", "defense", "output_dir")


def cells() -> list[tuple[str, str]]:
    if FLAGS.cells:
        out = []
        for c in FLAGS.cells:
            if c.count(":") != 1:
                raise ConfigError("cells", f"{c!r} is not defense:attack")
            out.append(tuple(c.split(":")))
        return out
    return [(d, a) for a in FLAGS.attacks for d in FLAGS.defenses]


def cell_configs(todo: list[tuple[str, str]]) -> list:
    """One ExperimentConfig per cell: the shared flags, and of the attack / defense
    settings given those its plug-in takes; ConfigError for a setting no cell takes."""
    for name in _PER_CELL:
        if FLAGS[name].present:
            raise ConfigError(name, "set per cell by --cells / --attacks / --defenses and --root")
    given = {kind: cli.plugin_config(kind) for kind in ("attack", "defense")}
    grid.check_taken(given, todo)
    configs = []
    for defense, attack in todo:
        try:
            cfg = cli.experiment_config(attack=attack, defense=defense,
                                        output_dir=grid.cell_dir(FLAGS.root, defense, attack),
                                        attack_config=grid.settings_taken("attack", attack, given["attack"]),
                                        defense_config=grid.settings_taken("defense", defense, given["defense"]))
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(e.flag, f"{e.message} (cell {defense}:{attack})") from None
        configs.append(cfg)
    return configs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    if FLAGS.table_only:
        print(open(os.path.join(FLAGS.root, "table.md")).read() if grid.write_table(FLAGS.root) else "no finished cell")
        return 0
    try:
        configs = cell_configs(cells())
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, cfg in enumerate(configs, 1):
        done = records.finished(cfg.output_dir)
        if done and done.get("rounds_done", 0) >= cfg.rounds:
            continue  # a cell finished with fewer rounds is extended from its last checkpoint
        t0 = time.time()
        logging.info("cell %d/%d: %s under %s", i, len(configs), cfg.attack, cfg.defense)
        try:
            s = runner.run(cfg, progress=cfg.eval_every)
        except ConfigError as e:
            print(f"error: cell {cfg.defense}:{cfg.attack}: {e}", file=sys.stderr)
            return 2
        except (runner.Stopped, KeyboardInterrupt) as e:
            # The table was rewritten after the last finished cell; the stopped cell resumes from its checkpoint.
            why = str(e) if isinstance(e, runner.Stopped) else "interrupted; rerun the same command to resume"
            print(f"cell {cfg.defense}:{cfg.attack}: {why} ({cfg.output_dir}); finished cells are skipped on rerun",
                  file=sys.stderr)
            return 130
        logging.info("cell %s:%s done in %.0f s: %s", cfg.defense, cfg.attack, time.time() - t0, grid.cell_text(s))
        grid.write_table(FLAGS.root)
    grid.write_table(FLAGS.root)
    print(open(os.path.join(FLAGS.root, "table.md")).read())
    return 0


if __name__ == "__main__":
    cli.run(main)
