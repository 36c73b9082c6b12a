"""Separability of benign and malicious updates by FedREDefense's trajectory scores: a page
and two figures from recorded FedREDefense runs.

    python experiments/separability.py --out=results/separability_30 \
        --title="Fashion-MNIST, paper CNN, 30 clients" 'results/runs/small/fashion_mnist/fedredefense__*' \
        'runs/grid30_10/fedredefense__*'

Every argument is a run directory or a glob of them (runs of other defenses, unfinished or
with early rejection are skipped with a line saying why). One row per attack and number of
attackers, separately for first participations (the first-participation cap) and later ones:
the paper rule's TPR / FPR at gamma, then per score (final ``error``, ``iterations`` to gamma,
``loss@b``) the ROC AUC and the clean catch (malicious participations above every benign one
of the same runs). ``OUT.md``, ``OUT.png`` (ROC curves per score, first participations, one
colour per attack), ``OUT_scatter.png`` (iterations to gamma against final error, benign
grey, gamma drawn) and ``OUT_iterations.png`` (iterations to gamma at the first
participation, one line per row). See ``fedredefense_jax/separability.py`` for the scores.
"""

from __future__ import annotations

import collections
import glob
import os
import shlex
import sys

import numpy as np
from absl import app, flags

from fedredefense_jax import records
from fedredefense_jax import separability as sep
from fedredefense_jax.reproduction.scales import TRAIN_SIZES

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "results/separability", "Page and figures: OUT.md, OUT.png, OUT_scatter.png.")
flags.DEFINE_string("title", "", "Title of the page (the setting).")
flags.DEFINE_list("roc_scores", ["error", "iterations", "loss@25", "loss@50"],
                  "Scores drawn in OUT.png (those the runs have).")
flags.DEFINE_list("table_scores", ["error", "iterations", "loss@25", "loss@50", "loss@100"],
                  "Scores in the page's tables (those the runs have).")
flags.DEFINE_float("gamma", 0.6, "The paper rule's threshold.", lower_bound=0.0)

_COLORS = ("tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan",
           "tab:blue", "tab:green", "black", "tab:gray", "gold", "navy")


def collect(patterns: list[str]) -> dict[str, list[sep.Participation]]:
    """Participations by row label (``attack (q of p)``), runs in sorted order."""
    out = collections.defaultdict(list)
    dirs = sorted({d for p in patterns for d in ([g for g in glob.glob(p) if os.path.isdir(g)] or [p])})
    for d in dirs:
        if not os.path.isdir(d):
            print(f"skipped {d}: not a directory", file=sys.stderr)
            continue
        if records.finished(d) is None:
            print(f"skipped {d}: not a finished run", file=sys.stderr)
            continue
        try:
            parts = sep.participations(d)
        except ValueError as e:
            print(f"skipped {e}", file=sys.stderr)
            continue
        cfg = records.read_config(d)
        out[_label(cfg)].append(parts)
    order = sorted(out, key=lambda label: (label.split(" ")[0], int(label.split("(")[1].split(" ")[0]), label))
    return {label: _merge(out[label]) for label in order}


def _label(cfg: dict) -> str:
    """``attack (q of p)`` and the settings that differ from the paper's defaults (beta 0.1, 1
    epoch, every client every round, about 600 images per client, Fashion-MNIST, seed 0)."""
    extra = []
    dataset = cfg.get("dataset", "fashion_mnist")
    if dataset != "fashion_mnist":
        extra.append(dataset)
    images = cfg.get("train_subset") or TRAIN_SIZES.get(dataset, 0)
    per_client = images // max(cfg["num_clients"], 1)
    if dataset == "fashion_mnist" and abs(per_client - 600) > 60:
        extra.append(f"{per_client} images per client")
    if cfg.get("beta", 0.1) != 0.1:
        extra.append(f"beta {cfg['beta']:g}")
    if cfg.get("local_epochs", 1) != 1:
        extra.append(f"{cfg['local_epochs']} epochs")
    if cfg.get("participation_rate", 1.0) != 1.0:
        extra.append(f"participation {cfg['participation_rate']:g}")
    if cfg.get("seed", 0) != 0:  # another draw: its participations are not the seed-0 run's
        extra.append(f"seed {cfg['seed']}")
    label = f"{cfg.get('attack', 'none')} ({cfg['num_malicious']} of {cfg['num_clients']})"
    return label + (", " + ", ".join(extra) if extra else "")


