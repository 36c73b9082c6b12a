"""Runs one federated-learning experiment (attack x defense) from absl flags.

Example (the paper's Fashion-MNIST setting, FedAvg, no attack, 100 rounds)::

    python experiments/run.py --dataset=fashion_mnist --data_dir=../shared/data/fashion_mnist \
        --num_clients=100 --num_malicious=0 --beta=0.1 --rounds=100 --output_dir=runs/fedavg
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "fashion_mnist", "fashion_mnist, cifar10 or cinic10.")
flags.DEFINE_string("data_dir", None, "IDX dir, image-folder tree/.tar.gz or cifar-10-python.tar.gz; unset = download into the cache.")
flags.DEFINE_string("model", "cnn", "cnn (the paper's Tables 5/6) or convnet (the authors' scripts).")
flags.DEFINE_string("conv_impl", "auto", "Convolution implementation: auto, xla or matmul.")
flags.DEFINE_integer("num_clients", 100, "Number of clients p.")
flags.DEFINE_integer("num_malicious", 28, "Number of malicious clients q (the last q ids).")
flags.DEFINE_float("beta", 0.1, "Dirichlet concentration of the non-IID split (smaller = more skewed).")
flags.DEFINE_integer("rounds", 500, "Communication rounds T.")
flags.DEFINE_integer("local_epochs", 1, "Local epochs E.")
flags.DEFINE_float("participation_rate", 1.0, "Fraction of non-expelled clients sampled per round, in (0, 1].")
flags.DEFINE_integer("batch_size", 32, "Local batch size.")
flags.DEFINE_float("lr", 1e-3, "Local SGD learning rate.")
flags.DEFINE_integer("seed", 0, "Seed of the split, the initial model and all sampling.")
flags.DEFINE_string("output_dir", "runs/default", "Where rounds.jsonl and summary.json go.")
flags.DEFINE_integer("checkpoint_every", 1, "Save an Orbax checkpoint every this many rounds (and at the end); "
                     "rerunning the same command resumes from the newest.")
flags.DEFINE_bool("overwrite", False, "Replace a run of a different configuration found in --output_dir.")
flags.DEFINE_integer("eval_every", 10, "Evaluate test accuracy every this many rounds (and at the end).")
flags.DEFINE_string("attack", "none", "Attack name (see fedredefense_jax.attacks.names()).")
flags.DEFINE_string("defense", "fedavg", "Defense name (see fedredefense_jax.defenses.names()).")
flags.DEFINE_string("layout", None, "Client batching: vmap, map or chunked; unset = fastest for the backend.")
flags.DEFINE_float("attack_scale", None, "Scaling factor of MPAF, Scaling and DBA; unset = the paper's 3.")
flags.DEFINE_float("lie_z", None, "LIE's z, fixed; unset = z_max of Appendix A.2, "
                   "Phi^-1((p - q - s) / (p - q)) with s = floor(p/2 + 1) - q, each round.")
flags.DEFINE_string("backdoor_training", None,
                    "Scaling / DBA local training: alternating (unset) = a poisoned epoch then a clean one (authors' "
                    "code); mixed = each epoch over the data plus a poisoned copy, shuffled together.")
flags.DEFINE_list("trigger_pixels", None,
                  "Scaling / DBA trigger as row:col pixels of channel 0, e.g. 24:24,22:24,24:22,23:23; unset = the "
                  "paper's 26:26,24:26,26:24,25:25 (three of which the paper's Fashion-MNIST CNN cannot see).")
flags.DEFINE_enum("lone_attacker", None, ["zero", "genuine"],
                  "LIE, Min-Max, Min-Sum, Fang with one compromised participant in its pool: zero (unset) = send "
                  "the zero update (the authors' code); genuine = the formulas on one update (its genuine update).")
flags.DEFINE_enum("min_sum_bound", None, ["min", "max"],
                  "Min-Sum's bound on the summed squared distances: min (unset) = the minimum over the compromised "
                  "updates of their summed distances to the others (the authors' and Shejwalkar's code); max.")
flags.DEFINE_float("adaptive_delta_init", None, "Adaptive attacks (Algorithm 3): initial step delta_init of the scale "
                   "search; unset = the paper's 2.")
flags.DEFINE_float("adaptive_step_min", None, "Adaptive attacks (Algorithm 3): the search stops once the step is "
                   "below gamma_att; unset = the paper's 0.125.")
flags.DEFINE_integer("train_subset", None, "Use this many training images (a seeded uniform subset) before the split; "
                     "unset = all. 30 clients over 18000 Fashion-MNIST images hold ~600 each, as 100 clients over 60000.")
flags.DEFINE_integer("flame_min_samples", None, "FLAME: HDBSCAN's min_samples; unset = 1 (single linkage). "
                     "num_clients // 2 + 1 matches the paper's Table 8; large values let identical attacker "
                     "updates (Min-Sum, Min-Max, LIE) outlast the benign ones.")
flags.DEFINE_integer("flcert_groups", None, "FLCert: number of client groups, one Median-trained model each (paper: 10).")
# FedREDefense (unset = the paper's defaults: Section 5.1.4 and Table 7 for the dataset).
flags.DEFINE_float("gamma", None, "Reconstruction-error threshold (paper: 0.6).")
flags.DEFINE_integer("inner_steps", None, "Inner GD steps N of the virtual model (paper: 5).")
flags.DEFINE_integer("distill_images_per_class", None, "Synthetic images per class (paper: 1).")
flags.DEFINE_float("lr_images", None, "Outer LR of the synthetic images (Table 7).")
flags.DEFINE_float("lr_labels", None, "Outer LR of the label logits (Table 7).")
flags.DEFINE_float("alpha_init", None, "Initial virtual-model LR alpha (Table 7).")
flags.DEFINE_float("lr_alpha", None, "Outer LR of alpha (Table 7).")
flags.DEFINE_integer("first_cap", None, "Outer-iteration cap at a client's first participation (Table 7 'Initial Round of M').")
flags.DEFINE_integer("later_cap", None, "Outer-iteration cap later (Table 7 'Upper Bound of M').")
flags.DEFINE_string("redefense_variant", None,
                    "Optimisation schedule of Appendix B.3: dynamic (unset), continuous or intermittent.")
flags.DEFINE_string("redefense_layout", None, "Reconstruction batching over clients: auto (unset), vmap or map.")
flags.DEFINE_string("redefense_aggregator", None,
                    "Rule aggregating FedREDefense's kept updates: fedavg (unset), median, trimmed_mean, norm_bound or krum.")

# Unset flags stay out of the configs: the attack / defense applies its own default.
_ATTACK_FLAGS = {"attack_scale": "scale", "lie_z": "lie_z", "backdoor_training": "backdoor_training",
                 "adaptive_delta_init": "delta_init", "adaptive_step_min": "step_min",
                 "trigger_pixels": "trigger_pixels", "lone_attacker": "lone_attacker",
                 "min_sum_bound": "min_sum_bound"}
_REDEFENSE_FLAGS = {"gamma": "gamma", "inner_steps": "inner_steps", "distill_images_per_class": "images_per_class",
                    "lr_images": "lr_images", "lr_labels": "lr_labels", "alpha_init": "alpha_init",
                    "lr_alpha": "lr_alpha", "first_cap": "first_cap", "later_cap": "later_cap",
                    "redefense_variant": "variant", "redefense_layout": "layout",
                    "redefense_aggregator": "aggregator", "flcert_groups": "groups",
                    "flame_min_samples": "flame_min_samples"}


def config_from_flags():
    from fedredefense_jax.runner import ExperimentConfig

    return ExperimentConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model=FLAGS.model, conv_impl=FLAGS.conv_impl,
        num_clients=FLAGS.num_clients, num_malicious=FLAGS.num_malicious, beta=FLAGS.beta,
        rounds=FLAGS.rounds, local_epochs=FLAGS.local_epochs, participation_rate=FLAGS.participation_rate,
        batch_size=FLAGS.batch_size, lr=FLAGS.lr, seed=FLAGS.seed, output_dir=FLAGS.output_dir,
        eval_every=FLAGS.eval_every, checkpoint_every=FLAGS.checkpoint_every, overwrite=FLAGS.overwrite,
        attack=FLAGS.attack, defense=FLAGS.defense, layout=FLAGS.layout,
        train_subset=FLAGS.train_subset,
        attack_config={key: FLAGS[name].value for name, key in _ATTACK_FLAGS.items()
                       if FLAGS[name].value not in (None, [])},
        defense_config={key: FLAGS[name].value for name, key in _REDEFENSE_FLAGS.items()
                        if FLAGS[name].value is not None})


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 2
    from fedredefense_jax.data import DataError
    from fedredefense_jax.runner import ConfigError, Stopped, run
    from fedredefense_jax.simulation import AttackOutputError

    logging.set_verbosity(logging.INFO)
    try:
        summary = run(config_from_flags())
    except (ConfigError, DataError, AttackOutputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
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
    app.run(main)
