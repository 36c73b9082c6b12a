"""experiments/reproduce.py and fedredefense_jax/reproduction: the paper's numbers, the cells
of every target and scale, how a cell finds a run of its settings (runs recorded by older
versions included), the pages rendered from made-up runs, and (slow) every target end to end
at smoke scale (runs, pages, byte-identical --render_only, reuse of finished runs, stop and
resume)."""

import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fedredefense_jax import grid, paper, records, reproduction
from fedredefense_jax.config import ConfigError, validate
from fedredefense_jax.reproduction import cells, pages
from fedredefense_jax.reproduction.results import read_result
from fedredefense_jax.simulation import malicious_clients
from test_data import write_idx_dir
from test_resume import _env, _rounds_written

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "reproduce.py")
PAPER_MD = os.environ.get("FEDREDEFENSE_PAPER",
                          os.path.join(ROOT, os.pardir, "shared", "paper", "FedREDefense-ICML2024.md"))


# ---------------------------------------------------------------------------- the paper's numbers


def test_the_grids_table_shows_the_papers_table2_and_3():
    for attack in paper.TABLE2_ATTACKS:
        for defense in paper.TABLE2_DEFENSES:
            value = paper.TABLE2["fashion_mnist"][attack][defense]
            assert grid.paper_text(attack, defense) == paper.tacc_asr_text(value)
    assert grid.paper_text("scaling", "fedavg") == "87.45/98.42" and grid.paper_text("mpaf", "fedavg") == "20.46"
    for attack in paper.TABLE3_ATTACKS:  # the grid's Table 3 entries are FedREDefense + FedAvg
        assert grid.paper_text(attack, "fedredefense") == paper.tacc_asr_text(
            paper.TABLE3["fashion_mnist"][attack]["fedavg"])
        assert grid.paper_text(attack, "fedavg") is None
    assert grid.paper_text("lie", "fedavg") is None


def test_paper_tables_are_complete():
    assert paper.TABLE2["cifar10"]["none"]["fedredefense"] is None  # missing from the paper's text
    assert paper.TABLE2["cifar10"]["none"]["flcert"] == 50.89
    for d in paper.DATASETS:
        assert set(paper.TABLE1[d]) == set(paper.TABLE1_ATTACKS) == set(paper.TABLE8[d])
        assert set(paper.TABLE2[d]) == set(paper.TABLE2_ATTACKS)
        assert all(set(row) == set(paper.TABLE2_DEFENSES) for row in paper.TABLE2[d].values())
        assert set(paper.TABLE3[d]) == set(paper.TABLE3_ATTACKS)
        assert set(paper.TABLE10[d]) == {"benign", *paper.TABLE10_ATTACKS}
        assert all(paper.TABLE1[d][a]["fedredefense"] == {"dacc": 100, "fpr": 0, "fnr": 0, "aar": 0}
                   for a in paper.TABLE1_ATTACKS)


def _read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def _md_rows(lines, start):
    out = []
    for line in lines[start:]:
        if not line.strip():
            break
        out.append([re.sub(r"</?b>", "", c).strip() for c in line.split("\t")])
    return out


