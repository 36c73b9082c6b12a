"""The flags of every experiment script: one absl flag per setting, defined here only.

The flags are made from the settings dataclasses, ``config.ExperimentConfig`` and the
settings of every registered attack and defense (``settings.setting`` fields): each setting
has one name, the flag's, the key of ``--attack_config`` / ``--defense_config``
``key=value`` strings and the key in ``config.json``. Choices become ``DEFINE_enum``,
inclusive bounds absl's bounds, and every flag gets a validator that checks what its field
checks. A plug-in's setting is unset by default (the plug-in's own default applies, e.g.
Table 7's for the dataset). A plug-in registered before this module is imported gets flags
too; any plug-in's settings can be given as ``key=value`` strings.

A script that places its runs on the client mesh also calls :func:`define_device_flags`
(``--num_devices``, ``--coordinator_address``, ``--num_processes``, ``--process_id``:
``mesh.DeviceSettings``, which are not settings of the experiment) and builds the mesh with
:func:`client_mesh`; the other scripts do not take them.

    from fedredefense_jax import cli

    cli.define_device_flags()

    def main(argv):
        summary = runner.run(cli.experiment_config(), mesh=cli.client_mesh())

    cli.run(main)   # a bad flag prints one line "error: --flag: message" and exits with 2
"""

from __future__ import annotations

import difflib
import sys

from absl import app, flags

from fedredefense_jax import attacks, defenses
from fedredefense_jax import mesh as mesh_lib
from fedredefense_jax.config import ConfigError, ExperimentConfig
from fedredefense_jax.settings import Settings, base_type, coerce, type_hints

FLAGS = flags.FLAGS
PLUGIN_KINDS = {"attack": attacks, "defense": defenses}
_SPECS: dict[str, tuple] = {}  # setting name -> (type hint, Spec) of the flags defined here


def _validator(name: str, hint, spec):
    def check(value) -> bool:
        if value is None:  # unset: the plug-in's default
            return True
        try:
            coerce(name, value, hint, spec)
        except ConfigError as e:
            raise flags.ValidationError(e.message) from None
        return True

    return check


def _define(name: str, field, hint, default, help_text: str) -> None:
    spec = field.metadata["spec"]
    kind, _ = base_type(hint)
    if spec.choices is not None:
        flags.DEFINE_enum(name, default, [str(c) for c in spec.choices], help_text)
    elif kind is bool:
        flags.DEFINE_bool(name, default, help_text)
    elif kind in (int, float):
        define = flags.DEFINE_integer if kind is int else flags.DEFINE_float
        define(name, default, help_text, lower_bound=spec.low, upper_bound=spec.high)
    else:
        flags.DEFINE_string(name, None if default is None else str(default), help_text)
    flags.register_validator(name, _validator(name, hint, spec))


def _define_settings(cls: type[Settings], *, unset: bool) -> list[str]:
    """Flags of ``cls``'s settings (not yet defined); ``unset``: default None, the field's
    default named in the help."""
    hints = type_hints(cls)
    for name, field in cls.fields().items():
        spec = (hints[field.name], field.metadata["spec"])
        if name in FLAGS:
            if _SPECS.get(name) != spec:  # one name, one meaning
                raise ValueError(f"setting {name} of {cls.__name__} differs from the flag --{name} already defined")
            continue
        _SPECS[name] = spec
        help_text = field.metadata["spec"].help
        if unset and "Table 7" not in help_text and field.default is not None:
            help_text += f" (default: {_shown(field.default)})"
        _define(name, field, hints[field.name], None if unset else field.default, help_text)
    return list(cls.fields())


def _shown(value) -> str:
    if isinstance(value, tuple):  # trigger pixels
        return ",".join(":".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


EXPERIMENT = _define_settings(ExperimentConfig, unset=False)
PLUGIN_SETTINGS = {kind: sorted({n for name in reg.names() for n in _define_settings(reg.settings(name), unset=True)})
                   for kind, reg in PLUGIN_KINDS.items()}
flags.DEFINE_list("attack_config", [], "Attack settings as key=value (the names of the attack flags, or of "
                  "an attack registered elsewhere), e.g. attack_scale=2,trigger_pixels=24:24;22:24.")
flags.DEFINE_list("defense_config", [], "Defense settings as key=value, e.g. gamma=0.5,flcert_groups=5.")


DEVICE_FLAGS: list[str] = []  # the flags of mesh.DeviceSettings, once define_device_flags ran


def define_device_flags() -> None:
    """Defines ``--num_devices``, ``--coordinator_address``, ``--num_processes`` and
    ``--process_id`` (``mesh.DeviceSettings``) for a script that runs on the client mesh
    (before the flags are parsed; once)."""
    if not DEVICE_FLAGS:
        DEVICE_FLAGS.extend(_define_settings(mesh_lib.DeviceSettings, unset=False))


def client_mesh() -> mesh_lib.ClientMesh:
    """Starts the processes and builds the client mesh the device flags describe
    (``mesh.start``; ConfigError naming a bad flag)."""
    if not DEVICE_FLAGS:
        raise RuntimeError("cli.define_device_flags() was not called")
    given = {n: FLAGS[n].value for n in DEVICE_FLAGS}
    return mesh_lib.start(mesh_lib.DeviceSettings.parse(given, owner="the client mesh"))


def set_defaults(**values) -> None:
    """A script's own defaults (before the flags are parsed)."""
    for name, value in values.items():
        FLAGS.set_default(name, value)


def plugin_config(kind: str) -> dict:
    """``{setting: value}`` of the ``kind`` ('attack' / 'defense') settings given on the
    command line: the set flags and the ``--{kind}_config`` key=value strings."""
    given = {n: FLAGS[n].value for n in PLUGIN_SETTINGS[kind] if FLAGS[n].value is not None}
    for item in FLAGS[f"{kind}_config"].value:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{kind}_config", f"{item!r} is not key=value")
        if key in given and _differ(key, given[key], value):
            raise ConfigError(key, f"given twice, as --{key}={given[key]} and in --{kind}_config as {value}")
        given[key] = value
    return given


def _differ(name: str, a, b) -> bool:
    try:
        return coerce(name, a, *_SPECS[name]) != coerce(name, b, *_SPECS[name])
    except ConfigError:
        return True


def experiment_config(**overrides) -> ExperimentConfig:
    """The ExperimentConfig the flags describe (``overrides`` replace fields); ConfigError
    naming a bad setting."""
    values = {n: FLAGS[n].value for n in EXPERIMENT}
    values.update(attack_config=plugin_config("attack"), defense_config=plugin_config("defense"))
    return ExperimentConfig(**(values | overrides))


def _one_line(e: flags.Error) -> str:
    if isinstance(e, flags.UnrecognizedFlagError):
        close = difflib.get_close_matches(e.flagname, list(FLAGS), n=1)
        return f"--{e.flagname}: unknown flag" + (f"; did you mean --{close[0]}?" if close else "")
    text = str(e).splitlines()[0]
    if text.startswith("flag --") and ": " in text:
        flag, _, message = text[len("flag "):].partition(": ")
        return f"{flag.split('=')[0]}: {message}"
    return text


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line errors: ``error: --flag: message``, exit code 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def run(main) -> None:
    """``app.run(main)`` with :func:`parse_flags`."""
    app.run(main, flags_parser=parse_flags)
