"""The attack protocol: ``init(num_clients, key) -> state``,
``apply(state, AttackInput) -> (updates[S, P], state)``.

An attack may also poison the compromised clients' local data (:class:`DataPoison`: the
simulation turns it into per-client arrays of the batched trainer, so the genuine updates
``apply`` sees are honest training on poisoned data) and define an attack success rate
(:class:`AsrSpec`, evaluated next to the test accuracy).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedredefense_jax.settings import Settings, setting


class AttackContext(NamedTuple):
    """What the attacker knows when the federation is built.

    Attributes:
      num_clients: ``p``; num_malicious: ``q`` (the last ``q`` client ids).
      init_params: flat ``[P]`` initial global model.
      aggregation: name of the server's defense / aggregation rule.
      config: the attack's settings, an instance of the settings class it was registered
        with (``attacks.make`` parses a ``{name: value}`` mapping into it).
    """

    num_clients: int
    num_malicious: int
    init_params: jax.Array
    aggregation: str
    config: Any


class AttackInput(NamedTuple):
    """One round as the attacker sees it.

    Attributes:
      global_params: flat ``[P]`` current global model ``w^{t-1}``.
      updates: ``[S, P]`` genuine updates of every slot (rows of benign slots are not
        the attacker's to read; attacks use only ``updates[malicious]``).
      malicious: ``[S]`` bool, slots of compromised clients.
      valid: ``[S]`` bool, False for padding slots.
      client_ids: ``[S]`` int32.
      round: 1-based round; key: PRNG key.
      probe: None, or, when the server's defense offers one (``Defense.probe``), the
        white-box oracle ``probe(updates[S, P], slots[S] bool) -> {'error': [S],
        'flagged': [S] bool}``: what the defense would decide this round for ``slots`` if
        they sent those rows (the adaptive attacks' threat model: the attacker knows the
        defense, its settings and its state).
      start_params: None when every slot trained from ``global_params``; else ``[S, P]``,
        the model each slot trained from (FLCert's group models).
      groups: None when every slot trained from the same model; else ``[S]`` int32, the
        pool of each slot: slots of one pool trained from the same model, and the
        statistics attacks pool the compromised updates within it.
    """

    global_params: jax.Array
    updates: jax.Array
    malicious: jax.Array
    valid: jax.Array
    client_ids: jax.Array
    round: int
    key: jax.Array
    probe: Callable | None = None
    start_params: jax.Array | None = None
    groups: jax.Array | None = None


def _identity_labels(num_classes: int) -> np.ndarray:
    return np.arange(num_classes, dtype=np.int32)


def _no_trigger(client_id: int) -> tuple:
    del client_id
    return ()


POISON_SCHEDULES = ("constant", "alternating", "mixed")
# Factor of MPAF (Cao & Gong) and of the scaled backdoors (Scaling, DBA): the paper's 3.
SCALE = 3.0


@dataclasses.dataclass(frozen=True)
class ScaleSettings(Settings):
    """Settings of the attacks that multiply what they send (MPAF, Scaling, DBA)."""

    attack_scale: float = setting(SCALE, "Factor of MPAF, Scaling and DBA (the paper's 3).")


@dataclasses.dataclass(frozen=True)
class DataPoison:
    """How a compromised client poisons its local data before training honestly on them.

    Attributes:
      label_map: ``num_classes -> [K] int`` poisoned label of each class.
      trigger_pixels: ``client_id -> ((row, col), ...)``: pixels of channel 0 whose
        normalised value is set to ``training.TRIGGER_VALUE`` (1.0) in poisoned epochs.
      schedule: ``"constant"``: every local epoch is poisoned; ``"alternating"``: each local
        epoch becomes a poisoned epoch followed by a clean one (the authors' backdoor
        training); ``"mixed"``: each epoch runs over the data plus a poisoned copy, shuffled
        together (``training.make_client_update``).
    """

    label_map: Callable[[int], np.ndarray] = _identity_labels
    trigger_pixels: Callable[[int], tuple] = _no_trigger
    schedule: str = "constant"

    def __post_init__(self):
        if self.schedule not in POISON_SCHEDULES:
            raise ValueError(f"DataPoison.schedule must be one of {', '.join(POISON_SCHEDULES)}, "
                             f"got {self.schedule!r}")


@dataclasses.dataclass(frozen=True)
class AsrSpec:
    """Attack success rate: among the test images whose true label is ``source`` (or, with
    ``source=None``, is not ``target``), stamped with ``trigger_pixels`` (channel 0,
    normalised value 1.0; none: unchanged), the fraction classified as ``target``."""

    target: int
    source: int | None = None
    trigger_pixels: tuple = ()


@dataclasses.dataclass(frozen=True)
class Attack:
    """``poison``: how compromised clients poison their data (None: they train on clean
    data); ``asr``: the attack's success rate (None: untargeted, no ASR); ``record``:
    ``(state, ids[S]) -> {name: [S] array}`` written into each round's record as
    ``attack_<name>`` (e.g. the adaptive attacks' scale factors); ``needs_probe``: the attack
    requires a defense with a ``probe`` (an adaptive attack)."""

    name: str
    init: Callable[..., Any]
    apply: Callable[..., tuple]
    poison: DataPoison | None = None
    asr: AsrSpec | None = None
    record: Callable[..., dict] | None = None
    needs_probe: bool = False


def trigger_mask(input_shape, pixels, channel: int = 0) -> np.ndarray:
    """``[H, W, C]`` bool mask, True at ``(row, col)`` of ``channel`` for each of ``pixels``."""
    mask = np.zeros(tuple(input_shape), bool)
    h, w = mask.shape[:2]
    for r, c in pixels:
        if not (0 <= r < h and 0 <= c < w):
            raise ValueError(f"trigger pixel ({r}, {c}) lies outside a {h}x{w} image")
        mask[r, c, channel] = True
    return mask


def replace_malicious(inp: AttackInput, crafted: jax.Array) -> jax.Array:
    """Rows of ``crafted`` (``[S, P]`` or ``[P]``) for malicious slots, genuine rows elsewhere."""
    crafted = jnp.broadcast_to(crafted, inp.updates.shape)
    return jnp.where((inp.malicious & inp.valid)[:, None], crafted, inp.updates)


def no_state(num_clients, key):
    """``init`` of a plug-in without state: the empty tuple."""
    del num_clients, key
    return ()