@pytest.mark.skipif(not os.path.exists(PAPER_MD), reason=f"the paper's text is not at {PAPER_MD}")
def test_paper_numbers_match_the_papers_text():
    lines = _read(PAPER_MD).split("\n")
    names = {"Fang": "fang", "LIE": "lie", "Min-Max": "min_max", "Min-Sum": "min_sum", "MPAF": "mpaf", "DBA": "dba",
             "Scaling": "scaling", "No att": "none", "Label Flip": "label_flip",
             "Targeted Label Flip": "targeted_label_flip", "Adaptive Label Flip": "adaptive_label_flip",
             "Adaptive Targeted Label Flip": "adaptive_targeted_label_flip"}
    value = lambda s: tuple(float(x) for x in s.split("/")) if "/" in s else float(s)
    heads = [i for i, line in enumerate(lines) if line.startswith("Attack\tDetector\t")]
    assert len(heads) == 2  # Tables 1 and 8
    for head, table, keys in ((heads[0], paper.TABLE1, ("dacc", "fpr", "fnr", "aar")),
                              (heads[1], paper.TABLE8, ("adacc", "afpr", "afnr", "aar"))):
        attack, n = None, 0
        for c in _md_rows(lines, head + 2):
            attack = names[c[0]] if c[0] else attack
            defense = c[1].lower()
            for k, d in enumerate(paper.DATASETS):
                assert [table[d][attack][defense][m] for m in keys] == [float(x) for x in c[2 + 4 * k:6 + 4 * k]]
            n += 1
        assert n == 14
    head = next(i for i, line in enumerate(lines) if line.startswith("Dataset\tAttack\tFedAVG"))
    dataset, n = None, 0
    for c in _md_rows(lines, head + 1):
        c = [x for x in c if x]
        if c[0] in ("FashionMNIST", "CIFAR-10", "CINIC"):
            dataset = {"FashionMNIST": "fashion_mnist", "CIFAR-10": "cifar10", "CINIC": "cinic10"}[c.pop(0)]
        values = [value(x) for x in c[1:]]
        expected = [paper.TABLE2[dataset][names[c[0]]][f] for f in paper.TABLE2_DEFENSES]
        assert values == [v for v in expected if v is not None], (dataset, c[0])
        n += 1
    assert n == 21
    head = next(i for i, line in enumerate(lines) if line.startswith("\t\tFashionMNIST\tCIFAR-10\tCINIC"))
    attack, n = None, 0
    for c in _md_rows(lines, head + 1):
        attack = names[c[0]] if c[0] else attack
        agg = {"FedAVG": "fedavg", "Norm Bound": "norm_bound"}[c[1]]
        assert [paper.TABLE3[d][attack][agg] for d in paper.DATASETS] == [value(x) for x in c[2:5]]
        n += 1
    assert n == 8
    aoi = next(line for line in lines if line.startswith("AOI\t")).split("\t")[1:]
    assert [paper.TABLE9["cifar10"][v] for v in ("continuous", "intermittent", "dynamic")] == [float(x) for x in aoi]
    head = next(i for i, line in enumerate(lines) if line.startswith("\tFashionMNIST\tCIFAR-10\tCINIC"))
    rows = {"Benign": "benign", "Fang": "fang", "MinMax": "min_max", "MinSum": "min_sum", "DBA": "dba",
            "Scaling": "scaling"}
    for c in _md_rows(lines, head + 1):
        for k, d in enumerate(paper.DATASETS):
            mean, _, std = c[1 + k].partition("$\\pm$")
            assert paper.TABLE10[d][rows[c[0]]] == (float(mean), float(std) if std else None)


# ---------------------------------------------------------------------------- cells


def _all_cells(scale, data_dirs=None):
    return {t: reproduction.build_page(t, scale, data_dirs or {}).unique_cells() for t in reproduction.TARGETS}


@pytest.mark.parametrize("scale,counts,total", [
    ("smoke", {"table1": 2, "table2": 6, "table3": 2, "table8": 3, "table9": 3, "table10": 3, "fig2": 2,
               "fig3": 2, "fig4": 2, "fig5": 2}, 17),
    ("small", {"table1": 14, "table2": 70, "table3": 8, "table8": 21, "table9": 3, "table10": 6, "fig2": 60,
               "fig3": 64, "fig4": 48, "fig5": 36}, 232),
    ("paper", {"table1": 28, "table2": 140, "table3": 16, "table8": 42, "table9": 3, "table10": 12, "fig2": 60,
               "fig3": 64, "fig4": 48, "fig5": 36}, 314),
])
def test_cells_per_target(scale, counts, total):
    cells_ = _all_cells(scale)
    assert {t: len(c) for t, c in cells_.items()} == counts
    assert len(set().union(*cells_.values())) == total
    s = reproduction.scale_settings(scale)
    names = set()
    for cs in cells_.values():
        for c in cs:  # every cell is a valid run, in a directory of its own
            validate(reproduction.make_config(c, s, None, "unused"))
            names.add(c.label(s))
    assert len(names) == total


