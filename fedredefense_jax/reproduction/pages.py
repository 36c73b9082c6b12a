"""The markdown page of a target: the command that regenerates it, the settings, the
commits the runs were made on, then each cell as "measured [paper]" and a count of the
cells. Values are fractions in the runs, % on the page."""

from __future__ import annotations

from fedredefense_jax import grid, paper
from fedredefense_jax.reproduction.cells import Location
from fedredefense_jax.reproduction.results import Result, error_stats, errors_of, finite
from fedredefense_jax.reproduction.targets import Page

DEFENSE_NAMES = {"fedavg": "FedAvg", "krum": "Krum", "median": "Median", "trimmed_mean": "Trimmed Mean",
                 "norm_bound": "Norm Bound", "flame": "FLAME", "fltrust": "FLTrust", "fldetector": "FLDetector",
                 "flcert": "FLCert", "fedredefense": "FedREDefense"}
ATTACK_NAMES = {"none": "No attack", "fang": "Fang", "lie": "LIE", "min_max": "Min-Max", "min_sum": "Min-Sum",
                "mpaf": "MPAF", "dba": "DBA", "scaling": "Scaling", "label_flip": "Label Flip",
                "targeted_label_flip": "Targeted Label Flip", "adaptive_label_flip": "Adaptive Label Flip",
                "adaptive_targeted_label_flip": "Adaptive Targeted Label Flip"}
VARIANT_NAMES = {"continuous": "Continuous", "intermittent": "Intermittent", "dynamic": "Dynamic"}
#: Attacks whose runs record an attack success rate (TACC / ASR cells).
TARGETED = ("dba", "scaling", "targeted_label_flip", "adaptive_targeted_label_flip")
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
#: The flag of reproduce.py that gives each dataset's data.
DATA_FLAGS = {"fashion_mnist": "data_dir", "cifar10": "cifar10_dir", "cinic10": "cinic_dir"}


def attack_name(a: str) -> str:
    return ATTACK_NAMES.get(a, a)


def pct(x) -> str:
    return f"{100 * x:.2f}" if finite(x) else "-"


def num(x) -> str:
    return f"{x:.2f}" if finite(x) else "-"


def pair(measured: str, reference: str | None) -> str:
    return f"{measured} [{reference or '-'}]"


def tacc_text(res: Result | None, attack: str) -> str:
    """TACC % of a cell, with its ASR % for a targeted attack."""
    if res is None:
        return "-"
    return pct(res.tacc) + (f"/{pct(res.asr)}" if attack in TARGETED else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(r) + " |" for r in (header, ["---"] * len(header), *rows)]


def _section(d: str) -> str:
    return f"## {paper.DATASET_NAMES[d]}"


# ------------------------------------------------------------------------- the tables


def _detection_rows(page: Page, res: dict, d: str, ref: dict, keys: tuple) -> list[list[str]]:
    """attack, defense and measured [paper] of ``keys`` (% but AAR) for every cell of ``d``."""
    rows = []
    for a in page.attacks:
        for f in page.columns:
            r = res.get(page.cells[d, a, f])
            p = ref.get(d, {}).get(a, {}).get(f, {})
            det = r.detection if r else {}
            rows.append([attack_name(a), DEFENSE_NAMES[f]] + [
                pair(num(det.get(k)) if k == "aar" else pct(det.get(k)), num(p.get(k))) for k in keys])
    return rows


def render_table1(page: Page, res: dict) -> list[str]:
    lines = [("DACC / FPR / FNR (%) of the final labels and AAR (rounds a malicious client was aggregated, "
             f"at most {page.scale.rounds} here, 500 in the paper): measured [paper]."), ""]
    for d in page.datasets:
        rows = _detection_rows(page, res, d, paper.TABLE1, ("dacc", "fpr", "fnr", "aar"))
        lines += [_section(d), "", *_table(["attack", "detector", "DACC", "FPR", "FNR", "AAR"], rows), ""]
    return lines


def render_table2(page: Page, res: dict) -> list[str]:
    lines = ["TACC (%) of the final global model (/ ASR (%) for the backdoors): measured [paper].", ""]
    for d in page.datasets:
        rows = [[attack_name(a)] + [pair(tacc_text(res.get(page.cells[d, a, f]), a),
                                         paper.tacc_asr_text(paper.TABLE2.get(d, {}).get(a, {}).get(f)))
                                    for f in page.columns] for a in page.attacks]
        lines += [_section(d), "", *_table(["attack"] + [DEFENSE_NAMES[f] for f in page.columns], rows), ""]
        if d == "cifar10" and "none" in page.attacks:
            lines += [("The paper's CIFAR-10 no-attack FedREDefense value is missing from its text (the row is "
                      "misaligned in the extraction)."), ""]
    return lines


