"""Hand-made cases for fedredefense_jax/metrics.py."""

from __future__ import annotations

import math

import numpy as np

from fedredefense_jax import metrics as M

# 5 clients, the last 2 malicious.
MAL = np.array([False, False, False, True, True])


def test_detection_metrics():
    flagged = np.array([False, True, False, True, False])  # one FP, one FN
    d = M.detection_metrics(flagged, MAL)
    assert math.isclose(d["dacc"], 3 / 5)
    assert math.isclose(d["fpr"], 1 / 3)
    assert math.isclose(d["fnr"], 1 / 2)
    perfect = M.detection_metrics(MAL, MAL)
    assert perfect == {"dacc": 1.0, "fpr": 0.0, "fnr": 0.0}
    none_mal = M.detection_metrics(np.zeros(3, bool), np.zeros(3, bool))
    assert none_mal["dacc"] == 1.0 and none_mal["fpr"] == 0.0 and math.isnan(none_mal["fnr"])


def test_aar():
    # 4 rounds; client 3 aggregated in rounds 0,1 then expelled; client 4 never aggregated.
    w = np.ones((4, 5))
    w[2:, 3] = 0
    w[:, 4] = 0
    assert math.isclose(M.aar(w, MAL), (2 + 0) / 2)
    assert math.isnan(M.aar(w, np.zeros(5, bool)))


def test_aoi():
    it = np.array([[800, 500, 0, 0, 0],
                   [2, 1, 0, 0, 0],
                   [0, 0, 0, 0, 0]])
    part = np.array([[1, 1, 0, 0, 0],
                     [1, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0]], bool)  # round 2: nobody participated -> skipped
    assert math.isclose(M.aoi(it, part), (650 + 1) / 2)


def test_error_distribution():
    e = np.array([[0.2, 0.4, np.nan, 0.9, 1.0],
                  [0.3, 0.3, 0.5, np.nan, np.nan]])
    part = np.array([[1, 1, 0, 1, 1], [1, 1, 1, 0, 0]], bool)
    d = M.error_distribution(e, MAL, part)
    b = np.array([0.2, 0.4, 0.3, 0.3, 0.5])
    assert np.allclose(d["benign"][:2], (b.mean(), b.std())) and d["benign"][2] == 5
    assert np.allclose(d["malicious"][:2], (0.95, 0.05)) and d["malicious"][2] == 2
    d1 = M.error_distribution(np.array([0.1, 0.3, 0.2, np.inf, 0.8]), MAL)
    assert d1["malicious"] == (0.8, 0.0, 1)  # non-finite errors are left out


def test_per_round_detection():
    part = np.array([[1, 1, 1, 1, 1],
                     [1, 1, 1, 0, 0],   # no malicious participant: FNR undefined
                     [0, 0, 0, 0, 0]], bool)  # empty round: skipped
    w = np.array([[1, 0, 1, 0, 1],      # DACC 3/5, FPR 1/3, FNR 1/2
                  [1, 1, 1, 0, 0],      # DACC 1, FPR 0
                  [0, 0, 0, 0, 0]], float)
    r = M.per_round_detection(w, part, MAL)
    assert math.isclose(r["adacc"], (0.6 + 1.0) / 2)
    assert math.isclose(r["afpr"], (1 / 3 + 0) / 2)
    assert math.isclose(r["afnr"], 0.5)
    assert math.isnan(r["fnr"][1]) and math.isnan(r["dacc"][2])


def test_slots_to_clients_and_expelled():
    ids = np.array([[3, 0, 1], [4, 2, 0]])
    valid = np.array([[True, True, False], [True, True, True]])
    vals = np.array([[10, 20, 99], [30, 40, 50]])
    out = M.slots_to_clients(vals, ids, valid, 5, fill=-1)
    np.testing.assert_array_equal(out, [[20, -1, -1, 10, -1], [50, -1, 40, -1, 30]])
    flagged = np.array([[True, False, True], [False, False, False]])  # slot 2 of round 0 is padding
    np.testing.assert_array_equal(M.expelled_clients(flagged, ids, valid, 5),
                                  [False, False, False, True, False])
