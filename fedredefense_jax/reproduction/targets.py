"""Which runs ("cells") each target needs at a scale, and each cell's configuration.

A :class:`Cell` is one configuration: the scale's settings plus the cell's attack,
defense and the settings a target varies. Targets that need the same configuration
get equal cells (Table 1's FedREDefense cells are Table 2's, 8's and 10's; each
figure's default point is the tables' cell), so it runs once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from fedredefense_jax import grid, paper
from fedredefense_jax.config import ExperimentConfig
from fedredefense_jax.defenses.redefense import TABLE7
from fedredefense_jax.reproduction.scales import Scale, scale_settings

TARGETS = ("table1", "table2", "table3", "table8", "table9", "table10", "fig2", "fig3", "fig4", "fig5")
VARIANTS = ("continuous", "intermittent", "dynamic")  # Table 9's columns
AGGREGATORS = ("fedavg", "norm_bound")  # Table 3's columns


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration: the scale's settings plus these. ``options`` are sorted
    ``(setting, value)`` pairs of the cell's defense (FedREDefense's
    ``redefense_aggregator``, ``redefense_variant``, ``first_cap``, ``later_cap``)."""

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
        """The grid's ``DEFENSE__ATTACK`` and a part per setting that differs from the
        scale's: ``q22``, ``beta0.5``, ``E2``, ``rate0.1``, ``SETTING-VALUE`` (FedREDefense's
        settings without their ``redefense_`` prefix)."""
        parts = []
        if self.num_malicious != scale.num_malicious:
            parts.append(f"q{self.num_malicious}")
        if self.beta != scale.beta:
            parts.append(f"beta{self.beta:g}")
        if self.local_epochs != 1:
            parts.append(f"E{self.local_epochs}")
        if self.participation_rate != 1.0:
            parts.append(f"rate{self.participation_rate:g}")
        parts += [f"{k.removeprefix('redefense_')}-{v}" for k, v in self.options]
        return grid.cell_name(self.defense, self.attack, *parts)

    def label(self, scale: Scale) -> str:
        return f"{self.dataset}/{self.name(scale)}"


def cell_dir(root: str, scale: Scale, cell: Cell) -> str:
    """``ROOT/<scale>/<dataset>/<cell name>``."""
    return os.path.join(root, scale.name, cell.dataset, cell.name(scale))


def make_config(cell: Cell, scale: Scale, data_dir: str | None, output_dir: str) -> ExperimentConfig:
    """The run of ``cell``: the paper's CNN and the scale's federation; the defense gets the
    scale's ``defense_config`` settings it takes and the cell's options; every other
    setting at its default."""
    defense_config = grid.settings_taken("defense", cell.defense, scale.defense_config) | dict(cell.options)
    return ExperimentConfig(
        dataset=cell.dataset, data_dir=data_dir, model="cnn", num_clients=scale.num_clients,
        num_malicious=cell.num_malicious, beta=cell.beta, rounds=cell.rounds, local_epochs=cell.local_epochs,
        participation_rate=cell.participation_rate, train_subset=scale.train_subset(cell.dataset),
        attack=cell.attack, defense=cell.defense, defense_config=defense_config, output_dir=output_dir,
        eval_every=min(scale.eval_every, cell.rounds), checkpoint_every=min(scale.checkpoint_every, cell.rounds))


@dataclasses.dataclass
class Page:
    """A target at a scale: its datasets, rows and columns, and ``cells[key] = Cell`` with
    keys as the target's page reads them: ``(dataset, attack, column)``, and for the
    figures ``(dataset, attack, defense, sweep value)``."""

    target: str
    scale: Scale
    datasets: tuple
    attacks: tuple
    columns: tuple  # defenses (tables 1, 2, 8, 10, figures), aggregators (table 3), variants (table 9)
    cells: dict
    sweep: tuple = ()  # figures: ((value, label), ...)
    options: dict = dataclasses.field(default_factory=dict)  # the datasets / attacks the page was built with

    def unique_cells(self) -> list[Cell]:
        """The page's cells, each configuration once, in the page's order."""
        return list(dict.fromkeys(self.cells.values()))


