"""Data-poisoning and backdoor attacks: compromised clients train *honestly* on poisoned
local data (FedREDefense, Section 6.1 and Appendix A.2; the authors' public code).

The poisoning is described by a :class:`DataPoison` that the simulation turns into
per-client arrays of the batched trainer (``training.Poison``), so benign and malicious
clients run in the same compiled program; ``apply`` then sees the genuine updates of the
poisoned training. Labels are ``y in 0..K-1`` (``K = 10`` for every dataset here).

* ``label_flip`` (Fung et al., 2018): every local label ``y`` becomes ``(y + 1) mod K``, in
  every epoch; the update is sent as trained. Untargeted: no ASR.
* ``targeted_label_flip`` (Tolpegin et al., ESORICS 2020): labels of class 0 become 2
  (other labels unchanged), in every epoch; sent as trained. ASR = fraction of the test
  images of class 0 classified as 2.
* ``scaling`` (Bagdasaryan et al., AISTATS 2020): each of the ``E`` local epochs becomes a
  poisoned epoch followed by a clean one (``2E`` passes over the data, each reshuffled). In a
  poisoned epoch *every* sample is poisoned: the trigger is stamped (pixels (26, 26),
  (24, 26), (26, 24), (25, 25) of channel 0 set to 1.0 *after* normalisation) and the label
  set to 0. This is the authors' ``train_op_backdoor`` (all samples of the poisoned epoch,
  not a fraction). With the setting ``backdoor_training = 'mixed'``
  each epoch instead runs over the client's data plus a stamped, relabelled copy, shuffled
  together: Appendix A.2's "train using both the original and poisoned datasets" read
  literally. The update is then multiplied by ``s = attack_scale`` (default 3).
* ``dba`` (Xie et al., ICLR 2020): as ``scaling``, but client ``i`` stamps only the trigger's
  pixel ``i mod 4`` (in the order above; the authors' ``train_op_dba``). Scaled by ``s``.

The setting ``trigger_pixels`` replaces the four pixels by any others
(``"row:col"`` strings or ``(row, col)`` pairs; DBA then gives client ``i`` pixel
``i mod len``). The paper's CNN (valid 3x3 convolutions, floor 2x2 pooling) never reads
rows or columns 26-27 of a 28x28 image, so three of the paper's four pixels are invisible
to it (``models.unseen_pixels``).

ASR of ``scaling`` and ``dba`` (Appendix A.4, the authors' ``eval_op_ensemble_attack``):
among the test images whose true label is not 0, stamped with the *full* four-pixel trigger,
the fraction classified as 0.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from fedredefense_jax import data as data_lib
from fedredefense_jax.attacks import register
from fedredefense_jax.attacks.base import (
    AsrSpec,
    Attack,
    AttackContext,
    AttackInput,
    DataPoison,
    ScaleSettings,
    no_state,
    replace_malicious,
)
from fedredefense_jax.settings import ConfigError, setting

BACKDOOR_TARGET = 0
TRIGGER_PIXELS = ((26, 26), (24, 26), (26, 24), (25, 25))  # (row, col) of channel 0
FLIP_SOURCE, FLIP_TARGET = 0, 2


def _as_trained(state, inp: AttackInput):
    return inp.updates, state


def _next_class(num_classes: int) -> np.ndarray:
    return ((np.arange(num_classes) + 1) % num_classes).astype(np.int32)


def _source_to_target(num_classes: int) -> np.ndarray:
    m = np.arange(num_classes, dtype=np.int32)
    m[FLIP_SOURCE] = FLIP_TARGET
    return m


def _all_to_target(num_classes: int) -> np.ndarray:
    return np.full(num_classes, BACKDOOR_TARGET, np.int32)


def parse_trigger_pixels(value) -> tuple:
    """``"r:c"`` strings or ``(r, c)`` pairs (a non-empty sequence, or one string of ``r:c``
    separated by commas, semicolons or spaces) -> ``((r, c), ...)`` ints.

    Raises ValueError naming the bad entry."""
    if isinstance(value, str):
        value = [v for v in re.split(r"[,;\s]+", value) if v]
    pixels = []
    for item in value:
        parts = item.split(":") if isinstance(item, str) else list(item)
        try:
            r, c = (int(str(v).strip()) for v in parts)
        except ValueError:
            raise ValueError(f"expected row:col pairs of integers, got {item!r}") from None
        pixels.append((r, c))
    if not pixels:
        raise ValueError("needs at least one row:col pixel")
    return tuple(pixels)


@register("label_flip")
def make_label_flip(ctx: AttackContext) -> Attack:
    del ctx
    return Attack("label_flip", no_state, _as_trained, poison=DataPoison(label_map=_next_class))


@register("targeted_label_flip")
def make_targeted_label_flip(ctx: AttackContext) -> Attack:
    del ctx
    return Attack("targeted_label_flip", no_state, _as_trained, poison=DataPoison(label_map=_source_to_target),
                  asr=AsrSpec(target=FLIP_TARGET, source=FLIP_SOURCE))


DEFAULT_BACKDOOR_TRAINING = "alternating"
BACKDOOR_TRAINING = (DEFAULT_BACKDOOR_TRAINING, "mixed")


@dataclasses.dataclass(frozen=True)
class BackdoorSettings(ScaleSettings):
    backdoor_training: str = setting(
        DEFAULT_BACKDOOR_TRAINING, "Scaling / DBA local training: alternating = a poisoned epoch then a clean "
        "one (the authors' code); mixed = each epoch over the data plus a poisoned copy, shuffled together.",
        choices=BACKDOOR_TRAINING)
    trigger_pixels: tuple = setting(
        TRIGGER_PIXELS, "Scaling / DBA trigger as row:col pixels of channel 0, e.g. 24:24,22:24,24:22,23:23; "
        "three of the paper's four (the default) lie outside the paper's CNN's receptive field.",
        parse=parse_trigger_pixels)

    def check(self, experiment) -> None:
        h, w = data_lib.SPECS[experiment.dataset].input_shape[:2]
        outside = [p for p in self.trigger_pixels if not (0 <= p[0] < h and 0 <= p[1] < w)]
        if outside:
            raise ConfigError("trigger_pixels", f"pixel {outside[0][0]}:{outside[0][1]} lies outside the "
                              f"{h}x{w} images of {experiment.dataset} (attack {experiment.attack})")


def _backdoor(name: str, ctx: AttackContext, distributed: bool) -> Attack:
    """Scaling (every malicious client stamps the whole trigger) or, ``distributed``, DBA
    (client ``i`` stamps pixel ``i mod len`` of it)."""
    pattern, scale, schedule = ctx.config.trigger_pixels, ctx.config.attack_scale, ctx.config.backdoor_training

    def apply(state, inp: AttackInput):
        return replace_malicious(inp, scale * inp.updates), state

    def trigger_pixels(client_id: int) -> tuple:
        return (pattern[client_id % len(pattern)],) if distributed else pattern

    return Attack(name, no_state, apply,
                  poison=DataPoison(label_map=_all_to_target, trigger_pixels=trigger_pixels, schedule=schedule),
                  asr=AsrSpec(target=BACKDOOR_TARGET, trigger_pixels=pattern))


@register("scaling", settings=BackdoorSettings)
def make_scaling(ctx: AttackContext) -> Attack:
    return _backdoor("scaling", ctx, distributed=False)


@register("dba", settings=BackdoorSettings)
def make_dba(ctx: AttackContext) -> Attack:
    return _backdoor("dba", ctx, distributed=True)