def test_targets_share_cells_and_the_figures_sweep_the_papers_settings():
    small = _all_cells("small")
    t1, t2, t8, t10 = (set(small[t]) for t in ("table1", "table2", "table8", "table10"))
    assert t10 <= t2 and {c for c in t1 if c.attack != "lie"} <= t2 and {c for c in t8 if c.attack != "lie"} <= t2
    # the figures' default point (8 of 30 malicious, beta 0.1, 1 epoch, all clients) is the tables' cell
    assert {c for c in small["fig2"] if c.num_malicious == 8} <= t1 | t2 | t8
    assert not any(c.defense == "flame" and c.num_malicious == 22 for c in small["fig2"])
    assert {c.num_malicious for c in small["fig2"]} == {2, 8, 14, 22}
    assert {c.beta for c in small["fig3"]} == {1.0, 0.5, 0.1, 0.05}
    assert {(c.local_epochs, c.rounds) for c in small["fig4"]} == {(1, 10), (2, 5), (5, 2)}
    caps = {c.local_epochs: dict(c.options) for c in small["fig4"] if c.defense == "fedredefense"}
    assert caps == {1: {}, 2: {"first_cap": 1600, "later_cap": 4000}, 5: {"first_cap": 4000, "later_cap": 10000}}
    later = {c.participation_rate: dict(c.options) for c in small["fig5"] if c.defense == "fedredefense"}
    assert later == {0.1: {"later_cap": 20000}, 0.5: {"later_cap": 4000}, 1.0: {}}
    assert not any(c.defense == "fldetector" for c in small["fig5"])
    assert {dict(c.options).get("redefense_variant") for c in small["table9"]} == {None, "continuous", "intermittent"}
    assert {dict(c.options).get("redefense_aggregator") for c in small["table3"]} == {None, "norm_bound"}
    s = reproduction.scale_settings("small")
    norm = next(c for c in small["table3"] if c.options)
    assert norm.name(s) == "fedredefense__label_flip__aggregator-norm_bound"
    assert reproduction.make_config(norm, s, None, "o").defense_config == {"redefense_aggregator": "norm_bound"}
    cfg = reproduction.make_config(next(c for c in small["table1"] if c.defense == "fldetector"), s, "d", "o")
    assert (cfg.num_clients, cfg.num_malicious, cfg.train_subset, cfg.rounds, cfg.eval_every, cfg.beta) == \
        (30, 8, 18000, 10, 5, 0.1)
    assert cfg.defense_config == {"fldetector_cold_start": 2, "fldetector_window": 3}
    assert reproduction.make_config(small["table2"][0], s, "d", "o").defense_config == {}  # FedAvg takes none


def test_paper_scale_has_the_papers_settings_and_cinic_only_with_its_data():
    s = reproduction.scale_settings("paper")
    page = reproduction.build_page("table2", "paper", {})
    assert page.datasets == ("fashion_mnist", "cifar10")
    assert reproduction.build_page("table2", "paper", {"cinic10": "x"}).datasets == paper.DATASETS
    cfg = reproduction.make_config(page.cells["cifar10", "fang", "fldetector"], s, "d", "o")
    assert (cfg.num_clients, cfg.num_malicious, cfg.train_subset, cfg.rounds, cfg.eval_every) == \
        (100, 28, None, 500, 10)
    assert cfg.defense_config == {}  # FLDetector's 50 + 10, FedREDefense's Table 7: their defaults
    fig4 = reproduction.build_page("fig4", "paper", {})
    assert fig4.datasets == ("cifar10",)
    assert {(c.local_epochs, c.rounds, dict(c.options).get("later_cap")) for c in fig4.unique_cells()
            if c.defense == "fedredefense"} == {(1, 500, None), (2, 250, 3000), (5, 100, 7500)}
    fig2 = reproduction.build_page("fig2", "paper", {})
    assert not any(c.defense == "flame" and c.num_malicious == 72 for c in fig2.unique_cells())
    for bad in (("table4", "small"), ("table2", "huge")):
        with pytest.raises(ValueError, match="unknown"):
            reproduction.build_page(*bad)
    with pytest.raises(ValueError, match="unknown dataset"):
        reproduction.build_page("table2", "small", {}, datasets=["mnist"])


# config.json of grid runs made before settings had one name everywhere (30 / 8, 10 rounds,
# --defense_config=fldetector_cold_start=2,fldetector_window=3 given to every cell).
OLD_GRID_CONFIG = {
    "dataset": "fashion_mnist", "data_dir": "../shared/data/fashion_mnist", "model": "cnn", "conv_impl": "auto",
    "num_clients": 30, "num_malicious": 8, "beta": 0.1, "rounds": 10, "local_epochs": 1, "participation_rate": 1.0,
    "batch_size": 32, "lr": 0.001, "seed": 0, "output_dir": "runs/grid30_10/fedavg__fang", "eval_every": 5,
    "attack": "fang", "defense": "fedavg", "layout": None,
    "attack_config": {"scale": 3.0, "backdoor_training": "alternating", "delta_init": 2.0, "step_min": 0.125,
                      "lone_attacker": "zero", "min_sum_bound": "min"},
    "defense_config": {"variant": "dynamic", "layout": "auto", "fldetector_cold_start": 2, "fldetector_window": 3},
    "checkpoint_every": 1, "overwrite": False, "train_subset": 18000}