def _merge(runs: list[list[sep.Participation]]) -> list[sep.Participation]:
    """The participations of runs of one row, each (round, client) once: runs of the same
    settings record the same participations, and the one with a trajectory is kept."""
    best = {}
    for parts in runs:
        for p in parts:
            key = (p.round, p.client)
            if key not in best or (best[key].loss_at is None and p.loss_at is not None):
                best[key] = p
    return sorted(best.values(), key=lambda p: (p.round, p.client))


def _f(x, pct=False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.0f}" if pct else f"{x:.3f}"


def _spread(ps: list[sep.Participation], malicious: bool) -> str:
    """``median / max`` (benign) or ``min / median`` (malicious) iterations to gamma; ``never``
    where the statistic falls on reconstructions that did not reach it."""
    its = np.array([np.inf if p.iterations is None else p.iterations
                    for p in ps if p.malicious == malicious and not p.invalid], dtype=np.float64)
    if not its.size:
        return "-"
    a, b = (np.median(its), its.max()) if not malicious else (its.min(), np.median(its))
    return " / ".join("never" if np.isinf(v) else f"{v:g}" for v in (a, b))


def table(groups: dict[str, list[sep.Participation]], first: bool, gamma: float) -> list[str]:
    """Markdown rows of one kind of participation (first or later)."""
    have_any = {n for parts in groups.values() for n in sep.score_names(parts)}
    names = [n for n in FLAGS.table_scores if n in have_any]
    head = ["attack (attackers of clients)", "benign / malicious", "no error (zero or non-finite)",
            "paper rule TPR / FPR %", "iterations to gamma, benign: median / max", "malicious: min / median"]
    head += [f"{n} AUC / clean %" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label, parts in groups.items():
        ps = [p for p in parts if p.first == first]
        if not ps:
            continue
        nb = sum(not p.malicious for p in ps)
        tpr, fpr = sep.paper_rule(ps, gamma)
        row = [label, f"{nb} / {len(ps) - nb}", str(sum(p.invalid for p in ps)), f"{_f(tpr, True)} / {_f(fpr, True)}",
               _spread(ps, False), _spread(ps, True)]
        have = sep.score_names(ps)
        for n in names:
            if n not in have:
                row.append("-")
                continue
            s = sep.separation(ps, n)
            row.append(f"{_f(s.auc)} / {_f(s.clean_catch, True)}")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def roc_figure(groups, names, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.2 * len(names), 3.4), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, n in zip(axes, names):
        for (label, parts), color in zip(groups.items(), _COLORS):
            ps = [p for p in parts if p.first and not p.invalid]
            if not any(p.malicious for p in ps) or n not in sep.score_names(ps):
                continue
            fpr, tpr = sep.roc(ps, n)
            ax.plot(fpr, tpr, color=color, label=f"{label} ({sep.separation(ps, n).auc:.2f})", lw=1.2)
        ax.plot([0, 1], [0, 1], color="0.8", lw=0.8, ls=":")
        ax.set(title=n, xlabel="false-positive rate", ylabel="true-positive rate", xlim=(-0.02, 1), ylim=(0, 1.02))
        ax.legend(fontsize=5.5, loc="lower right")
    fig.suptitle("ROC at the first participation (AUC in brackets)", fontsize=9)
    FigureCanvasAgg(fig).print_png(path, metadata={"Software": None})


def scatter_figure(groups, gamma: float, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10.5, 3.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, first in zip(axes, (True, False)):
        benign = [p for parts in groups.values() for p in parts
                  if p.first == first and not p.malicious and not p.invalid]
        if benign:
            ax.scatter(sep.scores(benign, "iterations"), [p.error for p in benign], s=6, color="0.6",
                       label="benign", alpha=0.6, linewidths=0)
        for (label, parts), color in zip(groups.items(), _COLORS):
            mal = [p for p in parts if p.first == first and p.malicious and not p.invalid]
            if mal:
                ax.scatter(sep.scores(mal, "iterations"), [p.error for p in mal], s=9, color=color, label=label,
                           marker="x", linewidths=0.8)
        ax.axhline(gamma, color="black", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel="outer iterations to gamma (cap + 1: never)",
               title="first participation" if first else "later participations")
    axes[0].set_ylabel("final reconstruction error")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=6, loc="outside right upper")
    FigureCanvasAgg(fig).print_png(path, metadata={"Software": None})


def strip_figure(groups, path: str) -> None:
    """Iterations to gamma at the first participation, one line per row: benign dots, malicious crosses."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = list(groups)
    fig = Figure(figsize=(8, 1.2 + 0.28 * len(labels)), layout="constrained")
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    for y, label in enumerate(labels):
        ps = [p for p in groups[label] if p.first and not p.invalid]
        for mal, style in ((False, dict(s=7, color="0.45", marker="o", linewidths=0)),
                           (True, dict(s=14, color="tab:red", marker="x", linewidths=0.9))):
            sub = [p for p in ps if p.malicious == mal]
            if sub:
                ax.scatter(sep.scores(sub, "iterations"), y + rng.uniform(-0.18, 0.18, len(sub)), **style,
                           label="malicious" if mal else "benign")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="outer iterations to gamma at the first participation (cap + 1: never)")
    ax.grid(axis="x", alpha=0.3)
    handles, names = ax.get_legend_handles_labels()
    uniq = dict(zip(names, handles))  # one entry per kind
    fig.legend(uniq.values(), uniq.keys(), fontsize=7, loc="outside lower center", ncols=2)
    FigureCanvasAgg(fig).print_png(path, metadata={"Software": None})


def main(argv):
    if len(argv) < 2:
        print("error: give FedREDefense run directories (or globs)", file=sys.stderr)
        return 2
    groups = collect(argv[1:])
    if not groups:
        print("error: no finished FedREDefense run among the arguments", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    all_names = {n for parts in groups.values() for n in sep.score_names(parts)}
    names = [n for n in FLAGS.roc_scores if n in all_names]
    roc_figure(groups, names, FLAGS.out + ".png")
    scatter_figure(groups, FLAGS.gamma, FLAGS.out + "_scatter.png")
    strip_figure(groups, FLAGS.out + "_iterations.png")
    base = os.path.basename(FLAGS.out)
    cmd = "python experiments/separability.py " + shlex.join(
        [f"--out={FLAGS.out}"] + ([f"--title={FLAGS.title}"] if FLAGS.title else []) + argv[1:])
    lines = [f"# Separability of FedREDefense's scores{': ' + FLAGS.title if FLAGS.title else ''}", "",
             "Generated by:", "", "    " + cmd, "",
             "Per attack (and number of attackers): participations benign / malicious; the paper rule "
             f"(error > gamma = {FLAGS.gamma}) as TPR / FPR; per score the ROC AUC and the clean catch "
             "(malicious participations scoring above every benign one of the same runs: the TPR of the best "
             "threshold without a false positive). Scores: final `error`; `iterations` to reach gamma (the cap "
             "+ 1 when never); `loss@b` after b outer iterations (the final error where gamma was reached "
             "sooner). Definitions: `fedredefense_jax/separability.py`.", ""]
    for first in (True, False):
        lines += [f"## {'First participations' if first else 'Later participations'}", ""]
        lines += table(groups, first, FLAGS.gamma) + [""]
    lines += [f"![ROC]({base}.png)", "", f"![iterations against error]({base}_scatter.png)", "",
              f"![iterations per row]({base}_iterations.png)", ""]
    with open(FLAGS.out + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    app.run(main)
