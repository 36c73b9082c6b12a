"""The paper's tables and figures as runs ("cells") and pages (``experiments/reproduce.py``).

A *target* (``table1`` ... ``fig5``) at a *scale* (``smoke``, ``small``, ``paper``) is a
page of cells, each an ordinary :func:`fedredefense_jax.runner.run` of one configuration in
``ROOT/<scale>/<dataset>/<cell name>``, rendered as ``<target>.md`` (measured value next to
the paper's, cell by cell) and the figures ``<target>.png`` / ``<target>_latency.png``.

* :mod:`.scales`: the settings every cell of a scale shares, and what each target covers;
* :mod:`.targets`: the cells of each target and their configurations;
* :mod:`.cells`: where each cell is read from (its directory, or a finished run of the
  same settings elsewhere), running the missing ones, JAX's compilation cache;
* :mod:`.results`: a finished cell's values, from its first ``rounds`` records;
* :mod:`.pages` / :mod:`.figures`: the markdown page and the PNG figures.

Run directories are read and written through :mod:`fedredefense_jax.records` only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from fedredefense_jax import runner
from fedredefense_jax.reproduction import figures, pages
from fedredefense_jax.reproduction.cells import (
    Location,
    check,
    default_cache_dir,
    enable_compilation_cache,
    locate,
    run_missing,
)
from fedredefense_jax.reproduction.results import read_result
from fedredefense_jax.reproduction.scales import SCALES, scale_settings
from fedredefense_jax.reproduction.targets import TARGETS, Page, build_page, cell_dir, make_config

__all__ = ["SCALES", "TARGETS", "build_page", "cell_dir", "default_cache_dir", "enable_compilation_cache", "locate",
           "make_config", "render", "reproduce", "scale_settings"]


def render(page: Page, locations: list[Location], root: str, out: str, data_dirs: dict) -> list[str]:
    """Writes ``out/<target>.md`` and its figures from the cells' runs; returns the paths."""
    results = {loc.cell: read_result(loc) for loc in locations}
    files = {f"{page.target}.md": pages.render_markdown(page, locations, results, root, data_dirs).encode()}
    files.update(figures.render_figures(page, locations, results))
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, data in files.items():
        path = os.path.join(out, name)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths


def reproduce(target: str, scale: str, root: str, out: str, data_dirs: dict | None = None, *,
              render_only: bool = False, datasets: Iterable[str] | None = None, attacks: Iterable[str] | None = None,
              search: Iterable[str] = (), overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Runs the target's missing cells (unless ``render_only``) and writes its page.

    ``data_dirs`` maps datasets to their data (a dataset without one: downloaded when a cell
    runs, and any recorded data directory matches); ``search``: more roots searched for
    finished runs; ``overwrite``: replace a cell directory holding a run of other settings.
    Returns ``{"ran": cells run, "cells": count, "finished": count, "reused": count,
    "files": paths}``. Raises runner.Stopped (after writing the page from the finished
    cells) when a signal stopped a cell, ConfigError for a cell that cannot run.
    """
    data_dirs = dict(data_dirs or {})
    page = build_page(target, scale, data_dirs, datasets, attacks)
    locations = locate(page, root, data_dirs, search)
    ran = 0
    if not render_only:
        check(locations, overwrite)
        try:
            ran = run_missing(locations, log, overwrite)
        except runner.Stopped:
            render(page, locate(page, root, data_dirs, search), root, out, data_dirs)
            raise
        locations = locate(page, root, data_dirs, search)
    files = render(page, locations, root, out, data_dirs)
    done = [loc for loc in locations if loc.run_dir is not None]
    return {"ran": ran, "cells": len(locations), "finished": len(done), "reused": sum(loc.reused for loc in done),
            "files": files}
