"""The paper's tables and figures as runs ("cells") and pages (``experiments/reproduce.py``).

A *target* (``table1`` ... ``fig5``) at a *scale* (``smoke``, ``small``, ``paper``) is a
:class:`Page`: the cells it needs, each an ordinary :func:`fedredefense_jax.runner.run` of
one configuration in ``ROOT/<scale>/<dataset>/<cell name>``, and how their records become
``<target>.md`` (measured value next to the paper's, cell by cell) and the figures
``<target>.png`` / ``<target>_latency.png``. Targets that need the same configuration share
its directory (Table 1's FedREDefense cells are Table 2's, 8's and 10's), so it runs once.

Cells are found, reused and run by :func:`locate` and :func:`run_missing`:

* a cell is *finished* when its directory's ``summary.json`` says ``"status": "done"`` with
  ``rounds_done`` >= the cell's rounds;
* otherwise a finished run anywhere under the searched roots whose recorded configuration
  equals the cell's (every setting but rounds / eval_every / checkpoint_every / overwrite /
  output_dir, as the runner compares them; data directories compared by their real path)
  stands in for it;
* otherwise the cell runs (or resumes from its checkpoint, or is extended from its last
  round) in its own directory.

A run longer than its cell is read up to the cell's rounds: every value of a page is
computed from the first ``rounds`` records of ``rounds.jsonl`` (test accuracy and ASR of
the last evaluation at or before that round, detection metrics of those rounds).

Everything that builds a configuration or reads a run's files goes through the few
functions of the "Runs" section below (:func:`make_config`, :func:`recorded`,
:func:`comparable_key`, :func:`read_config`, :func:`read_summary`, :func:`read_rounds`,
:func:`finished`, :func:`run_cell`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from collections.abc import Callable, Iterable

import numpy as np

from fedredefense_jax import metrics, paper, runner
from fedredefense_jax.defenses.redefense import TABLE7, RedefenseConfig

TARGETS = ("table1", "table2", "table3", "table8", "table9", "table10", "fig2", "fig3", "fig4", "fig5")
SCALES = ("smoke", "small", "paper")

DEFENSE_NAMES = {"fedavg": "FedAvg", "krum": "Krum", "median": "Median", "trimmed_mean": "Trimmed Mean",
                 "norm_bound": "Norm Bound", "flame": "FLAME", "fltrust": "FLTrust", "fldetector": "FLDetector",
                 "flcert": "FLCert", "fedredefense": "FedREDefense"}
ATTACK_NAMES = {"none": "No attack", "fang": "Fang", "lie": "LIE", "min_max": "Min-Max", "min_sum": "Min-Sum",
                "mpaf": "MPAF", "dba": "DBA", "scaling": "Scaling", "label_flip": "Label Flip",
                "targeted_label_flip": "Targeted Label Flip", "adaptive_label_flip": "Adaptive Label Flip",
                "adaptive_targeted_label_flip": "Adaptive Targeted Label Flip"}
#: Attacks whose runs record an attack success rate (TACC / ASR cells).
TARGETED = ("dba", "scaling", "targeted_label_flip", "adaptive_targeted_label_flip")
VARIANT_NAMES = {"continuous": "Continuous", "intermittent": "Intermittent", "dynamic": "Dynamic"}
#: One colour per defense in every figure (matplotlib's tab10 and two more).
COLORS = {"fedavg": "tab:blue", "krum": "tab:orange", "median": "tab:green", "trimmed_mean": "tab:red",
          "norm_bound": "tab:purple", "flame": "tab:brown", "fltrust": "tab:pink", "fldetector": "tab:gray",
          "flcert": "tab:olive", "fedredefense": "tab:cyan"}
LATENCY_PARTS = (("train_s", "local training"), ("attack_s", "attack"), ("detection_s", "detection"),
                 ("aggregation_s", "aggregation"))
TITLES = {
    "table1": "Table 1: DACC / FPR / FNR / AAR of FedREDefense and FLDetector",
    "table2": "Table 2: TACC (/ ASR) under every attack and defense",
    "table3": "Table 3: FedREDefense with FedAvg or Norm Bound under data-poisoning and adaptive attacks",
    "table8": "Table 8: ADACC / AFPR / AFNR / AAR of the per-round filters",
    "table9": "Table 9: AOI of the three FedREDefense variants under Fang",
    "table10": "Table 10: reconstruction errors of benign and malicious updates",
    "fig2": "Figure 2: the fraction of malicious clients",
    "fig3": "Figure 3: the non-IID degree",
    "fig4": "Figure 4: the local training epochs",
    "fig5": "Figure 5: the participation rate",
}
#: Training images of each dataset's train split (for the scale's training subsets).
TRAIN_SIZES = {"fashion_mnist": 60000, "cifar10": 50000, "cinic10": 90000}


# --------------------------------------------------------------------------------------
# Scales
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scale:
    """The settings of every cell at one scale, and the rows / columns / sweeps it covers.

    ``redefense`` and ``fldetector`` are the ``defense_config`` of FedREDefense's and
    FLDetector's cells (empty: the paper's settings, Table 7 and 50 + 10 rounds).
    ``epochs_sweep`` pairs local epochs with their rounds.
    """

    name: str
    num_clients: int
    num_malicious: int
    rounds: int
    eval_every: int
    train_fraction: float | None  # of the dataset's training images (None: all of them)
    train_images: int | None  # a fixed count instead (smoke)
    checkpoint_every: int
    redefense: dict
    fldetector: dict
    table_datasets: tuple
    table9_datasets: tuple
    figure_datasets: tuple
    table1_attacks: tuple
    table2_attacks: tuple
    table2_defenses: tuple
    table3_attacks: tuple
    table8_attacks: tuple
    table8_defenses: tuple
    table10_attacks: tuple
    figure_attacks: tuple
    figure_defenses: tuple
    malicious_sweep: tuple
    beta_sweep: tuple
    epochs_sweep: tuple
    rate_sweep: tuple
    notes: tuple = ()
    beta: float = 0.1

    def train_subset(self, dataset: str) -> int | None:
        if self.train_images is not None:
            return self.train_images
        if self.train_fraction is None:
            return None
        return round(TRAIN_SIZES[dataset] * self.train_fraction)


_FIGURE_DEFENSES = ("fedredefense", "fldetector", "flame", "fltrust")  # Section 5.3's comparison set
_FIGURE_ATTACKS = ("fang", "lie", "mpaf", "scaling")

SCALE_SETTINGS = {
    "smoke": Scale(
        name="smoke", num_clients=6, num_malicious=2, rounds=2, eval_every=2, train_fraction=None,
        train_images=600, checkpoint_every=2, redefense={"first_cap": 3, "later_cap": 3, "inner_unroll": 1},
        fldetector={"fldetector_cold_start": 0, "fldetector_window": 1},
        table_datasets=("fashion_mnist",), table9_datasets=("fashion_mnist",), figure_datasets=("fashion_mnist",),
        table1_attacks=("fang",), table2_attacks=("none", "fang", "scaling"), table2_defenses=("fedavg", "fedredefense"),
        table3_attacks=("adaptive_targeted_label_flip",), table8_attacks=("fang",),
        table8_defenses=("flame", "fltrust", "fldetector"), table10_attacks=("fang", "scaling"),
        figure_attacks=("fang",), figure_defenses=("fedredefense", "fldetector"),
        malicious_sweep=(2, 4), beta_sweep=(1.0, 0.1), epochs_sweep=((1, 2), (2, 1)), rate_sweep=(0.5, 1.0),
        notes=(("Smoke scale: a check that every step runs and renders, not a measurement: 20 runs of 2 rounds "
               "for the ten targets. Subsets of the paper's rows and columns (Table 1 and 8: Fang; Table 2: "
               "no attack, Fang and Scaling under FedAvg and FedREDefense; Table 3: Adaptive Targeted Label "
               "Flip; Table 10: Fang and Scaling; figures: Fang under FedREDefense and FLDetector, two points "
               "per sweep); FedREDefense capped at 3 outer iterations (first and later participations); "
               "FLDetector with cold start 0 and a window of 1 round."),)),
    "small": Scale(
        name="small", num_clients=30, num_malicious=8, rounds=10, eval_every=5, train_fraction=0.3,
        train_images=None, checkpoint_every=1, redefense={},
        fldetector={"fldetector_cold_start": 2, "fldetector_window": 3},
        table_datasets=("fashion_mnist",), table9_datasets=("fashion_mnist",), figure_datasets=("fashion_mnist",),
        table1_attacks=paper.TABLE1_ATTACKS, table2_attacks=paper.TABLE2_ATTACKS,
        table2_defenses=paper.TABLE2_DEFENSES, table3_attacks=paper.TABLE3_ATTACKS,
        table8_attacks=paper.TABLE1_ATTACKS, table8_defenses=("flame", "fltrust", "fldetector"),
        table10_attacks=paper.TABLE10_ATTACKS, figure_attacks=_FIGURE_ATTACKS, figure_defenses=_FIGURE_DEFENSES,
        malicious_sweep=(2, 8, 14, 22), beta_sweep=(1.0, 0.5, 0.1, 0.05), epochs_sweep=((1, 10), (2, 5), (5, 2)),
        rate_sweep=(0.1, 0.5, 1.0),
        notes=(("Small scale: what a 2-core CPU runs in about an hour per target. 30 clients hold 30 % of "
               "the training images (about as many per client as the paper's 100 clients over all of them); "
               "10 rounds instead of 500, so TACC is far below the paper's and AAR counts at most 10 rounds "
               "(the paper's at most 500). FLDetector's cold start and window (50 + 10 of 500 rounds) "
               "scaled to 2 + 3."),
               ("Datasets: Fashion-MNIST for every target. The paper runs Table 9 and Figures 2-5 on "
               "CIFAR-10, whose CNN costs several times as much per client and iteration; "
               "`--datasets=cifar10` runs them on CIFAR-10 instead."),
               ("Figures: the attacks Fang, LIE, MPAF and Scaling (the figures' own attacks are images "
               "without numbers); the sweeps scaled to 30 clients (2 / 8 / 14 / 22 malicious for the "
               "paper's 8 / 28 / 48 / 72 of 100); local epochs 1 / 2 / 5 with 10 / 5 / 2 rounds (the "
               "paper's 500 / 250 / 100), so that FLDetector (2 + 3 rounds before it judges) never judges at "
               "5 epochs."))),
    "paper": Scale(
        name="paper", num_clients=100, num_malicious=28, rounds=500, eval_every=10, train_fraction=None,
        train_images=None, checkpoint_every=10, redefense={}, fldetector={},
        table_datasets=paper.DATASETS, table9_datasets=("cifar10",), figure_datasets=("cifar10",),
        table1_attacks=paper.TABLE1_ATTACKS, table2_attacks=paper.TABLE2_ATTACKS,
        table2_defenses=paper.TABLE2_DEFENSES, table3_attacks=paper.TABLE3_ATTACKS,
        table8_attacks=paper.TABLE1_ATTACKS, table8_defenses=("flame", "fltrust", "fldetector"),
        table10_attacks=paper.TABLE10_ATTACKS, figure_attacks=_FIGURE_ATTACKS, figure_defenses=_FIGURE_DEFENSES,
        malicious_sweep=(8, 28, 48, 72), beta_sweep=(1.0, 0.5, 0.1, 0.05),
        epochs_sweep=((1, 500), (2, 250), (5, 100)), rate_sweep=(0.1, 0.5, 1.0),
        notes=(("Paper scale: Section 5.1.4 and Appendix A.5 (100 clients, 28 malicious, 500 rounds, beta "
               "0.1, one local epoch, every client every round, FedREDefense with Table 7's settings, "
               "FLDetector with 50 cold-start rounds and a window of 10). CINIC-10 cells exist only when "
               "`--cinic_dir` is given."),
               ("Figures: the attacks Fang, LIE, MPAF and Scaling (the figures' own attacks are images "
               "without numbers)."))),
}


def scale_settings(name: str) -> Scale:
    if name not in SCALE_SETTINGS:
        raise ValueError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)}")
    return SCALE_SETTINGS[name]


# --------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration: the scale's settings plus these. ``options`` are sorted
    ``(key, value)`` pairs added to the defense's ``defense_config`` (FedREDefense's
    ``aggregator``, ``variant``, ``first_cap``, ``later_cap``)."""

    dataset: str
    defense: str
    attack: str
    num_malicious: int
    rounds: int
    beta: float
    local_epochs: int = 1
    participation_rate: float = 1.0
    options: tuple = ()

    def name(self, scale: Scale) -> str:
        """``DEFENSE__ATTACK`` (the grid's cell name) and a suffix per setting that differs
        from the scale's: ``__q22``, ``__beta0.5``, ``__E2``, ``__rate0.1``, ``__KEY-VALUE``."""
        parts = [self.defense, self.attack]
        if self.num_malicious != scale.num_malicious:
            parts.append(f"q{self.num_malicious}")
        if self.beta != scale.beta:
            parts.append(f"beta{self.beta:g}")
        if self.local_epochs != 1:
            parts.append(f"E{self.local_epochs}")
        if self.participation_rate != 1.0:
            parts.append(f"rate{self.participation_rate:g}")
        parts += [f"{k}-{v}" for k, v in self.options]
        return "__".join(parts)

    def label(self, scale: Scale) -> str:
        return f"{self.dataset}/{self.name(scale)}"


