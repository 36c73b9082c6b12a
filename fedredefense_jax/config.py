"""One experiment's settings: the federation's (``simulation.FLConfig``) plus data, model,
attack, defense and outputs, and their validation.

``attack_config`` / ``defense_config`` map setting names to values (typed, or strings from
the command line); :func:`attack_settings` / :func:`defense_settings` parse them into the
plug-in's settings dataclass, so that a setting the plug-in does not take, a wrong type or
an out-of-range value is refused at start with one line naming it and the plug-in.
"""

from __future__ import annotations

import dataclasses
import os

from fedredefense_jax import attacks as attacks_lib
from fedredefense_jax import data as data_lib
from fedredefense_jax import defenses as defenses_lib
from fedredefense_jax import models
from fedredefense_jax.settings import ConfigError, setting
from fedredefense_jax.simulation import FLConfig

__all__ = ["ConfigError", "ExperimentConfig", "attack_settings", "defense_settings", "validate"]


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(FLConfig):
    """Every setting of one run (``FLConfig``'s federation settings first)."""

    dataset: str = setting("fashion_mnist", "Dataset.", choices=tuple(sorted(data_lib.SPECS)))
    data_dir: str | None = setting(None, "IDX dir, image-folder tree/.tar.gz or cifar-10-python.tar.gz; "
                                   "unset = download into the cache.")
    model: str = setting("cnn", "cnn (the paper's Tables 5/6) or convnet (the authors' scripts).",
                         choices=models.MODEL_NAMES)
    conv_impl: str = setting("auto", "Convolution implementation.", choices=("auto", "xla", "matmul"))
    beta: float = setting(0.1, "Dirichlet concentration of the non-IID split (smaller = more skewed).", above=0)
    train_subset: int | None = setting(None, "Use this many training images (a seeded uniform subset) before "
                                       "the split; unset = all.", low=1)
    attack: str = setting("none", "Attack name (see fedredefense_jax.attacks.names()).")
    defense: str = setting("fedavg", "Defense name (see fedredefense_jax.defenses.names()).")
    attack_config: dict = dataclasses.field(default_factory=dict)
    defense_config: dict = dataclasses.field(default_factory=dict)
    output_dir: str = setting("runs/default", "Where rounds.jsonl, summary.json and config.json go.")
    eval_every: int = setting(10, "Evaluate test accuracy every this many rounds (and at the end).", low=1)
    checkpoint_every: int = setting(1, "Save a checkpoint every this many rounds (and at the end); rerunning "
                                    "the same command resumes from the newest.", low=1)
    overwrite: bool = setting(False, "Replace a run of a different configuration found in --output_dir.")


def attack_settings(cfg: ExperimentConfig):
    """``cfg.attack``'s settings parsed from ``cfg.attack_config`` (ConfigError if bad)."""
    return _parse(attacks_lib, "attack", cfg.attack, cfg.attack_config, cfg.dataset)


def defense_settings(cfg: ExperimentConfig):
    """``cfg.defense``'s settings parsed from ``cfg.defense_config`` with the dataset's
    defaults (ConfigError if bad)."""
    return _parse(defenses_lib, "defense", cfg.defense, cfg.defense_config, cfg.dataset)


def takers(registry, name: str) -> list[str]:
    """The plug-ins of ``registry`` that take the setting ``name``."""
    return [n for n in registry.names() if name in registry.settings(n).fields()]


def _parse(registry, kind: str, name: str, given: dict, dataset: str):
    try:
        known = registry.settings(name).fields()
    except ValueError as e:  # an unknown plug-in
        raise ConfigError(kind, str(e)) from None
    for key in (k for k, v in given.items() if v is not None and k not in known):
        others = takers(registry, key)
        if others:
            raise ConfigError(key, f"not a setting of {kind} {name} (it is one of {', '.join(others)})")
    return registry.parse_settings(name, given, dataset)


def validate(cfg: ExperimentConfig) -> None:
    """Raises ConfigError naming the first bad setting. The fields' own types and ranges
    are checked when ``cfg`` is made; this checks what involves several settings, the
    plug-ins' settings and the data directory."""
    if cfg.num_malicious > cfg.num_clients:
        raise ConfigError("num_malicious", f"must be in [0, num_clients={cfg.num_clients}], got {cfg.num_malicious}")
    if cfg.train_subset is not None and cfg.train_subset < cfg.num_clients:
        raise ConfigError("train_subset", f"must be >= num_clients={cfg.num_clients} (or unset = all training "
                          f"images), got {cfg.train_subset}")
    for settings in (attack_settings(cfg), defense_settings(cfg)):
        settings.check(cfg)
    if cfg.data_dir is not None and not os.path.exists(cfg.data_dir):
        raise ConfigError("data_dir", f"no such file or directory: {cfg.data_dir}")