@pytest.mark.parametrize("defense,attack", [("fedavg", "fang"), ("fldetector", "scaling"), ("flcert", "none"),
                                            ("fedredefense", "min_sum")])
def test_small_cells_are_the_grids_runs_recorded_by_older_versions(defense, attack):
    s = reproduction.scale_settings("small")
    cell = reproduction.build_page("table2", "small").cells["fashion_mnist", attack, defense]
    old = {**OLD_GRID_CONFIG, "attack": attack, "defense": defense}
    if defense == "flcert":
        old["defense_config"] = {**old["defense_config"], "groups": None}
    key = records.settings_key
    for data_dir in ("../shared/data/fashion_mnist", None):
        mine = records.recorded_config(reproduction.make_config(cell, s, data_dir, "results/runs/x"))
        assert key(old, data_dir=data_dir is not None) == key(mine, data_dir=data_dir is not None)
    mine = records.recorded_config(reproduction.make_config(cell, s, None, "o"))
    changes = [{"beta": 0.5}, {"num_malicious": 7}, {"train_subset": None}]
    if attack == "scaling":  # an old name with another value
        changes.append({"attack_config": {**old["attack_config"], "scale": 2.0}})
    for change in changes:
        assert key({**old, **change}, data_dir=False) != key(mine, data_dir=False)
    if defense == "fldetector":
        other = {**old, "defense_config": {"fldetector_window": 10}}
        assert key(other, data_dir=False) != key(mine, data_dir=False)


@pytest.mark.parametrize("defense,attack,revised", [
    ("fedavg", "fang", True), ("fedavg", "min_sum", True), ("fldetector", "scaling", True), ("flcert", "none", True),
    ("fedavg", "scaling", False), ("krum", "mpaf", False)])
def test_runs_of_the_attacks_earlier_revision_do_not_stand_in(defense, attack, revised):
    s = reproduction.scale_settings("small")
    cell = reproduction.build_page("table2", "small").cells["fashion_mnist", attack, defense]
    mine = records.recorded_config(reproduction.make_config(cell, s, None, "o"))
    assert mine["attacks_revision"] == records.ATTACKS_REVISION == 2
    # the grid's config before the attacks followed the authors: no lone_attacker, settings as given
    earlier = {**OLD_GRID_CONFIG, "attack": attack, "defense": defense,
               "attack_config": {"scale": 3.0, "backdoor_training": "alternating"}}
    if defense == "flcert":
        earlier["defense_config"] = {**earlier["defense_config"], "groups": None}
    assert records.attacks_revision(earlier) == (1 if revised else 2)
    same = records.settings_key(earlier, data_dir=False) == records.settings_key(mine, data_dir=False)
    assert same is not revised
    assert records.upgrade_config(earlier)["attacks_revision"] == (1 if revised else 2)


def test_data_directories_compare_by_real_path(tmp_path):
    s = reproduction.scale_settings("small")
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(data, tmp_path / "link")
    cell = reproduction.build_page("table2", "small").cells["fashion_mnist", "fang", "fedavg"]
    a = records.recorded_config(reproduction.make_config(cell, s, str(data), "a"))
    b = records.recorded_config(dataclasses.replace(reproduction.make_config(cell, s, str(tmp_path / "link"), "b"),
                                                    rounds=50, eval_every=10, checkpoint_every=5))
    assert records.settings_key(a) == records.settings_key(b)
    other = records.recorded_config(reproduction.make_config(cell, s, str(tmp_path), "c"))
    assert records.settings_key(a) != records.settings_key(other)
    assert records.settings_key(a, data_dir=False) == records.settings_key(other, data_dir=False)


# ---------------------------------------------------------------------------- pages from made-up runs


