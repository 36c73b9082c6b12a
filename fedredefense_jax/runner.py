"""One experiment from a plain config: load data, split, build, run rounds, log, summarise.

Outputs in ``output_dir``:

* ``rounds.jsonl``: one JSON object per round (round, test accuracy and, for an attack
  that defines one, its attack success rate ``asr`` when evaluated (for a trigger backdoor
  also ``asr_base``, the same count on the unstamped images),
  seconds in local training / attack / detection / aggregation, participants, flagged
  clients and any per-client values the defense reports), appended and flushed each round;
* ``summary.json``: config, final metrics, time (``wall_s``: this process since it started
  or resumed; ``rounds_s_total``: the summed round times of every round, resumed ones
  included), jax version and device, rewritten
  atomically after every evaluation so a stopped run keeps what it measured;
* ``config.json``: the configuration, attack / defense defaults filled in (a different one
  in the same directory is refused unless ``overwrite``);
* ``checkpoints/``: Orbax checkpoints of the whole simulation state every
  ``checkpoint_every`` rounds; rerunning the same command resumes from the newest one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import tempfile
import threading
import time
from typing import Callable

import jax
import numpy as np
from absl import logging
from jax.flatten_util import ravel_pytree

from fedredefense_jax import attacks as attacks_lib
from fedredefense_jax import data as data_lib
from fedredefense_jax import defenses as defenses_lib
from fedredefense_jax import metrics, models, partition, simulation, training
from fedredefense_jax.attacks import adaptive as adaptive_attack
from fedredefense_jax.attacks.base import SCALE
from fedredefense_jax.attacks.data_poisoning import BACKDOOR_TRAINING, DEFAULT_BACKDOOR_TRAINING, parse_trigger_pixels
from fedredefense_jax.attacks.model_poisoning import LONE_ATTACKER, MIN_SUM_BOUNDS
from fedredefense_jax.defenses.fltrust import DEFAULT_ROOT_SIZE
from fedredefense_jax.defenses.redefense import AGGREGATORS, DEFAULT_VARIANT, VARIANTS, RedefenseConfig
from fedredefense_jax.defenses.redefense import LAYOUTS as REDEFENSE_LAYOUTS


class ConfigError(ValueError):
    """A bad setting; ``flag`` names the flag at fault."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    model: str = "cnn"
    conv_impl: str = "auto"
    num_clients: int = 100
    num_malicious: int = 28
    beta: float = 0.1
    rounds: int = 500
    local_epochs: int = 1
    participation_rate: float = 1.0
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    output_dir: str = "runs/default"
    eval_every: int = 10
    attack: str = "none"
    defense: str = "fedavg"
    layout: str | None = None
    attack_config: dict = dataclasses.field(default_factory=dict)
    defense_config: dict = dataclasses.field(default_factory=dict)
    checkpoint_every: int = 1
    overwrite: bool = False
    train_subset: int | None = None


# Settings that may change when a run in ``output_dir`` is resumed (extended, re-evaluated).
_RESUMABLE_CHANGES = ("rounds", "eval_every", "checkpoint_every", "overwrite", "output_dir")


# (flag, defense_config key, lower bound, strict) of FedREDefense's numeric settings.
_DEFENSE_RANGES = (("gamma", "gamma", 0, True), ("inner_steps", "inner_steps", 1, False),
                   ("distill_images_per_class", "images_per_class", 1, False),
                   ("lr_images", "lr_images", 0, False), ("lr_labels", "lr_labels", 0, False),
                   ("alpha_init", "alpha_init", 0, True), ("lr_alpha", "lr_alpha", 0, False),
                   ("first_cap", "first_cap", 1, False), ("later_cap", "later_cap", 1, False))


