"""One experiment from its config: build it, run its rounds, record them, resume it.

``run`` writes the run directory through :mod:`~fedredefense_jax.records` (``config.json``,
``rounds.jsonl`` one record per round, ``summary.json`` after every evaluation) and saves
Orbax checkpoints of the whole simulation state every ``checkpoint_every`` rounds;
rerunning the same config resumes from the newest one. ``summary.json`` holds ``wall_s``
(this process since it started or resumed) and ``rounds_s_total`` (the summed round times
of every round, resumed ones included). SIGINT / SIGTERM stop after the current round with
a checkpoint saved.

The clients are split over a client mesh (``mesh.ClientMesh``: every local device by
default, or every process's with ``jax.distributed``); ``summary.json`` records it. Every
process runs the same rounds; only process 0 writes the run directory's files and logs,
every process saves and restores its part of the checkpoints, and a checkpoint written on
one device count resumes on another.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

import jax
import numpy as np
from absl import logging

from fedredefense_jax import mesh as mesh_lib
from fedredefense_jax import metrics, records, simulation, training
from fedredefense_jax.config import ConfigError, ExperimentConfig, validate
from fedredefense_jax.experiment import build


class Stopped(Exception):
    """The run was stopped by SIGINT/SIGTERM after saving a checkpoint."""


class _StopRequests:
    """SIGINT/SIGTERM -> stop after the current round (a second signal stops at once)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logging.warning("signal %d: saving a checkpoint after this round, then stopping "
                        "(send it again to stop at once)", signum)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(cfg: ExperimentConfig, progress: int = 1, mesh: mesh_lib.ClientMesh | None = None) -> dict:
    """Runs the experiment, or resumes it from the newest checkpoint in ``output_dir``;
    returns the summary (also written to ``summary.json``). Logs a progress line (round,
    accuracy when evaluated, seconds per round, ETA) every ``progress`` rounds and at the
    last; ``progress=0`` (or False) logs none.

    ``mesh``: the devices the clients are split over (default: every local device, or with
    ``jax.distributed`` started every process's). Every process runs the same rounds; only
    process 0 writes ``rounds.jsonl``, ``summary.json`` and ``config.json`` and logs, every
    process saves and restores its part of the checkpoints (a checkpoint written on one
    device count restores on another).

    Raises ConfigError for bad settings, a mismatched ``output_dir`` or an unusable
    checkpoint, and :class:`Stopped` after SIGINT/SIGTERM (with a checkpoint saved).
    """
    from fedredefense_jax import checkpoint

    validate(cfg)
    mesh = mesh_lib.ClientMesh() if mesh is None else mesh
    writer = mesh_lib.is_writer()
    records.prepare_output_dir(cfg, write=writer)
    mesh_lib.barrier("fedredefense_output_dir")
    start = time.time()
    setup = build(cfg, mesh)
    fed = setup.federation
    if writer:
        logging.info("split: %s", setup.split)
        if mesh.size > 1:
            logging.info("clients split over %d %s devices in %d process(es)", mesh.size, mesh.devices[0].platform,
                         jax.process_count())
    ckpt = checkpoint.Checkpointer(os.path.join(cfg.output_dir, records.CHECKPOINTS), mesh=mesh)
    state, rows = _resume(cfg, ckpt, simulation.init_state(fed), writer)
    summary = {"config": records.recorded_config(cfg), "environment": records.environment(),
               "mesh": records.mesh_record(mesh), "split": setup.split, "param_count": int(fed.init_params.size),
               "status": "running"}
    if setup.asr_base is not None:
        summary["trigger_unseen"] = [list(p) for p in setup.trigger_unseen]
    history = _History(rows, setup.asr is not None, start)
    summary_path = os.path.join(cfg.output_dir, records.SUMMARY)
    with _StopRequests() as stop, records.RoundLog(cfg.output_dir, write=writer) as log:
        for t in range(state.round + 1, cfg.rounds + 1):
            r0 = time.time()
            state, rec = simulation.step(fed, state)
            if t % cfg.eval_every == 0 or t == cfg.rounds:
                rec.update(_evaluate(setup, fed, state))
                if "asr_base" in rec:
                    summary["asr_base"] = rec["asr_base"]
            rec["round_s"] = time.time() - r0
            history.add(rec)
            log.append(rec)
            stop.requested = mesh_lib.any_process(stop.requested)  # every process stops together
            if t % cfg.checkpoint_every == 0 or t == cfg.rounds or stop.requested:
                ckpt.save(state)
            if "test_acc" in rec or stop.requested:
                summary.update(history.summary(fed, state))
                if stop.requested:
                    summary["status"] = "stopped"
                if writer:
                    records.write_json(summary_path, summary)
            if progress and writer and (t % progress == 0 or t == cfg.rounds):
                _log_progress(rec, t, cfg.rounds, history.round_times)
            if stop.requested:
                ckpt.close()
                raise Stopped(f"stopped after round {t}; checkpoint saved, rerun the same command to resume")
    ckpt.close()
    summary.update(history.summary(fed, state))
    summary["status"] = "done"
    if writer:
        records.write_json(summary_path, summary)
    return summary


