"""Where each cell of a page is read from, and running the cells that have no run yet.

* A cell is *finished* when its own directory holds a run of its settings whose summary
  says done with ``rounds_done`` >= the cell's rounds (:func:`finished`).
* Otherwise a finished run anywhere under the searched roots whose recorded settings are
  the cell's (:func:`records.settings_key <fedredefense_jax.records.settings_key>`:
  config.json of any version, every setting but rounds / eval_every / checkpoint_every /
  overwrite / output_dir, the data directory by its real path) stands in for it.
* Otherwise the cell runs in its own directory (:func:`run_missing`): from the start, from
  its newest checkpoint, or extended from its last round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
from collections.abc import Callable, Iterable

from fedredefense_jax import records, runner
from fedredefense_jax.config import ConfigError, ExperimentConfig, validate
from fedredefense_jax.reproduction.targets import Cell, Page, cell_dir, make_config


@dataclasses.dataclass
class Location:
    """Where one cell is read from and where it runs."""

    cell: Cell
    own_dir: str
    config: ExperimentConfig  # what runs in own_dir
    run_dir: str | None  # the finished run read for the cell (None: not finished)
    reused: bool = False  # run_dir is another run's directory
    conflict: bool = False  # own_dir holds a run of other settings (replaced only with overwrite)


def finished(run_dir: str, rounds: int) -> dict | None:
    """The summary of a run in ``run_dir`` that is done with at least ``rounds`` rounds."""
    s = records.finished(run_dir)
    return s if s is not None and (s.get("rounds_done") or 0) >= rounds else None


def _key(run_dir: str, data_dir: bool) -> str | None:
    """``records.settings_key`` of the run in ``run_dir`` (None: no readable config)."""
    try:
        return records.settings_key(records.read_config(run_dir), data_dir)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def index_runs(roots: Iterable[str], data_dir: bool) -> dict[str, list[str]]:
    """``{settings key: [run directories]}`` of every run under ``roots`` (sorted;
    checkpoint folders are not entered)."""
    index: dict[str, list[str]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != records.CHECKPOINTS)
            if records.CONFIG in filenames and (key := _key(dirpath, data_dir)) is not None:
                index.setdefault(key, []).append(dirpath)
    return index


def locate(page: Page, root: str, data_dirs: dict, search: Iterable[str] = ()) -> list[Location]:
    """Where each of the page's cells is read from: its own finished directory, else a
    finished run with the same settings under ``root`` or ``search``, else nowhere yet. A
    dataset without a data directory in ``data_dirs`` matches runs of any data directory
    (``--render_only`` needs none), and its cells resume with the one their run recorded."""
    roots = [r for r in dict.fromkeys([root, *search]) if os.path.isdir(r)]
    indexes = {exact: index_runs(roots, exact) for exact in {data_dirs.get(c.dataset) is not None
                                                             for c in page.unique_cells()}}
    out = []
    for cell in page.unique_cells():
        own = cell_dir(root, page.scale, cell)
        exact = data_dirs.get(cell.dataset) is not None
        cfg = make_config(cell, page.scale, data_dirs.get(cell.dataset), own)
        key = records.settings_key(records.recorded_config(cfg), exact)
        same = _key(own, exact) == key
        if same:  # the same data under another spelling, or any: resume with the recorded one
            cfg = dataclasses.replace(cfg, data_dir=records.read_config(own).get("data_dir"))
        loc = Location(cell, own, cfg, None, conflict=os.path.exists(os.path.join(own, records.CONFIG)) and not same)
        if same and finished(own, cell.rounds):
            loc.run_dir = own
        else:
            for other in indexes[exact].get(key, []):
                if os.path.abspath(other) != os.path.abspath(own) and finished(other, cell.rounds):
                    loc.run_dir, loc.reused = other, True
                    break
        out.append(loc)
    return out


def check(locations: list[Location], overwrite: bool = False) -> None:
    """Raises ConfigError naming the cell for a cell that cannot run: bad settings
    (``config.validate``), or a directory holding a run of other settings (unless ``overwrite``)."""
    for loc in locations:
        if loc.run_dir is None:
            if loc.conflict and not overwrite:
                raise ConfigError("overwrite", f"{loc.own_dir} holds a run with other settings (the cell's "
                                               "definition changed?); --overwrite replaces it")
            try:
                validate(loc.config)
            except ConfigError as e:
                raise ConfigError(e.flag, f"cell {loc.cell.dataset}/{os.path.basename(loc.own_dir)}: "
                                          f"{e.message}") from None


def run_cell(cfg: ExperimentConfig) -> dict:
    """Runs (resumes, extends) one cell with ``runner.run``."""
    return runner.run(cfg, progress=cfg.eval_every)


@contextlib.contextmanager
def claim(own_dir: str, wait: bool):
    """Holds the cell's lock file (``<own_dir>.lock``, an advisory ``flock``) while it runs,
    so that reproductions running at once (two targets sharing cells) never run one cell
    twice. Yields False, holding nothing, when another process holds it and not ``wait``."""
    os.makedirs(os.path.dirname(own_dir) or ".", exist_ok=True)
    with open(own_dir.rstrip(os.sep) + ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_missing(locations: list[Location], log: Callable[[str], None] = print, overwrite: bool = False) -> int:
    """Runs every cell that has no finished run, in order; returns how many ran here. A cell
    another process is running (:func:`claim`) is left for last, then waited for; one that
    process finished is not run again. Raises runner.Stopped after SIGINT/SIGTERM (the
    stopped cell's checkpoint is saved) and ConfigError for a cell that cannot run, both
    naming the cell."""
    todo = [loc for loc in locations if loc.run_dir is None]
    ran = 0

    def run_one(loc: Location, wait: bool) -> bool:  # False: another process holds the cell
        nonlocal ran
        with claim(loc.own_dir, wait) as held:
            if not held:
                log(f"cell {loc.own_dir}: run by another process, left for last")
                return False
            if not finished(loc.own_dir, loc.cell.rounds):  # else run meanwhile by another process
                ran += 1
                log(f"cell {ran}/{len(todo)}: {loc.own_dir}")
                try:
                    run_cell(dataclasses.replace(loc.config, overwrite=loc.conflict and overwrite))
                except runner.Stopped as e:
                    raise runner.Stopped(f"cell {loc.own_dir}: {e}") from None
                except ConfigError as e:
                    raise ConfigError(e.flag, f"cell {loc.own_dir}: {e.message}") from None
            if finished(loc.own_dir, loc.cell.rounds):
                loc.run_dir = loc.own_dir
            return True

    busy = [loc for loc in todo if not run_one(loc, wait=False)]
    for loc in busy:
        run_one(loc, wait=True)
    return ran


def default_cache_dir() -> str:
    """``$FEDREDEFENSE_CACHE/jax`` or ``~/.cache/fedredefense_jax/jax`` (next to the data cache)."""
    base = os.environ.get("FEDREDEFENSE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                 "fedredefense_jax")
    return os.path.join(base, "jax")


def enable_compilation_cache(path: str | None) -> None:
    """JAX's persistent compilation cache in ``path``, every program written to it (the
    cells of a reproduction compile the same programs again and again: one model, a few
    shapes; with the cache each compiles once per machine); None or "": switched off. Takes
    effect after earlier compiles too."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if path:
        os.makedirs(path, exist_ok=True)
    compilation_cache.reset_cache()  # a cache in use stays in use until reset
    jax.config.update("jax_compilation_cache_dir", path or None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0 if path else 1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1 if path else 0)
