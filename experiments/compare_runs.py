"""Whether two runs recorded the same rounds, timings aside: exit code 0 when they did, 1
with the differences printed when not.

    python experiments/compare_runs.py runs/before/fedredefense_mpaf runs/after/fedredefense_mpaf

Fields recorded by one run only (a newer version records more) are listed, not compared,
unless ``--strict``.
"""

from __future__ import annotations

import sys

from absl import app, flags

from fedredefense_jax import records

flags.DEFINE_bool("strict", False, "A field only one run records is a difference.")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) != 3:
        print("error: give two run directories", file=sys.stderr)
        return 2
    try:
        a, b = records.read_rounds(argv[1]), records.read_rounds(argv[2])
    except OSError as e:
        print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    only = sorted({k for r in a for k in r} ^ {k for r in b for k in r})
    if only and not FLAGS.strict:
        print(f"recorded by one run only (not compared): {', '.join(only)}")
    diff = records.round_differences(a, b, shared_only=not FLAGS.strict)
    for line in diff:
        print(line)
    print(f"{len(a)} and {len(b)} rounds: {'the same' if not diff else f'{len(diff)} difference(s)'}")
    return 1 if diff else 0


if __name__ == "__main__":
    app.run(main)