def _resume(cfg: ExperimentConfig, ckpt, state: simulation.SimState, writer: bool = True):
    """``(state, records of its rounds)`` from the newest checkpoint, or ``(state, [])``
    (records of a run stopped before its first checkpoint are dropped by the ``writer``)."""
    from fedredefense_jax import checkpoint

    if ckpt.latest_round() is None:
        path = os.path.join(cfg.output_dir, records.ROUNDS)
        if writer and os.path.exists(path):
            os.remove(path)
        return state, []
    try:
        state = ckpt.restore(state)
    except checkpoint.CheckpointError as e:
        raise ConfigError("output_dir", f"{e}; pass --overwrite to start the run again") from None
    rows = records.keep_rounds(cfg.output_dir, state.round, rewrite=writer)
    if writer:
        logging.info("resumed from the checkpoint of round %d", state.round)
    return state, rows


def eval_model(fed: simulation.Federation, state: simulation.SimState) -> jax.Array:
    """What predicts: the global model ``[P]``, or the defense's voting ensemble ``[G, P]``
    (FLCert)."""
    if fed.defense.ensemble is not None:
        return fed.defense.ensemble(state.defense_state)
    return state.params


def _evaluate(setup, fed: simulation.Federation, state: simulation.SimState) -> dict:
    """``test_acc`` and, for an attack that defines them, ``asr`` and ``asr_base``."""
    model = eval_model(fed, state)
    out = {"test_acc": training.accuracy(setup.predict, model, setup.dataset.test_x, setup.dataset.test_y)}
    if setup.asr is not None:
        out["asr"] = setup.asr(model)
    if setup.asr_base is not None:
        out["asr_base"] = setup.asr_base(model)
    return out


class _History:
    """What the summary needs of every round so far (resumed ones included)."""

    _KEPT = ("participants", "weights", "aggregated", "error", "iterations")

    def __init__(self, rows: list[dict], with_asr: bool, start: float):
        self.start = start
        self.records, self.accs, self.round_times = [], {}, []
        self.asrs = {} if with_asr else None
        for r in rows:
            self.add(r)

    def add(self, rec: dict) -> None:
        self.records.append({k: rec[k] for k in self._KEPT if k in rec})
        self.round_times.append(rec["round_s"])
        if "test_acc" in rec:
            self.accs[rec["round"]] = rec["test_acc"]
            if self.asrs is not None:
                self.asrs[rec["round"]] = rec.get("asr")

    def summary(self, fed: simulation.Federation, state: simulation.SimState) -> dict:
        last = max(self.accs) if self.accs else None
        out = {} if self.asrs is None else {"asr": self.asrs.get(last) if last else None,
                                            "asr_by_round": {str(k): v for k, v in sorted(self.asrs.items())}}
        return out | {
            "detection": metrics.summarize(self.records, fed.malicious, state.expelled),
            "rounds_done": state.round,
            "test_acc": self.accs.get(last) if last else None,
            "test_acc_by_round": {str(k): v for k, v in sorted(self.accs.items())},
            "expelled": np.flatnonzero(state.expelled).tolist(),
            "seconds_per_round_median": float(np.median(self.round_times)) if self.round_times else None,
            "rounds_s_total": float(np.sum(self.round_times)),
            "wall_s": time.time() - self.start,
        }


def _log_progress(rec: dict, t: int, rounds: int, round_times: list[float]) -> None:
    eta = int(np.median(round_times[-10:]) * (rounds - t))
    acc = f"acc {rec['test_acc']:.4f} " if "test_acc" in rec else ""
    acc += f"asr {rec['asr']:.4f} " if "asr" in rec else ""
    logging.info("round %d/%d %s(%.2fs/round, train %.2fs, detect %.2fs) ETA %d:%02d:%02d", t, rounds, acc,
                 rec["round_s"], rec["train_s"], rec["detection_s"], eta // 3600, eta // 60 % 60, eta % 60)


def local_backdoor(cfg: ExperimentConfig, client: int, on_eval: Callable | None = None) -> list[dict]:
    """One malicious client's backdoor training alone: ``w_t = w_{t-1} + g(w_{t-1})`` for
    ``t = 1..cfg.rounds`` from the initial model, ``g`` the client's genuine poisoned update
    (the federation's own trainer and poison; no other client, no scaling, no aggregation).

    Shows whether the attack's local schedule can implant its trigger at all: a backdoor
    exists where ``asr`` exceeds ``asr_base``. Returns (and passes to ``on_eval``) one record
    ``{"round", "test_acc", "asr", "asr_base"}`` every ``cfg.eval_every`` rounds and at the end.
    Raises ConfigError for bad settings, an attack without a trigger or a benign ``client``.
    """
    validate(cfg)
    first = cfg.num_clients - cfg.num_malicious
    if not first <= client < cfg.num_clients:
        raise ConfigError("client", f"must be a malicious client id in [{first}, {cfg.num_clients - 1}], got {client}")
    setup = build(cfg)
    fed = setup.federation
    if setup.asr_base is None:
        raise ConfigError("attack", f"needs a trigger backdoor (scaling or dba), got {cfg.attack!r}")
    ids, key = np.array([client]), jax.random.key(cfg.seed)
    w, rows = fed.init_params, []
    for t in range(1, cfg.rounds + 1):
        keys = training.client_keys(jax.random.fold_in(key, t), ids)
        w = w + fed.train(w, fed.client_x, fed.client_y, fed.client_counts, ids, keys, poison=fed.poison)[0]
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            rows.append({"round": t, "test_acc": training.accuracy(setup.predict, w, setup.dataset.test_x,
                                                                  setup.dataset.test_y),
                         "asr": setup.asr(w), "asr_base": setup.asr_base(w)})
            if on_eval is not None:
                on_eval(rows[-1])
    return rows
