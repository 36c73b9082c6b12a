"""Algorithm 1 as an explicit state and a step function.

One round ``t``::

    M^t  <- uniform sample of round(rate * p) clients among those not expelled
    g_i  <- local training of every i in M^t from w^{t-1}          (one compiled program;
            malicious clients on data poisoned as the attack's ``poison`` says)
    g    <- attack(g)           rows of malicious clients rewritten (plug point)
    a, flagged <- defense(g)    detection + aggregation             (plug point)
    w^t  <- w^{t-1} + a;   expelled |= flagged
            (w^t <- w^0, the initial model, when the defense asks for a restart)

The federation (data, model, compiled kernels, attack and defense) is a static
``Federation``; everything that changes is in ``SimState``. Participation slots are padded
to a multiple of ``SLOT_BUCKET`` so that the compiled programs keep their shapes when
clients are expelled.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedredefense_jax import attacks as attacks_lib
from fedredefense_jax import defenses as defenses_lib
from fedredefense_jax import mesh as mesh_lib
from fedredefense_jax import training
from fedredefense_jax.partition import ClientData
from fedredefense_jax.settings import Settings, setting

SLOT_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class FLConfig(Settings):
    """Federation settings (the paper's defaults); ``config.ExperimentConfig`` extends them."""

    num_clients: int = setting(100, "Number of clients p.", low=1)
    num_malicious: int = setting(28, "Number of malicious clients q (the last q ids).", low=0)
    participation_rate: float = setting(1.0, "Fraction of non-expelled clients sampled per round, in (0, 1].",
                                        above=0, high=1)
    rounds: int = setting(500, "Communication rounds T.", low=1)
    local_epochs: int = setting(1, "Local epochs E.", low=1)
    batch_size: int = setting(32, "Local batch size.", low=1)
    lr: float = setting(1e-3, "Local SGD learning rate.", above=0)
    seed: int = setting(0, "Seed of the split, the initial model and all sampling.")
    layout: str | None = setting(None, "Client batching: vmap, map or chunked; unset = fastest for the backend.",
                                 choices=training.LAYOUTS)


@dataclasses.dataclass
class SimState:
    """Everything that changes during a run.

    Attributes:
      round: rounds completed.
      params: flat ``[P]`` global model ``w^t``.
      key: base PRNG key of the run (round keys are ``fold_in(key, t)``).
      expelled: bool ``[p]``.
      defense_state, attack_state: the plug-ins' explicit states.
    """

    round: int
    params: jax.Array
    key: jax.Array
    expelled: np.ndarray
    defense_state: Any
    attack_state: Any


def malicious_clients(num_clients: int, num_malicious: int) -> np.ndarray:
    """bool ``[p]``: the last ``q`` client ids are malicious."""
    m = np.zeros(num_clients, bool)
    if num_malicious:
        m[-num_malicious:] = True
    return m


@dataclasses.dataclass
class Federation:
    """The static parts of a simulation."""

    config: FLConfig
    clients: ClientData
    client_x: jax.Array
    client_y: jax.Array
    client_counts: jax.Array
    init_params: jax.Array
    train: Callable
    attack: attacks_lib.Attack
    defense: defenses_lib.Defense
    poison: training.Poison | None = None  # per-client arrays when the attack poisons data

    @property
    def malicious(self) -> np.ndarray:
        """bool ``[p]``: the last ``q`` client ids are malicious."""
        return malicious_clients(self.config.num_clients, self.config.num_malicious)

    @property
    def num_slots(self) -> int:
        return max(1, int(round(self.config.participation_rate * self.config.num_clients)))


def client_poison(poison: attacks_lib.DataPoison, malicious: np.ndarray, num_classes: int,
                  input_shape) -> training.Poison:
    """Per-client arrays of ``poison`` (``[p, K]``, ``[p, H, W, C]``, ``[p]``): the attack's label
    map, trigger and backdoor schedule for the ``malicious`` clients, the identity for the others."""
    out = training.clean_poison(num_classes, input_shape, len(malicious))
    label_map = np.asarray(poison.label_map(num_classes))
    if label_map.shape != (num_classes,) or not np.all((label_map >= 0) & (label_map < num_classes)):
        raise ValueError(f"label map {label_map.tolist()} is not a map of {num_classes} classes")
    for i in np.flatnonzero(malicious):
        out.label_map[i] = label_map
        out.trigger[i] = attacks_lib.trigger_mask(input_shape, poison.trigger_pixels(int(i)))
        out.backdoor[i] = poison.schedule != "constant"
    return out


def build_federation(config: FLConfig, clients: ClientData, apply_fn: Callable, unravel: Callable,
                     init_params: jax.Array, mean, std, attack: attacks_lib.Attack,
                     defense: defenses_lib.Defense, num_classes: int = 10, mesh=None) -> Federation:
    """``num_classes`` sizes the label maps of a data-poisoning attack. With a ``mesh``
    (``mesh.ClientMesh``) the client table is split over its devices (``clients`` may hold
    arrays already split, ``mesh.stack_clients``) and local training runs on all of them
    (``training.make_trainer``); the rest of a round runs on one device as without a mesh."""
    poison, poisoning = None, None
    if mesh_lib.active(mesh) is not None:
        clients = mesh_lib.split_client_data(mesh, clients)
    malicious = malicious_clients(config.num_clients, config.num_malicious)
    if attack.poison is not None and malicious.any():
        poisoning = attack.poison.schedule
        poison = training.Poison(*map(jnp.asarray, client_poison(attack.poison, malicious, num_classes,
                                                                 clients.x.shape[2:])))
    train = training.make_trainer(apply_fn, unravel, mean, std, batch_size=config.batch_size,
                                  lr=config.lr, epochs=config.local_epochs, layout=config.layout,
                                  poisoning=poisoning, mesh=mesh)
    return Federation(config, clients, jnp.asarray(clients.x), jnp.asarray(clients.y),
                      jnp.asarray(clients.counts), init_params, train, attack, defense, poison)


def init_state(fed: Federation) -> SimState:
    key = jax.random.key(fed.config.seed)
    dkey, akey = jax.random.split(jax.random.fold_in(key, 0x5eed))
    return SimState(
        round=0,
        params=fed.init_params,
        key=key,
        expelled=np.zeros(fed.config.num_clients, bool),
        defense_state=fed.defense.init(fed.config.num_clients, dkey),
        attack_state=fed.attack.init(fed.config.num_clients, akey),
    )


def sample_participants(key: jax.Array, expelled: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform sample without replacement of up to ``num_slots`` non-expelled clients.

    Returns ``(ids[S], valid[S])`` with ``S`` the participant count rounded up to a multiple
    of ``SLOT_BUCKET`` (at most ``num_slots``); ids sorted; padding slots repeat the first id.
    """
    scores = np.asarray(jax.random.uniform(key, expelled.shape))
    scores = np.where(expelled, np.inf, scores)
    m = int(min(num_slots, (~expelled).sum()))
    chosen = np.sort(np.argsort(scores, kind="stable")[:m])
    s = min(num_slots, -(-m // SLOT_BUCKET) * SLOT_BUCKET) if m else SLOT_BUCKET
    ids = np.full(s, chosen[0] if m else 0, np.int32)
    ids[:m] = chosen
    valid = np.arange(s) < m
    return ids, valid


class AttackOutputError(ValueError):
    """An attack returned something that is not an update matrix like the genuine one."""


def check_attack_output(name: str, crafted, genuine: jax.Array) -> jax.Array:
    """The attack's output if it is an array of the genuine matrix's shape with a floating
    dtype (cast to it); AttackOutputError naming the attack otherwise. Non-finite or huge
    values pass: handling them is the defense's job."""
    shape = getattr(crafted, "shape", None)
    dtype = getattr(crafted, "dtype", None)
    if shape is None or dtype is None:
        raise AttackOutputError(f"attack {name!r} returned {type(crafted).__name__}, not an update matrix "
                                f"of shape {tuple(genuine.shape)}")
    if tuple(shape) != tuple(genuine.shape):
        raise AttackOutputError(f"attack {name!r} returned updates of shape {tuple(shape)}, "
                                f"expected {tuple(genuine.shape)} (slots x parameters)")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise AttackOutputError(f"attack {name!r} returned updates of dtype {dtype}, expected a floating dtype")
    return jnp.asarray(crafted, genuine.dtype)


def _local_training(fed: Federation, state: SimState, ids: np.ndarray, key: jax.Array):
    """``(updates[S, P], start[S, P] or None, groups[S] or None)``: the slots' genuine
    updates, trained from the global model or from the defense's per-slot start models."""
    poison = {} if fed.poison is None else {"poison": fed.poison}
    start, slot_start, groups = state.params, None, None
    if fed.defense.client_models is not None:  # per-slot start models (e.g. FLCert's groups)
        start = slot_start = fed.defense.client_models(state.defense_state, state.params, jnp.asarray(ids))
    if fed.defense.client_groups is not None:
        groups = jnp.asarray(fed.defense.client_groups(state.defense_state, jnp.asarray(ids)), jnp.int32)
    updates = fed.train(start, fed.client_x, fed.client_y, fed.client_counts, ids,
                        training.client_keys(key, ids), **poison)
    return updates.block_until_ready(), slot_start, groups


def _attack(fed: Federation, state: SimState, updates, ids, valid, t: int, akey, dkey, slot_start, groups):
    """``(updates[S, P] with the malicious rows crafted, attack state, attack record)``; the
    attack may probe the defense (``Defense.probe``) on candidate rows."""
    malicious = fed.malicious[ids] & valid
    probe = None
    if fed.defense.probe is not None:
        def probe(rows, slots):
            slots = jnp.asarray(np.asarray(slots, bool) & valid)
            return fed.defense.probe(state.defense_state, defenses_lib.DefenseInput(
                state.params, jnp.asarray(rows, updates.dtype), jnp.asarray(ids), slots, t, dkey))
    inp = attacks_lib.AttackInput(state.params, updates, jnp.asarray(malicious), jnp.asarray(valid),
                                  jnp.asarray(ids), t, akey, probe, slot_start, groups)
    crafted, attack_state = fed.attack.apply(state.attack_state, inp)
    updates = check_attack_output(fed.attack.name, crafted, updates)
    info = {} if fed.attack.record is None else fed.attack.record(attack_state, ids)
    return updates, attack_state, info


def _record(fed: Federation, t: int, ids, valid, flagged, out, info: dict, times, params, restart: bool) -> dict:
    """The round's record: participants, decisions, seconds of each phase and the plug-ins'
    per-slot values (padding slots dropped, non-finite floats as None)."""
    t0, t1, t2, t3 = times
    detection_s = float(info.pop("detection_s", 0.0))
    record = {
        "round": t,
        "participants": ids[valid].tolist(),
        "malicious": ids[valid & fed.malicious[ids]].tolist(),
        "flagged": ids[flagged].tolist(),
        "weights": np.asarray(out.weights)[valid].round(6).tolist(),
        # whether each participant's update entered the aggregate (weight > 0 before rounding)
        "aggregated": (np.asarray(out.weights)[valid] > 0).tolist(),
        "train_s": t1 - t0,
        "attack_s": t2 - t1,
        "detection_s": detection_s,
        "aggregation_s": (t3 - t2) - detection_s,
        "global_finite": bool(jnp.all(jnp.isfinite(params))),
    }
    if restart:
        record["restart"] = True
    for k, v in info.items():
        v = np.asarray(v)
        v = v[valid] if v.shape[:1] == valid.shape else v
        if v.dtype.kind == "f":  # JSON has no NaN: non-finite values are recorded as null
            v = np.where(np.isfinite(v), v, None)
        record[k] = v.tolist()
    return record


def step(fed: Federation, state: SimState) -> tuple[SimState, dict]:
    """Runs round ``state.round + 1``; returns the new state and the round's record."""
    t = state.round + 1
    rkey = jax.random.fold_in(state.key, t)
    pkey, tkey, akey, dkey = jax.random.split(rkey, 4)
    ids, valid = sample_participants(pkey, state.expelled, fed.num_slots)

    t0 = time.perf_counter()
    updates, slot_start, groups = _local_training(fed, state, ids, tkey)
    t1 = time.perf_counter()
    updates, attack_state, attack_info = _attack(fed, state, updates, ids, valid, t, akey, dkey, slot_start, groups)
    t2 = time.perf_counter()
    out, defense_state = fed.defense.apply(
        state.defense_state,
        defenses_lib.DefenseInput(state.params, updates, jnp.asarray(ids), jnp.asarray(valid), t, dkey))
    restart = bool(out.restart)
    # a restart drops the round's aggregate and goes back to the initial model
    params = jnp.asarray(fed.init_params) if restart else state.params + out.aggregate
    params.block_until_ready()
    t3 = time.perf_counter()

    flagged = np.asarray(out.flagged) & valid
    expelled = state.expelled.copy()
    expelled[ids[flagged]] = True
    info = dict(out.info) | {f"attack_{k}": v for k, v in attack_info.items()}
    record = _record(fed, t, ids, valid, flagged, out, info, (t0, t1, t2, t3), params, restart)
    return SimState(t, params, state.key, expelled, defense_state, attack_state), record
