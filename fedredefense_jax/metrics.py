"""Detection and efficiency metrics of the paper (Appendix A.4, B.1, B.3, B.4), in numpy.

Conventions: "positive" = malicious. ``malicious`` is a ``[C]`` bool ground truth over all
clients. Per-round quantities are ``[T, C]`` arrays over rounds and clients; use
:func:`slots_to_clients` to turn the simulator's per-slot ``[T, S]`` records (with
``client_ids`` and ``valid``) into them. Rates whose denominator is empty (e.g. FNR with no
malicious client) are NaN, and averages over rounds skip NaN rounds. Percentages are not
applied: every rate is a fraction in [0, 1].
"""

from __future__ import annotations

import numpy as np


def slots_to_clients(values, client_ids, valid, num_clients: int, fill=0):
    """Scatters per-slot records ``[T, S]`` into per-client ``[T, C]`` (``fill`` elsewhere).

    Invalid (padding) slots are ignored.
    """
    values = np.asarray(values)
    client_ids = np.asarray(client_ids)
    valid = np.asarray(valid, bool)
    dtype = np.result_type(values, np.asarray(fill))
    out = np.full((values.shape[0], num_clients), fill, dtype=dtype)
    t, s = np.nonzero(valid)
    out[t, client_ids[t, s]] = values[t, s]
    return out


def _rates(pred_malicious, malicious):
    pred = np.asarray(pred_malicious, bool)
    mal = np.asarray(malicious, bool)
    n = pred.size
    n_mal = int(mal.sum())
    n_ben = n - n_mal
    dacc = float(np.mean(pred == mal)) if n else float("nan")
    fpr = float(np.sum(pred & ~mal) / n_ben) if n_ben else float("nan")
    fnr = float(np.sum(~pred & mal) / n_mal) if n_mal else float("nan")
    return dacc, fpr, fnr


def detection_metrics(flagged, malicious) -> dict:
    """Final-label detection metrics over all clients.

    ``flagged[C]``: the client was flagged/expelled at some round (the final label);
    ``malicious[C]``: ground truth.

    * DACC = #(flagged == malicious) / C
    * FPR  = #(flagged & benign) / #benign
    * FNR  = #(not flagged & malicious) / #malicious

    Returns ``{'dacc', 'fpr', 'fnr'}`` as fractions (NaN for an empty denominator).
    """
    dacc, fpr, fnr = _rates(flagged, malicious)
    return {"dacc": dacc, "fpr": fpr, "fnr": fnr}


def aar(weights, malicious) -> float:
    """Averaged Aggregated Rounds for malicious clients.

    ``weights[T, C]``: aggregation weight each client got each round, or whether its update
    was aggregated (bool; 0 / False = excluded or not participating). AAR = mean over
    malicious clients of #rounds with weight > 0.
    NaN when there is no malicious client.
    """
    w = np.asarray(weights)
    mal = np.asarray(malicious, bool)
    if not mal.any():
        return float("nan")
    return float(np.mean(np.sum(w[:, mal] > 0, axis=0)))


def aoi(iterations, participated) -> float:
    """Average Optimisation Iterations (Appendix B.3).

    ``iterations[T, C]``: outer iterations of each client each round; ``participated[T, C]``
    bool. AOI = mean over rounds (with at least one participant) of the mean iterations of
    that round's participants (as the authors: ``sum_t (sum_i it_i^t / |M^t|) / #rounds``).
    """
    it = np.asarray(iterations, np.float64)
    part = np.asarray(participated, bool)
    counts = part.sum(axis=1)
    keep = counts > 0
    if not keep.any():
        return float("nan")
    per_round = np.where(part, it, 0.0).sum(axis=1)[keep] / counts[keep]
    return float(per_round.mean())


def error_distribution(errors, malicious, participated=None) -> dict:
    """Mean and std of reconstruction errors of benign and of malicious clients (Table 10).

    ``errors[T, C]`` (or ``[C]``); ``participated`` same shape (default: finite entries).
    Only finite errors of participating entries count. Returns
    ``{'benign': (mean, std, count), 'malicious': (mean, std, count)}``; mean/std NaN when
    the count is 0. std is the population std (ddof = 0).
    """
    e = np.asarray(errors, np.float64)
    if e.ndim == 1:
        e = e[None]
    mal = np.broadcast_to(np.asarray(malicious, bool), e.shape)
    if participated is None:
        part = np.ones(e.shape, bool)
    else:
        part = np.asarray(participated, bool).reshape(e.shape)
    ok = part & np.isfinite(e)
    out = {}
    for name, sel in (("benign", ok & ~mal), ("malicious", ok & mal)):
        vals = e[sel]
        if vals.size:
            out[name] = (float(vals.mean()), float(vals.std()), int(vals.size))
        else:
            out[name] = (float("nan"), float("nan"), 0)
    return out