def _cell(scale: Scale, dataset: str, defense: str, attack: str, *, num_malicious: int | None = None,
          rounds: int | None = None, beta: float | None = None, local_epochs: int = 1,
          participation_rate: float = 1.0, **options) -> Cell:
    opts = tuple(sorted((k, v) for k, v in options.items() if v is not None))
    return Cell(dataset, defense, attack, scale.num_malicious if num_malicious is None else int(num_malicious),
                scale.rounds if rounds is None else int(rounds), float(scale.beta if beta is None else beta),
                int(local_epochs), float(participation_rate), opts)


def cell_dir(root: str, scale: Scale, cell: Cell) -> str:
    return os.path.join(root, scale.name, cell.dataset, cell.name(scale))


def _redefense_caps(scale: Scale, dataset: str) -> tuple[int, int]:
    """FedREDefense's (first_cap, later_cap) at this scale: the smoke caps or Table 7's."""
    base = TABLE7[dataset]
    return (int(scale.redefense.get("first_cap", base["first_cap"])),
            int(scale.redefense.get("later_cap", base["later_cap"])))


# --------------------------------------------------------------------------------------
# Pages: which cells each target shows
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Page:
    """A target at a scale: its datasets, rows and columns, and ``cells[key] = Cell`` with
    keys as the target's renderer reads them."""

    target: str
    scale: Scale
    datasets: tuple
    attacks: tuple
    columns: tuple  # defenses (tables 1, 2, 8, figures), aggregators (table 3), variants (table 9)
    cells: dict
    sweep: tuple = ()  # figures: ((value, label), ...)
    options: dict = dataclasses.field(default_factory=dict)  # the overrides the page was built with

    def unique_cells(self) -> list[Cell]:
        """The page's cells, each configuration once, in the page's order."""
        seen, out = set(), []
        for c in self.cells.values():
            if c not in seen:
                seen.add(c)
                out.append(c)
        return out


