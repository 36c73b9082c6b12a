"""The defense protocol: an optax-like ``(init, apply)`` pair over explicit state.

Every round the simulator hands a defense the ``[S, P]`` matrix of model updates sent
by the ``S`` participation slots (``P`` = number of model parameters, updates are flat
vectors ``w_local - w_global``) and gets back the aggregate ``[P]`` that moves the global
model, plus which slots it flagged (flagged clients are expelled for good by the
simulator) and the aggregation weight it gave each slot.

Slots whose ``valid`` entry is False are padding (they keep shapes static so XLA compiles
a handful of programs); a defense must ignore them and must not flag them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class DefenseContext(NamedTuple):
    """What a defense may know about the federation when it is built.

    Attributes:
      apply_fn: ``apply_fn(params_pytree, images_float[B, H, W, C]) -> logits[B, K]``.
      unravel: flat ``[P]`` vector -> params pytree (``jax.flatten_util.ravel_pytree``).
      num_clients: total number of clients ``p``.
      num_malicious: the ``q`` that some rules (Krum, Trimmed Mean) are told.
      num_classes: ``K``.
      input_shape: ``(H, W, C)``.
      dataset: dataset name (selects per-dataset defaults such as Table 7's).
      init_params: flat ``[P]`` initial global model.
      config: the defense's settings, an instance of the settings class it was registered
        with (``defenses.make`` parses a ``{name: value}`` mapping into it, with the
        dataset's defaults, e.g. FedREDefense's Table 7).
      server_data: optional ``(x uint8 [n, H, W, C], y int32 [n])`` held by the server (the
        root dataset of FLTrust; ``experiment.build`` samples it, see
        ``partition.server_sample``); None when not provided.
      local_update: optional ``local_update(w0[P], x, y, count, key) -> g[P]``, the clients'
        local training (same epochs, batch size and learning rate,
        ``training.make_client_update``), for defenses that train on ``server_data``.
      mesh: optional ``mesh.ClientMesh`` the run's clients are split over (FedREDefense
        splits its knowledge and reconstructions over it); None: one device. Every defense
        gets the whole update matrix on one device, whatever the mesh.
    """

    apply_fn: Callable[..., jax.Array]
    unravel: Callable[[jax.Array], Any]
    num_clients: int
    num_malicious: int
    num_classes: int
    input_shape: tuple
    dataset: str
    init_params: jax.Array
    config: Any
    server_data: Any = None
    local_update: Optional[Callable[..., jax.Array]] = None
    mesh: Any = None


class DefenseInput(NamedTuple):
    """One round's view for the defense.

    Attributes:
      global_params: flat ``[P]`` global model the clients started from.
      updates: ``[S, P]`` float32 updates, one row per slot.
      client_ids: ``[S]`` int32 client id of each slot.
      valid: ``[S]`` bool, False for padding slots.
      round: 1-based round number.
      key: PRNG key for this round's randomness.
    """

    global_params: jax.Array
    updates: jax.Array
    client_ids: jax.Array
    valid: jax.Array
    round: int
    key: jax.Array


class DefenseOutput(NamedTuple):
    """What a defense returns.

    Attributes:
      aggregate: ``[P]`` update added to the global model.
      flagged: ``[S]`` bool, slots judged malicious (their clients are expelled).
      weights: ``[S]`` float, the weight each slot got in the aggregate (0 = excluded);
        used for per-round detection metrics of filtering rules.
      info: dict of per-slot ``[S]`` arrays or scalars to record (e.g. errors).
      restart: when True the simulator drops ``aggregate`` and resets the global model to the
        initial model ``init_params`` (the round counter keeps counting, so the total number
        of rounds stays fixed), e.g. FLDetector's restart after a detection.
    """

    aggregate: jax.Array
    flagged: jax.Array
    weights: jax.Array
    info: dict
    restart: bool = False


@dataclasses.dataclass(frozen=True)
class Defense:
    """An ``(init, apply)`` pair.

    ``init(num_clients, key) -> state``;
    ``apply(state, DefenseInput) -> (DefenseOutput, state)``.
    ``apply`` may be plain Python that calls jitted kernels.

    Optional hooks, None for a rule with one global model and no oracle:
      client_models: ``(state, global_params[P], ids[S]) -> [S, P]``, the model each slot's
        client starts from (FLCert's per-group models); None: the global model.
      client_groups: ``(state, ids[S]) -> [S]`` int32, which of the start models each slot
        trained from (FLCert's group); attacks pool compromised updates within a group.
        None: one pool.
      ensemble: ``state -> [G, P]``, models whose majority vote is the prediction (TACC and
        ASR are evaluated on the vote); None: the global model predicts.
      probe: ``(state, DefenseInput) -> {'error': [S] float, 'flagged': [S] bool}``, what
        ``apply`` would compute and decide for the valid slots of ``DefenseInput``, without
        changing ``state``: the white-box oracle of an adaptive attacker who knows the
        defense, its settings and its state (FedREDefense: reconstruction errors, flagged
        above gamma).
    """

    name: str
    init: Callable[..., Any]
    apply: Callable[..., tuple]
    client_models: Optional[Callable[..., jax.Array]] = None
    client_groups: Optional[Callable[..., jax.Array]] = None
    ensemble: Optional[Callable[[Any], jax.Array]] = None
    probe: Optional[Callable[..., Any]] = None


def nonfinite_rows(updates: jax.Array) -> jax.Array:
    """``[S, P] -> [S]`` bool: rows holding any NaN or +-Inf."""
    return ~jnp.all(jnp.isfinite(updates), axis=1)


def fedavg(updates: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean ``sum_i w_i g_i / sum_i w_i`` of ``[S, P]`` rows; zero if all w are 0.

    Rows with zero weight never contribute, even when they hold NaN or Inf.
    """
    w = weights.astype(updates.dtype)
    safe = jnp.where((w > 0)[:, None], updates, 0.0)
    total = jnp.sum(w)
    return jnp.where(total > 0, (w @ safe) / jnp.maximum(total, 1e-12), jnp.zeros_like(safe[0]))


def no_state(num_clients, key):
    """``init`` of a plug-in without state: the empty tuple."""
    del num_clients, key
    return ()
