"""Runs one federated-learning experiment (attack x defense) from absl flags
(``fedredefense_jax/cli.py``: one flag per setting; ``--helpfull`` lists them).

Example (the paper's Fashion-MNIST setting, FedAvg, no attack, 100 rounds)::

    python experiments/run.py --dataset=fashion_mnist --data_dir=../shared/data/fashion_mnist \
        --num_clients=100 --num_malicious=0 --beta=0.1 --rounds=100 --output_dir=runs/fedavg
"""

from __future__ import annotations

import sys

from absl import logging

from fedredefense_jax import cli, runner
from fedredefense_jax.config import ConfigError
from fedredefense_jax.data import DataError
from fedredefense_jax.simulation import AttackOutputError

FLAGS = cli.FLAGS


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    try:
        summary = runner.run(cli.experiment_config())
    except (ConfigError, DataError, AttackOutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except runner.Stopped as e:
        print(f"{e} ({FLAGS.output_dir})", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"interrupted; rounds so far are in {FLAGS.output_dir}, rerun the same command to resume "
              "from the last checkpoint", file=sys.stderr)
        return 130
    print(f"done: test accuracy {summary['test_acc']:.4f} after {summary['rounds_done']} rounds; "
          f"{FLAGS.output_dir}/summary.json")
    return 0


if __name__ == "__main__":
    cli.run(main)
