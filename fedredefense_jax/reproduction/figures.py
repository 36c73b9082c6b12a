"""The figures of a target's page, PNG bytes from matplotlib's object API on an Agg canvas
with no date in the metadata (the same runs give the same bytes): ``<target>.png`` (the
reconstruction errors per client for Tables 1 and 10, grouped bars with the paper's values
as ticks for Tables 2, 3, 8 and 9, the swept curves for Figures 2-5) and
``<target>_latency.png`` (seconds per round of every finished cell by part)."""

from __future__ import annotations

import io

import numpy as np

from fedredefense_jax import grid, paper
from fedredefense_jax.reproduction.cells import Location
from fedredefense_jax.reproduction.pages import (
    DEFENSE_NAMES,
    TARGETED,
    TITLES,
    VARIANT_NAMES,
    attack_name,
)
from fedredefense_jax.reproduction.results import LATENCY_PARTS, Result, errors_of, finite
from fedredefense_jax.reproduction.targets import Page

#: One colour per defense in every figure (matplotlib's tab10).
COLORS = {"fedavg": "tab:blue", "krum": "tab:orange", "median": "tab:green", "trimmed_mean": "tab:red",
          "norm_bound": "tab:purple", "flame": "tab:brown", "fltrust": "tab:pink", "fldetector": "tab:gray",
          "flcert": "tab:olive", "fedredefense": "tab:cyan"}


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
        vals = errors_of(r, mal, first)
        invalid += sum(1 for e in vals if not finite(e))
        v = np.asarray([e for e in vals if finite(e)], np.float64)
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
    attacks = list(page.attacks)
    rows = len(page.datasets)
    fig = _figure(2.6 * len(attacks) + 0.6, 3.0 * rows + 0.4)
    axes = fig.subplots(rows, len(attacks), squeeze=False)
    for i, d in enumerate(page.datasets):
        for j, a in enumerate(attacks):
            cell = page.cells.get((d, a, "fedredefense"))
            _strip_panel(axes[i, j], res.get(cell) if cell else None,
                         f"{paper.DATASET_NAMES[d]}: {attack_name(a)}")
            if j == 0:
                axes[i, j].set_ylabel("reconstruction error")
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
        ax.bar(pos, [v if finite(v) else 0.0 for v in measured], width, label=label, color=color)
        missing = [p for p, v in zip(pos, measured) if not finite(v)]
        if missing:
            ax.scatter(missing, [0.0] * len(missing), marker="x", s=14, color="0.6", zorder=3, clip_on=False,
                       label="not run" if not any_missing else None)
            any_missing = True
        pts = [(p, v) for p, v in zip(pos, ref) if finite(v)]
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
            panels.append((d, "TACC (%)", [attack_name(a) for a in page.attacks], series, (0, 100)))
            targeted = [a for a in page.attacks if a in TARGETED]
            if targeted:
                series = [(DEFENSE_NAMES[f], [_value(res.get(page.cells[d, a, f]), "asr") for a in targeted],
                           [paper.tacc_asr(paper.TABLE2.get(d, {}).get(a, {}).get(f))[1] for a in targeted])
                          for f in page.columns]
                panels.append((d, "ASR (%)", [attack_name(a) for a in targeted], series, (0, 100)))
        elif t == "table3":
            series = [(DEFENSE_NAMES[g], [_value(res.get(page.cells[d, a, g]), "tacc") for a in page.attacks],
                       [paper.tacc_asr(paper.TABLE3.get(d, {}).get(a, {}).get(g))[0] for a in page.attacks])
                      for g in page.columns]
            panels.append((d, "TACC (%)", [attack_name(a) for a in page.attacks], series, (0, 100)))
        elif t == "table8":
            for key, label in (("adacc", "ADACC (%)"), ("afpr", "AFPR (%)"), ("afnr", "AFNR (%)")):
                series = [(DEFENSE_NAMES[f], [_value(res.get(page.cells[d, a, f]), key) for a in page.attacks],
                           [paper.TABLE8.get(d, {}).get(a, {}).get(f, {}).get(key) for a in page.attacks])
                          for f in page.columns]
                panels.append((d, label, [attack_name(a) for a in page.attacks], series, (0, 100)))
        elif t == "table9":
            series = [(attack_name(a), [_value(res.get(page.cells[d, a, v]), "aoi") for v in page.columns],
                       [paper.TABLE9.get(d, {}).get(v) if a == "fang" else None for v in page.columns])
                      for a in page.attacks]
            panels.append((d, "AOI", [VARIANT_NAMES[v] for v in page.columns], series, None))
    bars = max(len(p[2]) * len(p[3]) for p in panels)
    fig = _figure(max(7.0, 0.12 * bars + 3.5), 3.2 * len(panels))
    axes = fig.subplots(len(panels), 1, squeeze=False)[:, 0]
    for ax, (d, ylabel, groups, series, ylim) in zip(axes, panels):
        _bars(ax, groups, series, ylabel, ylim)
        ax.set_title(paper.DATASET_NAMES[d], fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
    fig = _figure(3.2 * len(attacks) + 2.0, 2.6 * per * len(datasets) + 0.8)
    axes = fig.subplots(per * len(datasets), len(attacks), squeeze=False)
    x = np.arange(len(page.sweep))
    labels = [lab for _, lab in page.sweep]
    labelled = set()  # rows whose first drawn panel carries the y label
    for b, d in enumerate(datasets):
        for j, a in enumerate(attacks):
            blocks = [("dacc", "DACC (%)", [f for f in page.columns if f in grid.LABELLING]),
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
                    ax.plot(x, [y if finite(y) else np.nan for y in ys], marker="o", label=DEFENSE_NAMES[f],
                            color=COLORS[f])
                ax.set_xticks(x)
                ax.set_xticklabels(labels, fontsize=7, rotation=20)
                ax.set_ylim(-3, 103)
                ax.grid(alpha=0.3)
                if (b, i) not in labelled:
                    labelled.add((b, i))
                    ax.set_ylabel(f"{paper.DATASET_NAMES[d]}\n{ylabel}" if len(datasets) > 1 else ylabel)
                if i == 0:
                    ax.set_title(attack_name(a), fontsize=9)
                if j == len(attacks) - 1:
                    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    names = ", ".join(paper.DATASET_NAMES[d] for d in datasets)
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