def per_round_detection(weights, participated, malicious) -> dict:
    """ADACC / AFPR / AFNR (Appendix B.1): per-round DACC/FPR/FNR over the participating
    clients, judged malicious when their weight is 0, averaged over rounds.

    ``weights[T, C]`` (or the bool ``aggregated``), ``participated[T, C]`` bool,
    ``malicious[C]``. A round with no
    participating benign (malicious) client has an undefined FPR (FNR) and is skipped in
    that average. Returns ``{'adacc', 'afpr', 'afnr', 'dacc', 'fpr', 'fnr'}`` where the
    last three are the ``[T]`` per-round series (NaN where undefined).
    """
    w = np.asarray(weights)
    part = np.asarray(participated, bool)
    mal = np.asarray(malicious, bool)
    series = np.full((3, w.shape[0]), np.nan)
    for t in range(w.shape[0]):
        sel = part[t]
        if sel.any():
            series[:, t] = _rates(w[t, sel] == 0, mal[sel])

    def nanmean(x):
        x = x[np.isfinite(x)]
        return float(x.mean()) if x.size else float("nan")

    return {"adacc": nanmean(series[0]), "afpr": nanmean(series[1]), "afnr": nanmean(series[2]),
            "dacc": series[0], "fpr": series[1], "fnr": series[2]}


def expelled_clients(flagged, client_ids, valid, num_clients: int) -> np.ndarray:
    """``[C]`` bool final labels from per-slot ``flagged[T, S]``: flagged in any round."""
    per_client = slots_to_clients(np.asarray(flagged, bool), client_ids, valid, num_clients, False)
    return per_client.any(axis=0)


def records_to_arrays(records: list[dict], num_clients: int) -> dict:
    """Per-round records of the simulator (participants, weights, aggregated and optional
    per-participant 'error' / 'iterations' lists) -> ``[T, C]`` arrays ``participated``,
    ``weights``, ``aggregated`` (bool: the update entered the aggregate; records without the
    field: weight > 0), ``error`` (NaN where absent) and ``iterations``."""
    t = len(records)
    out = {"participated": np.zeros((t, num_clients), bool), "weights": np.zeros((t, num_clients)),
           "aggregated": np.zeros((t, num_clients), bool),
           "error": np.full((t, num_clients), np.nan), "iterations": np.zeros((t, num_clients))}
    for i, r in enumerate(records):
        ids = np.asarray(r["participants"], int)
        out["participated"][i, ids] = True
        out["weights"][i, ids] = r["weights"]
        out["aggregated"][i, ids] = r["aggregated"] if "aggregated" in r else np.asarray(r["weights"]) > 0
        if "error" in r:
            out["error"][i, ids] = [np.nan if e is None else e for e in r["error"]]
        if "iterations" in r:
            out["iterations"][i, ids] = r["iterations"]
    return out


def summarize(records: list[dict], malicious, expelled) -> dict:
    """The detection summary of a run: DACC/FPR/FNR of the final labels (``expelled[C]``),
    AAR, ADACC/AFPR/AFNR, and, when the defense reports them, AOI and the benign/malicious
    reconstruction-error distributions (Table 10)."""
    malicious = np.asarray(malicious, bool)
    arr = records_to_arrays(records, malicious.size)
    out = detection_metrics(expelled, malicious)
    out["aar"] = aar(arr["aggregated"], malicious)
    prd = per_round_detection(arr["aggregated"], arr["participated"], malicious)
    out.update({k: prd[k] for k in ("adacc", "afpr", "afnr")})
    if records and "iterations" in records[0]:
        out["aoi"] = aoi(arr["iterations"], arr["participated"])
        it = arr["iterations"][arr["participated"]]
        out["iterations_max"] = float(it.max()) if it.size else float("nan")
    if records and "error" in records[0]:
        dist = error_distribution(arr["error"], malicious, arr["participated"])
        out["error_benign"] = dict(zip(("mean", "std", "count"), dist["benign"]))
        out["error_malicious"] = dict(zip(("mean", "std", "count"), dist["malicious"]))
        first = error_distribution(_first_participation(arr["error"], arr["participated"]), malicious)
        out["error_first_benign"] = dict(zip(("mean", "std", "count"), first["benign"]))
        out["error_first_malicious"] = dict(zip(("mean", "std", "count"), first["malicious"]))
    return out


def _first_participation(errors, participated):
    """``[C]`` error of each client at its first participation (NaN if it never took part)."""
    first = np.argmax(participated, axis=0)
    out = errors[first, np.arange(errors.shape[1])]
    return np.where(participated.any(axis=0), out, np.nan)


def attack_success_rate(pred, y, target: int, source: int | None = None) -> float:
    """ASR (Appendix A.4; Section 6.1 for the targeted label flip) from the predictions
    ``pred`` of the (possibly trigger-stamped) test images with true labels ``y``: among the
    images of class ``source`` (``None``: of every class but ``target``), the fraction
    predicted as ``target``; NaN when there are none."""
    pred, y = np.asarray(pred), np.asarray(y)
    keep = (y == source) if source is not None else (y != target)
    return float(np.mean(pred[keep] == target)) if keep.any() else float("nan")
