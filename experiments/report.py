"""Markdown summary of FedREDefense runs from their ``summary.json`` and ``rounds.jsonl``.

    python experiments/report.py runs/acc_fmnist_cnn_mpaf runs/acc_fmnist_cnn_sign_flip
    python experiments/report.py --curves[=10,20,30] runs/convnet30/fedavg__none runs/convnet30/fedavg__scaling
    python experiments/report.py --plot=curves.png runs/grid100/fedavg__none runs/grid100/fedavg__min_max

Per run: DACC, FPR, FNR (final labels), AAR, ADACC / AFPR / AFNR (averaged over rounds:
what describes a per-round filter such as FLAME, which never expels), AOI; errors (mean +- std) of benign and malicious
participations, at first participation and over all rounds; outer iterations per client at
first participation and later (median / max), benign and malicious; malicious participations
flagged; final test accuracy; the summed round times (resumed runs included), the last
process's wall time and median seconds per round (training and detection).

With ``--curves``: one row per run, one column per evaluated round (all of them, or the
comma-separated rounds given), each cell the test accuracy in % or, for runs that record an
attack success rate, ``TACC / ASR / asr_base`` in % (``asr_base``: the same count on images
without the trigger); ``-`` where the run has no evaluation at that round.

With ``--plot=FILE`` (any format matplotlib writes: .png, .pdf, .svg): the same evaluations
as a figure, test accuracy (solid) and, where recorded, ASR (dashed) in % against the round,
one colour per run.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from fedredefense_jax import records


def _pm(d) -> str:
    if not d or d.get("mean") is None:
        return "-"
    return f"{d['mean']:.3f} +- {d['std']:.3f} (n={d['count']})"


def read_rounds(run_dir: str) -> list[dict]:
    """The per-round records of ``run_dir/rounds.jsonl``."""
    try:
        return records.read_rounds(run_dir)
    except FileNotFoundError:
        path = os.path.join(run_dir, records.ROUNDS)
        raise SystemExit(f"report: {path} not found (is {run_dir!r} a run's --output_dir?)") from None


def describe(run_dir: str) -> dict:
    rows = read_rounds(run_dir)
    s = records.read_summary(run_dir)
    seen = set()
    its = {(m, f): [] for m in ("benign", "malicious") for f in ("first", "later")}
    mal_part = mal_flag = 0
    for r in rows:
        mal = set(r["malicious"])
        for c, it in zip(r["participants"], r.get("iterations", [0] * len(r["participants"]))):
            its["malicious" if c in mal else "benign", "later" if c in seen else "first"].append(it)
            seen.add(c)
        mal_part += len(mal)
        mal_flag += len(mal & set(r["flagged"]))
    det = s.get("detection", {})
    stat = lambda a: f"{np.median(a):.0f} / {max(a)}" if a else "-"  # noqa: E731
    return {
        "run": os.path.basename(run_dir.rstrip("/")),
        "rounds": s.get("rounds_done"),
        "DACC": det.get("dacc"), "FPR": det.get("fpr"), "FNR": det.get("fnr"), "AAR": det.get("aar"),
        "ADACC": det.get("adacc"), "AFPR": det.get("afpr"), "AFNR": det.get("afnr"),
        "AOI": det.get("aoi"),
        "benign error (first)": _pm(det.get("error_first_benign")),
        "malicious error (first)": _pm(det.get("error_first_malicious")),
        "benign error (all)": _pm(det.get("error_benign")),
        "malicious error (all)": _pm(det.get("error_malicious")),
        **{f"{m} iterations {f} (median / max)": stat(a) for (m, f), a in its.items()},
        "malicious participations flagged": f"{mal_flag} / {mal_part}",
        "test acc": s.get("test_acc"),
        "round time (sum over rounds)": f"{sum(r['round_s'] for r in rows) / 60:.1f} min",
        "wall (last process)": f"{s.get('wall_s', 0) / 60:.1f} min",
        "s/round (median)": f"{s.get('seconds_per_round_median') or 0:.1f}",
        "train s / detect s (median)": f"{np.median([r['train_s'] for r in rows]):.1f} / "
                                       f"{np.median([r['detection_s'] for r in rows]):.1f}",
        "round-1 detect s": f"{rows[0]['detection_s']:.0f}" if rows else "-",
    }


PERCENT = ("DACC", "FPR", "FNR", "ADACC", "AFPR", "AFNR")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{100 * v:.1f} %" if v <= 1 else f"{v:.1f}"
    return "-" if v is None else str(v)


def evaluations(run_dir: str) -> dict:
    """``{round: {"test_acc", "asr", "asr_base"}}`` of the evaluated rounds in ``rounds.jsonl``."""
    return {r["round"]: {k: r.get(k) for k in ("test_acc", "asr", "asr_base")}
            for r in read_rounds(run_dir) if "test_acc" in r}


def _cell(e: dict | None) -> str:
    if e is None:
        return "-"
    vals = [e["test_acc"]] + [e[k] for k in ("asr", "asr_base") if e.get(k) is not None]
    return " / ".join(f"{100 * v:.2f}" for v in vals)


def curves_table(run_dirs: list[str], rounds: list[int] | None = None) -> str:
    """Markdown table: runs x evaluated rounds (``rounds`` or the union of all)."""
    evals = {d: evaluations(d) for d in run_dirs}
    cols = rounds or sorted(set().union(*(e.keys() for e in evals.values())))
    row = lambda cells: "| " + " | ".join(cells) + " |"  # noqa: E731
    lines = [row(["run"] + [f"round {t}" for t in cols]), row(["---"] * (len(cols) + 1))]
    for d, e in evals.items():
        lines.append(row([os.path.basename(d.rstrip("/"))] + [_cell(e.get(t)) for t in cols]))
    return "\n".join(lines)


def _labels(run_dirs: list[str]) -> list[str]:
    """Each run's directory name, or its path below the runs' common parent where two names
    are equal (``runs/a/fedavg__lie`` and ``runs/b/fedavg__lie`` become ``a/...``, ``b/...``)."""
    names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath([os.path.abspath(d) for d in run_dirs])
    return [os.path.relpath(os.path.abspath(d), common) for d in run_dirs]


def plot_curves(run_dirs: list[str], path: str):
    """Writes test accuracy (and ASR, dashed) in % against the round of every run to ``path``;
    returns the matplotlib figure (its first axes hold one solid line per run, in order)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for d, label in zip(run_dirs, _labels(run_dirs)):
        ev = evaluations(d)
        rounds = sorted(ev)
        line, = ax.plot(rounds, [100 * ev[t]["test_acc"] for t in rounds], label=label)
        asr = [t for t in rounds if ev[t].get("asr") is not None]
        if asr:
            ax.plot(asr, [100 * ev[t]["asr"] for t in asr], "--", color=line.get_color(), label=f"{label} (ASR)")
    ax.set(xlabel="round", ylabel="%", ylim=(0, 100))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        fig.savefig(path, dpi=120)
    except ValueError as e:  # unknown extension
        raise SystemExit(f"report: --plot={path}: {e}") from None
    return fig