def available_datasets(wanted: Iterable[str], data_dirs: dict) -> tuple:
    """``wanted`` without CINIC-10 unless its data directory is given (it is not downloadable)."""
    return tuple(d for d in wanted if d != "cinic10" or data_dirs.get("cinic10"))


def build_page(target: str, scale_name: str, data_dirs: dict | None = None, datasets: Iterable[str] | None = None,
               attacks: Iterable[str] | None = None) -> Page:
    """The :class:`Page` of ``target`` at ``scale_name``. ``datasets`` / ``attacks`` replace the
    scale's choice for the target (attacks: the rows, or the figures' panels)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    scale = scale_settings(scale_name)
    data_dirs = data_dirs or {}
    default_ds = (scale.table9_datasets if target == "table9" else
                  scale.figure_datasets if target.startswith("fig") else scale.table_datasets)
    for d in datasets or ():
        if d not in paper.DATASETS:
            raise ValueError(f"unknown dataset {d!r}; choose among {', '.join(paper.DATASETS)}")
    ds = available_datasets(tuple(datasets) if datasets else default_ds, data_dirs)
    if not ds:
        raise ValueError("no dataset left: CINIC-10 cells need its data (--cinic_dir)")
    options = {"datasets": tuple(datasets) if datasets else None, "attacks": tuple(attacks) if attacks else None}
    att = tuple(attacks) if attacks else None
    cells: dict = {}
    if target in ("table1", "table2", "table8"):
        rows = att or {"table1": scale.table1_attacks, "table2": scale.table2_attacks,
                       "table8": scale.table8_attacks}[target]
        cols = {"table1": ("fldetector", "fedredefense"), "table2": scale.table2_defenses,
                "table8": scale.table8_defenses}[target]
        for d in ds:
            for a in rows:
                for f in cols:
                    cells[d, a, f] = _cell(scale, d, f, a)
        return Page(target, scale, ds, rows, cols, cells, options=options)
    if target == "table10":
        rows = att or scale.table10_attacks
        for d in ds:
            for a in ("none",) + tuple(rows):
                cells[d, a, "fedredefense"] = _cell(scale, d, "fedredefense", a)
        return Page(target, scale, ds, ("none",) + tuple(rows), ("fedredefense",), cells, options=options)
    if target == "table3":
        rows = att or scale.table3_attacks
        for d in ds:
            for a in rows:
                cells[d, a, "fedavg"] = _cell(scale, d, "fedredefense", a)  # FedAvg is FedREDefense's default
                cells[d, a, "norm_bound"] = _cell(scale, d, "fedredefense", a, aggregator="norm_bound")
        return Page(target, scale, ds, rows, ("fedavg", "norm_bound"), cells, options=options)
    if target == "table9":
        rows = att or ("fang",)
        variants = ("continuous", "intermittent", "dynamic")
        for d in ds:
            for a in rows:
                for v in variants:
                    cells[d, a, v] = _cell(scale, d, "fedredefense", a, variant=None if v == "dynamic" else v)
        return Page(target, scale, ds, rows, variants, cells, options=options)
    # figures: one cell per (dataset, attack, defense, sweep point) where the defense applies
    rows = att or scale.figure_attacks
    cols = tuple(f for f in scale.figure_defenses if not (target == "fig5" and f == "fldetector"))
    sweep = _sweep(target, scale)
    for d in ds:
        first, later = _redefense_caps(scale, d)
        for a in rows:
            for value, _ in sweep:
                for f in cols:
                    kw: dict = {}
                    if target == "fig2":
                        if f == "flame" and value / scale.num_clients > 0.5:
                            continue  # FLAME assumes a benign majority (the paper leaves it out at 72 %)
                        kw["num_malicious"] = value
                    elif target == "fig3":
                        kw["beta"] = value
                    elif target == "fig4":
                        epochs, rounds = value
                        kw.update(local_epochs=epochs, rounds=rounds)
                        if f == "fedredefense" and epochs != 1:  # Appendix B.2: the caps times the epochs
                            kw.update(first_cap=first * epochs, later_cap=later * epochs)
                    elif target == "fig5":
                        kw["participation_rate"] = value
                        if f == "fedredefense" and value != 1.0:  # later participations are further apart
                            kw["later_cap"] = round(later / value)
                    cells[d, a, f, value] = _cell(scale, d, f, a, **kw)
    return Page(target, scale, ds, rows, cols, cells, sweep, options=options)


def _sweep(target: str, scale: Scale) -> tuple:
    p = scale.num_clients
    if target == "fig2":
        return tuple((q, f"{q} of {p} ({100 * q / p:.0f} %)") for q in scale.malicious_sweep)
    if target == "fig3":
        return tuple((b, f"beta {b:g}") for b in scale.beta_sweep)
    if target == "fig4":
        return tuple(((e, r), f"{e} epoch{'s' if e > 1 else ''}, {r} rounds") for e, r in scale.epochs_sweep)
    return tuple((r, f"rate {r:g}") for r in scale.rate_sweep)


# --------------------------------------------------------------------------------------
# Runs: building configurations and reading records (the only place that does either)
# --------------------------------------------------------------------------------------


def make_config(cell: Cell, scale: Scale, data_dir: str | None, output_dir: str) -> runner.ExperimentConfig:
    """The runner's configuration of ``cell``. Only the cell's own defense gets settings:
    FedREDefense the scale's caps and the cell's options, FLDetector its cold start / window."""
    if cell.defense == "fedredefense":
        defense_config = {**scale.redefense, **dict(cell.options)}
    elif cell.defense == "fldetector":
        defense_config = {**scale.fldetector, **dict(cell.options)}
    else:
        defense_config = dict(cell.options)
    return runner.ExperimentConfig(
        dataset=cell.dataset, data_dir=data_dir, model="cnn", num_clients=scale.num_clients,
        num_malicious=cell.num_malicious, beta=cell.beta, rounds=cell.rounds, local_epochs=cell.local_epochs,
        participation_rate=cell.participation_rate, seed=0, output_dir=output_dir,
        eval_every=min(scale.eval_every, cell.rounds), attack=cell.attack, defense=cell.defense,
        defense_config=defense_config, attack_config={}, checkpoint_every=min(scale.checkpoint_every, cell.rounds),
        train_subset=scale.train_subset(cell.dataset))


def recorded(cfg: runner.ExperimentConfig) -> dict:
    """``cfg`` as a run records it in config.json."""
    return runner.recorded_config(cfg)


def _canonical(obj):
    """JSON-ready ``obj`` with every number as a float (1 and 1.0 are the same setting)."""
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return float(obj)
    return obj


def _real_data_dir(path):
    return os.path.realpath(path) if isinstance(path, str) and os.path.exists(path) else path


#: ``defense_config`` keys only one defense reads. experiments/grid.py hands the same
#: ``--defense_config`` to every cell, so its FedAvg cell of a grid run with
#: ``fldetector_cold_start=2`` records that key although FedAvg never reads it.
_OWN_KEYS = {"fldetector": lambda k: k.startswith("fldetector_"), "flame": lambda k: k.startswith("flame_"),
             "fltrust": lambda k: k == "fltrust_root_size", "flcert": lambda k: k == "groups",
             "fedredefense": lambda k: k in _REDEFENSE_KEYS}
_REDEFENSE_KEYS = frozenset(f.name for f in dataclasses.fields(RedefenseConfig)) | {"aggregator"}


def _read_by(defense: str, key: str) -> bool:
    """Whether ``defense`` can read ``defense_config[key]``: False for another defense's own key."""
    owner = next((d for d, own in _OWN_KEYS.items() if own(key)), None)
    return owner is None or owner == defense


