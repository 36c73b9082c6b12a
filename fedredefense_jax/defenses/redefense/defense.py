"""FedREDefense as a registered defense (``--defense=fedredefense``): per-round state,
the expel decision and the aggregation of the kept updates.

Decision: a slot is flagged when its update holds a NaN/Inf, when ``||g||^2`` is zero or
overflows (the ratio is undefined: a zero update cannot be "reconstructed" and carries no
training, so it is flagged rather than silently kept), or when its error is ``> gamma`` or
non-finite. Reconstruction never runs on such updates. The kept slots are aggregated with
FedAvg (equal weights) unless the setting ``redefense_aggregator`` is a callable ``(updates[S,P],
weights[S]) -> [P]`` or the name of a registered rule ('median', 'trimmed_mean',
'norm_bound', 'krum'; see ``defenses/robust.py``), which then sees the kept slots only.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedredefense_jax.defenses import register
from fedredefense_jax.defenses.base import (
    Defense,
    DefenseContext,
    DefenseInput,
    DefenseOutput,
    fedavg,
    nonfinite_rows,
)
from fedredefense_jax.defenses.redefense.distillation import Knowledge
from fedredefense_jax.defenses.redefense.reconstruction import BUDGETS, get_reconstructor
from fedredefense_jax.defenses.redefense.settings import AGGREGATORS, RedefenseConfig


class RedefenseState(NamedTuple):
    """Defense state.

    Attributes:
      knowledge: :class:`Knowledge` of all ``C`` clients (with a mesh of several devices:
        rows padded to a multiple of the device count and split over the devices; the
        padding rows belong to no client).
      last_opt_round: ``[C]`` int32, last round whose reconstruction optimised the client's
        knowledge (0 = never); drives the intermittent variant's refinements.
    """

    knowledge: Knowledge
    last_opt_round: jax.Array


def invalid_updates(updates: jax.Array, valid) -> np.ndarray:
    """``[S]`` bool numpy: valid slots whose update is non-finite or has a zero/overflowing
    squared norm (the reconstruction ratio would be undefined)."""
    sq = np.asarray(jnp.sum(jnp.square(updates.astype(jnp.float32)), axis=1))
    bad = np.asarray(nonfinite_rows(updates)) | ~np.isfinite(sq) | (sq <= 0)
    return np.asarray(valid, bool) & bad


def iteration_caps(cfg: RedefenseConfig, seen, last_opt_round, round_: int) -> np.ndarray:
    """``[S]`` outer-iteration caps of the slots' clients for ``cfg.variant``.

    dynamic / continuous: ``first_cap`` if not seen else ``later_cap``; intermittent:
    ``first_cap`` if not seen, ``later_cap`` if ``round - last_opt_round >= interval``,
    else 0 (inference only).
    """
    seen = np.asarray(seen, bool)
    caps = np.where(seen, cfg.later_cap, cfg.first_cap)
    if cfg.variant == "intermittent":
        due = (int(round_) - np.asarray(last_opt_round)) >= cfg.interval
        caps = np.where(seen, np.where(due, cfg.later_cap, 0), cfg.first_cap)
    return caps.astype(np.int32)


def _resolve_aggregator(agg, ctx: DefenseContext):
    """``(updates[S, P], weights[S], inp) -> [P]`` from the setting ``redefense_aggregator``:
    None or 'fedavg' (equal weights), a callable ``(updates, weights) -> [P]``, or a
    registered rule name of :data:`AGGREGATORS`, built with ``ctx`` (and its own default
    settings) and applied to the kept slots only (``valid = inp.valid & (weights > 0)``)."""
    if agg is None or agg == "fedavg":
        return lambda updates, weights, inp: fedavg(updates, weights)
    if callable(agg):
        return lambda updates, weights, inp: agg(updates, weights)
    if agg in AGGREGATORS:
        from fedredefense_jax.defenses import make

        rule = make(agg, ctx._replace(config=None))
        rule_state = rule.init(ctx.num_clients, jax.random.PRNGKey(0))  # stateless rules

        def aggregate(updates, weights, inp):
            kept = jnp.asarray(inp.valid, bool) & (weights > 0)
            out, _ = rule.apply(rule_state, inp._replace(updates=updates, valid=kept))
            return out.aggregate

        return aggregate
    raise ValueError(f"aggregator must be None, a callable or one of {AGGREGATORS}, got {agg!r}")


@register("fedredefense", settings=RedefenseConfig)
def make_redefense(ctx: DefenseContext) -> Defense:
    """FedREDefense with the settings ``ctx.config`` (a :class:`RedefenseConfig`, Table 7's
    defaults for ``ctx.dataset`` where unset).

    ``apply`` returns ``info = {'error': [S], 'iterations': [S], 'to_gamma': [S],
    'loss_at': [S, len(BUDGETS)], 'invalid_update': [S]}``: ``error`` is NaN for slots that
    were not reconstructed; ``to_gamma`` the first outer iteration whose loss was below gamma
    (NaN: never); ``loss_at`` the loss at each of :data:`BUDGETS` outer iterations (NaN where
    the reconstruction stopped before).
    """
    cfg = ctx.config
    aggregator = _resolve_aggregator(cfg.aggregator, ctx)
    rec = get_reconstructor(ctx.apply_fn, ctx.unravel, cfg, ctx.mesh)

    def init(num_clients, key):
        kn = rec.init_knowledge(key, num_clients, ctx.input_shape, ctx.num_classes,
                                cfg.images_per_class, cfg.alpha_init, cfg.init_noise)
        return RedefenseState(kn, jnp.zeros((num_clients,), jnp.int32))

    def decide(errors, bad, valid) -> np.ndarray:
        """``[S]`` flagged: valid slots with an invalid update, or an error > gamma or NaN/Inf."""
        with np.errstate(invalid="ignore"):
            unreconstructible = ~(errors <= cfg.gamma)
        return valid & (bad | unreconstructible)

    def reconstruct_round(state: RedefenseState, inp: DefenseInput):
        """Algorithm 2 for the valid slots: ``(result, bad[S], run[S], ids[S])``."""
        valid = np.asarray(inp.valid, bool)
        ids = np.asarray(inp.client_ids, np.int32)
        if len(np.unique(ids[valid])) != valid.sum():
            raise ValueError("a client appears in two valid slots of one round")
        updates = jnp.asarray(inp.updates)
        bad = invalid_updates(updates, valid)
        run = valid & ~bad
        gather_ids = np.where(valid, ids, 0)
        kn = rec.gather_clients(state.knowledge, jnp.asarray(gather_ids), cfg.reset_momentum)
        last_opt = np.asarray(state.last_opt_round)[gather_ids]
        caps = iteration_caps(cfg, kn.seen, last_opt, inp.round)
        res = rec.reconstruct(kn, inp.global_params, jnp.where(run[:, None], updates, 0.0),
                              caps, run, early_stop=cfg.variant == "dynamic",
                              final_eval=cfg.variant != "dynamic")
        return res, bad, run, ids

    def probe(state: RedefenseState, inp: DefenseInput) -> dict:
        """What :func:`apply` would decide for the valid slots this round, ``state`` unchanged:
        ``{'error': [S]`` reconstruction errors (``inf`` for a non-finite or zero update, NaN
        for invalid slots), ``'flagged': [S]`` bool ``}``."""
        res, bad, _, _ = reconstruct_round(state, inp)
        errors = np.where(bad, np.inf, res.errors).astype(np.float32)
        return {"error": errors, "flagged": decide(res.errors, bad, np.asarray(inp.valid, bool))}

    def apply(state: RedefenseState, inp: DefenseInput):
        num_clients = state.last_opt_round.shape[0]
        valid = np.asarray(inp.valid, bool)
        updates = jnp.asarray(inp.updates)
        t0 = time.perf_counter()
        res, bad, run, ids = reconstruct_round(state, inp)
        detection_s = time.perf_counter() - t0

        errors = res.errors
        flagged = decide(errors, bad, valid)
        weights = (valid & ~flagged).astype(np.float32)
        aggregate = aggregator(updates, jnp.asarray(weights), inp)

        rows = state.knowledge.alpha.shape[0]  # num_clients, or padded to the devices
        knowledge, last_opt_round = rec.scatter_clients(
            state.knowledge, state.last_opt_round, res.knowledge,
            jnp.asarray(np.where(run, ids, rows)),
            jnp.asarray(np.where(run & (res.iterations > 0), ids, num_clients)),
            jnp.int32(inp.round))

        out = DefenseOutput(
            aggregate=aggregate,
            flagged=jnp.asarray(flagged),
            weights=jnp.asarray(weights),
            info={"error": jnp.asarray(errors), "iterations": jnp.asarray(res.iterations),
                  "to_gamma": np.where(res.to_gamma > 0, res.to_gamma, np.nan),
                  "loss_at": res.loss_at, "invalid_update": jnp.asarray(bad), "detection_s": detection_s},
        )
        return out, RedefenseState(knowledge, last_opt_round)

    return Defense("fedredefense", init, apply, probe=probe)


def rejection_bound(rounds, reject_at: int, margin: float, gamma: float) -> dict:
    """Early rejection's bound from recorded trajectories (``rounds.jsonl`` records with
    ``loss_at``, ``to_gamma`` and ``error`` per participant).

    Over the participations that ran at least ``reject_at`` outer iterations (``reject_at``
    one of :data:`BUDGETS`), ``bound = max(max loss_at[reject_at] of those that reached gamma
    + margin, gamma)``: no recorded reconstruction that reached gamma would have been stopped.

    Returns:
      ``{'bound', 'reached', 'reached_max', 'unreached', 'unreached_min',
      'unreached_rejected'}``: counts of the participations that reached gamma and of those
      that never did, the largest loss of the first, the smallest of the second and how many
      of the second the bound rejects. ValueError when none reached gamma.
    """
    b = BUDGETS.index(reject_at)
    reached, unreached = [], []
    for rec in rounds:
        for loss_at, to_gamma, err in zip(rec.get("loss_at", []), rec.get("to_gamma", []), rec.get("error", [])):
            if loss_at is None or loss_at[b] is None:
                continue
            reaches = to_gamma is not None or (err is not None and err <= gamma)
            (reached if reaches else unreached).append(loss_at[b])
    if not reached:
        raise ValueError(f"no recorded reconstruction ran {reject_at} iterations or more and reached gamma")
    bound = max(max(reached) + margin, gamma)
    return {"bound": bound, "reached": len(reached), "reached_max": max(reached), "unreached": len(unreached),
            "unreached_min": min(unreached) if unreached else None,
            "unreached_rejected": sum(v > bound for v in unreached)}

