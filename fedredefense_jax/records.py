"""The files of a run directory, read and written here only:

* ``config.json``: the configuration, every attack / defense setting filled in
  (:func:`recorded_config`); a different one in the same directory is refused unless
  ``overwrite`` (:func:`prepare_output_dir`); :func:`read_config` reads it, and
  :func:`upgrade_config` / :func:`comparable` / :func:`settings_key` say whether two runs,
  of any version, have the same settings;
* ``rounds.jsonl``: one JSON object per round, appended and flushed each round
  (:class:`RoundLog`, :func:`read_rounds`);
* ``summary.json``: config, final metrics, time, environment (:func:`environment`, with
  the code's commit), the client mesh (:func:`mesh_record`), rewritten atomically
  (:func:`write_json`, :func:`read_summary`);
* ``checkpoints/``: written by ``checkpoint.Checkpointer``.

A run of several processes has one writer, process 0 (``mesh.is_writer``): the others check
the directory (``prepare_output_dir(write=False)``), read the rounds of a checkpoint
(``keep_rounds(rewrite=False)``) and keep no round log (``RoundLog(write=False)``); every
process writes its part of the checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile

import numpy as np

from fedredefense_jax import config as config_lib
from fedredefense_jax.settings import ConfigError

CONFIG, ROUNDS, SUMMARY, CHECKPOINTS = "config.json", "rounds.jsonl", "summary.json", "checkpoints"
_OUTPUTS = (CONFIG, ROUNDS, SUMMARY, CHECKPOINTS)

# Settings that may change when a run in ``output_dir`` is resumed (extended, re-evaluated).
_RESUMABLE_CHANGES = ("rounds", "eval_every", "checkpoint_every", "overwrite", "output_dir")

# Names of settings in config.json files written before settings had one name everywhere.
_OLD_NAMES = {
    "attack_config": {"scale": "attack_scale", "delta_init": "adaptive_delta_init",
                      "step_min": "adaptive_step_min", "tau": "gamma_tau"},
    "defense_config": {"groups": "flcert_groups", **{k: f"redefense_{k}" for k in (
        "variant", "interval", "momentum", "reset_momentum", "layout", "chunk", "first_chunk",
        "map_batch_size", "init_noise", "inner_unroll", "aggregator")}},
}


def jsonable(obj):
    """``obj`` with non-finite floats as None (JSON has no NaN), numpy scalars as Python and
    callables by name."""
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
    if callable(obj):
        return getattr(obj, "__qualname__", repr(obj))
    return obj


def write_json(path: str, obj) -> None:
    """Writes ``obj`` as JSON to ``path`` through a temporary file and a rename (never half-written)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(jsonable(obj), f, indent=2, allow_nan=False)
    os.replace(tmp, path)


def read_summary(run_dir: str) -> dict:
    """``summary.json`` of ``run_dir`` (OSError / ValueError when missing or unreadable)."""
    with open(os.path.join(run_dir, SUMMARY)) as f:
        return json.load(f)


def read_config(run_dir: str) -> dict:
    """``config.json`` of ``run_dir`` as written, of whatever version (OSError / ValueError
    when missing or unreadable; :func:`upgrade_config` reads it as today's)."""
    with open(os.path.join(run_dir, CONFIG)) as f:
        return json.load(f)


def finished(run_dir: str) -> dict | None:
    """The summary of a run that finished (``status`` done), else None."""
    try:
        s = read_summary(run_dir)
    except (OSError, ValueError):
        return None
    return s if s.get("status") == "done" else None


def read_rounds(run_dir: str) -> list[dict]:
    """The complete records of ``rounds.jsonl``, in order (a torn last line is dropped);
    FileNotFoundError when there is none."""
    rows = []
    with open(os.path.join(run_dir, ROUNDS)) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return rows


def keep_rounds(run_dir: str, upto: int, rewrite: bool = True) -> list[dict]:
    """Cuts ``rounds.jsonl`` back to rounds ``1..upto`` (a checkpoint's) and returns them
    (``rewrite=False``: only returns them); ConfigError when it holds fewer."""
    path = os.path.join(run_dir, ROUNDS)
    rows = []
    for row in read_rounds(run_dir) if os.path.exists(path) else []:
        if row.get("round") != len(rows) + 1 or len(rows) >= upto:
            break
        rows.append(row)
    if len(rows) != upto:
        raise ConfigError("output_dir", f"{path} holds {len(rows)} complete rounds but the checkpoint is at "
                                        f"round {upto}; pass --overwrite to start the run again")
    if not rewrite:
        return rows
    fd, tmp = tempfile.mkstemp(dir=run_dir, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(r, allow_nan=False) + "\n" for r in rows)
    os.replace(tmp, path)
    return rows


