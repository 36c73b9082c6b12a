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
AAR) or filters per round (ADACC / AFPR / AFNR).
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import time

from absl import app, flags, logging

from fedredefense_jax import attacks as attacks_lib
from fedredefense_jax import cli, records, runner
from fedredefense_jax import defenses as defenses_lib
from fedredefense_jax.config import ConfigError, takers, validate

FLAGS = cli.FLAGS
flags.DEFINE_string("root", "runs/grid", "Directory of the grid: one sub-directory per cell, table.md, table.json.")
flags.DEFINE_list("defenses", ["fedavg"], "Defenses (rows of the table are attacks, columns defenses).")
flags.DEFINE_list("attacks", ["none"], "Attacks.")
flags.DEFINE_list("cells", [], "Only these defense:attack cells (instead of defenses x attacks).")
flags.DEFINE_bool("table_only", False, "Only rewrite the table from the finished cells.")
cli.set_defaults(num_clients=30, num_malicious=8, rounds=20)
# Set per cell from --cells / --attacks / --defenses / --root.
_PER_CELL = ("attack", "defense", "output_dir")

# The paper's Table 2, Fashion-MNIST (TACC %, or TACC/ASR %).
PAPER_TABLE2_FMNIST = {
    "none": {"fedavg": "85.94", "krum": "60.45", "median": "82.20", "trimmed_mean": "85.98",
             "norm_bound": "85.37", "flame": "81.73", "fltrust": "86.97", "fldetector": "86.03",
             "flcert": "81.79", "fedredefense": "86.04"},
    "fang": {"fedavg": "28.18", "krum": "39.63", "median": "35.67", "trimmed_mean": "68.41",
             "norm_bound": "70.86", "flame": "82.43", "fltrust": "84.06", "fldetector": "84.62",
             "flcert": "75.87", "fedredefense": "85.54"},
    "min_max": {"fedavg": "76.85", "krum": "49.09", "median": "72.10", "trimmed_mean": "72.44",
                "norm_bound": "77.96", "flame": "82.05", "fltrust": "82.10", "fldetector": "76.69",
                "flcert": "78.89", "fedredefense": "85.61"},
    "min_sum": {"fedavg": "84.12", "krum": "53.47", "median": "76.16", "trimmed_mean": "78.70",
                "norm_bound": "83.76", "flame": "79.08", "fltrust": "80.66", "fldetector": "84.08",
                "flcert": "79.75", "fedredefense": "85.68"},
    "mpaf": {"fedavg": "20.46", "krum": "10.22", "median": "76.73", "trimmed_mean": "75.39",
             "norm_bound": "20.26", "flame": "82.44", "fltrust": "79.95", "fldetector": "10.00",
             "flcert": "79.15", "fedredefense": "85.61"},
    "dba": {"fedavg": "85.86/98.33", "krum": "65.44/7.93", "median": "82.48/5.69",
            "trimmed_mean": "83.37/9.24", "norm_bound": "84.11/69.11", "flame": "82.30/4.57",
            "fltrust": "76.27/98.11", "fldetector": "85.96/2.54", "flcert": "82.49/25.42",
            "fedredefense": "85.54/2.43"},
    "scaling": {"fedavg": "87.45/98.42", "krum": "65.41/6.56", "median": "82.54/78.04",
                "trimmed_mean": "84.39/87.46", "norm_bound": "85.11/88.86", "flame": "82.03/4.97",
                "fltrust": "82.16/97.66", "fldetector": "86.07/8.53", "flcert": "82.86/82.00",
                "fedredefense": "85.66/2.50"},
    # Table 3 (FedREDefense + FedAvg after filtering)
    "label_flip": {"fedredefense": "72.99"},
    "targeted_label_flip": {"fedredefense": "85.62/7.00"},
    "adaptive_label_flip": {"fedredefense": "71.57"},
    "adaptive_targeted_label_flip": {"fedredefense": "81.24/6.10"},
}

LABELLING = ("fedredefense", "fldetector")  # defenses that expel clients: DACC/FPR/FNR/AAR
FILTERING = ("flame", "fltrust")  # per-round filters: ADACC/AFPR/AFNR (Table 8)


def cells() -> list[tuple[str, str]]:
    if FLAGS.cells:
        out = []
        for c in FLAGS.cells:
            if c.count(":") != 1:
                raise ConfigError("cells", f"{c!r} is not defense:attack")
            out.append(tuple(c.split(":")))
        return out
    return [(d, a) for a in FLAGS.attacks for d in FLAGS.defenses]


def cell_dir(defense: str, attack: str) -> str:
    return os.path.join(FLAGS.root, f"{defense}__{attack}")


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def cell_text(s: dict) -> str:
    t = pct(s.get("test_acc"))
    return t + (f"/{pct(s['asr'])}" if s.get("asr") is not None else "")


def excluded_share(path: str) -> float | None:
    """Fraction of all participations that got aggregation weight 0 (filtered out)."""
    kept = total = 0
    try:
        for rec in records.read_rounds(path):
            agg = rec.get("aggregated", [x > 0 for x in rec["weights"]])
            total += len(agg)
            kept += sum(agg)
    except (OSError, KeyError):
        return None
    return (total - kept) / total if total else None


