"""A finished cell's values, computed from the first ``rounds`` records of its run (a
longer run serves a shorter cell): test accuracy and ASR of the last evaluation at or
before that round, detection metrics of those rounds, every reconstruction error,
per-round latency and the code's commit."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedredefense_jax import metrics, records
from fedredefense_jax.reproduction.cells import Location
from fedredefense_jax.simulation import malicious_clients

LATENCY_PARTS = (("train_s", "local training"), ("attack_s", "attack"), ("detection_s", "detection"),
                 ("aggregation_s", "aggregation"))
_KEPT = ("participants", "weights", "aggregated", "error", "iterations")  # what metrics.summarize reads


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
    errors: list  # (error or None, malicious, first participation, iterations) per participation
    gamma: float
    latency: dict  # mean seconds per round of each LATENCY_PARTS key
    minutes: float  # summed round times
    commit: str  # the code's commit as the run recorded it, or "unrecorded"
    config: dict  # as the run recorded it


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_result(loc: Location) -> Result | None:
    """The cell's values from its run's records (None when the cell is not finished)."""
    if loc.run_dir is None:
        return None
    summary = records.read_summary(loc.run_dir)
    config = summary.get("config") or records.read_config(loc.run_dir)
    try:
        rows = records.read_rounds(loc.run_dir)[:loc.cell.rounds]
    except OSError:  # a finished run without rounds.jsonl: no value
        rows = []
    num_clients = int(config["num_clients"])
    # under no attack the last q clients are honest
    malicious = malicious_clients(num_clients, loc.cell.num_malicious if loc.cell.attack != "none" else 0)
    expelled = np.zeros(num_clients, bool)
    for r in rows:
        expelled[np.asarray(r.get("flagged", []), int)] = True
    detection = metrics.summarize([{k: r[k] for k in _KEPT if k in r} for r in rows], malicious, expelled) \
        if rows else {}
    evals = [r for r in rows if "test_acc" in r]
    last = evals[-1] if evals else {}
    seen: set = set()
    errors = []
    for r in rows:
        its = r.get("iterations") or [None] * len(r["participants"])
        for i, c in enumerate(r["participants"]):
            if r.get("error") is not None:
                errors.append((r["error"][i], bool(malicious[c]), c not in seen, its[i]))
            seen.add(c)
    return Result(
        run_dir=loc.run_dir, reused=loc.reused, rounds=len(rows), eval_round=last.get("round"),
        tacc=last.get("test_acc"), asr=last.get("asr"), detection=detection, errors=errors,
        gamma=float((config.get("defense_config") or {}).get("gamma", 0.6)),
        latency={k: float(np.mean([r.get(k, 0.0) for r in rows])) if rows else 0.0 for k, _ in LATENCY_PARTS},
        minutes=sum(r.get("round_s", 0.0) for r in rows) / 60,
        commit=(summary.get("environment") or {}).get("git_commit") or "unrecorded", config=config)


def errors_of(r: Result | None, malicious: bool, first: bool | None = None) -> list:
    """The reconstruction errors of the benign / malicious participations (only the
    first participations, or only the later ones)."""
    if r is None:
        return []
    return [e for e, m, f, _ in r.errors if m == malicious and (first is None or f == first)]


def error_stats(values: list) -> tuple | None:
    """(mean, population std, count) of the finite values, None when there is none."""
    v = np.asarray([x for x in values if finite(x)], np.float64)
    return (float(v.mean()), float(v.std()), int(v.size)) if v.size else None
