"""The paper's numbers (Xie et al., ICML 2024), as plain data, for the reproduction pages.

Transcribed from the paper's Tables 1, 2, 3, 8, 9 and 10. Keys: dataset ("fashion_mnist",
"cifar10", "cinic10"), attack and defense names as the project spells them
(``--attack`` / ``--defense``). Percentages are in % as printed (not fractions); a
backdoor or targeted cell is ``(TACC, ASR)``. Figures 2-5 are images: the text gives no
number for them except that FedREDefense keeps 100 % DACC in every setting (Section 5.3,
Appendix B.2).
"""

from __future__ import annotations

DATASETS = ("fashion_mnist", "cifar10", "cinic10")
DATASET_NAMES = {"fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "cinic10": "CINIC-10"}

#: Table 2's columns, in the paper's order.
TABLE2_DEFENSES = ("fedavg", "krum", "median", "trimmed_mean", "norm_bound", "flame", "fltrust", "fldetector",
                   "flcert", "fedredefense")
#: Table 2's rows (Table 1's and Table 8's are the same without "none", with "lie" second).
TABLE2_ATTACKS = ("none", "fang", "min_max", "min_sum", "mpaf", "dba", "scaling")
TABLE1_ATTACKS = ("fang", "lie", "min_max", "min_sum", "mpaf", "dba", "scaling")
TABLE3_ATTACKS = ("label_flip", "targeted_label_flip", "adaptive_label_flip", "adaptive_targeted_label_flip")
TABLE10_ATTACKS = ("fang", "min_max", "min_sum", "dba", "scaling")


def _det(dacc, fpr, fnr, aar):
    return {"dacc": dacc, "fpr": fpr, "fnr": fnr, "aar": aar}


def _filt(adacc, afpr, afnr, aar):
    return {"adacc": adacc, "afpr": afpr, "afnr": afnr, "aar": aar}


def _t2(*values):
    return dict(zip(TABLE2_DEFENSES, values))


#: Table 1: DACC / FPR / FNR (%) and AAR (rounds) of FLDetector and FedREDefense, 100 clients,
#: 28 malicious, 500 rounds.
TABLE1 = {
    "fashion_mnist": {
        "fang": {"fldetector": _det(93.00, 9.72, 0.00, 60.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "lie": {"fldetector": _det(72.00, 0.00, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "min_max": {"fldetector": _det(72.00, 0.00, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "min_sum": {"fldetector": _det(72.00, 0.00, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "mpaf": {"fldetector": _det(0.00, 100.00, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "dba": {"fldetector": _det(100.00, 0.00, 0.00, 60.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "scaling": {"fldetector": _det(100.00, 0.00, 0.00, 60.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
    },
    "cifar10": {
        "fang": {"fldetector": _det(94.00, 8.33, 0.00, 0.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "lie": {"fldetector": _det(0.00, 100.00, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "min_max": {"fldetector": _det(0.00, 100.00, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "min_sum": {"fldetector": _det(0.00, 100.00, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "mpaf": {"fldetector": _det(0.00, 100.00, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "dba": {"fldetector": _det(99.00, 0.00, 3.57, 75.71), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "scaling": {"fldetector": _det(100.00, 0.00, 0.00, 60.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
    },
    "cinic10": {
        "fang": {"fldetector": _det(86.00, 19.44, 0.00, 60.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "lie": {"fldetector": _det(5.00, 93.06, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "min_max": {"fldetector": _det(72.00, 0.00, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "min_sum": {"fldetector": _det(8.00, 88.89, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "mpaf": {"fldetector": _det(0.00, 100.00, 100.00, 500.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "dba": {"fldetector": _det(100.00, 0.00, 0.00, 60.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
        "scaling": {"fldetector": _det(100.00, 0.00, 0.00, 60.00), "fedredefense": _det(100.00, 0.00, 0.00, 0.00)},
    },
}


#: Table 2: TACC (%), or (TACC, ASR) (%) for the backdoors, attack x defense.
#: CIFAR-10's "No att" row is misaligned in the paper's text extraction: its nine values are
#: FedAvg ... FLCert and FedREDefense's value is missing (None).
TABLE2 = {
    "fashion_mnist": {
        "none": _t2(85.94, 60.45, 82.20, 85.98, 85.37, 81.73, 86.97, 86.03, 81.79, 86.04),
        "fang": _t2(28.18, 39.63, 35.67, 68.41, 70.86, 82.43, 84.06, 84.62, 75.87, 85.54),
        "min_max": _t2(76.85, 49.09, 72.10, 72.44, 77.96, 82.05, 82.10, 76.69, 78.89, 85.61),
        "min_sum": _t2(84.12, 53.47, 76.16, 78.70, 83.76, 79.08, 80.66, 84.08, 79.75, 85.68),
        "mpaf": _t2(20.46, 10.22, 76.73, 75.39, 20.26, 82.44, 79.95, 10.00, 79.15, 85.61),
        "dba": _t2((85.86, 98.33), (65.44, 7.93), (82.48, 5.69), (83.37, 9.24), (84.11, 69.11),
                   (82.30, 4.57), (76.27, 98.11), (85.96, 2.54), (82.49, 25.42), (85.54, 2.43)),
        "scaling": _t2((87.45, 98.42), (65.41, 6.56), (82.54, 78.04), (84.39, 87.46), (85.11, 88.86),
                       (82.03, 4.97), (82.16, 97.66), (86.07, 8.53), (82.86, 82.00), (85.66, 2.50)),
    },
    "cifar10": {
        "none": _t2(61.51, 26.86, 51.68, 61.44, 61.36, 51.17, 57.28, 61.59, 50.89, None),
        "fang": _t2(21.77, 3.04, 20.10, 23.64, 37.50, 54.44, 53.94, 58.56, 36.04, 61.06),
        "min_max": _t2(45.25, 9.88, 38.62, 38.20, 47.69, 57.30, 55.04, 5.57, 39.39, 61.06),
        "min_sum": _t2(55.14, 16.37, 39.58, 43.23, 54.60, 56.40, 54.73, 22.32, 44.15, 61.20),
        "mpaf": _t2(11.77, 10.42, 33.26, 26.39, 11.65, 56.71, 48.96, 10.00, 39.45, 61.05),
        "dba": _t2((59.32, 79.90), (28.43, 4.90), (51.85, 18.98), (51.47, 38.48), (59.78, 17.82),
                   (56.74, 0.15), (52.63, 13.36), (59.97, 3.86), (50.21, 41.61), (60.56, 3.81)),
        "scaling": _t2((63.85, 92.08), (27.69, 4.62), (51.04, 75.59), (52.72, 82.31), (60.16, 73.50),
                       (56.92, 0.19), (58.31, 87.00), (59.97, 3.86), (50.73, 80.51), (60.78, 4.03)),
    },
    "cinic10": {
        "none": _t2(52.25, 25.40, 43.89, 52.10, 52.00, 46.24, 39.66, 52.15, 42.96, 52.20),
        "fang": _t2(16.10, 4.47, 18.84, 22.27, 32.87, 42.17, 46.02, 46.01, 32.97, 50.81),
        "min_max": _t2(35.26, 9.96, 31.12, 30.33, 38.32, 46.12, 38.54, 13.23, 31.70, 50.96),
        "min_sum": _t2(45.26, 14.51, 31.28, 34.40, 45.79, 45.67, 40.12, 16.33, 35.80, 50.81),
        "mpaf": _t2(11.91, 10.91, 29.19, 20.10, 11.86, 49.65, 33.80, 10.91, 34.24, 51.04),
        "dba": _t2((44.70, 85.49), (22.51, 4.48), (43.33, 27.59), (44.53, 35.84), (49.99, 23.51),
                   (45.95, 5.65), (40.35, 43.14), (52.17, 5.12), (42.65, 39.19), (50.87, 4.48)),
        "scaling": _t2((53.43, 91.27), (22.82, 4.72), (43.48, 81.06), (45.52, 79.80), (51.46, 75.61),
                       (45.43, 6.41), (36.78, 98.60), (50.90, 4.24), (42.78, 83.14), (50.90, 4.02)),
    },
}


#: Table 3: TACC (%) or (TACC, ASR) (%) of FedREDefense with FedAvg or Norm Bound aggregating
#: the kept updates, under the data-poisoning and adaptive attacks.
TABLE3 = {
    "fashion_mnist": {
        "label_flip": {"fedavg": 72.99, "norm_bound": 83.30},
        "targeted_label_flip": {"fedavg": (85.62, 7.00), "norm_bound": (85.30, 6.20)},
        "adaptive_label_flip": {"fedavg": 71.57, "norm_bound": 77.30},
        "adaptive_targeted_label_flip": {"fedavg": (81.24, 6.10), "norm_bound": (81.99, 5.10)},
    },
    "cifar10": {
        "label_flip": {"fedavg": 52.95, "norm_bound": 54.34},
        "targeted_label_flip": {"fedavg": (60.95, 18.40), "norm_bound": (60.40, 18.60)},
        "adaptive_label_flip": {"fedavg": 47.04, "norm_bound": 47.67},
        "adaptive_targeted_label_flip": {"fedavg": (59.56, 10.40), "norm_bound": (56.62, 16.80)},
    },
    "cinic10": {
        "label_flip": {"fedavg": 44.58, "norm_bound": 45.26},
        "targeted_label_flip": {"fedavg": (51.33, 17.96), "norm_bound": (50.86, 18.58)},
        "adaptive_label_flip": {"fedavg": 38.66, "norm_bound": 39.48},
        "adaptive_targeted_label_flip": {"fedavg": (45.14, 30.87), "norm_bound": (44.27, 17.37)},
    },
}


#: Table 8: ADACC / AFPR / AFNR (%) and AAR (the caption's "ARR") of FLAME and FLTrust,
#: averaged over the rounds.
TABLE8 = {
    "fashion_mnist": {
        "fang": {"flame": _filt(79.34, 28.69, 0.00, 0.00), "fltrust": _filt(87.11, 17.90, 0.00, 0.00)},
        "lie": {"flame": _filt(27.58, 63.57, 95.20, 476.00), "fltrust": _filt(57.70, 20.79, 97.60, 488.00)},
        "min_max": {"flame": _filt(80.33, 27.23, 0.00, 0.00), "fltrust": _filt(87.03, 18.01, 67.40, 337.00)},
        "min_sum": {"flame": _filt(29.04, 62.08, 93.80, 469.00), "fltrust": _filt(57.93, 20.71, 97.00, 485.00)},
        "mpaf": {"flame": _filt(79.87, 27.96, 0.00, 0.00), "fltrust": _filt(87.03, 18.01, 0.00, 0.00)},
        "dba": {"flame": _filt(79.87, 27.95, 0.00, 0.00), "fltrust": _filt(65.54, 15.30, 83.73, 418.64)},
        "scaling": {"flame": _filt(79.84, 28.00, 0.00, 0.00), "fltrust": _filt(64.92, 15.23, 86.12, 430.61)},
    },
    "cifar10": {
        "fang": {"flame": _filt(81.09, 26.27, 0.00, 0.00), "fltrust": _filt(90.36, 13.39, 0.00, 0.00)},
        "lie": {"flame": _filt(73.09, 28.98, 21.60, 108.00), "fltrust": _filt(56.52, 22.98, 96.20, 482.00)},
        "min_max": {"flame": _filt(79.50, 28.48, 0.00, 0.00), "fltrust": _filt(66.15, 20.03, 69.40, 347.00)},
        "min_sum": {"flame": _filt(73.81, 29.06, 18.80, 94.00), "fltrust": _filt(58.24, 22.93, 90.20, 451.00)},
        "mpaf": {"flame": _filt(80.14, 27.58, 0.00, 0.00), "fltrust": _filt(90.14, 13.70, 0.00, 0.00)},
        "dba": {"flame": _filt(80.72, 26.78, 0.00, 0.00), "fltrust": _filt(66.75, 12.28, 87.15, 435.75)},
        "scaling": {"flame": _filt(80.74, 26.75, 0.00, 0.00), "fltrust": _filt(67.06, 10.54, 90.52, 452.61)},
    },
    "cinic10": {
        "fang": {"flame": _filt(79.46, 28.53, 0.00, 0.00), "fltrust": _filt(91.32, 12.06, 0.00, 0.00)},
        "lie": {"flame": _filt(78.59, 27.87, 4.80, 24.00), "fltrust": _filt(57.75, 21.73, 95.00, 475.00)},
        "min_max": {"flame": _filt(79.92, 27.88, 0.00, 0.00), "fltrust": _filt(63.68, 19.88, 78.60, 393.00)},
        "min_sum": {"flame": _filt(79.99, 27.80, 0.00, 0.00), "fltrust": _filt(58.58, 21.83, 91.80, 459.00)},
        "mpaf": {"flame": _filt(79.87, 27.96, 0.00, 0.00), "fltrust": _filt(90.74, 12.86, 0.00, 0.00)},
        "dba": {"flame": _filt(80.02, 27.75, 0.00, 0.00), "fltrust": _filt(67.17, 11.54, 87.59, 437.93)},
        "scaling": {"flame": _filt(79.84, 28.00, 0.00, 0.00), "fltrust": _filt(67.41, 10.48, 89.44, 447.21)},
    },
}


#: Table 9: AOI (outer iterations per client per round) of the three variants, Fang, CIFAR-10.
TABLE9 = {"cifar10": {"continuous": 60.88, "intermittent": 50.00, "dynamic": 2.40}}

#: Table 10: reconstruction errors, (mean, std); std None where the paper gives only the mean
#: (Fang, Min-Max, Min-Sum: "negligible standard deviation < 1e-3").
TABLE10 = {
    "fashion_mnist": {"benign": (0.36, 0.03), "fang": (0.97, None), "min_max": (0.99, None),
                      "min_sum": (0.98, None), "dba": (0.74, 0.02), "scaling": (0.74, 0.03)},
    "cifar10": {"benign": (0.18, 0.02), "fang": (0.97, None), "min_max": (0.99, None),
                "min_sum": (0.97, None), "dba": (0.82, 0.02), "scaling": (0.83, 0.02)},
    "cinic10": {"benign": (0.31, 0.03), "fang": (0.99, None), "min_max": (1.00, None),
                "min_sum": (0.97, None), "dba": (0.81, 0.02), "scaling": (0.82, 0.02)},
}

#: Figures 2-5: FedREDefense's DACC (%) at every point of every sweep (Section 5.3, Appendix B.2).
FIGURES_FEDREDEFENSE_DACC = 100.0


def tacc_asr_text(value) -> str | None:
    """A Table 2 / 3 cell as printed: ``"TACC"`` or ``"TACC/ASR"`` (None for a missing one)."""
    tacc, asr = tacc_asr(value)
    return None if tacc is None else f"{tacc:.2f}" + (f"/{asr:.2f}" if asr is not None else "")


def tacc_asr(value) -> tuple:
    """``(TACC, ASR)`` of a Table 2 / 3 cell: ``(v, None)`` for a plain number, ``(None, None)``
    for a missing one."""
    if value is None:
        return None, None
    if isinstance(value, tuple):
        return value
    return value, None
