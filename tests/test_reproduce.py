"""experiments/reproduce.py and fedredefense_jax/reproduction.py: the paper's numbers, the
cells of every target and scale, and every target end to end at smoke scale (runs, pages,
byte-identical --render_only, reuse of finished runs, stop and resume)."""

import ast
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from test_data import write_idx_dir
from test_resume import _env, _rounds_written

from fedredefense_jax import paper, reproduction, runner

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "reproduce.py")
PAPER_MD = os.environ.get("FEDREDEFENSE_PAPER",
                          os.path.join(ROOT, os.pardir, "shared", "paper", "FedREDefense-ICML2024.md"))


# ---------------------------------------------------------------------------- the paper's numbers


def test_table2_fashion_mnist_equals_the_grids_copy():
    with open(os.path.join(ROOT, "experiments", "grid.py")) as f:
        tree = ast.parse(f.read())
    grid = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "PAPER_TABLE2_FMNIST")
    for attack in paper.TABLE2_ATTACKS:
        for defense in paper.TABLE2_DEFENSES:
            tacc, asr = paper.tacc_asr(paper.TABLE2["fashion_mnist"][attack][defense])
            assert grid[attack][defense] == f"{tacc:.2f}" + (f"/{asr:.2f}" if asr is not None else "")
    for attack in paper.TABLE3_ATTACKS:  # the grid's Table 3 entries are FedREDefense + FedAvg
        tacc, asr = paper.tacc_asr(paper.TABLE3["fashion_mnist"][attack]["fedavg"])
        assert grid[attack]["fedredefense"] == f"{tacc:.2f}" + (f"/{asr:.2f}" if asr is not None else "")


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
    ("small", {"table1": 14, "table2": 70, "table3": 8, "table8": 21, "table9": 3, "table10": 6, "fig2": 60,
               "fig3": 64, "fig4": 48, "fig5": 36}, 232),
    ("paper", {"table1": 28, "table2": 140, "table3": 16, "table8": 42, "table9": 3, "table10": 12, "fig2": 60,
               "fig3": 64, "fig4": 48, "fig5": 36}, 314),
])
def test_cells_per_target(scale, counts, total):
    cells = _all_cells(scale)
    assert {t: len(c) for t, c in cells.items()} == counts
    assert len(set().union(*cells.values())) == total
    s = reproduction.scale_settings(scale)
    for cs in cells.values():
        for c in cs:  # every cell is a valid run
            runner.validate(reproduction.make_config(c, s, None, "unused"))


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
    assert {dict(c.options).get("variant") for c in small["table9"]} == {None, "continuous", "intermittent"}
    assert {dict(c.options).get("aggregator") for c in small["table3"]} == {None, "norm_bound"}
    s = reproduction.scale_settings("small")
    cfg = reproduction.make_config(next(c for c in small["table1"] if c.defense == "fldetector"), s, "d", "o")
    assert (cfg.num_clients, cfg.num_malicious, cfg.train_subset, cfg.rounds, cfg.eval_every, cfg.beta) == \
        (30, 8, 18000, 10, 5, 0.1)
    assert cfg.defense_config == {"fldetector_cold_start": 2, "fldetector_window": 3}


def test_paper_scale_has_the_papers_settings_and_cinic_only_with_its_data():
    s = reproduction.scale_settings("paper")
    page = reproduction.build_page("table2", "paper", {})
    assert page.datasets == ("fashion_mnist", "cifar10")
    assert reproduction.build_page("table2", "paper", {"cinic10": "x"}).datasets == paper.DATASETS
    cfg = reproduction.make_config(page.cells["cifar10", "fang", "fldetector"], s, "d", "o")
    assert (cfg.num_clients, cfg.num_malicious, cfg.train_subset, cfg.rounds, cfg.eval_every) == (100, 28, None, 500, 10)
    assert cfg.defense_config == {}  # FLDetector's 50 + 10, FedREDefense's Table 7: their defaults
    fig4 = reproduction.build_page("fig4", "paper", {})
    assert fig4.datasets == ("cifar10",)
    assert {(c.local_epochs, c.rounds, dict(c.options).get("later_cap")) for c in fig4.unique_cells()
            if c.defense == "fedredefense"} == {(1, 500, None), (2, 250, 3000), (5, 100, 7500)}
    fig2 = reproduction.build_page("fig2", "paper", {})
    assert not any(c.defense == "flame" and c.num_malicious == 72 for c in fig2.unique_cells())


