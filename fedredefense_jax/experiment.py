"""Everything one experiment builds from its config before the first round: data, split,
model, attack, defense, the federation and the evaluation functions."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from absl import logging
from jax.flatten_util import ravel_pytree

from fedredefense_jax import attacks as attacks_lib
from fedredefense_jax import data as data_lib
from fedredefense_jax import defenses as defenses_lib
from fedredefense_jax import mesh as mesh_lib
from fedredefense_jax import metrics, models, partition, simulation, training
from fedredefense_jax.config import ConfigError, ExperimentConfig, attack_settings, defense_settings
from fedredefense_jax.defenses.fltrust import DEFAULT_ROOT_SIZE


@dataclasses.dataclass
class Setup:
    """Everything built from a config before the first round."""

    dataset: data_lib.Dataset
    parts: list
    federation: simulation.Federation
    predict: Callable
    split: dict
    asr: Callable | None = None  # w -> the attack's success rate on the test set (targeted attacks)
    asr_base: Callable | None = None  # w -> the same count without the trigger (backdoors)
    trigger_unseen: tuple = ()  # trigger pixels outside the model's receptive field


def build(cfg: ExperimentConfig, mesh: mesh_lib.ClientMesh | None = None) -> Setup:
    """Loads the data, splits it, builds the model, attack and defense (ConfigError for a
    setting the data or a plug-in refuse); with a ``mesh`` of several devices the clients
    are split over it (each process stacking only its own)."""
    ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir)
    spec = ds.spec
    if cfg.train_subset is not None:
        if cfg.train_subset > len(ds.train_y):
            raise ConfigError("train_subset", f"{cfg.train_subset} exceeds the {len(ds.train_y)} training images "
                              f"of {cfg.dataset}")
        ds = partition.subset_train(ds, cfg.train_subset, cfg.seed)
    parts = partition.dirichlet_split(ds.train_y, cfg.num_clients, cfg.beta, cfg.seed, spec.num_classes)
    if mesh_lib.active(mesh) is None:
        clients = partition.stack_clients(ds.train_x, ds.train_y, parts)
    else:
        clients = mesh_lib.stack_clients(mesh, ds.train_x, ds.train_y, parts)
    model = models.build_model(cfg.model, cfg.dataset, spec.num_classes, cfg.conv_impl)
    params = models.init_params(model, jax.random.key(cfg.seed), spec.input_shape)
    w0, unravel = ravel_pytree(params)
    apply_fn = models.make_apply_fn(model)
    attack = attacks_lib.make(cfg.attack, attacks_lib.AttackContext(
        cfg.num_clients, cfg.num_malicious, w0, cfg.defense, attack_settings(cfg)))
    defense_config = defense_settings(cfg)
    root = partition.server_sample(parts, getattr(defense_config, "fltrust_root_size", DEFAULT_ROOT_SIZE), cfg.seed)
    local_update = training.make_client_update(apply_fn, unravel, spec.mean, spec.std, batch_size=cfg.batch_size,
                                               lr=cfg.lr, epochs=cfg.local_epochs)
    defense = defenses_lib.make(cfg.defense, defenses_lib.DefenseContext(
        apply_fn, unravel, cfg.num_clients, cfg.num_malicious, spec.num_classes, spec.input_shape,
        cfg.dataset, w0, defense_config, server_data=(ds.train_x[root], ds.train_y[root]),
        local_update=local_update, mesh=mesh))
    if attack.needs_probe and defense.probe is None:
        raise ConfigError("attack", f"{cfg.attack} adapts to FedREDefense's reconstruction: it needs a defense "
                          f"that offers a probe (--defense=fedredefense), got --defense={cfg.defense}")
    try:
        fed = simulation.build_federation(cfg, clients, apply_fn, unravel, w0, spec.mean, spec.std, attack, defense,
                                          num_classes=spec.num_classes, mesh=mesh)
        predict = training.make_predictor(apply_fn, unravel, spec.mean, spec.std, mesh=mesh)
        asr = None if attack.asr is None else make_asr(attack.asr, ds, predict, apply_fn, unravel, mesh=mesh)
        asr_base = (make_asr(attack.asr, ds, predict, apply_fn, unravel, stamp=False, mesh=mesh)
                    if attack.asr is not None and attack.asr.trigger_pixels else None)
    except ValueError as e:  # e.g. a trigger outside the images
        raise ConfigError("attack", f"{cfg.attack}: {e}") from None
    return Setup(ds, parts, fed, predict, partition.split_stats(ds.train_y, parts, spec.num_classes), asr,
                 asr_base, _unseen_trigger(attack, apply_fn, params, spec.input_shape, cfg.model))


def _unseen_trigger(attack, apply_fn, params, input_shape, model: str) -> tuple:
    """The attack's trigger pixels that no output of the model depends on (warned about)."""
    if attack.asr is None or not attack.asr.trigger_pixels:
        return ()
    blind = models.unseen_pixels(apply_fn, params, input_shape)
    unseen = tuple(p for p in attack.asr.trigger_pixels if blind[p])
    if unseen:
        logging.warning("trigger pixels %s lie outside the receptive field of --model=%s: no output depends "
                        "on them, so only the other trigger pixels can carry a backdoor (see --trigger_pixels)",
                        ", ".join(f"{r}:{c}" for r, c in unseen), model)
    return unseen


def make_asr(spec: attacks_lib.AsrSpec, ds: data_lib.Dataset, predict: Callable, apply_fn: Callable,
             unravel: Callable, stamp: bool = True, mesh: mesh_lib.ClientMesh | None = None) -> Callable:
    """``asr(w) -> float``: ``metrics.attack_success_rate`` of the flat model ``w`` on the test
    images it counts (class ``source``, or every class but ``target``), stamped with the
    trigger in normalised space by a jitted predictor when the attack has one. ``stamp=False``:
    the same count on the unstamped images (the backdoor's base rate: an ASR no higher than it
    owes nothing to the trigger)."""
    keep = ds.test_y == spec.source if spec.source is not None else ds.test_y != spec.target
    x, y = ds.test_x[keep], ds.test_y[keep]
    if spec.trigger_pixels and stamp:
        trigger = attacks_lib.trigger_mask(ds.spec.input_shape, spec.trigger_pixels)
        predict = training.make_predictor(apply_fn, unravel, ds.spec.mean, ds.spec.std, trigger=trigger, mesh=mesh)
    return lambda w: metrics.attack_success_rate(predict(w, x), y, spec.target, spec.source)
