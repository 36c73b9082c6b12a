"""Grids of (defense, attack) runs: where each cell's run lives, which plug-in settings it
gets, and the grid's table (``experiments/grid.py``; ``fedredefense_jax.reproduction``
names and configures its cells the same way).

A cell is an ordinary run in ``ROOT/DEFENSE__ATTACK`` (more ``__``-separated parts name
settings that differ from the grid's). Settings given to a whole grid go to the cells
whose plug-in takes them: ``fldetector_window`` to the FLDetector cells only, so a FedAvg
cell records no FLDetector setting. The table puts the paper's Table 2 / 3 Fashion-MNIST
value beside each cell (:mod:`fedredefense_jax.paper`).
"""

from __future__ import annotations

import difflib
import json
import os

from fedredefense_jax import attacks as attacks_lib
from fedredefense_jax import defenses as defenses_lib
from fedredefense_jax import paper, records
from fedredefense_jax.config import ConfigError, takers

SEP = "__"
REGISTRIES = {"attack": attacks_lib, "defense": defenses_lib}
LABELLING = ("fedredefense", "fldetector")  # defenses that expel clients: DACC/FPR/FNR/AAR
FILTERING = ("flame", "fltrust")  # per-round filters: ADACC/AFPR/AFNR (Table 8)


def cell_name(defense: str, attack: str, *parts: str) -> str:
    """``DEFENSE__ATTACK`` (and ``__PART`` for each of ``parts``)."""
    return SEP.join((defense, attack, *parts))


def cell_dir(root: str, defense: str, attack: str, *parts: str) -> str:
    return os.path.join(root, cell_name(defense, attack, *parts))


def _fields(kind: str, plugin: str) -> dict:
    registry = REGISTRIES[kind]
    return registry.settings(plugin).fields() if plugin in registry.names() else {}


def settings_taken(kind: str, plugin: str, given: dict) -> dict:
    """The settings of ``given`` that the ``kind`` ('attack' / 'defense') ``plugin`` takes
    (none for a plug-in that is not registered: building its run names it)."""
    known = _fields(kind, plugin)
    return {k: v for k, v in given.items() if k in known}


def check_taken(given: dict, cells: list[tuple[str, str]]) -> None:
    """ConfigError for a setting of ``given`` (``{kind: {name: value}}``) that no plug-in of
    the ``(defense, attack)`` cells takes (a typo, or a setting of a plug-in not in the grid)."""
    for kind, used in (("attack", {a for _, a in cells}), ("defense", {d for d, _ in cells})):
        known = {n for u in used for n in _fields(kind, u)}
        for key in given.get(kind, {}):
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
                others = takers(REGISTRIES[kind], key)
                raise ConfigError(key, f"no {kind} of the grid ({', '.join(sorted(used))}) takes it" +
                                  (f"; did you mean {close[0]}?" if close else "") +
                                  (f" (it is one of {', '.join(others)})" if others else ""))


def paper_text(attack: str, defense: str) -> str | None:
    """The paper's Fashion-MNIST value of the cell as printed: Table 2's, or Table 3's
    FedREDefense + FedAvg for the label flips ("TACC" or "TACC/ASR", %)."""
    if attack in paper.TABLE3_ATTACKS:
        value = paper.TABLE3["fashion_mnist"][attack]["fedavg"] if defense == "fedredefense" else None
    else:
        value = paper.TABLE2["fashion_mnist"].get(attack, {}).get(defense)
    return paper.tacc_asr_text(value)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def cell_text(s: dict) -> str:
    """TACC % (/ASR %) of a summary."""
    t = pct(s.get("test_acc"))
    return t + (f"/{pct(s['asr'])}" if s.get("asr") is not None else "")


def excluded_share(run_dir: str) -> float | None:
    """Fraction of all participations that got aggregation weight 0 (filtered out)."""
    kept = total = 0
    try:
        for rec in records.read_rounds(run_dir):
            agg = rec.get("aggregated", [x > 0 for x in rec["weights"]])
            total += len(agg)
            kept += sum(agg)
    except (OSError, KeyError):
        return None
    return (total - kept) / total if total else None