def comparable_key(config: dict, data_dir: bool = True) -> str:
    """A recorded config as a string that is equal for two runs of the same settings: the
    runner's comparison (all but rounds / eval_every / checkpoint_every / overwrite /
    output_dir), without the ``defense_config`` keys that only another defense reads
    (FLDetector's window in a FedAvg run), the data directory by its real path (relative
    paths from the working directory; left out with ``data_dir=False``), numbers as floats."""
    c = runner._comparable(config)
    defense = c.get("defense")
    c["defense_config"] = {k: v for k, v in (c.get("defense_config") or {}).items() if _read_by(defense, k)}
    c["data_dir"] = _real_data_dir(c.get("data_dir")) if data_dir else None
    return json.dumps(_canonical(c), sort_keys=True)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_config(run_dir: str) -> dict | None:
    """``run_dir/config.json`` (None when missing or unreadable)."""
    return _read_json(os.path.join(run_dir, "config.json"))


def read_summary(run_dir: str) -> dict | None:
    """``run_dir/summary.json`` (None when missing or unreadable)."""
    return _read_json(os.path.join(run_dir, "summary.json"))


def read_rounds(run_dir: str, upto: int | None = None) -> list[dict]:
    """The first ``upto`` (all) complete records of ``run_dir/rounds.jsonl``."""
    rows = []
    try:
        with open(os.path.join(run_dir, "rounds.jsonl")) as f:
            for line in f:
                if upto is not None and len(rows) >= upto:
                    break
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    break
    except OSError:
        pass
    return rows


def finished(run_dir: str, rounds: int) -> dict | None:
    """The summary of a run in ``run_dir`` that is done with at least ``rounds`` rounds."""
    s = read_summary(run_dir)
    if s and s.get("status") == "done" and (s.get("rounds_done") or 0) >= rounds:
        return s
    return None


def run_cell(cfg: runner.ExperimentConfig) -> dict:
    """Runs (resumes, extends) one cell; raises runner.Stopped / runner.ConfigError."""
    return runner.run(cfg, progress=cfg.eval_every)


def git_commit(summary: dict) -> str:
    return (summary.get("environment") or {}).get("git_commit") or "unrecorded"


# --------------------------------------------------------------------------------------
# Locating cells: own directory, a finished equal run elsewhere, or to run
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Location:
    cell: Cell
    own_dir: str
    config: runner.ExperimentConfig  # what runs in own_dir
    run_dir: str | None  # the finished run read for the cell (None: not finished)
    reused: bool = False  # run_dir is another run's directory
    conflict: bool = False  # own_dir holds a run of other settings (replaced only with overwrite)


def index_runs(roots: Iterable[str]) -> dict[tuple[str, bool], list[str]]:
    """``{(comparable_key, with data_dir): [run directories]}`` of every config.json under
    ``roots`` (sorted; checkpoint folders are not entered), keyed with and without the data
    directory."""
    index: dict[tuple[str, bool], list[str]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "checkpoints")
            if "config.json" in filenames:
                cfg = read_config(dirpath)
                try:
                    keys = [(comparable_key(cfg, exact), exact) for exact in (True, False)]
                except (TypeError, ValueError, AttributeError):
                    continue
                for key in keys:
                    index.setdefault(key, []).append(dirpath)
    return {k: sorted(v) for k, v in index.items()}


def _key_of(config, data_dir: bool) -> str | None:
    try:
        return comparable_key(config, data_dir) if isinstance(config, dict) else None
    except (TypeError, ValueError, AttributeError):
        return None


def locate(page: Page, root: str, data_dirs: dict, search: Iterable[str] = ()) -> list[Location]:
    """Where each of the page's cells is read from: its own finished directory, else a
    finished run with the same settings under ``root`` or ``search``, else nowhere yet. A
    dataset without a data directory in ``data_dirs`` matches runs of any data directory
    (``--render_only`` needs none), and its cells resume with the one their run recorded."""
    roots = [r for r in dict.fromkeys([root, *search]) if os.path.isdir(r)]
    index = index_runs(roots)
    out = []
    for cell in page.unique_cells():
        own = cell_dir(root, page.scale, cell)
        exact = data_dirs.get(cell.dataset) is not None
        cfg = make_config(cell, page.scale, data_dirs.get(cell.dataset), own)
        key = comparable_key(recorded(cfg), exact)
        mine = read_config(own)
        same = _key_of(mine, exact) == key
        if same and mine.get("data_dir") != cfg.data_dir:  # the same data under another spelling, or any
            cfg = dataclasses.replace(cfg, data_dir=mine.get("data_dir"))
        loc = Location(cell, own, cfg, None, conflict=mine is not None and not same)
        if same and finished(own, cell.rounds):
            loc.run_dir = own
        else:
            for other in index.get((key, exact), []):
                if os.path.abspath(other) != os.path.abspath(own) and finished(other, cell.rounds):
                    loc.run_dir, loc.reused = other, True
                    break
        out.append(loc)
    return out


def validate(locations: list[Location], overwrite: bool = False) -> None:
    """Raises runner.ConfigError (message naming the cell) for a cell that cannot run: bad
    settings, or a directory holding a run of other settings (unless ``overwrite``)."""
    for loc in locations:
        if loc.run_dir is None:
            if loc.conflict and not overwrite:
                raise runner.ConfigError("overwrite", f"{loc.own_dir} holds a run with other settings (the cell's "
                                                      "definition changed?); --overwrite replaces it")
            try:
                runner.validate(loc.config)
            except runner.ConfigError as e:
                raise runner.ConfigError(e.flag, f"cell {loc.cell.dataset}/{os.path.basename(loc.own_dir)}: "
                                                 f"{e}") from None


def run_missing(locations: list[Location], log: Callable[[str], None] = print, overwrite: bool = False) -> int:
    """Runs every cell that has no finished run, in order (resuming or extending what its
    directory holds); returns how many ran. Raises runner.Stopped after SIGINT/SIGTERM (the
    stopped cell's checkpoint is saved) and runner.ConfigError for a cell that cannot run."""
    todo = [loc for loc in locations if loc.run_dir is None]
    for i, loc in enumerate(todo, 1):
        log(f"cell {i}/{len(todo)}: {loc.own_dir}")
        try:
            run_cell(dataclasses.replace(loc.config, overwrite=True) if loc.conflict and overwrite else loc.config)
        except runner.Stopped as e:
            raise runner.Stopped(f"cell {loc.own_dir}: {e}") from None
        except runner.ConfigError as e:
            raise runner.ConfigError(e.flag, f"cell {loc.own_dir}: {e}") from None
        if finished(loc.own_dir, loc.cell.rounds):
            loc.run_dir = loc.own_dir
    return len(todo)


# --------------------------------------------------------------------------------------
# Reading a finished cell
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    """A finished cell read at its rounds (fractions, not %)."""

    run_dir: str
    reused: bool
    rounds: int
    eval_round: int | None  # the round test_acc / asr are from
    tacc: float | None
    asr: float | None
    detection: dict  # metrics.summarize of the cell's rounds
    errors: list  # (error or None, malicious, first participation, iterations)
    gamma: float
    latency: dict  # mean seconds per round of each LATENCY_PARTS key
    minutes: float  # summed round times
    commit: str
    config: dict


