"""The three scales of a reproduction: the settings every cell shares and the rows,
columns and sweep points each target covers."""

from __future__ import annotations

import dataclasses

from fedredefense_jax import paper

SCALES = ("smoke", "small", "paper")
#: Training images of each dataset's train split (for the scale's training subsets).
TRAIN_SIZES = {"fashion_mnist": 60000, "cifar10": 50000, "cinic10": 90000}


@dataclasses.dataclass(frozen=True)
class Scale:
    """The settings of every cell at one scale, and the rows / columns / sweeps it covers.

    ``defense_config`` is given to every cell's defense that takes the setting (as
    ``experiments/grid.py`` hands out its ``--defense_config``): FedREDefense's caps,
    FLDetector's cold start and window; empty: the paper's settings (Table 7, 50 + 10
    rounds). ``epochs_sweep`` pairs local epochs with their rounds.
    """

    name: str
    num_clients: int
    num_malicious: int
    rounds: int
    eval_every: int
    train_fraction: float | None  # of the dataset's training images (None: all of them)
    train_images: int | None  # a fixed count instead (smoke)
    checkpoint_every: int
    defense_config: dict
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
        """Training images of ``dataset`` at this scale (None: all)."""
        if self.train_images is not None:
            return self.train_images
        if self.train_fraction is None:
            return None
        return round(TRAIN_SIZES[dataset] * self.train_fraction)


_FIGURE_DEFENSES = ("fedredefense", "fldetector", "flame", "fltrust")  # Section 5.3's comparison set
_FIGURE_ATTACKS = ("fang", "lie", "mpaf", "scaling")
_TABLE8_DEFENSES = ("flame", "fltrust", "fldetector")

SCALE_SETTINGS = {
    "smoke": Scale(
        name="smoke", num_clients=6, num_malicious=2, rounds=2, eval_every=2, train_fraction=None,
        train_images=600, checkpoint_every=2,
        defense_config={"first_cap": 3, "later_cap": 3, "redefense_inner_unroll": 1, "fldetector_cold_start": 0,
                        "fldetector_window": 1},
        table_datasets=("fashion_mnist",), table9_datasets=("fashion_mnist",), figure_datasets=("fashion_mnist",),
        table1_attacks=("fang",), table2_attacks=("none", "fang", "scaling"),
        table2_defenses=("fedavg", "fedredefense"),
        table3_attacks=("adaptive_targeted_label_flip",), table8_attacks=("fang",), table8_defenses=_TABLE8_DEFENSES,
        table10_attacks=("fang", "scaling"), figure_attacks=("fang",), figure_defenses=("fedredefense",),
        malicious_sweep=(2, 4), beta_sweep=(1.0, 0.1), epochs_sweep=((1, 2), (2, 1)), rate_sweep=(0.5, 1.0),
        notes=(("Smoke scale: a check that every step runs and renders, not a measurement: 17 runs of at most 2 "
               "rounds for the ten targets. Subsets of the paper's rows and columns (Table 1 and 8: Fang; Table 2: "
               "no attack, Fang and Scaling under FedAvg and FedREDefense; Table 3: Adaptive Targeted Label "
               "Flip; Table 10: Fang and Scaling; figures: Fang under FedREDefense, two points per sweep); "
               "FedREDefense capped at 3 outer iterations (first and later participations); FLDetector with "
               "cold start 0 and a window of 1 round."),)),
    "small": Scale(
        name="small", num_clients=30, num_malicious=8, rounds=10, eval_every=5, train_fraction=0.3,
        train_images=None, checkpoint_every=1, defense_config={"fldetector_cold_start": 2, "fldetector_window": 3},
        table_datasets=("fashion_mnist",), table9_datasets=("fashion_mnist",), figure_datasets=("fashion_mnist",),
        table1_attacks=paper.TABLE1_ATTACKS, table2_attacks=paper.TABLE2_ATTACKS,
        table2_defenses=paper.TABLE2_DEFENSES, table3_attacks=paper.TABLE3_ATTACKS,
        table8_attacks=paper.TABLE1_ATTACKS, table8_defenses=_TABLE8_DEFENSES,
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
        train_images=None, checkpoint_every=10, defense_config={},
        table_datasets=paper.DATASETS, table9_datasets=("cifar10",), figure_datasets=("cifar10",),
        table1_attacks=paper.TABLE1_ATTACKS, table2_attacks=paper.TABLE2_ATTACKS,
        table2_defenses=paper.TABLE2_DEFENSES, table3_attacks=paper.TABLE3_ATTACKS,
        table8_attacks=paper.TABLE1_ATTACKS, table8_defenses=_TABLE8_DEFENSES,
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
    """The :class:`Scale` called ``name`` (ValueError naming the scales if unknown)."""
    if name not in SCALE_SETTINGS:
        raise ValueError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)}")
    return SCALE_SETTINGS[name]