def main(argv):
    mode = next((m for m in ("--plot", "--curves") if len(argv) > 1 and argv[1].startswith(m)), None)
    if mode:
        value = argv[1].partition("=")[2]
        if mode == "--plot" and not value:
            raise SystemExit("report: --plot needs a file, e.g. --plot=curves.png")
        try:
            rounds = [int(t) for t in value.split(",")] if mode == "--curves" and value else None
        except ValueError:
            raise SystemExit(f"report: --curves takes comma-separated round numbers, got {value!r}") from None
        if len(argv) < 3:
            raise SystemExit(f"report: {mode} needs at least one run directory")
        if mode == "--plot":
            plot_curves(argv[2:], value)
            print(f"wrote {value}")
        else:
            print(curves_table(argv[2:], rounds))
        return 0
    runs = [describe(d) for d in argv[1:]]
    if not runs:
        print(__doc__)
        return 2
    keys = list(runs[0])
    print("| | " + " | ".join(r["run"] for r in runs) + " |")
    print("| --- |" + " --- |" * len(runs))
    for k in keys[1:]:
        print(f"| {k} | " + " | ".join(_fmt(r[k]) if k in PERCENT else
                                       (str(r[k]) if not isinstance(r[k], float) else f"{r[k]:.4g}")
                                       for r in runs) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