def _fake_run(run_dir, cfg, tacc=0.5, asr=None, commit="c0ffee"):
    """A finished run of ``cfg`` written through records as the runner writes one, with
    made-up values: a detector (FedREDefense, FLDetector) flags every malicious client in
    round 1 and expels it, a filter (FLAME, FLTrust) leaves them out of each aggregate;
    FedREDefense records errors 0.9 (malicious) and 0.3 (benign) after 3 iterations."""
    os.makedirs(run_dir, exist_ok=True)
    recorded = records.recorded_config(cfg)
    records.write_json(os.path.join(run_dir, records.CONFIG), recorded)
    mal = malicious_clients(cfg.num_clients, cfg.num_malicious if cfg.attack != "none" else 0)
    expelled = set()
    with records.RoundLog(run_dir) as log:
        for t in range(1, cfg.rounds + 1):
            ids = [i for i in range(cfg.num_clients) if i not in expelled]
            flagged = [i for i in ids if mal[i]] if cfg.defense in grid.LABELLING and t == 1 else []
            expelled.update(flagged)
            kept = [not (mal[i] and cfg.defense in grid.LABELLING + grid.FILTERING) for i in ids]
            rec = {"round": t, "participants": ids, "weights": [k / sum(kept) for k in kept], "aggregated": kept,
                   "flagged": flagged, "round_s": 2.0, "train_s": 1.0, "attack_s": 0.5, "detection_s": 0.25,
                   "aggregation_s": 0.25}
            if cfg.defense == "fedredefense":
                rec.update(error=[0.9 if mal[i] else 0.3 for i in ids], iterations=[3] * len(ids))
            if t % cfg.eval_every == 0 or t == cfg.rounds:
                rec.update(test_acc=tacc, **({} if asr is None else {"asr": asr}))
            log.append(rec)
    records.write_json(os.path.join(run_dir, records.SUMMARY), {
        "config": recorded, "environment": {"git_commit": commit}, "status": "done", "rounds_done": cfg.rounds,
        "test_acc": tacc})


def _fake_cells(root, scale, data_dir, skip=()):
    """Made-up finished runs of every cell of every target at ``scale`` in their own directories."""
    s = reproduction.scale_settings(scale)
    for cell in {c for t in reproduction.TARGETS for c in reproduction.build_page(t, scale).unique_cells()}:
        if cell not in skip:
            own = reproduction.cell_dir(root, s, cell)
            _fake_run(own, reproduction.make_config(cell, s, data_dir, own),
                      asr=0.25 if cell.attack in pages.TARGETED else None)


def test_pages_render_from_the_runs(tmp_path):
    root, out, data = str(tmp_path / "runs"), str(tmp_path / "pages"), str(tmp_path / "fm")
    os.makedirs(data)
    _fake_cells(root, "smoke", data)
    md = {}
    for target in reproduction.TARGETS:
        r = reproduction.reproduce(target, "smoke", root, out, render_only=True)  # no data flag: any data matches
        n = r["cells"]
        assert (r["finished"], r["reused"], r["ran"]) == (n, 0, 0)
        md[target] = open(os.path.join(out, f"{target}.md")).read()
        assert f"# {pages.TITLES[target]} (smoke scale)" in md[target]
        assert f"--target={target} --scale=smoke --root={root} --data_dir={data}" in md[target]
        assert f"runs made on commit(s): c0ffee ({n} cell{'s' if n > 1 else ''})" in md[target]
        assert f"{n} cells, {n} finished (0 read from another run directory" in md[target]
    assert "| No attack | 50.00 [85.94] | 50.00 [86.04] |" in md["table2"]
    assert "| Scaling | 50.00/25.00 [87.45/98.42] | 50.00/25.00 [85.66/2.50] |" in md["table2"]
    # FedREDefense flags both malicious clients in round 1: DACC 100, never aggregated
    assert "| Fang | FedREDefense | 100.00 [100.00] | 0.00 [0.00] | 0.00 [0.00] | 0.00 [0.00] |" in md["table1"]
    assert "| Fang | FLAME | 100.00 [79.34] | 0.00 [28.69] | 0.00 [0.00] | 0.00 [0.00] |" in md["table8"]
    assert "| Fang | Continuous | 3.00 [-] | 100.00 [-] |" in md["table9"]
    assert "| Benign (no attack) | 0.300 ± 0.000 (n=12) | 0.300 ± 0.000 (n=6) | 0.36 ± 0.03 |" in md["table10"]
    assert "| Fang (malicious) | 0.900 ± 0.000 (n=2) | 0.900 ± 0.000 (n=2) | 0.97 |" in md["table10"]
    assert "| Adaptive Targeted Label Flip | 50.00/25.00 [81.24/6.10] | 50.00/25.00 [81.99/5.10] |" in md["table3"]
    assert "| malicious clients | 2 of 6 (33 %) | 4 of 6 (67 %) |" in md["fig2"]
    assert "| FedREDefense DACC | 100.00 [100.00] | 100.00 [100.00] |" in md["fig2"]
    assert "| participation rate | rate 0.5 | rate 1 |" in md["fig5"]
    files = {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}
    assert len(files) == 3 * len(reproduction.TARGETS) and files["fig3.png"].startswith(b"\x89PNG")
    # the same runs give the same bytes
    for target in ("table10", "fig3"):
        reproduction.reproduce(target, "smoke", root, out, render_only=True)
    assert {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))} == files


