"""Runs one federated-learning experiment (attack x defense) from absl flags
(``fedredefense_jax/cli.py``: one flag per setting; ``--helpfull`` lists them).

Example (FedREDefense under Fang's attack, 10 Fashion-MNIST clients of which 3 malicious;
it prints the clients it expelled)::

    python experiments/run.py --data_dir=../shared/data/fashion_mnist --num_clients=10 --num_malicious=3 \
        --train_subset=6000 --attack=fang --defense=fedredefense --rounds=3 --output_dir=runs/fedredefense_fang

The clients are split over every local device (``--num_devices=N``: the first N), or over
the devices of several processes (``--coordinator_address``, ``--num_processes``,
``--process_id``, or JAX's detection on SLURM, Open MPI and TPU VMs); see docs/scale_out.md.
"""

from __future__ import annotations

import sys

from absl import logging

from fedredefense_jax import cli, runner
from fedredefense_jax import mesh as mesh_lib
from fedredefense_jax.config import ConfigError
from fedredefense_jax.data import DataError
from fedredefense_jax.simulation import AttackOutputError

FLAGS = cli.FLAGS
cli.define_device_flags()


def detection_line(summary: dict) -> str | None:
    """What the defense expelled, against the malicious clients (the last ``num_malicious``
    ids); None for a defense that expels no one."""
    det, cfg = summary.get("detection") or {}, summary["config"]
    if "dacc" not in det:
        return None
    expelled = summary.get("expelled", [])
    malicious = set(range(cfg["num_clients"] - cfg["num_malicious"], cfg["num_clients"])) \
        if cfg["attack"] != "none" else set()
    caught = len(malicious.intersection(expelled))
    return (f"expelled {len(expelled)} of {cfg['num_clients']} clients {expelled}: {caught} of {len(malicious)} "
            f"malicious, {len(expelled) - caught} benign (DACC {det['dacc']:.2f}, FPR {det['fpr']:.2f}, "
            f"FNR {det['fnr']:.2f})")


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    logging.set_verbosity(logging.INFO)
    try:
        mesh = cli.client_mesh()
        if not mesh_lib.is_writer():
            logging.set_verbosity(logging.WARNING)  # process 0 logs the progress
        summary = runner.run(cli.experiment_config(), mesh=mesh)
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
    if not mesh_lib.is_writer():
        return 0
    print(f"done: test accuracy {summary['test_acc']:.4f} after {summary['rounds_done']} rounds; "
          f"{FLAGS.output_dir}/summary.json")
    if (line := detection_line(summary)) is not None:
        print(line)
    return 0


if __name__ == "__main__":
    cli.run(main)
