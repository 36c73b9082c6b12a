"""One malicious client's Scaling / DBA training on its own, round after round, without the
federation: can the client's local schedule implant the trigger at all?

Takes every experiment flag of ``experiments/run.py`` (``fedredefense_jax/cli.py``) plus
``--client`` and ``--output``. The client starts from the initial global model and applies
its own genuine poisoned update every round (``runner.local_backdoor``: the federation's
trainer and poison, no scaling, no other client). Every ``--eval_every`` rounds it prints
and records the test accuracy, the ASR (triggered test images of classes other than 0
predicted 0) and ``asr_base`` (the same count without the trigger); a backdoor exists only
where ``asr`` exceeds ``asr_base``.

    python experiments/backdoor_local.py --data_dir=../shared/data/fashion_mnist \\
        --num_clients=30 --num_malicious=8 --train_subset=18000 --client=29 --rounds=50 \\
        --lr=0.01 --backdoor_training=mixed --trigger_pixels=24:24,22:24,24:22,23:23 \\
        --output=runs/backdoor_local.json
"""

from __future__ import annotations

import os
import sys

from absl import flags

from fedredefense_jax import cli, records, runner
from fedredefense_jax.config import ConfigError
from fedredefense_jax.data import DataError

FLAGS = cli.FLAGS
flags.DEFINE_integer("client", None, "Malicious client id (unset = the last one).")
flags.DEFINE_string("output", "runs/backdoor_local.json", "JSON results (rewritten after every evaluation).")
cli.set_defaults(num_clients=30, num_malicious=8, attack="scaling", rounds=50)


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    client = FLAGS.num_clients - 1 if FLAGS.client is None else FLAGS.client
    if os.path.dirname(FLAGS.output):
        os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
    try:
        cfg = cli.experiment_config()
        out = {"config": records.recorded_config(cfg) | {"client": client}, "evaluations": []}

        def report(row):
            out["evaluations"].append(row)
            records.write_json(FLAGS.output, out)
            print(f"round {row['round']}: test_acc {row['test_acc']:.4f} asr {row['asr']:.4f} "
                  f"asr_base {row['asr_base']:.4f}", flush=True)

        runner.local_backdoor(cfg, client, on_eval=report)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {FLAGS.output}")
    return 0


if __name__ == "__main__":
    cli.run(main)