def build_page(target: str, scale_name: str, data_dirs: dict | None = None, datasets: Iterable[str] | None = None,
               attacks: Iterable[str] | None = None) -> Page:
    """The :class:`Page` of ``target`` at ``scale_name``. ``datasets`` / ``attacks`` replace the
    scale's choice for the target (attacks: the rows, or the figures' panels); CINIC-10 is
    left out unless ``data_dirs`` names its data (it cannot be downloaded)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    scale = scale_settings(scale_name)
    for d in datasets or ():
        if d not in paper.DATASETS:
            raise ValueError(f"unknown dataset {d!r}; choose among {', '.join(paper.DATASETS)}")
    default = (scale.table9_datasets if target == "table9" else
               scale.figure_datasets if target.startswith("fig") else scale.table_datasets)
    ds = tuple(d for d in (datasets or default) if d != "cinic10" or (data_dirs or {}).get("cinic10"))
    if not ds:
        raise ValueError("no dataset left: CINIC-10 cells need its data (--cinic_dir)")
    options = {"datasets": tuple(datasets) if datasets else None, "attacks": tuple(attacks) if attacks else None}
    rows, columns, cells = _TABLES.get(target, _figure_cells)(target, scale, ds, options["attacks"])
    sweep = _sweep(target, scale) if target.startswith("fig") else ()
    return Page(target, scale, ds, rows, columns, cells, sweep, options)


def _cell(scale: Scale, dataset: str, defense: str, attack: str, *, num_malicious: int | None = None,
          rounds: int | None = None, beta: float | None = None, local_epochs: int = 1,
          participation_rate: float = 1.0, **options) -> Cell:
    opts = tuple(sorted((k, v) for k, v in options.items() if v is not None))
    return Cell(dataset, defense, attack, scale.num_malicious if num_malicious is None else int(num_malicious),
                scale.rounds if rounds is None else int(rounds), float(scale.beta if beta is None else beta),
                int(local_epochs), float(participation_rate), opts)


def _grid_cells(target, scale, ds, attacks):
    """Tables 1, 2, 8: attack x defense."""
    rows = attacks or {"table1": scale.table1_attacks, "table2": scale.table2_attacks,
                       "table8": scale.table8_attacks}[target]
    cols = {"table1": ("fldetector", "fedredefense"), "table2": scale.table2_defenses,
            "table8": scale.table8_defenses}[target]
    return rows, cols, {(d, a, f): _cell(scale, d, f, a) for d in ds for a in rows for f in cols}


def _table10_cells(target, scale, ds, attacks):
    """FedREDefense without attack (the benign errors) and under each attack."""
    rows = ("none",) + tuple(attacks or scale.table10_attacks)
    return rows, ("fedredefense",), {(d, a, "fedredefense"): _cell(scale, d, "fedredefense", a)
                                     for d in ds for a in rows}


def _table3_cells(target, scale, ds, attacks):
    """FedREDefense aggregating the kept updates with FedAvg (its default) or Norm Bound."""
    rows = attacks or scale.table3_attacks
    return rows, AGGREGATORS, {(d, a, g): _cell(scale, d, "fedredefense", a,
                                                redefense_aggregator=None if g == "fedavg" else g)
                               for d in ds for a in rows for g in AGGREGATORS}


def _table9_cells(target, scale, ds, attacks):
    """FedREDefense's three variants (dynamic is its default)."""
    rows = attacks or ("fang",)
    return rows, VARIANTS, {(d, a, v): _cell(scale, d, "fedredefense", a,
                                             redefense_variant=None if v == "dynamic" else v)
                            for d in ds for a in rows for v in VARIANTS}


_TABLES = {"table1": _grid_cells, "table2": _grid_cells, "table8": _grid_cells, "table10": _table10_cells,
           "table3": _table3_cells, "table9": _table9_cells}


def _figure_cells(target, scale, ds, attacks):
    """One cell per (dataset, attack, defense, sweep point) where the defense applies:
    FLAME only with a benign majority, FLDetector only when every client takes part; under
    more local epochs FedREDefense's caps times the epochs (Appendix B.2), under partial
    participation its later cap divided by the rate (later participations are further apart)."""
    rows = attacks or scale.figure_attacks
    cols = tuple(f for f in scale.figure_defenses if not (target == "fig5" and f == "fldetector"))
    cells = {}
    for d in ds:
        first = int(scale.defense_config.get("first_cap", TABLE7[d]["first_cap"]))
        later = int(scale.defense_config.get("later_cap", TABLE7[d]["later_cap"]))
        for a in rows:
            for value, _ in _sweep(target, scale):
                for f in cols:
                    kw: dict = {}
                    if target == "fig2":
                        if f == "flame" and value / scale.num_clients > 0.5:
                            continue  # the paper leaves FLAME out at 72 %
                        kw["num_malicious"] = value
                    elif target == "fig3":
                        kw["beta"] = value
                    elif target == "fig4":
                        epochs, kw["rounds"] = value
                        kw["local_epochs"] = epochs
                        if f == "fedredefense" and epochs != 1:
                            kw.update(first_cap=first * epochs, later_cap=later * epochs)
                    else:
                        kw["participation_rate"] = value
                        if f == "fedredefense" and value != 1.0:
                            kw["later_cap"] = round(later / value)
                    cells[d, a, f, value] = _cell(scale, d, f, a, **kw)
    return rows, cols, cells


def _sweep(target: str, scale: Scale) -> tuple:
    """``((value, label), ...)`` of the figure's swept setting."""
    p = scale.num_clients
    if target == "fig2":
        return tuple((q, f"{q} of {p} ({100 * q / p:.0f} %)") for q in scale.malicious_sweep)
    if target == "fig3":
        return tuple((b, f"beta {b:g}") for b in scale.beta_sweep)
    if target == "fig4":
        return tuple(((e, r), f"{e} epoch{'s' if e > 1 else ''}, {r} rounds") for e, r in scale.epochs_sweep)
    return tuple((r, f"rate {r:g}") for r in scale.rate_sweep)