def test_a_run_of_the_same_settings_elsewhere_stands_in_and_a_shorter_run_does_not(tmp_path):
    s = reproduction.scale_settings("small")
    page = reproduction.build_page("table1", "small", attacks=["fang"])
    fld, red = page.cells["fashion_mnist", "fang", "fldetector"], page.cells["fashion_mnist", "fang", "fedredefense"]
    other = str(tmp_path / "grid")
    # a grid of other runs: the FLDetector cell under the grid's name, 20 rounds; FedREDefense's of 5 rounds
    _fake_run(grid.cell_dir(other, "fldetector", "fang"),
              dataclasses.replace(reproduction.make_config(fld, s, None, "x"), rounds=20, eval_every=10), tacc=0.7)
    _fake_run(grid.cell_dir(other, "fedredefense", "fang"),
              dataclasses.replace(reproduction.make_config(red, s, None, "x"), rounds=5))
    root = str(tmp_path / "runs")
    locs = {loc.cell: loc for loc in reproduction.locate(page, root, {}, [other])}
    assert locs[fld].run_dir == grid.cell_dir(other, "fldetector", "fang") and locs[fld].reused
    assert locs[red].run_dir is None
    result = read_result(locs[fld])
    assert (result.rounds, result.eval_round, result.tacc) == (10, 10, 0.7)  # read at the cell's 10 rounds
    r = reproduction.reproduce("table1", "small", root, str(tmp_path / "out"), render_only=True, attacks=["fang"],
                               search=[other])
    assert (r["cells"], r["finished"], r["reused"]) == (2, 1, 1)
    md = open(tmp_path / "out" / "table1.md").read()
    assert "| Fang | FedREDefense | - [100.00] | - [0.00] | - [0.00] | - [0.00] |" in md
    assert "2 cells, 1 finished (1 read from another run directory with the same settings), 1 not run" in md


def test_a_cell_directory_of_other_settings_stops_before_anything_runs(tmp_path, monkeypatch):
    page = reproduction.build_page("table9", "smoke")
    cell = page.unique_cells()[0]
    own = reproduction.cell_dir(str(tmp_path), page.scale, cell)
    os.makedirs(own)
    cfg = reproduction.make_config(cell, page.scale, None, own)
    records.write_json(os.path.join(own, records.CONFIG), records.recorded_config(dataclasses.replace(cfg, beta=0.5)))
    ran = []
    monkeypatch.setattr(cells, "run_cell", ran.append)
    with pytest.raises(ConfigError, match="--overwrite"):
        reproduction.reproduce("table9", "smoke", str(tmp_path), str(tmp_path / "out"), {})
    assert ran == []
    r = reproduction.reproduce("table9", "smoke", str(tmp_path), str(tmp_path / "out"), {}, overwrite=True)
    assert [c.overwrite for c in ran] == [True, False, False] and r["finished"] == 0
    assert [c.defense_config for c in ran] == [
        {"first_cap": 3, "later_cap": 3, "redefense_inner_unroll": 1, "redefense_variant": v}
        for v in ("continuous", "intermittent")] + [{"first_cap": 3, "later_cap": 3, "redefense_inner_unroll": 1}]
    assert "| Fang | Continuous | - [-] | - [-] |" in open(tmp_path / "out" / "table9.md").read()