def render_table3(page: Page, res: dict) -> list[str]:
    lines = [("TACC (%) (/ ASR (%) for the targeted flips) of FedREDefense aggregating the updates it keeps with "
             "FedAvg or Norm Bound: measured [paper]. The adaptive attacks scale their flipped updates by the "
             "largest factor FedREDefense does not flag (Algorithm 3)."), ""]
    for d in page.datasets:
        rows = [[attack_name(a)] + [pair(tacc_text(res.get(page.cells[d, a, g]), a),
                                         paper.tacc_asr_text(paper.TABLE3.get(d, {}).get(a, {}).get(g)))
                                    for g in page.columns] for a in page.attacks]
        lines += [_section(d), "", *_table(["attack", "FedAvg", "Norm Bound"], rows), ""]
    return lines


def render_table8(page: Page, res: dict) -> list[str]:
    lines = [("ADACC / AFPR / AFNR (%): DACC / FPR / FNR of each round's filter over that round's participants "
             "(an update left out of the aggregate counts as flagged), averaged over the rounds; AAR: rounds a "
             "malicious update was aggregated: measured [paper]. The paper's Table 8 has FLAME and FLTrust; "
             "FLDetector's per-round figures are shown beside them without a paper value."), ""]
    for d in page.datasets:
        rows = _detection_rows(page, res, d, paper.TABLE8, ("adacc", "afpr", "afnr", "aar"))
        lines += [_section(d), "", *_table(["attack", "defense", "ADACC", "AFPR", "AFNR", "AAR"], rows), ""]
    return lines


def render_table9(page: Page, res: dict) -> list[str]:
    lines = ["AOI: outer iterations per client and round, averaged over the rounds (Appendix B.3), with DACC (%) "
             "beside it: measured [paper]. Continuous: 500 iterations at the first participation, 60 later; "
             "intermittent: 500 at the first, 500 again every 10 rounds, inference otherwise; dynamic: stop "
             "below gamma, capped by Table 7." + (" At this scale every variant's caps are the scale's."
                                                 if "first_cap" in page.scale.defense_config else ""), ""]
    for d in page.datasets:
        rows = []
        for a in page.attacks:
            for v in page.columns:
                r = res.get(page.cells[d, a, v])
                det = r.detection if r else {}
                p = paper.TABLE9.get(d, {}).get(v) if a == "fang" else None
                rows.append([attack_name(a), VARIANT_NAMES[v], pair(num(det.get("aoi")), num(p)),
                             pair(pct(det.get("dacc")), "100.00" if d in paper.TABLE9 and a == "fang" else "-")])
        lines += [_section(d), "", *_table(["attack", "variant", "AOI", "DACC"], rows), ""]
    if "cifar10" not in page.datasets:
        lines += [("The paper's Table 9 is on CIFAR-10 (AOI: continuous 60.88, intermittent 50.00, dynamic 2.40, every "
                  "variant at 100 % DACC); `--datasets=cifar10` runs it there."), ""]
    return lines


def _stats_text(values: list) -> str:
    st = error_stats(values)
    return "-" if st is None else f"{st[0]:.3f} ± {st[1]:.3f} (n={st[2]})"


def render_table10(page: Page, res: dict) -> list[str]:
    lines = [("Reconstruction errors, mean ± std (n participations), over all participations and at each "
             "client's first: benign from the no-attack run, each attack's malicious updates from its run: "
             "measured [paper]. FedREDefense's dynamic optimisation stops as soon as an error is below gamma "
             "(0.6), so a passing update ends just under it; a flagged one at its cap."), ""]
    for d in page.datasets:
        rows = []
        for a in page.attacks:
            r, malicious = res.get(page.cells[d, a, "fedredefense"]), a != "none"
            p = paper.TABLE10.get(d, {}).get(a if malicious else "benign")
            ref = "-" if p is None else f"{p[0]:.2f}" + (f" ± {p[1]:.2f}" if p[1] is not None else "")
            name = f"{attack_name(a)} (malicious)" if malicious else "Benign (no attack)"
            rows.append([name, _stats_text(errors_of(r, malicious)), _stats_text(errors_of(r, malicious, True)), ref])
        lines += [_section(d), "", *_table(["updates", "all participations", "first participation", "paper"], rows), ""]
    return lines


def render_figure_tables(page: Page, res: dict) -> list[str]:
    """The figures' numbers: per attack, the detectors' DACC and every defense's TACC (/ASR)
    at each point of the sweep."""
    lines = [("DACC (%) of the detectors (final labels) and TACC (%) (/ ASR (%) for Scaling) of every defense at each "
             "point of the sweep. The paper's figures are images without numbers; the only value its text gives "
             "is FedREDefense's DACC, 100 % at every point, in brackets. '-': not run, or not applicable "
             "(FLAME above 50 % malicious clients, FLDetector under partial participation)."), ""]
    head = {"fig2": "malicious clients", "fig3": "non-IID degree", "fig4": "local epochs",
            "fig5": "participation rate"}[page.target]
    for d in page.datasets:
        lines += [_section(d), ""]
        for a in page.attacks:
            def result(f, value):
                c = page.cells.get((d, a, f, value))
                return res.get(c) if c else None

            rows = []
            for f in (f for f in page.columns if f in grid.LABELLING):
                dacc = [pct(r.detection.get("dacc")) if (r := result(f, v)) else "-" for v, _ in page.sweep]
                ref = f"{paper.FIGURES_FEDREDEFENSE_DACC:.2f}" if f == "fedredefense" else None
                rows.append([f"{DEFENSE_NAMES[f]} DACC"] + [pair(t, ref) if ref else t for t in dacc])
            for f in page.columns:
                rows.append([f"{DEFENSE_NAMES[f]} TACC" + ("/ASR" if a in TARGETED else "")] +
                            [tacc_text(result(f, v), a) for v, _ in page.sweep])
            lines += [f"### {attack_name(a)}", "", *_table([head] + [lab for _, lab in page.sweep], rows), ""]
    return lines