def round_differences(a: list[dict], b: list[dict], shared_only: bool = True) -> list[str]:
    """Where two runs' round records differ, ignoring timings (fields ending in ``_s``).

    Args:
      a, b: records of ``rounds.jsonl`` (:func:`read_rounds`).
      shared_only: compare only the fields both records of a round have (a newer version may
        record more); False counts a field one side lacks as a difference.

    Returns:
      One line per difference (``round R: field: A != B``, or a round only one side has);
      empty when the records agree.
    """
    out = []
    for ra, rb in zip(a, b):
        keys = (ra.keys() & rb.keys()) if shared_only else (ra.keys() | rb.keys())
        for k in sorted(k for k in keys if not k.endswith("_s")):
            if ra.get(k) != rb.get(k):
                out.append(f"round {ra.get('round')}: {k}: {ra.get(k)!r} != {rb.get(k)!r}")
    out += [f"round {r.get('round')}: only in the first run" for r in a[len(b):]]
    out += [f"round {r.get('round')}: only in the second run" for r in b[len(a):]]
    return out


class RoundLog:
    """Appends round records to ``rounds.jsonl``, each flushed to disk before the next round
    (``write=False``: a log that writes nothing, for the processes other than the writer)."""

    def __init__(self, run_dir: str, write: bool = True):
        self._file = open(os.path.join(run_dir, ROUNDS), "a") if write else None

    def append(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(jsonable(record), allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._file is not None:
            self._file.close()


def environment() -> dict:
    """Versions, device and the code's commit (:func:`git_commit`), so that a run can be repeated."""
    import flax
    import jax
    import optax

    dev = jax.devices()[0]
    return {
        "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__,
        "python": platform.python_version(), "backend": jax.default_backend(),
        "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}", "num_devices": jax.device_count(),
        "host": platform.node(), "git_commit": git_commit(),
    }


def mesh_record(mesh) -> dict:
    """The client mesh (a ``mesh.ClientMesh``) as ``summary.json`` records it: ``devices``
    (all processes), ``processes``, ``devices_per_process``, ``platform``, ``device_kind``
    and the mesh ``axis``."""
    import jax

    from fedredefense_jax import mesh as mesh_lib

    dev = mesh.devices[0]
    return {"devices": mesh.size, "processes": jax.process_count(),
            "devices_per_process": mesh.size // max(1, len({d.process_index for d in mesh.devices})),
            "platform": dev.platform, "device_kind": getattr(dev, "device_kind", ""), "axis": mesh_lib.AXIS}


def git_commit(path: str | None = None) -> str | None:
    """``git rev-parse HEAD`` of the repository holding ``path`` (default: this package), with
    ``-dirty`` appended when a tracked file differs from it; None when it is not in a git
    checkout or git is missing or fails (never raises). Takes no lock on the repository."""
    path = path or os.path.dirname(os.path.abspath(__file__))

    def git(*args: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", "-C", path, *args], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


#: The attacks' revision: 2 since the attacks follow the paper's authors (Fang's partial-knowledge
#: attack, Min-Sum's minimum bound, a lone compromised participant sends zero, attacks under
#: FLCert per group, FLDetector aggregates its detection round; commit 55ee95f).
ATTACKS_REVISION = 2
#: The attacks and defenses whose runs that revision changed.
_REVISED = {"attack": ("fang", "lie", "min_max", "min_sum"), "defense": ("fldetector", "flcert")}


def attacks_revision(recorded: dict) -> int:
    """The attacks' revision a recorded config ran with: its ``attacks_revision``; in a config
    written before the key existed, 2 when it names ``lone_attacker`` (a setting of revision
    2) or states every setting of its attack and defense (as configs have since revision 2),
    else 1; for a run that revision 2 left unchanged (another attack and defense), 2."""
    if "attacks_revision" in recorded:
        return recorded["attacks_revision"]
    attack, defense = recorded.get("attack", "none"), recorded.get("defense", "fedavg")
    if attack not in _REVISED["attack"] and defense not in _REVISED["defense"]:
        return ATTACKS_REVISION
    if "lone_attacker" in (recorded.get("attack_config") or {}):
        return ATTACKS_REVISION
    for key, name, registry in (("attack_config", attack, config_lib.attacks_lib),
                                ("defense_config", defense, config_lib.defenses_lib)):
        try:
            known = set(registry.settings(name).fields())
        except ValueError:
            return 1
        if {_OLD_NAMES[key].get(k, k) for k in recorded.get(key) or {}} != known:
            return 1
    return ATTACKS_REVISION


def recorded_config(cfg: config_lib.ExperimentConfig) -> dict:
    """``cfg`` as JSON with the attack's and defense's settings filled in (their defaults
    included), so that config.json and summary.json state every setting the run used, and
    the attacks' revision."""
    out = jsonable(dataclasses.asdict(cfg))
    out["attack_config"] = jsonable(config_lib.attack_settings(cfg).as_dict())
    out["defense_config"] = jsonable(config_lib.defense_settings(cfg).as_dict())
    out["attacks_revision"] = ATTACKS_REVISION
    return out


def upgrade_config(recorded: dict) -> dict:
    """A config.json of any version as :func:`recorded_config` writes it today: old setting
    names renamed, settings the run's attack / defense does not take dropped (they never
    acted), the others filled in; the experiment's own settings typed, those it lacks at
    their defaults (keys that are no setting today are kept). ConfigError naming the file's
    setting if one is refused. A run of the attacks' earlier revision keeps
    ``attacks_revision`` 1 (:func:`attacks_revision`), so it neither resumes nor stands in
    for a run of today's."""
    out = dict(recorded) | {"attacks_revision": attacks_revision(recorded)}
    for key, kind, registry in (("attack_config", "attack", config_lib.attacks_lib),
                                ("defense_config", "defense", config_lib.defenses_lib)):
        name = out.get(kind, config_lib.ExperimentConfig.__dataclass_fields__[kind].default)
        given = {_OLD_NAMES[key].get(k, k): v for k, v in (out.get(key) or {}).items()}
        try:
            known = registry.settings(name).fields()
            settings = registry.parse_settings(name, {k: v for k, v in given.items() if k in known},
                                               out.get("dataset"))
        except ValueError as e:
            raise ConfigError(e.flag if isinstance(e, ConfigError) else kind, f"recorded {e}") from None
        out[key] = jsonable(settings.as_dict())
    own = config_lib.ExperimentConfig.fields()
    try:
        typed = config_lib.ExperimentConfig(**{f.name: out[n] for n, f in own.items() if n in out})
    except ConfigError as e:
        raise ConfigError(e.flag, f"recorded {e.message}") from None
    return out | {n: jsonable(getattr(typed, f.name)) for n, f in own.items()}


def prepare_output_dir(cfg: config_lib.ExperimentConfig, write: bool = True) -> None:
    """Makes ``output_dir`` ready: refuses one that holds a run of a different configuration
    (unless ``overwrite``, which deletes that run's outputs) and records this config.
    ``write=False`` only refuses (every process checks, the writing one also writes)."""
    cfg_path = os.path.join(cfg.output_dir, CONFIG)
    present = [n for n in _OUTPUTS if os.path.exists(os.path.join(cfg.output_dir, n))]
    mine = recorded_config(cfg)
    if present and not cfg.overwrite:
        try:
            with open(cfg_path) as f:
                old = upgrade_config(json.load(f))
        except ConfigError as e:
            raise ConfigError("output_dir", f"{cfg_path}: {e}; pass --overwrite to replace the run or choose "
                                            "another --output_dir") from None
        except FileNotFoundError:
            raise ConfigError("output_dir", f"{cfg.output_dir} holds outputs of another run "
                                            f"({', '.join(present)}) without config.json; pass --overwrite "
                                            "to replace them or choose another --output_dir") from None
        except (OSError, ValueError) as e:
            raise ConfigError("output_dir", f"{cfg_path} is unreadable ({e}); pass --overwrite to replace "
                                            "the run or choose another --output_dir") from None
        a, b = comparable(old), comparable(mine)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
            raise ConfigError("output_dir", f"{cfg.output_dir} holds a run with different settings ({shown}); "
                                            "pass --overwrite to replace it or choose another --output_dir")
    if not write:
        return
    os.makedirs(cfg.output_dir, exist_ok=True)
    if present and cfg.overwrite:
        for n in present:
            path = os.path.join(cfg.output_dir, n)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    write_json(cfg_path, mine)


def comparable(config: dict) -> dict:
    """The settings of an upgraded ``config`` (:func:`upgrade_config`) that must match for a
    resume, plug-in settings flattened (``attack_config.attack_scale``), so a refusal names
    the setting that differs."""
    out = {k: v for k, v in config.items() if k not in _RESUMABLE_CHANGES + ("attack_config", "defense_config")}
    for key in ("attack_config", "defense_config"):
        out.update({f"{key}.{k}": v for k, v in config.get(key, {}).items()})
    return out


def settings_key(recorded: dict, data_dir: bool = True) -> str:
    """A string equal for two recorded configs (of any version) whose runs have the same
    settings: :func:`comparable` of the upgraded config, the data directory by its real path
    (a relative one from the working directory) or, with ``data_dir=False``, left out.
    ConfigError when the config is refused (:func:`upgrade_config`)."""
    out = comparable(upgrade_config(recorded))
    path = out.get("data_dir")
    out["data_dir"] = (os.path.realpath(path) if isinstance(path, str) and os.path.exists(path) else path) \
        if data_dir else None
    return json.dumps(out, sort_keys=True)