def validate(cfg: ExperimentConfig) -> None:
    """Raises ConfigError naming the first bad flag."""
    if cfg.dataset not in data_lib.SPECS:
        raise ConfigError("dataset", f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(sorted(data_lib.SPECS))}")
    if cfg.model not in models.MODEL_NAMES:
        raise ConfigError("model", f"unknown model {cfg.model!r}; choose one of {', '.join(models.MODEL_NAMES)}")
    if cfg.conv_impl not in ("auto", "xla", "matmul"):
        raise ConfigError("conv_impl", f"must be auto, xla or matmul, got {cfg.conv_impl!r}")
    if cfg.num_clients < 1:
        raise ConfigError("num_clients", f"must be >= 1, got {cfg.num_clients}")
    if not 0 <= cfg.num_malicious <= cfg.num_clients:
        raise ConfigError("num_malicious", f"must be in [0, num_clients={cfg.num_clients}], got {cfg.num_malicious}")
    if not (cfg.beta > 0 and math.isfinite(cfg.beta)):
        raise ConfigError("beta", f"must be a finite number > 0, got {cfg.beta}")
    if cfg.rounds < 1:
        raise ConfigError("rounds", f"must be >= 1, got {cfg.rounds}")
    if cfg.local_epochs < 1:
        raise ConfigError("local_epochs", f"must be >= 1, got {cfg.local_epochs}")
    if not 0 < cfg.participation_rate <= 1:
        raise ConfigError("participation_rate", f"must be in (0, 1], got {cfg.participation_rate}")
    if cfg.batch_size < 1:
        raise ConfigError("batch_size", f"must be >= 1, got {cfg.batch_size}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError("lr", f"must be a finite number > 0, got {cfg.lr}")
    if cfg.train_subset is not None and cfg.train_subset < cfg.num_clients:
        raise ConfigError("train_subset", f"must be >= num_clients={cfg.num_clients} (or unset = all training "
                          f"images), got {cfg.train_subset}")
    if cfg.eval_every < 1:
        raise ConfigError("eval_every", f"must be >= 1, got {cfg.eval_every}")
    if cfg.checkpoint_every < 1:
        raise ConfigError("checkpoint_every", f"must be >= 1, got {cfg.checkpoint_every}")
    if cfg.layout is not None and cfg.layout not in training.LAYOUTS:
        raise ConfigError("layout", f"must be one of {', '.join(training.LAYOUTS)}, got {cfg.layout!r}")
    if cfg.attack not in attacks_lib.names():
        raise ConfigError("attack", f"unknown attack {cfg.attack!r}; registered: {', '.join(attacks_lib.names())}")
    if cfg.defense not in defenses_lib.names():
        raise ConfigError("defense", f"unknown defense {cfg.defense!r}; registered: {', '.join(defenses_lib.names())}")
    for flag, key, low, strict in _DEFENSE_RANGES:
        v = cfg.defense_config.get(key)
        if v is not None and not (math.isfinite(v) and (v > low if strict else v >= low)):
            raise ConfigError(flag, f"must be a finite number {'>' if strict else '>='} {low}, got {v}")
    if cfg.defense == "fldetector" and cfg.participation_rate < 1:
        raise ConfigError("participation_rate",
                          "fldetector assumes full participation (it predicts each client's update from the "
                          "client's update of the previous round; the paper, Appendix B.2, does not run it "
                          f"otherwise), got {cfg.participation_rate}")
    defense = _filled("defense_config", cfg.defense_config)
    if defense["variant"] not in VARIANTS:
        raise ConfigError("redefense_variant", f"must be one of {', '.join(VARIANTS)}, got {defense['variant']!r}")
    if defense["layout"] not in REDEFENSE_LAYOUTS:
        raise ConfigError("redefense_layout", f"must be one of {', '.join(REDEFENSE_LAYOUTS)}, "
                          f"got {defense['layout']!r}")
    agg = cfg.defense_config.get("aggregator")
    if agg is not None and not callable(agg) and agg not in AGGREGATORS:
        raise ConfigError("redefense_aggregator", f"must be one of {', '.join(AGGREGATORS)}, got {agg!r}")
    attack = _filled("attack_config", cfg.attack_config)
    if attack["backdoor_training"] not in BACKDOOR_TRAINING:
        raise ConfigError("backdoor_training", f"must be {' or '.join(BACKDOOR_TRAINING)}, "
                          f"got {cfg.attack_config['backdoor_training']!r}")
    if cfg.attack_config.get("trigger_pixels"):
        try:
            pixels = parse_trigger_pixels(cfg.attack_config["trigger_pixels"])
        except ValueError as e:
            raise ConfigError("trigger_pixels", str(e)) from None
        h, w = data_lib.SPECS[cfg.dataset].input_shape[:2]
        outside = [p for p in pixels if not (0 <= p[0] < h and 0 <= p[1] < w)]
        if outside:
            raise ConfigError("trigger_pixels", f"pixel {outside[0][0]}:{outside[0][1]} lies outside the "
                              f"{h}x{w} images of {cfg.dataset}")
    if attack["lone_attacker"] not in LONE_ATTACKER:
        raise ConfigError("lone_attacker", f"must be {' or '.join(LONE_ATTACKER)}, got {attack['lone_attacker']!r}")
    if attack["min_sum_bound"] not in MIN_SUM_BOUNDS:
        raise ConfigError("min_sum_bound", f"must be {' or '.join(MIN_SUM_BOUNDS)}, got {attack['min_sum_bound']!r}")
    if not math.isfinite(attack["scale"]):
        raise ConfigError("attack_scale", "must be finite")
    lie_z = attack.get("lie_z")
    if lie_z is not None and not (isinstance(lie_z, (int, float)) and math.isfinite(lie_z)):
        raise ConfigError("lie_z", f"must be a finite number, got {lie_z!r}")
    if not (attack["delta_init"] > 0 and math.isfinite(attack["delta_init"])):
        raise ConfigError("adaptive_delta_init", f"must be a finite number > 0, got {attack['delta_init']}")
    step_min = attack["step_min"]
    if not (step_min > 0 and math.isfinite(step_min)):
        raise ConfigError("adaptive_step_min", f"must be a finite number > 0, got {step_min}")
    min_samples = cfg.defense_config.get("flame_min_samples")
    if min_samples is not None and not (isinstance(min_samples, (int, np.integer)) and min_samples >= 1):
        raise ConfigError("flame_min_samples", f"must be an integer >= 1, got {min_samples!r}")
    groups = cfg.defense_config.get("groups")
    if groups is not None and not 1 <= groups <= cfg.num_clients:
        raise ConfigError("flcert_groups", f"must be in [1, num_clients={cfg.num_clients}], got {groups}")
    if cfg.data_dir is not None and not os.path.exists(cfg.data_dir):
        raise ConfigError("data_dir", f"no such file or directory: {cfg.data_dir}")


def jsonable(obj):
    """``obj`` with non-finite floats as None (JSON has no NaN) and numpy scalars as Python."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def atomic_json(path: str, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` through a temporary file and a rename (never half-written)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(jsonable(obj), f, indent=2, allow_nan=False)
    os.replace(tmp, path)


def environment() -> dict:
    """Versions and device, so that a run can be repeated."""
    import flax
    import optax

    dev = jax.devices()[0]
    return {
        "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "backend": jax.default_backend(),
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}", "num_devices": jax.device_count(),
        "host": platform.node(),
    }


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


def build(cfg: ExperimentConfig) -> Setup:
    """Loads the data, splits it, builds the model, attack and defense."""
    ds = data_lib.load_dataset(cfg.dataset, cfg.data_dir)
    spec = ds.spec
    if cfg.train_subset is not None:
        if cfg.train_subset > len(ds.train_y):
            raise ConfigError("train_subset", f"{cfg.train_subset} exceeds the {len(ds.train_y)} training images "
                              f"of {cfg.dataset}")
        ds = partition.subset_train(ds, cfg.train_subset, cfg.seed)
    parts = partition.dirichlet_split(ds.train_y, cfg.num_clients, cfg.beta, cfg.seed, spec.num_classes)
    clients = partition.stack_clients(ds.train_x, ds.train_y, parts)
    model = models.build_model(cfg.model, cfg.dataset, spec.num_classes, cfg.conv_impl)
    params = models.init_params(model, jax.random.key(cfg.seed), spec.input_shape)
    w0, unravel = ravel_pytree(params)
    apply_fn = models.make_apply_fn(model)
    attack = attacks_lib.make(cfg.attack, attacks_lib.AttackContext(
        cfg.num_clients, cfg.num_malicious, w0, cfg.defense, dict(cfg.attack_config)))
    root = partition.server_sample(parts, cfg.defense_config.get("fltrust_root_size", DEFAULT_ROOT_SIZE), cfg.seed)
    local_update = training.make_client_update(apply_fn, unravel, spec.mean, spec.std, batch_size=cfg.batch_size,
                                               lr=cfg.lr, epochs=cfg.local_epochs)
    defense = defenses_lib.make(cfg.defense, defenses_lib.DefenseContext(
        apply_fn, unravel, cfg.num_clients, cfg.num_malicious, spec.num_classes, spec.input_shape,
        cfg.dataset, w0, dict(cfg.defense_config), server_data=(ds.train_x[root], ds.train_y[root]),
        local_update=local_update))
    if attack.needs_probe and defense.probe is None:
        raise ConfigError("attack", f"{cfg.attack} adapts to FedREDefense's reconstruction: it needs a defense "
                          f"that offers a probe (--defense=fedredefense), got --defense={cfg.defense}")
    fl = simulation.FLConfig(cfg.num_clients, cfg.num_malicious, cfg.participation_rate, cfg.rounds,
                             cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.seed, cfg.layout)
    try:
        fed = simulation.build_federation(fl, clients, apply_fn, unravel, w0, spec.mean, spec.std, attack, defense,
                                          num_classes=spec.num_classes)
        predict = training.make_predictor(apply_fn, unravel, spec.mean, spec.std)
        asr = None if attack.asr is None else make_asr(attack.asr, ds, predict, apply_fn, unravel)
        asr_base = (make_asr(attack.asr, ds, predict, apply_fn, unravel, stamp=False)
                    if attack.asr is not None and attack.asr.trigger_pixels else None)
    except ValueError as e:  # e.g. a trigger outside the images
        raise ConfigError("attack", f"{cfg.attack}: {e}") from None
    unseen = ()
    if attack.asr is not None and attack.asr.trigger_pixels:
        blind = models.unseen_pixels(apply_fn, params, spec.input_shape)
        unseen = tuple(p for p in attack.asr.trigger_pixels if blind[p])
        if unseen:
            logging.warning("trigger pixels %s lie outside the receptive field of --model=%s: no output depends "
                            "on them, so only the other trigger pixels can carry a backdoor (see --trigger_pixels)",
                            ", ".join(f"{r}:{c}" for r, c in unseen), cfg.model)
    return Setup(ds, parts, fed, predict, partition.split_stats(ds.train_y, parts, spec.num_classes), asr,
                 asr_base, unseen)


def make_asr(spec: attacks_lib.AsrSpec, ds: data_lib.Dataset, predict: Callable, apply_fn: Callable,
             unravel: Callable, stamp: bool = True) -> Callable:
    """``asr(w) -> float``: ``metrics.attack_success_rate`` of the flat model ``w`` on the test
    images it counts (class ``source``, or every class but ``target``), stamped with the
    trigger in normalised space by a jitted predictor when the attack has one. ``stamp=False``:
    the same count on the unstamped images (the backdoor's base rate: an ASR no higher than it
    owes nothing to the trigger)."""
    keep = ds.test_y == spec.source if spec.source is not None else ds.test_y != spec.target
    x, y = ds.test_x[keep], ds.test_y[keep]
    if spec.trigger_pixels and stamp:
        trigger = attacks_lib.trigger_mask(ds.spec.input_shape, spec.trigger_pixels)
        predict = training.make_predictor(apply_fn, unravel, ds.spec.mean, ds.spec.std, trigger=trigger)
    return lambda w: metrics.attack_success_rate(predict(w, x), y, spec.target, spec.source)


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


class Stopped(Exception):
    """The run was stopped by SIGINT/SIGTERM after saving a checkpoint."""


_OUTPUTS = ("config.json", "rounds.jsonl", "summary.json", "checkpoints")


# Settings a run takes when its attack_config / defense_config leaves them out (the attacks'
# and FedREDefense's own defaults). run.py and grid.py pass only what was set, config.json
# records them filled in; a config with and one without them mean the same run.
_CONFIG_DEFAULTS = {
    "attack_config": {"scale": SCALE, "backdoor_training": DEFAULT_BACKDOOR_TRAINING,
                      "delta_init": adaptive_attack.DELTA_INIT, "step_min": adaptive_attack.STEP_MIN,
                      "lone_attacker": LONE_ATTACKER[0], "min_sum_bound": MIN_SUM_BOUNDS[0]},
    "defense_config": {"variant": DEFAULT_VARIANT, "layout": RedefenseConfig.layout},
}


def recorded_config(cfg: ExperimentConfig) -> dict:
    """``cfg`` as JSON with the attack / defense defaults filled in, so that config.json and
    summary.json state every setting the run used."""
    return _with_defaults(jsonable(dataclasses.asdict(cfg)))


def _filled(key: str, given: dict | None) -> dict:
    """``given`` (an attack_config or defense_config) with the defaults it leaves out."""
    return {**_CONFIG_DEFAULTS[key], **(given or {})}


def _with_defaults(config: dict) -> dict:
    return {**config, **{key: _filled(key, config.get(key)) for key in _CONFIG_DEFAULTS}}


def _comparable(config: dict) -> dict:
    return {k: v for k, v in _with_defaults(config).items() if k not in _RESUMABLE_CHANGES}


def prepare_output_dir(cfg: ExperimentConfig) -> None:
    """Makes ``output_dir`` ready: refuses one that holds a run of a different configuration
    (unless ``overwrite``, which deletes that run's outputs) and records this config."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    cfg_path = os.path.join(cfg.output_dir, "config.json")
    present = [n for n in _OUTPUTS if os.path.exists(os.path.join(cfg.output_dir, n))]
    mine = recorded_config(cfg)
    if present and not cfg.overwrite:
        try:
            with open(cfg_path) as f:
                old = json.load(f)
        except FileNotFoundError:
            raise ConfigError("output_dir", f"{cfg.output_dir} holds outputs of another run "
                                            f"({', '.join(present)}) without config.json; pass --overwrite "
                                            "to replace them or choose another --output_dir") from None
        except (OSError, ValueError) as e:
            raise ConfigError("output_dir", f"{cfg_path} is unreadable ({e}); pass --overwrite to replace "
                                            "the run or choose another --output_dir") from None
        a, b = _comparable(old), _comparable(mine)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
            raise ConfigError("output_dir", f"{cfg.output_dir} holds a run with different settings ({shown}); "
                                            "pass --overwrite to replace it or choose another --output_dir")
    elif present:
        for n in present:
            path = os.path.join(cfg.output_dir, n)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    atomic_json(cfg_path, mine)


def _load_records(path: str, upto: int) -> list[dict]:
    """The first ``upto`` rounds of ``rounds.jsonl`` (a torn last line is dropped); the file
    is rewritten to hold exactly those rounds."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    break
                if row.get("round") != len(rows) + 1 or len(rows) >= upto:
                    break
                rows.append(row)
    if len(rows) != upto:
        raise ConfigError("output_dir", f"{path} holds {len(rows)} complete rounds but the checkpoint is at "
                                        f"round {upto}; pass --overwrite to start the run again")
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    os.replace(tmp, path)
    return rows


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


def run(cfg: ExperimentConfig, progress: int = 1) -> dict:
    """Runs the experiment, or resumes it from the newest checkpoint in ``output_dir``;
    returns the summary (also written to ``summary.json``). Logs a progress line (round,
    accuracy when evaluated, seconds per round, ETA) every ``progress`` rounds and at the
    last; ``progress=0`` (or False) logs none.

    Raises ConfigError for bad settings, a mismatched ``output_dir`` or an unusable
    checkpoint, and :class:`Stopped` after SIGINT/SIGTERM (with a checkpoint saved).
    """
    from fedredefense_jax import checkpoint

    validate(cfg)
    prepare_output_dir(cfg)
    start = time.time()
    setup = build(cfg)
    fed = setup.federation
    logging.info("split: %s", setup.split)
    state = simulation.init_state(fed)
    ckpt = checkpoint.Checkpointer(os.path.join(cfg.output_dir, "checkpoints"))
    rounds_path = os.path.join(cfg.output_dir, "rounds.jsonl")
    rows = []
    if ckpt.latest_round() is not None:
        try:
            state = ckpt.restore(state)
        except checkpoint.CheckpointError as e:
            raise ConfigError("output_dir", f"{e}; pass --overwrite to start the run again") from None
        rows = _load_records(rounds_path, state.round)
        logging.info("resumed from the checkpoint of round %d", state.round)
    elif os.path.exists(rounds_path):
        os.remove(rounds_path)  # rounds of a run stopped before its first checkpoint
    summary = {"config": recorded_config(cfg), "environment": environment(), "split": setup.split,
               "param_count": int(fed.init_params.size), "status": "running"}
    if setup.asr_base is not None:
        summary["trigger_unseen"] = [list(p) for p in setup.trigger_unseen]
    keys = ("participants", "weights", "aggregated", "error", "iterations")
    records = [{k: r[k] for k in keys if k in r} for r in rows]
    accs = {r["round"]: r["test_acc"] for r in rows if "test_acc" in r}
    asrs = None if setup.asr is None else {r["round"]: r.get("asr") for r in rows if "test_acc" in r}
    round_times = [r["round_s"] for r in rows]
    summary_path = os.path.join(cfg.output_dir, "summary.json")
    with _StopRequests() as stop, open(rounds_path, "a") as log:
        for t in range(state.round + 1, cfg.rounds + 1):
            r0 = time.time()
            state, rec = simulation.step(fed, state)
            if t % cfg.eval_every == 0 or t == cfg.rounds:
                model = eval_model(fed, state)
                rec["test_acc"] = training.accuracy(setup.predict, model, setup.dataset.test_x,
                                                    setup.dataset.test_y)
                accs[t] = rec["test_acc"]
                if setup.asr is not None:
                    rec["asr"] = asrs[t] = setup.asr(model)
                if setup.asr_base is not None:
                    rec["asr_base"] = summary["asr_base"] = setup.asr_base(model)
            rec["round_s"] = time.time() - r0
            round_times.append(rec["round_s"])
            records.append({k: rec[k] for k in keys if k in rec})
            log.write(json.dumps(jsonable(rec), allow_nan=False) + "\n")
            log.flush()
            os.fsync(log.fileno())
            if t % cfg.checkpoint_every == 0 or t == cfg.rounds or stop.requested:
                ckpt.save(state)
            if "test_acc" in rec or stop.requested:
                summary.update(_final_metrics(cfg, fed, state, accs, round_times, start, records, asrs))
                if stop.requested:
                    summary["status"] = "stopped"
                atomic_json(summary_path, summary)
            if progress and (t % progress == 0 or t == cfg.rounds):
                eta = np.median(round_times[-10:]) * (cfg.rounds - t)
                acc = f"acc {rec['test_acc']:.4f} " if "test_acc" in rec else ""
                acc += f"asr {rec['asr']:.4f} " if "asr" in rec else ""
                logging.info("round %d/%d %s(%.2fs/round, train %.2fs, detect %.2fs) ETA %s", t, cfg.rounds,
                             acc, rec["round_s"], rec["train_s"], rec["detection_s"], _hms(eta))
            if stop.requested:
                ckpt.close()
                raise Stopped(f"stopped after round {t}; checkpoint saved, rerun the same command to resume")
    ckpt.close()
    summary.update(_final_metrics(cfg, fed, state, accs, round_times, start, records, asrs))
    summary["status"] = "done"
    atomic_json(summary_path, summary)
    return summary


def eval_model(fed: simulation.Federation, state: simulation.SimState) -> jax.Array:
    """What predicts: the global model ``[P]``, or the defense's voting ensemble ``[G, P]``
    (FLCert)."""
    if fed.defense.ensemble is not None:
        return fed.defense.ensemble(state.defense_state)
    return state.params


def _final_metrics(cfg, fed, state, accs, round_times, start, records, asrs=None) -> dict:
    last = max(accs) if accs else None
    det = metrics.summarize(records, fed.malicious, state.expelled)
    out = {} if asrs is None else {"asr": asrs.get(last) if last else None,
                                   "asr_by_round": {str(k): v for k, v in sorted(asrs.items())}}
    return out | {
        "detection": det,
        "rounds_done": state.round,
        "test_acc": accs.get(last) if last else None,
        "test_acc_by_round": {str(k): v for k, v in sorted(accs.items())},
        "expelled": np.flatnonzero(state.expelled).tolist(),
        "seconds_per_round_median": float(np.median(round_times)) if round_times else None,
        "rounds_s_total": float(np.sum(round_times)),
        "wall_s": time.time() - start,
    }


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