def test_comparison_ignores_another_defenses_settings_and_data_dir_spelling(tmp_path):
    s = reproduction.scale_settings("small")
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(data, tmp_path / "link")
    cell = reproduction.build_page("table2", "small", {}).cells["fashion_mnist", "fang", "fedavg"]
    mine = reproduction.recorded(reproduction.make_config(cell, s, str(data), "a"))
    # experiments/grid.py gives every cell the same --defense_config, read by FLDetector only
    grid = reproduction.recorded(dataclasses.replace(
        reproduction.make_config(cell, s, str(tmp_path / "link"), "b"), rounds=50, eval_every=10,
        defense_config={"fldetector_cold_start": 2, "fldetector_window": 3}))
    assert reproduction.comparable_key(mine) == reproduction.comparable_key(grid)
    key = reproduction.comparable_key
    assert key({**mine, "defense_config": {"flame_min_samples": 16}}) == key(mine)  # FLAME's, not FedAvg's
    flame = {**mine, "defense": "flame"}
    assert key({**flame, "defense_config": {"flame_min_samples": 16}}) != key(flame)
    for change in ({"defense_config": {"norm_threshold": 1.0}}, {"beta": 0.5}, {"attack": "lie"}):
        assert key({**mine, **change}) != key(mine)
    redef = reproduction.build_page("table2", "small", {}).cells["fashion_mnist", "fang", "fedredefense"]
    rcfg = reproduction.recorded(reproduction.make_config(redef, s, str(data), "c"))
    assert reproduction.comparable_key(rcfg) != reproduction.comparable_key(
        {**rcfg, "defense_config": {**rcfg["defense_config"], "later_cap": 30}})


def test_a_cell_directory_of_other_settings_stops_before_anything_runs(tmp_path, monkeypatch):
    page = reproduction.build_page("table9", "smoke", {})
    cell = page.unique_cells()[0]
    own = reproduction.cell_dir(str(tmp_path), page.scale, cell)
    os.makedirs(own)
    cfg = reproduction.make_config(cell, page.scale, None, own)
    with open(os.path.join(own, "config.json"), "w") as f:
        json.dump(reproduction.recorded(dataclasses.replace(cfg, beta=0.5)), f)
    ran = []
    monkeypatch.setattr(reproduction, "run_cell", ran.append)
    with pytest.raises(runner.ConfigError, match="--overwrite"):
        reproduction.reproduce("table9", "smoke", str(tmp_path), str(tmp_path / "out"), {})
    assert ran == []
    r = reproduction.reproduce("table9", "smoke", str(tmp_path), str(tmp_path / "out"), {}, overwrite=True)
    assert [c.overwrite for c in ran] == [True, False, False] and r["finished"] == 0
    assert "| Fang | Continuous | - [-] | - [-] |" in _read(str(tmp_path / "out" / "table9.md"))


