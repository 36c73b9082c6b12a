"""One command per table and figure of the paper: runs the missing cells, then writes the page.

    python experiments/reproduce.py --target=table2 --scale=small --data_dir=../shared/data/fashion_mnist
    python experiments/reproduce.py --target=fig2 --scale=paper --cifar10_dir=../shared/data/cifar10_jpeg.tar.gz
    python experiments/reproduce.py --target=table2 --scale=small --render_only --reuse_from=runs

Targets: table1 (DACC / FPR / FNR / AAR of FedREDefense and FLDetector), table2 (TACC / ASR,
attack x defense), table3 (FedREDefense with FedAvg or Norm Bound under the label flips and
adaptive attacks), table8 (ADACC / AFPR / AFNR / AAR of FLAME, FLTrust and FLDetector),
table9 (AOI of the three FedREDefense variants), table10 (reconstruction errors), fig2-fig5
(malicious fraction, non-IID degree, local epochs, participation rate). Scales: smoke (a
minute-sized check that everything runs and renders), small (30 clients / 8 malicious, 10
rounds: about an hour per target on a 2-core CPU), paper (the paper's settings: 100 / 28,
500 rounds, its sweeps and datasets).

Every cell is an ordinary run (``fedredefense_jax.runner.run``) in
``ROOT/<scale>/<dataset>/<cell>``; targets that need the same configuration share the
directory. Finished cells are skipped; a finished run with the same settings anywhere under
``--root`` or ``--reuse_from`` (e.g. a grid of ``experiments/grid.py``) is read instead of
running the cell again; SIGINT/SIGTERM stop after the running cell's current round with a
checkpoint (exit code 130) and the same command resumes. The page: ``OUT/<target>.md``
(measured [paper], cell by cell, with the settings, the commits of the runs and the
command), ``OUT/<target>.png`` and ``OUT/<target>_latency.png``. ``--render_only`` rewrites
them from the runs alone (the same bytes when no run changed).

Of the experiment flags (``fedredefense_jax/cli.py``) the scale sets all but ``--data_dir``
(Fashion-MNIST's data; ``--cifar10_dir`` / ``--cinic_dir`` give the others') and
``--overwrite`` (replace a cell directory that holds a run of other settings, a cell whose
definition changed; without it such a cell stops the command before anything runs).
"""

from __future__ import annotations

import os
import signal
import sys

from absl import flags, logging

from fedredefense_jax import cli, reproduction
from fedredefense_jax.config import ConfigError
from fedredefense_jax.data import DataError
from fedredefense_jax.runner import Stopped
from fedredefense_jax.simulation import AttackOutputError

FLAGS = cli.FLAGS
flags.DEFINE_enum("target", None, reproduction.TARGETS, "The table or figure to reproduce.")
flags.DEFINE_enum("scale", None, reproduction.SCALES, "smoke, small or paper (see the module docstring).")
flags.mark_flags_as_required(["target", "scale"])
flags.DEFINE_string("root", "results/runs", "Run directories: ROOT/<scale>/<dataset>/<cell>.")
flags.DEFINE_string("out", None, "Where the page and figures go (default: results; results/smoke at smoke scale).")
flags.DEFINE_bool("render_only", False, "Only rewrite the page from the existing runs (run nothing).")
flags.DEFINE_bool("dry_run", False, "Only list the cells, where each is read from, and which would run.")
flags.DEFINE_string("cifar10_dir", None, "CIFAR-10 (image-folder tree or .tar.gz, e.g. "
                    "../shared/data/cifar10_jpeg.tar.gz; unset: downloaded into the cache).")
flags.DEFINE_string("cinic_dir", None, "CINIC-10 (image-folder tree or its .tar.gz). CINIC-10 cells exist only "
                    "when it is given.")
flags.DEFINE_list("datasets", [], "Replace the scale's datasets for this target (fashion_mnist, cifar10, cinic10).")
flags.DEFINE_list("attacks", [], "Replace the target's attacks (its rows, or the figures' panels).")
flags.DEFINE_list("reuse_from", [], "More directories searched for finished runs with a cell's settings.")
flags.DEFINE_string("jax_cache_dir", None, "JAX's persistent compilation cache (default: "
                    "$FEDREDEFENSE_CACHE/jax or ~/.cache/fedredefense_jax/jax; empty: none).")
# The experiment flags this script takes; the scale sets every other one.
_TAKEN = ("data_dir", "overwrite")


def _set_by_scale() -> list[str]:
    names = [*cli.EXPERIMENT, *cli.PLUGIN_SETTINGS["attack"], *cli.PLUGIN_SETTINGS["defense"], "attack_config",
             "defense_config"]
    return [n for n in names if n not in _TAKEN and FLAGS[n].present]


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # between cells; during one the runner stops it after the round, with a checkpoint


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    if given := _set_by_scale():
        print(f"error: --{given[0]}: set by --scale (of the experiment flags reproduce.py takes only "
              f"{', '.join('--' + n for n in _TAKEN)})", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    data_dirs = {"fashion_mnist": FLAGS.data_dir, "cifar10": FLAGS.cifar10_dir, "cinic10": FLAGS.cinic_dir}
    out = FLAGS.out or (os.path.join("results", "smoke") if FLAGS.scale == "smoke" else "results")
    try:
        page = reproduction.build_page(FLAGS.target, FLAGS.scale, data_dirs, FLAGS.datasets or None,
                                       FLAGS.attacks or None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if FLAGS.dry_run:
        for loc in reproduction.locate(page, FLAGS.root, data_dirs, FLAGS.reuse_from):
            state = ("finished" if loc.run_dir == loc.own_dir else f"read from {loc.run_dir}" if loc.run_dir
                     else "to run, replacing a run of other settings" if loc.conflict else "to run")
            print(f"{loc.own_dir}: {state}")
        return 0
    if not FLAGS.render_only:
        cache = reproduction.default_cache_dir() if FLAGS.jax_cache_dir is None else FLAGS.jax_cache_dir
        reproduction.enable_compilation_cache(cache)
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        done = reproduction.reproduce(FLAGS.target, FLAGS.scale, FLAGS.root, out, data_dirs,
                                      render_only=FLAGS.render_only, datasets=FLAGS.datasets or None,
                                      attacks=FLAGS.attacks or None, search=FLAGS.reuse_from, overwrite=FLAGS.overwrite,
                                      log=lambda m: logging.info("%s", m))
    except (ConfigError, DataError, AttackOutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt) as e:
        why = str(e) if isinstance(e, Stopped) else "interrupted"
        print(f"{why}; the page holds the finished cells; rerun the same command to resume", file=sys.stderr)
        return 130
    print(f"{FLAGS.target} at {FLAGS.scale} scale: {done['finished']} of {done['cells']} cells finished "
          f"({done['reused']} read from other run directories, {done['ran']} run now); wrote "
          + ", ".join(done["files"]))
    return 0


if __name__ == "__main__":
    cli.run(main)