RENDERERS = {"table1": render_table1, "table2": render_table2, "table3": render_table3, "table8": render_table8,
             "table9": render_table9, "table10": render_table10}


# ------------------------------------------------------------------------- header and footer


def command(page: Page, root: str, data_flags: dict) -> str:
    """The reproduce.py command that regenerates the page."""
    parts = ["python experiments/reproduce.py", f"--target={page.target}", f"--scale={page.scale.name}",
             f"--root={root}"]
    parts += [f"--{flag}={','.join(page.options[flag])}" for flag in ("datasets", "attacks") if page.options.get(flag)]
    parts += [f"--{flag}={value}" for flag, value in sorted(data_flags.items()) if value]
    return " ".join(parts)


def _data_flags(page: Page, results: dict, data_dirs: dict) -> dict:
    """The data flags of the command: the directories the page's runs recorded (so that the
    page does not depend on how it was rendered), else the given ones."""
    out = {}
    for d in page.datasets:
        recorded = sorted({str(r.config["data_dir"]) for c, r in results.items()
                           if c.dataset == d and r is not None and r.config.get("data_dir")})
        value = recorded[0] if recorded else data_dirs.get(d)
        if value:
            out[DATA_FLAGS[d]] = value
    return out


def _settings_lines(page: Page) -> list[str]:
    s = page.scale
    ds = ", ".join(paper.DATASET_NAMES[d] for d in page.datasets)
    images = "; ".join(f"{paper.DATASET_NAMES[d]} {'all' if n is None else f'{n:,}'}"
                       for d in page.datasets for n in [s.train_subset(d)])
    redefense = grid.settings_taken("defense", "fedredefense", s.defense_config)
    fldetector = grid.settings_taken("defense", "fldetector", s.defense_config)
    caps = ("Table 7's settings" if not redefense else
            ", ".join(f"{k} {v}" for k, v in sorted(redefense.items())) + ", otherwise Table 7")
    fld = ("cold start 50, window 10 (Appendix A.3)" if not fldetector else
           f"cold start {fldetector['fldetector_cold_start']}, window {fldetector['fldetector_window']}")
    return [
        (f"* scale `{s.name}`: dataset(s) {ds}; the paper's CNN (Tables 5 / 6); {s.num_clients} clients, "
         f"{s.num_malicious} malicious (the last ids); {s.rounds} rounds, evaluated every {s.eval_every}; "
         f"beta {s.beta:g}; 1 local epoch, batch 32, SGD lr 1e-3; every client every round; seed 0"),
        f"* training images: {images}",
        (f"* FedREDefense: gamma 0.6, N = 5, {caps}; FLDetector: {fld}; other defenses and attacks at "
         "their defaults (Appendix A.2 / A.3)"),
    ]


def _header(page: Page, root: str, results: dict, data_dirs: dict) -> list[str]:
    commits: dict[str, int] = {}
    for r in results.values():
        if r is not None:
            commits[r.commit] = commits.get(r.commit, 0) + 1
    commit_text = ", ".join(f"{c} ({n} cell{'s' if n != 1 else ''})" for c, n in sorted(commits.items()))
    return [f"# {TITLES[page.target]} ({page.scale.name} scale)", "",
            ("Generated by (runs the missing cells, then rewrites this page; add `--render_only` to redraw "
             "it from the runs alone):"), "", f"    {command(page, root, _data_flags(page, results, data_dirs))}",
            "", "Settings:", "", *_settings_lines(page), f"* runs made on commit(s): {commit_text or 'no run yet'}", "",
            *(line for note in page.scale.notes for line in (note, ""))]


def _links(target: str) -> list[str]:
    return [f"![{target}]({target}.png)", "",
            ("Per-round seconds (mean over each cell's rounds; the first round includes compiling) split into local "
             "training, attack, detection and aggregation:"), "", f"![{target} latency]({target}_latency.png)", ""]


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


def render_markdown(page: Page, locations: list[Location], results: dict, root: str, data_dirs: dict) -> str:
    """The page: ``results`` maps each cell to its :class:`Result` (None: not finished)."""
    body = RENDERERS.get(page.target, render_figure_tables)(page, results)
    lines = [*_header(page, root, results, data_dirs), *body, *_links(page.target),
             *_footer(page, locations, results)]
    return "\n".join(lines).rstrip("\n") + "\n"