def _finite(x):
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def read_result(loc: Location) -> Result | None:
    """The cell's values from its run's first ``rounds`` records (None when not finished)."""
    if loc.run_dir is None:
        return None
    summary = read_summary(loc.run_dir) or {}
    config = summary.get("config") or read_config(loc.run_dir) or {}
    rows = read_rounds(loc.run_dir, loc.cell.rounds)
    num_clients = int(config.get("num_clients", 0))
    malicious = np.zeros(num_clients, bool)
    if loc.cell.attack != "none" and loc.cell.num_malicious:
        malicious[num_clients - loc.cell.num_malicious:] = True  # the last q ids (the simulator's rule)
    expelled = np.zeros(num_clients, bool)
    for r in rows:
        expelled[np.asarray(r.get("flagged", []), int)] = True
    keep = ("participants", "weights", "aggregated", "error", "iterations")
    records = [{k: r[k] for k in keep if k in r} for r in rows]
    detection = metrics.summarize(records, malicious, expelled) if rows else {}
    evals = [r for r in rows if "test_acc" in r]
    last = evals[-1] if evals else {}
    seen: set = set()
    errors = []
    for r in rows:
        errs = r.get("error")
        its = r.get("iterations") or [None] * len(r["participants"])
        for i, c in enumerate(r["participants"]):
            if errs is not None:
                errors.append((errs[i], bool(malicious[c]), c not in seen, its[i]))
            seen.add(c)
    defense_config = config.get("defense_config") or {}
    return Result(
        run_dir=loc.run_dir, reused=loc.reused, rounds=len(rows), eval_round=last.get("round"),
        tacc=last.get("test_acc"), asr=last.get("asr"), detection=detection, errors=errors,
        gamma=float(defense_config.get("gamma", 0.6)),
        latency={k: float(np.mean([r.get(k, 0.0) for r in rows])) if rows else 0.0 for k, _ in LATENCY_PARTS},
        minutes=sum(r.get("round_s", 0.0) for r in rows) / 60, commit=git_commit(summary), config=config)


def error_stats(values: list) -> tuple | None:
    """(mean, population std, count) of the finite values, None when there is none."""
    v = np.asarray([x for x in values if _finite(x)], np.float64)
    return (float(v.mean()), float(v.std()), int(v.size)) if v.size else None


# --------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------


def _pct(x) -> str:
    return f"{100 * x:.2f}" if _finite(x) else "-"