# ---------------------------------------------------------------------------- smoke scale, end to end


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every target at smoke scale in one process, on a tiny synthetic Fashion-MNIST."""
    base = tmp_path_factory.mktemp("reproduce")
    data = base / "fm"
    write_idx_dir(data, n_train=600, n_test=60)
    root, out = str(base / "runs"), str(base / "results")
    data_dirs = {"fashion_mnist": str(data)}
    reproduction.enable_compilation_cache(reproduction.default_cache_dir())
    start = time.time()
    ran = {}
    try:
        for target in reproduction.TARGETS:
            ran[target] = reproduction.reproduce(target, "smoke", root, out, data_dirs, log=lambda m: None)
    finally:
        reproduction.enable_compilation_cache(None)
    files = {name: _read(os.path.join(out, name), "rb") for name in sorted(os.listdir(out))}
    return {"root": root, "out": out, "data_dirs": data_dirs, "ran": ran, "files": files, "base": base,
            "seconds": time.time() - start}


def _pages(out):
    return {name: _read(os.path.join(out, name), "rb") for name in sorted(os.listdir(out))}


def test_smoke_runs_every_target_and_writes_its_page(smoke):
    ran = smoke["ran"]
    assert sum(r["ran"] for r in ran.values()) == 20  # every distinct cell once, shared cells once
    assert all(r["finished"] == r["cells"] for r in ran.values())
    assert ran["table10"]["ran"] == 0  # its cells are Table 2's
    for target in reproduction.TARGETS:
        md = smoke["files"][f"{target}.md"].decode()
        for name in (f"{target}.png", f"{target}_latency.png"):
            assert smoke["files"][name].startswith(b"\x89PNG") and f"]({name})" in md
        assert f"--target={target} --scale=smoke" in md and "unrecorded" in md
        assert "6 clients, 2 malicious" in md and "2 rounds" in md
        assert f"{ran[target]['cells']} cells, {ran[target]['cells']} finished" in md
    t2 = smoke["files"]["table2.md"].decode()
    assert re.search(r"\| Scaling \| [\d.]+/[\d.]+ \[87\.45/98\.42\] \|", t2)  # FedAvg: measured [paper]
    assert re.search(r"\| Fang \| FedREDefense \| [\d.]+ \[100\.00\] \|", smoke["files"]["table1.md"].decode())
    fig2 = smoke["files"]["fig2.md"].decode()
    assert "| malicious clients | 2 of 6 (33 %) | 4 of 6 (67 %) |" in fig2 and "| FedREDefense DACC | " in fig2 and "[100.00]" in fig2
    assert "± " in smoke["files"]["table10.md"].decode()


def test_render_only_is_byte_identical(smoke):
    for target in reproduction.TARGETS:
        r = reproduction.reproduce(target, "smoke", smoke["root"], smoke["out"], smoke["data_dirs"], render_only=True)
        assert r["ran"] == 0
    assert _pages(smoke["out"]) == smoke["files"]


def test_rerun_reuses_finished_cells_and_other_directories(smoke, monkeypatch):
    def no_run(cfg):
        raise AssertionError(f"ran {cfg.output_dir}")

    monkeypatch.setattr(reproduction, "run_cell", no_run)
    for target in reproduction.TARGETS:
        assert reproduction.reproduce(target, "smoke", smoke["root"], smoke["out"], smoke["data_dirs"])["ran"] == 0
    assert _pages(smoke["out"]) == smoke["files"]
    # the same data under another path (a link) is the same setting; no data directory matches any
    link = str(smoke["base"] / "fm_link")
    os.symlink(smoke["data_dirs"]["fashion_mnist"], link)
    for dirs in ({"fashion_mnist": link}, {}):
        r = reproduction.reproduce("table1", "smoke", smoke["root"], smoke["out"], dirs)
        assert (r["ran"], r["finished"]) == (0, 2)
    assert _pages(smoke["out"])["table1.md"] == smoke["files"]["table1.md"]  # the command names the recorded data
    # a finished run elsewhere under the root, under another name, stands in for a cell
    own = os.path.join(smoke["root"], "smoke", "fashion_mnist", "fedavg__fang")
    moved = os.path.join(smoke["root"], "older", "grid", "fedavg__fang")
    shutil.move(own, moved)
    try:
        r = reproduction.reproduce("table2", "smoke", smoke["root"], smoke["out"], smoke["data_dirs"])
        assert (r["ran"], r["reused"], r["finished"]) == (0, 1, 6)
        md = _read(os.path.join(smoke["out"], "table2.md"))
        assert md.split("## Cells")[0] == smoke["files"]["table2.md"].decode().split("## Cells")[0]
        assert "(1 read from another run directory" in md
    finally:
        shutil.move(moved, own)
        reproduction.reproduce("table2", "smoke", smoke["root"], smoke["out"], smoke["data_dirs"], render_only=True)


def test_stopped_cell_resumes_and_the_page_keeps_the_finished_cells(smoke, monkeypatch):
    cell = os.path.join(smoke["root"], "smoke", "fashion_mnist", "fedredefense__fang__variant-intermittent")
    saved = str(smoke["base"] / "saved_cell")
    shutil.copytree(cell, saved)
    shutil.rmtree(cell)

    def stop(cfg):
        raise runner.Stopped("stopped after round 1; checkpoint saved, rerun the same command to resume")

    monkeypatch.setattr(reproduction, "run_cell", stop)
    with pytest.raises(runner.Stopped, match="fedredefense__fang__variant-intermittent"):
        reproduction.reproduce("table9", "smoke", smoke["root"], smoke["out"], smoke["data_dirs"])
    md = _read(os.path.join(smoke["out"], "table9.md"))
    assert "| Fang | Intermittent | - [-] | - [-] |" in md and "3 cells, 2 finished" in md
    shutil.rmtree(cell, ignore_errors=True)
    shutil.copytree(saved, cell)
    monkeypatch.undo()
    reproduction.reproduce("table9", "smoke", smoke["root"], smoke["out"], smoke["data_dirs"], render_only=True)
    assert _pages(smoke["out"])["table9.md"] == smoke["files"]["table9.md"]


def _cli(*args, **kw):
    return subprocess.run([sys.executable, SCRIPT, *args], env=_env(), capture_output=True, text=True, timeout=600,
                          check=False, **kw)


def test_cli_render_only_dry_run_and_bad_flags(smoke, tmp_path):
    out = str(tmp_path / "pages")
    r = _cli("--target=table2", "--scale=smoke", f"--root={smoke['root']}", f"--out={out}", "--render_only")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "6 of 6 cells finished" in r.stdout
    for name in ("table2.md", "table2.png", "table2_latency.png"):
        assert _read(os.path.join(out, name), "rb") == smoke["files"][name]
    r = _cli("--target=fig5", "--scale=smoke", f"--root={smoke['root']}", "--dry_run")
    assert r.returncode == 0 and r.stdout.count(": finished") == 2, r.stdout + r.stderr[-2000:]
    for bad, needle in ((["--target=table4", "--scale=smoke"], "--target"), (["--target=table1"], "--scale"),
                        (["--target=table1", "--scale=smoke", "--datasets=mnist"], "unknown dataset")):
        r = _cli(*bad, "--render_only", f"--out={out}")
        assert r.returncode != 0 and "Traceback" not in r.stderr and needle in r.stderr, r.stderr[-2000:]


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
           f"--data_dir={smoke['data_dirs']['fashion_mnist']}"]
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
        assert json.loads(_read(os.path.join(cell, "summary.json")))["status"] == "stopped"
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "resumed from the checkpoint of round" in r.stderr and "2 of 2 cells finished" in r.stdout
        table = lambda md: md.split("![table3]")[0]
        assert table(_read(os.path.join(out, "table3.md"))) == table(smoke["files"]["table3.md"].decode())
    finally:
        shutil.rmtree(cell, ignore_errors=True)
        shutil.move(saved, cell)