def read_table(root: str) -> dict:
    """``{attack: {defense: extract}}`` of every finished ``DEFENSE__ATTACK`` cell under ``root``."""
    table: dict = {}
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if SEP not in name:
            continue
        s = records.finished(os.path.join(root, name))
        if s is None:
            continue
        defense, attack = name.split(SEP, 1)
        det = s.get("detection", {})
        table.setdefault(attack, {})[defense] = {
            "tacc": s.get("test_acc"), "asr": s.get("asr"), "wall_s": s.get("wall_s"),
            "rounds": s.get("rounds_done"), "expelled": len(s.get("expelled", [])),
            "clients": s.get("config", {}).get("num_clients"), "text": cell_text(s),
            "excluded": excluded_share(os.path.join(root, name)),
            **{k: det.get(k) for k in ("dacc", "fpr", "fnr", "aar", "adacc", "afpr", "afnr")}}
    return table


def table_markdown(table: dict) -> str:
    """The table of :func:`read_table`: TACC (/ASR) with the paper's value in brackets, then
    the detection metrics of the defenses that label or filter clients."""
    order = list(paper.TABLE2_DEFENSES)
    defenses = sorted({d for row in table.values() for d in row}, key=lambda d: order.index(d) if d in order else 99)
    known = list(paper.TABLE2_ATTACKS) + list(paper.TABLE3_ATTACKS)
    attacks = [a for a in known + sorted(set(table) - set(known)) if a in table]
    lines = ["TACC % (/ASR %) from these runs; in brackets the paper's Table 2/3 Fashion-MNIST value.", "",
             "| attack | " + " | ".join(defenses) + " |", "|" + " --- |" * (len(defenses) + 1)]
    for a in attacks:
        row = []
        for d in defenses:
            c = table[a].get(d)
            ref = paper_text(a, d)
            row.append((c["text"] if c else ".") + (f" [{ref}]" if ref else ""))
        lines.append(f"| {a} | " + " | ".join(row) + " |")
    det_lines = []
    for a in attacks:
        for d in defenses:
            c = table[a].get(d)
            if c and a == "none" and d in LABELLING + FILTERING:
                # no attacker: the q "malicious" ids are honest, every exclusion is a false positive
                det_lines.append(f"| none | {d} | expelled {c['expelled']} of {c['clients']} (all honest) "
                                 f"| filtered out: {pct(c['excluded'])} % of participations | | |")
                continue
            aar = None if not c or c["aar"] is None else round(c["aar"], 2)
            if c and d in LABELLING:
                det_lines.append(f"| {a} | {d} | DACC {pct(c['dacc'])} | FPR {pct(c['fpr'])} | FNR {pct(c['fnr'])} "
                                 f"| AAR {aar} |")
            if c and d in FILTERING:
                det_lines.append(f"| {a} | {d} | ADACC {pct(c['adacc'])} | AFPR {pct(c['afpr'])} "
                                 f"| AFNR {pct(c['afnr'])} | AAR {aar} |")
    if det_lines:
        lines += ["", "| attack | defense | detection | | | |", "| --- | --- | --- | --- | --- | --- |", *det_lines]
    walls = [c["wall_s"] for row in table.values() for c in row.values() if c.get("wall_s")]
    lines += ["", f"{sum(len(r) for r in table.values())} cells, {sum(walls) / 60:.0f} min of runs in all."]
    return "\n".join(lines) + "\n"


def write_table(root: str) -> dict:
    """Reads every finished cell under ``root``, writes ``table.md`` / ``table.json`` there
    and returns the table (:func:`read_table`)."""
    table = read_table(root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write(table_markdown(table))
    with open(os.path.join(root, "table.json"), "w") as f:
        json.dump(table, f, indent=1)
    return table
