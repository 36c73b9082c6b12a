"""One malicious client's Scaling / DBA training on its own, round after round, without the
federation: can the client's local schedule implant the trigger at all?

The client starts from the initial global model and applies its own genuine poisoned update
every round (``runner.local_backdoor``: the federation's trainer and poison, no scaling, no
other client). Every ``--eval_every`` rounds it prints and records the test accuracy, the ASR
(triggered test images of classes other than 0 predicted 0) and ``asr_base`` (the same count
without the trigger); a backdoor exists only where ``asr`` exceeds ``asr_base``.

    python experiments/backdoor_local.py --data_dir=../shared/data/fashion_mnist \\
        --num_clients=30 --num_malicious=8 --train_subset=18000 --client=29 --rounds=50 \\
        --lr=0.01 --backdoor_training=mixed --trigger_pixels=24:24,22:24,24:22,23:23 \\
        --output=runs/backdoor_local.json
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "fashion_mnist", "fashion_mnist, cifar10 or cinic10.")
flags.DEFINE_string("data_dir", None, "Dataset directory or archive.")
flags.DEFINE_string("model", "cnn", "cnn or convnet.")
flags.DEFINE_integer("num_clients", 30, "Clients of the split.")
flags.DEFINE_integer("num_malicious", 8, "Malicious clients (the last ids).")
flags.DEFINE_float("beta", 0.1, "Dirichlet concentration of the split.")
flags.DEFINE_integer("train_subset", None, "Training images used before the split (unset = all).")
flags.DEFINE_integer("seed", 0, "Seed of the split, the initial model and the shuffling.")
flags.DEFINE_integer("client", None, "Malicious client id (unset = the last one).")
flags.DEFINE_string("attack", "scaling", "scaling or dba.")
flags.DEFINE_string("backdoor_training", None, "Local backdoor schedule: alternating (unset) or mixed.")
flags.DEFINE_list("trigger_pixels", None, "row:col pixels of the trigger (unset = the paper's four).")
flags.DEFINE_integer("rounds", 50, "Local rounds (each: the attack's schedule over E epochs).")
flags.DEFINE_integer("local_epochs", 1, "Local epochs E per round.")
flags.DEFINE_integer("batch_size", 32, "Local batch size.")
flags.DEFINE_float("lr", 1e-3, "Local SGD learning rate.")
flags.DEFINE_integer("eval_every", 10, "Evaluate every this many rounds (and at the end).")
flags.DEFINE_string("output", "runs/backdoor_local.json", "JSON results (rewritten after every evaluation).")


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    from fedredefense_jax.data import DataError
    from fedredefense_jax.runner import ConfigError, ExperimentConfig, atomic_json, local_backdoor, recorded_config

    attack_config = {"backdoor_training": FLAGS.backdoor_training} if FLAGS.backdoor_training else {}
    if FLAGS.trigger_pixels:
        attack_config["trigger_pixels"] = FLAGS.trigger_pixels
    cfg = ExperimentConfig(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model=FLAGS.model,
                           num_clients=FLAGS.num_clients, num_malicious=FLAGS.num_malicious, beta=FLAGS.beta,
                           rounds=FLAGS.rounds, local_epochs=FLAGS.local_epochs, batch_size=FLAGS.batch_size,
                           lr=FLAGS.lr, seed=FLAGS.seed, eval_every=FLAGS.eval_every, attack=FLAGS.attack,
                           train_subset=FLAGS.train_subset, attack_config=attack_config)
    client = FLAGS.num_clients - 1 if FLAGS.client is None else FLAGS.client
    out = {"config": recorded_config(cfg) | {"client": client}, "evaluations": []}
    if os.path.dirname(FLAGS.output):
        os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)

    def report(row):
        out["evaluations"].append(row)
        atomic_json(FLAGS.output, out)
        print(f"round {row['round']}: test_acc {row['test_acc']:.4f} asr {row['asr']:.4f} "
              f"asr_base {row['asr_base']:.4f}", flush=True)

    try:
        local_backdoor(cfg, client, on_eval=report)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {FLAGS.output}")
    return 0


if __name__ == "__main__":
    app.run(main)