def test_a_cell_another_process_runs_is_left_for_last_and_not_run_twice(tmp_path, monkeypatch):
    page = reproduction.build_page("table1", "smoke")
    root = str(tmp_path / "runs")
    locs = reproduction.locate(page, root, {})
    first, second = locs
    ran, log = [], []

    def fake_run_cell(cfg):  # the other process finishes ``first`` while ``second`` runs here
        ran.append(cfg.output_dir)
        _fake_run(cfg.output_dir, cfg)
        _fake_run(first.own_dir, first.config)
        other.__exit__(None, None, None)

    monkeypatch.setattr(cells, "run_cell", fake_run_cell)
    other = cells.claim(first.own_dir, wait=True)
    assert other.__enter__() is True
    with cells.claim(first.own_dir, wait=False) as held:  # an flock conflicts within one process too
        assert held is False
    assert cells.run_missing(locs, log.append) == 1
    assert ran == [second.own_dir]
    assert [loc.run_dir for loc in locs] == [first.own_dir, second.own_dir]
    assert log[0] == f"cell {first.own_dir}: run by another process, left for last"


# ---------------------------------------------------------------------------- smoke scale, end to end


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every target at smoke scale in one process, on a tiny synthetic Fashion-MNIST, through
    JAX's persistent compilation cache in reproduce.py's default directory (the cells share
    most programs, and a second test run finds them compiled)."""
    base = tmp_path_factory.mktemp("reproduce")
    data = base / "fm"
    write_idx_dir(data, n_train=600, n_test=60)
    root, out = str(base / "runs"), str(base / "results")
    data_dirs = {"fashion_mnist": str(data)}
    reproduction.enable_compilation_cache(reproduction.default_cache_dir())
    try:
        ran = {t: reproduction.reproduce(t, "smoke", root, out, data_dirs, log=lambda m: None)
               for t in reproduction.TARGETS}
    finally:
        reproduction.enable_compilation_cache(None)
    return {"root": root, "out": out, "data_dirs": data_dirs, "ran": ran, "files": _pages(out), "base": base}


def _pages(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}


@pytest.mark.slow
def test_smoke_runs_every_target_and_writes_its_page(smoke):
    ran = smoke["ran"]
    assert sum(r["ran"] for r in ran.values()) == 17  # every distinct cell once, shared cells once
    assert all(r["finished"] == r["cells"] for r in ran.values())
    assert ran["table10"]["ran"] == 0  # its cells are Table 2's
    commit = records.git_commit() or "unrecorded"
    for target in reproduction.TARGETS:
        md = smoke["files"][f"{target}.md"].decode()
        for name in (f"{target}.png", f"{target}_latency.png"):
            assert smoke["files"][name].startswith(b"\x89PNG") and f"]({name})" in md
        assert f"--target={target} --scale=smoke" in md and f"runs made on commit(s): {commit} (" in md
        assert "6 clients, 2 malicious" in md and "2 rounds" in md
        assert f"{ran[target]['cells']} cells, {ran[target]['cells']} finished" in md
    t2 = smoke["files"]["table2.md"].decode()
    assert re.search(r"\| Scaling \| [\d.]+/[\d.]+ \[87\.45/98\.42\] \|", t2)  # FedAvg: measured [paper]
    assert re.search(r"\| Fang \| FedREDefense \| [\d.]+ \[100\.00\] \|", smoke["files"]["table1.md"].decode())
    fig2 = smoke["files"]["fig2.md"].decode()
    assert "| malicious clients | 2 of 6 (33 %) | 4 of 6 (67 %) |" in fig2
    assert re.search(r"\| FedREDefense DACC \| [\d.]+ \[100\.00\] \| [\d.]+ \[100\.00\] \|", fig2)
    assert "± " in smoke["files"]["table10.md"].decode()


@pytest.mark.slow
def test_render_only_is_byte_identical_and_a_rerun_runs_nothing(smoke, monkeypatch):
    for target in reproduction.TARGETS:
        r = reproduction.reproduce(target, "smoke", smoke["root"], smoke["out"], smoke["data_dirs"], render_only=True)
        assert r["ran"] == 0
    assert _pages(smoke["out"]) == smoke["files"]

    def no_run(cfg):
        raise AssertionError(f"ran {cfg.output_dir}")

    monkeypatch.setattr(cells, "run_cell", no_run)
    for target in ("table1", "fig4"):
        assert reproduction.reproduce(target, "smoke", smoke["root"], smoke["out"], smoke["data_dirs"])["ran"] == 0
    # the same data under another path (a link) is the same setting; no data directory matches any
    link = str(smoke["base"] / "fm_link")
    os.symlink(smoke["data_dirs"]["fashion_mnist"], link)
    for dirs in ({"fashion_mnist": link}, {}):
        r = reproduction.reproduce("table1", "smoke", smoke["root"], smoke["out"], dirs)
        assert (r["ran"], r["finished"]) == (0, 2)
    assert _pages(smoke["out"]) == smoke["files"]  # the command names the recorded data


@pytest.mark.slow
def test_stopped_cell_resumes_and_the_page_keeps_the_finished_cells(smoke, monkeypatch):
    cell = os.path.join(smoke["root"], "smoke", "fashion_mnist", "fedredefense__fang__variant-intermittent")
    saved = str(smoke["base"] / "saved_cell")
    shutil.move(cell, saved)

    def stop(cfg):
        raise reproduction.runner.Stopped("stopped after round 1; checkpoint saved, rerun the same command to resume")

    monkeypatch.setattr(cells, "run_cell", stop)
    try:
        with pytest.raises(reproduction.runner.Stopped, match="fedredefense__fang__variant-intermittent"):
            reproduction.reproduce("table9", "smoke", smoke["root"], smoke["out"], smoke["data_dirs"])
        md = open(os.path.join(smoke["out"], "table9.md")).read()
        assert "| Fang | Intermittent | - [-] | - [-] |" in md and "3 cells, 2 finished" in md
    finally:
        shutil.rmtree(cell, ignore_errors=True)
        shutil.move(saved, cell)
    reproduction.reproduce("table9", "smoke", smoke["root"], smoke["out"], smoke["data_dirs"], render_only=True)
    assert _pages(smoke["out"])["table9.md"] == smoke["files"]["table9.md"]


def _cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], env=_env(), capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.slow
def test_cli_render_only_dry_run_and_bad_flags(smoke, tmp_path):
    out = str(tmp_path / "pages")
    r = _cli("--target=table2", "--scale=smoke", f"--root={smoke['root']}", f"--out={out}", "--render_only")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "6 of 6 cells finished" in r.stdout
    for name in ("table2.md", "table2.png", "table2_latency.png"):
        assert open(os.path.join(out, name), "rb").read() == smoke["files"][name]
    r = _cli("--target=fig5", "--scale=smoke", f"--root={smoke['root']}", "--dry_run")
    assert r.returncode == 0 and r.stdout.count(": finished") == 2, r.stdout + r.stderr[-2000:]
    for bad, needle in ((["--target=table4", "--scale=smoke"], "error: --target: "),
                        (["--target=table1"], "error: --scale: "),
                        (["--target=table1", "--scale=smoke", "--datasets=mnist"], "unknown dataset"),
                        (["--target=table1", "--scale=smoke", "--num_clients=5"], "error: --num_clients: set by")):
        r = _cli(*bad, "--render_only", f"--out={out}")
        assert r.returncode == 2 and "Traceback" not in r.stderr and needle in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_cli_sigterm_stops_with_130_and_the_same_command_resumes(smoke, tmp_path):
    """A cell missing from the smoke root runs; SIGTERM after its first round stops it with a
    checkpoint (exit 130), and the same command finishes it from there. (The adaptive attack's
    second round searches for seconds: the signal arrives during it.)"""
    cell = os.path.join(smoke["root"], "smoke", "fashion_mnist",
                        "fedredefense__adaptive_targeted_label_flip__aggregator-norm_bound")
    saved = str(tmp_path / "saved_cell")
    shutil.move(cell, saved)
    out = str(tmp_path / "pages")
    cmd = [sys.executable, SCRIPT, "--target=table3", "--scale=smoke", f"--root={smoke['root']}", f"--out={out}",
           f"--data_dir={smoke['data_dirs']['fashion_mnist']}", f"--jax_cache_dir={reproduction.default_cache_dir()}"]
    log = tmp_path / "stderr.txt"
    try:
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 300
        while _rounds_written(cell) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
        text = log.read_text()
        assert proc.returncode == 130 and "Traceback" not in text, text[-2000:]
        assert "rerun the same command to resume" in text
        assert records.read_summary(cell)["status"] == "stopped"
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "resumed from the checkpoint of round" in r.stderr and "2 of 2 cells finished" in r.stdout
        table = lambda md: md.split("![table3]")[0]
        assert table(open(os.path.join(out, "table3.md")).read()) == table(smoke["files"]["table3.md"].decode())
    finally:
        shutil.rmtree(cell, ignore_errors=True)
        shutil.move(saved, cell)