def write_table(root: str) -> dict:
    """Reads every finished cell under ``root``; writes table.md / table.json; returns the
    table as ``{attack: {defense: summary-extract}}``."""
    table: dict = {}
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if "__" not in name:
            continue
        s = records.finished(os.path.join(root, name))
        if s is None:
            continue
        defense, attack = name.split("__", 1)
        det = s.get("detection", {})
        table.setdefault(attack, {})[defense] = {
            "tacc": s.get("test_acc"), "asr": s.get("asr"), "wall_s": s.get("wall_s"),
            "rounds": s.get("rounds_done"), "expelled": len(s.get("expelled", [])),
            "clients": s.get("config", {}).get("num_clients"), "text": cell_text(s),
            "excluded": excluded_share(os.path.join(root, name)),
            **{k: det.get(k) for k in ("dacc", "fpr", "fnr", "aar", "adacc", "afpr", "afnr")}}
    defenses = sorted({d for row in table.values() for d in row},
                      key=lambda d: list(PAPER_TABLE2_FMNIST["none"]).index(d)
                      if d in PAPER_TABLE2_FMNIST["none"] else 99)
    order = list(PAPER_TABLE2_FMNIST) + sorted(set(table) - set(PAPER_TABLE2_FMNIST))
    attacks = [a for a in order if a in table]
    lines = ["TACC % (/ASR %) from these runs; in brackets the paper's Table 2/3 Fashion-MNIST value.", "",
             "| attack | " + " | ".join(defenses) + " |", "|" + " --- |" * (len(defenses) + 1)]
    for a in attacks:
        row = []
        for d in defenses:
            c = table[a].get(d)
            paper = PAPER_TABLE2_FMNIST.get(a, {}).get(d)
            txt = c["text"] if c else "."
            row.append(txt + (f" [{paper}]" if paper else ""))
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    det_lines = []
    for a in attacks:
        for d in defenses:
            c = table[a].get(d)
            if c and a == "none" and d in LABELLING + FILTERING:
                # no attacker: the q "malicious" ids are honest, every exclusion is a false positive
                det_lines.append(f"| none | {d} | expelled {c['expelled']} of {c['clients']} (all honest) "
                                 f"| filtered out: {pct(c['excluded'])} % of participations | | |")
                continue
            if c and d in LABELLING:
                det_lines.append(f"| {a} | {d} | DACC {pct(c['dacc'])} | FPR {pct(c['fpr'])} | FNR {pct(c['fnr'])} "
                                 f"| AAR {c['aar'] if c['aar'] is None else round(c['aar'], 2)} |")
            if c and d in FILTERING:
                aar = c["aar"] if c["aar"] is None else round(c["aar"], 2)
                det_lines.append(f"| {a} | {d} | ADACC {pct(c['adacc'])} | AFPR {pct(c['afpr'])} "
                                 f"| AFNR {pct(c['afnr'])} | AAR {aar} |")
    if det_lines:
        lines += ["", "| attack | defense | detection | | | |", "| --- | --- | --- | --- | --- | --- |", *det_lines]
    walls = [c["wall_s"] for row in table.values() for c in row.values() if c.get("wall_s")]
    lines += ["", f"{sum(len(r) for r in table.values())} cells, {sum(walls) / 60:.0f} min of runs in all."]
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "table.json"), "w") as f:
        json.dump(table, f, indent=1)
    return table


def cell_configs(todo: list[tuple[str, str]]) -> list:
    """One ExperimentConfig per cell: the shared flags, and of the attack / defense
    settings given those its plug-in takes; ConfigError for a setting no cell takes."""
    for name in _PER_CELL:
        if FLAGS[name].present:
            raise ConfigError(name, "set per cell by --cells / --attacks / --defenses and --root")
    given = {kind: cli.plugin_config(kind) for kind in ("attack", "defense")}
    for kind, registry, used in (("attack", attacks_lib, {a for _, a in todo}),
                                 ("defense", defenses_lib, {d for d, _ in todo})):
        known = {n for u in used for n in _fields(registry, u)}
        for key in given[kind]:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
                others = takers(registry, key)
                raise ConfigError(key, f"no {kind} of the grid ({', '.join(sorted(used))}) takes it" +
                                  (f"; did you mean {close[0]}?" if close else "") +
                                  (f" (it is one of {', '.join(others)})" if others else ""))
    configs = []
    for defense, attack in todo:
        own = {kind: {k: v for k, v in given[kind].items() if k in _fields(registry, name)}
               for kind, registry, name in (("attack", attacks_lib, attack), ("defense", defenses_lib, defense))}
        try:
            cfg = cli.experiment_config(attack=attack, defense=defense, output_dir=cell_dir(defense, attack),
                                        attack_config=own["attack"], defense_config=own["defense"])
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(e.flag, f"{e.message} (cell {defense}:{attack})") from None
        configs.append(cfg)
    return configs


def _fields(registry, name: str) -> dict:
    return registry.settings(name).fields() if name in registry.names() else {}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.INFO)
    if FLAGS.table_only:
        print(open(os.path.join(FLAGS.root, "table.md")).read() if write_table(FLAGS.root) else "no finished cell")
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
        logging.info("cell %s:%s done in %.0f s: %s", cfg.defense, cfg.attack, time.time() - t0, cell_text(s))
        write_table(FLAGS.root)
    write_table(FLAGS.root)
    print(open(os.path.join(FLAGS.root, "table.md")).read())
    return 0


if __name__ == "__main__":
    cli.run(main)