def _num(x, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "-"


def _pair(measured: str, reference: str) -> str:
    return f"{measured} [{reference}]"


def _tacc_text(res: Result | None, attack: str) -> str:
    if res is None:
        return "-"
    return _pct(res.tacc) + (f"/{_pct(res.asr)}" if attack in TARGETED else "")


def _paper_tacc_text(value) -> str:
    tacc, asr = paper.tacc_asr(value)
    if tacc is None:
        return "-"
    return f"{tacc:.2f}" + (f"/{asr:.2f}" if asr is not None else "")


def _stats_text(st) -> str:
    return "-" if st is None else f"{st[0]:.3f} ± {st[1]:.3f} (n={st[2]})"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


# --------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------


def command(page: Page, root: str, data_flags: dict) -> str:
    parts = ["python experiments/reproduce.py", f"--target={page.target}", f"--scale={page.scale.name}",
             f"--root={root}"]
    for flag in ("datasets", "attacks"):
        if page.options.get(flag):
            parts.append(f"--{flag}={','.join(page.options[flag])}")
    parts += [f"--{flag}={value}" for flag, value in sorted(data_flags.items()) if value]
    return " ".join(parts)


DATA_FLAGS = {"fashion_mnist": "data_dir", "cifar10": "cifar10_dir", "cinic10": "cinic_dir"}


def _data_flags(page: Page, locations: list[Location], results: dict, data_dirs: dict) -> dict:
    """The data flags of the regenerate command: the directories the page's runs recorded
    (so that the page does not depend on how it was rendered), else the given ones."""
    out = {}
    for d in page.datasets:
        recorded_dirs = sorted({str(r.config.get("data_dir")) for loc in locations
                                if loc.cell.dataset == d and (r := results.get(loc.cell)) is not None
                                and r.config.get("data_dir")})
        value = recorded_dirs[0] if recorded_dirs else data_dirs.get(d)
        if value:
            out[DATA_FLAGS[d]] = value
    return out


def _settings_lines(page: Page) -> list[str]:
    s = page.scale
    ds = ", ".join(paper.DATASET_NAMES[d] for d in page.datasets) or "none available"
    subset = {d: s.train_subset(d) for d in page.datasets}
    images = "; ".join(f"{paper.DATASET_NAMES[d]} {'all' if n is None else f'{n:,}'}" for d, n in subset.items())
    caps = ("Table 7's settings" if not s.redefense else
            ", ".join(f"{k} {v}" for k, v in sorted(s.redefense.items())) + ", otherwise Table 7")
    fld = ("cold start 50, window 10 (Appendix A.3)" if not s.fldetector else
           f"cold start {s.fldetector['fldetector_cold_start']}, window {s.fldetector['fldetector_window']}")
    return [
        (f"* scale `{s.name}`: dataset(s) {ds}; the paper's CNN (Tables 5 / 6); {s.num_clients} clients, "
        f"{s.num_malicious} malicious (the last ids); {s.rounds} rounds, evaluated every {s.eval_every}; "
        f"beta {s.beta:g}; 1 local epoch, batch 32, SGD lr 1e-3; every client every round; seed 0"),
        f"* training images: {images}",
        (f"* FedREDefense: gamma 0.6, N = 5, {caps}; FLDetector: {fld}; other defenses and attacks at "
        "their defaults (Appendix A.2 / A.3)"),
    ]


def _header(page: Page, root: str, locations: list[Location], results: dict, data_dirs: dict) -> list[str]:
    cmd = command(page, root, _data_flags(page, locations, results, data_dirs))
    commits: dict[str, int] = {}
    for r in results.values():
        if r is not None:
            commits[r.commit] = commits.get(r.commit, 0) + 1
    commit_text = ", ".join(f"{c} ({n} cell{'s' if n != 1 else ''})" for c, n in sorted(commits.items())) or "no run yet"
    lines = [f"# {TITLES[page.target]} ({page.scale.name} scale)", "",
             ("Generated by (runs the missing cells, then rewrites this page; add `--render_only` to redraw "
             "it from the runs alone):"), "", f"    {cmd}", "", "Settings:", "", *_settings_lines(page),
             f"* runs made on commit(s): {commit_text}", ""]
    lines += [*page.scale.notes, ""] if page.scale.notes else []
    return lines


def _footer(page: Page, locations: list[Location], results: dict) -> list[str]:
    done = [loc for loc in locations if results.get(loc.cell) is not None]
    reused = sum(results[loc.cell].reused for loc in done)
    minutes = sum(results[loc.cell].minutes for loc in done)
    early = sorted(loc.cell.label(page.scale) for loc in done
                   if results[loc.cell].eval_round not in (None, loc.cell.rounds))
    lines = ["## Cells", "",
             (f"{len(locations)} cells, {len(done)} finished ({reused} read from another run directory with the "
             f"same settings), {len(locations) - len(done)} not run ('-'); {minutes:.1f} min of rounds in the "
             "finished ones. Values in brackets are the paper's.")]
    if early:
        lines += ["", "Last evaluated before the cell's last round (a reused run evaluated on another schedule): "
                  + ", ".join(early) + "."]
    return lines + [""]


def _links(target: str) -> list[str]:
    return [f"![{target}]({target}.png)", "",
            ("Per-round seconds (mean over each cell's rounds; the first round includes compiling) split into local "
            "training, attack, detection and aggregation:"), "", f"![{target} latency]({target}_latency.png)", ""]


def _section(page: Page, d: str) -> str:
    return f"## {paper.DATASET_NAMES[d]}"


def render_table1(page: Page, res: dict) -> list[str]:
    lines = [("DACC / FPR / FNR (%) of the final labels and AAR (rounds a malicious client was aggregated, "
             f"at most {page.scale.rounds} here, 500 in the paper): measured [paper]."), ""]
    for d in page.datasets:
        rows = []
        for a in page.attacks:
            for f in page.columns:
                r = res.get(page.cells[d, a, f])
                p = paper.TABLE1.get(d, {}).get(a, {}).get(f, {})
                det = r.detection if r else {}
                rows.append([ATTACK_NAMES.get(a, a), DEFENSE_NAMES[f]] + [
                    _pair(_pct(det.get(k)) if k != "aar" else _num(det.get(k)), _num(p.get(k)))
                    for k in ("dacc", "fpr", "fnr", "aar")])
        lines += [_section(page, d), "", *_table(["attack", "detector", "DACC", "FPR", "FNR", "AAR"], rows), ""]
    return lines


def render_table2(page: Page, res: dict) -> list[str]:
    lines = ["TACC (%) of the final global model (/ ASR (%) for the backdoors): measured [paper].", ""]
    for d in page.datasets:
        rows = []
        for a in page.attacks:
            row = [ATTACK_NAMES.get(a, a)]
            for f in page.columns:
                row.append(_pair(_tacc_text(res.get(page.cells[d, a, f]), a),
                                 _paper_tacc_text(paper.TABLE2.get(d, {}).get(a, {}).get(f))))
            rows.append(row)
        lines += [_section(page, d), "", *_table(["attack"] + [DEFENSE_NAMES[f] for f in page.columns], rows), ""]
        if d == "cifar10" and "none" in page.attacks:
            lines += [("The paper's CIFAR-10 no-attack FedREDefense value is missing from its text (the row is "
                      "misaligned in the extraction)."), ""]
    return lines


def render_table3(page: Page, res: dict) -> list[str]:
    lines = [("TACC (%) (/ ASR (%) for the targeted flips) of FedREDefense aggregating the updates it keeps with "
             "FedAvg or Norm Bound: measured [paper]. The adaptive attacks scale their flipped updates by the "
             "largest factor FedREDefense does not flag (Algorithm 3)."), ""]
    for d in page.datasets:
        rows = [[ATTACK_NAMES.get(a, a)] + [
            _pair(_tacc_text(res.get(page.cells[d, a, g]), a),
                  _paper_tacc_text(paper.TABLE3.get(d, {}).get(a, {}).get(g))) for g in page.columns]
            for a in page.attacks]
        lines += [_section(page, d), "", *_table(["attack", "FedAvg", "Norm Bound"], rows), ""]
    return lines


def render_table8(page: Page, res: dict) -> list[str]:
    lines = [("ADACC / AFPR / AFNR (%): DACC / FPR / FNR of each round's filter over that round's participants "
             "(an update left out of the aggregate counts as flagged), averaged over the rounds; AAR: rounds a "
             "malicious update was aggregated: measured [paper]. The paper's Table 8 has FLAME and FLTrust; "
             "FLDetector's per-round figures are shown beside them without a paper value."), ""]
    for d in page.datasets:
        rows = []
        for a in page.attacks:
            for f in page.columns:
                r = res.get(page.cells[d, a, f])
                p = paper.TABLE8.get(d, {}).get(a, {}).get(f, {})
                det = r.detection if r else {}
                rows.append([ATTACK_NAMES.get(a, a), DEFENSE_NAMES[f]] + [
                    _pair(_pct(det.get(k)) if k != "aar" else _num(det.get(k)), _num(p.get(k)))
                    for k in ("adacc", "afpr", "afnr", "aar")])
        lines += [_section(page, d), "", *_table(["attack", "defense", "ADACC", "AFPR", "AFNR", "AAR"], rows), ""]
    return lines


def render_table9(page: Page, res: dict) -> list[str]:
    lines = ["AOI: outer iterations per client and round, averaged over the rounds (Appendix B.3), with DACC (%) "
             "beside it: measured [paper]. Continuous: 500 iterations at the first participation, 60 later; "
             "intermittent: 500 at the first, 500 again every 10 rounds, inference otherwise; dynamic: stop "
             "below gamma, capped by Table 7." + (" At this scale every variant's caps are the scale's."
                                                 if page.scale.redefense else ""), ""]
    for d in page.datasets:
        rows = []
        for a in page.attacks:
            for v in page.columns:
                r = res.get(page.cells[d, a, v])
                det = r.detection if r else {}
                p = paper.TABLE9.get(d, {}).get(v) if a == "fang" else None
                rows.append([ATTACK_NAMES.get(a, a), VARIANT_NAMES[v], _pair(_num(det.get("aoi")), _num(p)),
                             _pair(_pct(det.get("dacc")), "100.00" if d in paper.TABLE9 and a == "fang" else "-")])
        lines += [_section(page, d), "", *_table(["attack", "variant", "AOI", "DACC"], rows), ""]
    if "cifar10" not in page.datasets:
        lines += [("The paper's Table 9 is on CIFAR-10 (AOI: continuous 60.88, intermittent 50.00, dynamic 2.40, every "
                  "variant at 100 % DACC); `--datasets=cifar10` runs it there."), ""]
    return lines


def _errors_of(r: Result | None, malicious: bool, first: bool | None = None) -> list:
    if r is None:
        return []
    return [e for e, m, f, _ in r.errors if m == malicious and (first is None or f == first)]


def render_table10(page: Page, res: dict) -> list[str]:
    lines = [("Reconstruction errors, mean ± std (n participations), over all participations and at each "
             "client's first: benign from the no-attack run, each attack's malicious updates from its run: "
             "measured [paper]. FedREDefense's dynamic optimisation stops as soon as an error is below gamma "
             "(0.6), so a passing update ends just under it; a flagged one at its cap."), ""]
    for d in page.datasets:
        rows = []
        for a in page.attacks:
            r = res.get(page.cells[d, a, "fedredefense"])
            malicious = a != "none"
            p = paper.TABLE10.get(d, {}).get("benign" if a == "none" else a)
            ptxt = "-" if p is None else f"{p[0]:.2f}" + (f" ± {p[1]:.2f}" if p[1] is not None else "")
            name = "Benign (no attack)" if a == "none" else f"{ATTACK_NAMES.get(a, a)} (malicious)"
            rows.append([name, _stats_text(error_stats(_errors_of(r, malicious))),
                         _stats_text(error_stats(_errors_of(r, malicious, True))), ptxt])
        lines += [_section(page, d), "", *_table(["updates", "all participations", "first participation", "paper"],
                                                 rows), ""]
    return lines


def render_figure_tables(page: Page, res: dict) -> list[str]:
    lines = [("DACC (%) of the detectors (final labels) and TACC (%) (/ ASR (%) for Scaling) of every defense at each "
             "point of the sweep. The paper's figures are images without numbers; the only value its text gives "
             "is FedREDefense's DACC, 100 % at every point, in brackets. '-': not run, or not applicable "
             "(FLAME above 50 % malicious clients, FLDetector under partial participation)."), ""]
    for d in page.datasets:
        lines += [_section(page, d), ""]
        for a in page.attacks:
            rows = []
            for f in page.columns:
                if f in ("fedredefense", "fldetector"):
                    row = [f"{DEFENSE_NAMES[f]} DACC"]
                    for value, _ in page.sweep:
                        c = page.cells.get((d, a, f, value))
                        r = res.get(c) if c else None
                        txt = _pct(r.detection.get("dacc")) if r else "-"
                        row.append(_pair(txt, "100.00") if f == "fedredefense" else txt)
                    rows.append(row)
            for f in page.columns:
                row = [f"{DEFENSE_NAMES[f]} TACC" + ("/ASR" if a in TARGETED else "")]
                for value, _ in page.sweep:
                    c = page.cells.get((d, a, f, value))
                    row.append(_tacc_text(res.get(c) if c else None, a))
                rows.append(row)
            head = {"fig2": "malicious clients", "fig3": "non-IID degree", "fig4": "local epochs",
                    "fig5": "participation rate"}[page.target]
            lines += [f"### {ATTACK_NAMES.get(a, a)}", "", *_table([head] + [lab for _, lab in page.sweep], rows), ""]
    return lines


RENDERERS = {"table1": render_table1, "table2": render_table2, "table3": render_table3, "table8": render_table8,
             "table9": render_table9, "table10": render_table10}


def render_markdown(page: Page, locations: list[Location], results: dict, root: str, data_dirs: dict) -> str:
    body = RENDERERS.get(page.target, render_figure_tables)(page, results)
    lines = [*_header(page, root, locations, results, data_dirs), *body, *_links(page.target),
             *_footer(page, locations, results)]
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------
# Figures (matplotlib's object API, Agg canvas, no date in the metadata: byte-stable)
# --------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _empty(ax, text="not run"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")


_GROUPS = (("benign", False, True), ("benign", False, False), ("malicious", True, True), ("malicious", True, False))
_MAX_POINTS = 2000  # per group in a strip: an even subsample beyond this


def _strip_panel(ax, r: Result | None, title: str):
    ax.set_title(title, fontsize=9)
    if r is None:
        _empty(ax)
        return
    labels, invalid = [], 0
    for i, (name, mal, first) in enumerate(_GROUPS):
        vals = [e for e in _errors_of(r, mal, first)]
        invalid += sum(1 for e in vals if not _finite(e))
        v = np.asarray([e for e in vals if _finite(e)], np.float64)
        labels.append(f"{name}\n{'first' if first else 'later'}\n(n={v.size})")
        if v.size > _MAX_POINTS:
            v = v[np.linspace(0, v.size - 1, _MAX_POINTS).astype(int)]
        if v.size:
            jitter = ((np.arange(v.size) * 0.6180339887) % 1.0 - 0.5) * 0.5
            ax.scatter(i + jitter, v, s=6, alpha=0.5, color="tab:red" if mal else "tab:blue", linewidths=0)
            ax.boxplot([v], positions=[i], widths=0.6, showfliers=False, manage_ticks=False,
                       medianprops={"color": "black"})
    ax.axhline(r.gamma, color="black", linestyle="--", linewidth=1)
    ax.text(len(_GROUPS) - 0.5, r.gamma, f" gamma {r.gamma:g}", va="bottom", ha="right", fontsize=7)
    ax.set_xticks(range(len(_GROUPS)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_xlim(-0.6, len(_GROUPS) - 0.4)
    if invalid:
        ax.set_xlabel(f"{invalid} invalid update(s) flagged without reconstruction", fontsize=7)


def plot_errors(page: Page, res: dict) -> bytes:
    """Per-client reconstruction errors of FedREDefense, benign vs malicious, at the first
    participation and later, one panel per attack (rows: datasets), gamma dashed."""
    attacks = [a for a in page.attacks]
    rows = max(1, len(page.datasets))
    fig = _figure(2.6 * max(1, len(attacks)) + 0.6, 3.0 * rows + 0.4)
    axes = np.atleast_2d(fig.subplots(rows, max(1, len(attacks)), squeeze=False))
    for i, d in enumerate(page.datasets):
        for j, a in enumerate(attacks):
            cell = page.cells.get((d, a, "fedredefense"))
            _strip_panel(axes[i, j], res.get(cell) if cell else None,
                         f"{paper.DATASET_NAMES[d]}: {ATTACK_NAMES.get(a, a)}")
            if j == 0:
                axes[i, j].set_ylabel("reconstruction error")
    if not page.datasets:
        _empty(axes[0, 0], "no dataset")
    fig.suptitle("FedREDefense: reconstruction error per client and participation", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _bars(ax, groups: list[str], series: list[tuple[str, list, list]], ylabel: str, ylim=None):
    """Grouped bars: ``series`` = (label, measured values, paper values) over ``groups``;
    the paper's values as black ticks over the bars."""
    n = max(1, len(series))
    width = 0.8 / n
    any_missing = False
    x = np.arange(len(groups))
    for k, (label, measured, ref) in enumerate(series):
        pos = x - 0.4 + width * (k + 0.5)
        color = COLORS.get(next((f for f, n in DEFENSE_NAMES.items() if n == label), ""), f"C{k % 10}")
        ax.bar(pos, [v if _finite(v) else 0.0 for v in measured], width, label=label, color=color)
        missing = [p for p, v in zip(pos, measured) if not _finite(v)]
        if missing:
            ax.scatter(missing, [0.0] * len(missing), marker="x", s=14, color="0.6", zorder=3, clip_on=False,
                       label="not run" if not any_missing else None)
            any_missing = True
        pts = [(p, v) for p, v in zip(pos, ref) if _finite(v)]
        if pts:
            ax.scatter([p for p, _ in pts], [v for _, v in pts], marker="_", s=60, color="black", zorder=3,
                       label="paper" if k == 0 else None)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)


def _value(r: Result | None, key: str):
    if r is None:
        return None
    if key in ("tacc", "asr"):
        v = getattr(r, key)
        return None if v is None else 100 * v
    v = r.detection.get(key)
    if v is None:
        return None
    return v if key in ("aar", "aoi") else 100 * v


def plot_bars(page: Page, res: dict) -> bytes:
    """Grouped bars of the table's main measure per dataset, the paper's as black ticks."""
    t = page.target
    panels = []
    for d in page.datasets:
        if t == "table2":
            series = [(DEFENSE_NAMES[f], [_value(res.get(page.cells[d, a, f]), "tacc") for a in page.attacks],
                       [paper.tacc_asr(paper.TABLE2.get(d, {}).get(a, {}).get(f))[0] for a in page.attacks])
                      for f in page.columns]
            panels.append((d, "TACC (%)", [ATTACK_NAMES.get(a, a) for a in page.attacks], series, (0, 100)))
            targeted = [a for a in page.attacks if a in TARGETED]
            if targeted:
                series = [(DEFENSE_NAMES[f], [_value(res.get(page.cells[d, a, f]), "asr") for a in targeted],
                           [paper.tacc_asr(paper.TABLE2.get(d, {}).get(a, {}).get(f))[1] for a in targeted])
                          for f in page.columns]
                panels.append((d, "ASR (%)", [ATTACK_NAMES.get(a, a) for a in targeted], series, (0, 100)))
        elif t == "table3":
            names = {"fedavg": "FedAvg", "norm_bound": "Norm Bound"}
            series = [(names[g], [_value(res.get(page.cells[d, a, g]), "tacc") for a in page.attacks],
                       [paper.tacc_asr(paper.TABLE3.get(d, {}).get(a, {}).get(g))[0] for a in page.attacks])
                      for g in page.columns]
            panels.append((d, "TACC (%)", [ATTACK_NAMES.get(a, a) for a in page.attacks], series, (0, 100)))
        elif t == "table8":
            for key, label in (("adacc", "ADACC (%)"), ("afpr", "AFPR (%)"), ("afnr", "AFNR (%)")):
                series = [(DEFENSE_NAMES[f], [_value(res.get(page.cells[d, a, f]), key) for a in page.attacks],
                           [paper.TABLE8.get(d, {}).get(a, {}).get(f, {}).get(key) for a in page.attacks])
                          for f in page.columns]
                panels.append((d, label, [ATTACK_NAMES.get(a, a) for a in page.attacks], series, (0, 100)))
        elif t == "table9":
            series = [(ATTACK_NAMES.get(a, a), [_value(res.get(page.cells[d, a, v]), "aoi") for v in page.columns],
                       [paper.TABLE9.get(d, {}).get(v) if a == "fang" else None for v in page.columns])
                      for a in page.attacks]
            panels.append((d, "AOI", [VARIANT_NAMES[v] for v in page.columns], series, None))
    bars = max([len(p[2]) * len(p[3]) for p in panels] or [1])
    fig = _figure(max(7.0, 0.12 * bars + 3.5), 3.2 * max(1, len(panels)))
    axes = fig.subplots(max(1, len(panels)), 1, squeeze=False)[:, 0]
    for ax, (d, ylabel, groups, series, ylim) in zip(axes, panels):
        _bars(ax, groups, series, ylabel, ylim)
        ax.set_title(paper.DATASET_NAMES[d], fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if not panels:
        _empty(axes[0], "no dataset")
    fig.suptitle(TITLES[t], fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_sweep(page: Page, res: dict) -> bytes:
    """The paper's figure form: per attack (columns) the detectors' DACC, every defense's
    TACC and, for Scaling / DBA, ASR against the swept setting (categorical x axis); one
    block of rows per dataset."""
    attacks = list(page.attacks)
    has_asr = any(a in TARGETED for a in attacks)
    per = 3 if has_asr else 2
    datasets = list(page.datasets)
    fig = _figure(3.2 * max(1, len(attacks)) + 2.0, 2.6 * per * max(1, len(datasets)) + 0.8)
    axes = fig.subplots(per * max(1, len(datasets)), max(1, len(attacks)), squeeze=False)
    x = np.arange(len(page.sweep))
    labels = [lab for _, lab in page.sweep]
    for b, d in enumerate(datasets):
        for j, a in enumerate(attacks):
            blocks = [("dacc", "DACC (%)", [f for f in page.columns if f in ("fedredefense", "fldetector")]),
                      ("tacc", "TACC (%)", list(page.columns))]
            if has_asr:
                blocks.append(("asr", "ASR (%)", list(page.columns) if a in TARGETED else []))
            for i, (key, ylabel, defenses) in enumerate(blocks):
                ax = axes[b * per + i, j]
                if not defenses:
                    ax.set_axis_off()
                    continue
                for f in defenses:
                    ys = [_value(res.get(page.cells.get((d, a, f, v))), key) for v, _ in page.sweep]
                    ax.plot(x, [y if _finite(y) else np.nan for y in ys], marker="o", label=DEFENSE_NAMES[f],
                            color=COLORS[f])
                ax.set_xticks(x)
                ax.set_xticklabels(labels, fontsize=7, rotation=20)
                ax.set_ylim(-3, 103)
                ax.grid(alpha=0.3)
                if j == 0:
                    ax.set_ylabel(f"{paper.DATASET_NAMES[d]}\n{ylabel}" if len(datasets) > 1 else ylabel)
                if i == 0:
                    ax.set_title(ATTACK_NAMES.get(a, a), fontsize=9)
                if j == len(attacks) - 1:
                    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    if not datasets:
        _empty(axes[0, 0], "no dataset")
    names = ", ".join(paper.DATASET_NAMES[d] for d in datasets) or "no dataset"
    fig.suptitle(f"{TITLES[page.target]}\n({names}, {page.scale.name} scale)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def plot_latency(page: Page, locations: list[Location], res: dict) -> bytes:
    """Mean seconds per round of every finished cell, stacked: local training, attack,
    detection, aggregation."""
    done = [loc for loc in locations if res.get(loc.cell) is not None]
    fig = _figure(8.0, 1.4 + 0.2 * max(1, len(done)))
    ax = fig.subplots()
    y = np.arange(len(done))
    left = np.zeros(len(done))
    for key, label in LATENCY_PARTS:
        vals = np.asarray([res[loc.cell].latency[key] for loc in done], np.float64)
        ax.barh(y, vals, left=left, label=label, height=0.7)
        left += vals
    ax.set_yticks(y)
    ax.set_yticklabels([loc.cell.label(page.scale) for loc in done], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("seconds per round (mean)")
    ax.grid(axis="x", alpha=0.3)
    if done:
        ax.legend(fontsize=7, loc="lower right")
    else:
        _empty(ax)
    ax.set_title(f"{page.target}: per-round latency ({page.scale.name} scale)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def render_figures(page: Page, locations: list[Location], results: dict) -> dict[str, bytes]:
    """``{file name: PNG bytes}``: ``<target>.png`` and ``<target>_latency.png``."""
    if page.target in ("table1", "table10"):
        main = plot_errors(page, results)
    elif page.target.startswith("fig"):
        main = plot_sweep(page, results)
    else:
        main = plot_bars(page, results)
    return {f"{page.target}.png": main, f"{page.target}_latency.png": plot_latency(page, locations, results)}


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def render(page: Page, locations: list[Location], root: str, out: str, data_dirs: dict) -> list[str]:
    """Writes ``out/<target>.md`` and its figures from the cells' runs; returns the paths."""
    results = {loc.cell: read_result(loc) for loc in locations}
    files = {f"{page.target}.md": render_markdown(page, locations, results, root, data_dirs).encode()}
    files.update(render_figures(page, locations, results))
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, data in files.items():
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def reproduce(target: str, scale: str, root: str, out: str, data_dirs: dict | None = None, *,
              render_only: bool = False, datasets=None, attacks=None, search: Iterable[str] = (),
              overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Runs the target's missing cells (unless ``render_only``) and writes its page.

    Returns ``{"ran": cells run, "cells": count, "finished": count, "reused": count,
    "files": paths}``. Raises runner.Stopped (after writing the page from the finished
    cells) when a signal stopped a cell, runner.ConfigError for a cell that cannot run.
    """
    data_dirs = dict(data_dirs or {})
    page = build_page(target, scale, data_dirs, datasets, attacks)
    locations = locate(page, root, data_dirs, search)
    ran = 0
    if not render_only:
        validate(locations, overwrite)
        try:
            ran = run_missing(locations, log, overwrite)
        except runner.Stopped:
            render(page, locate(page, root, data_dirs, search), root, out, data_dirs)
            raise
        locations = locate(page, root, data_dirs, search)
    files = render(page, locations, root, out, data_dirs)
    done = [loc for loc in locations if loc.run_dir is not None]
    return {"ran": ran, "cells": len(locations), "finished": len(done), "reused": sum(loc.reused for loc in done),
            "files": files}


def default_cache_dir() -> str:
    """``$FEDREDEFENSE_CACHE/jax`` or ``~/.cache/fedredefense_jax/jax`` (next to the data cache)."""
    base = os.environ.get("FEDREDEFENSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                 "fedredefense_jax")
    return os.path.join(base, "jax")


def enable_compilation_cache(path: str | None) -> None:
    """JAX's persistent compilation cache in ``path`` (None or "": switched off): the cells of a
    reproduction compile the same programs again and again (one model, one set of shapes);
    with the cache each compiles once per machine. Takes effect even after earlier compiles."""
    import jax

    if path:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path or None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0 if path else 1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1 if path else 0)
    try:
        from jax._src import compilation_cache  # the cache decides once per process whether it is used

        compilation_cache.reset_cache()
    except (ImportError, AttributeError):
        pass
