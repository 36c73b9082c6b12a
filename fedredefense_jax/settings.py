"""Typed settings: frozen dataclasses whose fields declare type, default, range and help.

A field declared with :func:`setting` is one setting with one name everywhere: the absl
flag (``fedredefense_jax/cli.py`` defines one per name), the key of ``--attack_config`` /
``--defense_config`` ``key=value`` strings and of ``config.json``. The name is the field's
unless ``setting(name=...)`` gives another (FedREDefense's ``redefense_*`` settings, whose
short attribute names would be ambiguous among all plug-ins).

``Cls.parse(given, owner)`` builds the dataclass from a ``{name: value}`` mapping (strings
from the command line, JSON values, Python values), refusing an unknown name, a value of
the wrong type or out of range with one :class:`ConfigError` naming the setting and
``owner`` (e.g. ``"defense fedredefense"``). Direct construction checks the same.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from typing import Any, Callable, Mapping

import numpy as np


class ConfigError(ValueError):
    """A bad setting: ``str(e) == f"--{flag}: {message}"``; ``flag`` names the setting."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag
        self.message = message


@dataclasses.dataclass(frozen=True)
class Spec:
    """What a setting accepts: ``choices``; bounds ``low <= v``, ``v > above``, ``v <= high``
    (a float must also be finite); ``parse``: str / JSON value -> value, for types other than
    bool, int, float, str; ``name``: the setting's name when it differs from the field's."""

    help: str
    choices: tuple | None = None
    low: float | None = None
    above: float | None = None
    high: float | None = None
    parse: Callable[[Any], Any] | None = None
    name: str | None = None


def setting(default, help: str, **spec) -> Any:
    """A dataclass field that is a setting (keyword arguments: :class:`Spec`'s)."""
    return dataclasses.field(default=default, metadata={"spec": Spec(help, **spec)})


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


@functools.cache
def type_hints(cls: type) -> dict:
    """The resolved type hints of a settings dataclass (cached)."""
    return typing.get_type_hints(cls)


def base_type(hint) -> tuple[type | None, bool]:
    """``(bool | int | float | str | None for anything else, None allowed)`` of a type hint."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else Any
    return (hint if hint in (bool, int, float, str) else None), optional


def coerce(name: str, value, hint, spec: Spec):
    """``value`` as the setting's type, checked against ``spec``; ConfigError naming ``name``."""
    kind, optional = base_type(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(name, "must be set")
    if spec.parse is not None:
        try:
            value = spec.parse(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(name, str(e)) from None
    elif kind is bool:
        text = str(value).lower()
        if not isinstance(value, (bool, np.bool_)) and text not in _TRUE + _FALSE:
            raise ConfigError(name, f"must be true or false, got {value!r}")
        value = bool(value) if isinstance(value, (bool, np.bool_)) else text in _TRUE
    elif kind in (int, float):
        value = _number(name, value, kind)
    elif kind is str and not isinstance(value, str):
        raise ConfigError(name, f"must be a string, got {value!r}")
    if spec.choices is not None and not callable(value) and value not in spec.choices:
        raise ConfigError(name, f"must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
    _check_range(name, value, spec)
    return value


def _number(name: str, value, kind: type):
    word = "an integer" if kind is int else "a number"
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(name, f"must be {word}, got {value!r}")
    try:
        number = kind(value.strip()) if isinstance(value, str) else value
    except ValueError:
        raise ConfigError(name, f"must be {word}, got {value!r}") from None
    if kind is int and not isinstance(number, (int, np.integer)):
        raise ConfigError(name, f"must be {word}, got {value!r}")
    if kind is float and not isinstance(number, (int, float, np.integer, np.floating)):
        raise ConfigError(name, f"must be {word}, got {value!r}")
    return kind(number)


def _check_range(name: str, value, spec: Spec) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value}")
    if spec.low is not None and value < spec.low:
        raise ConfigError(name, f"must be >= {spec.low}, got {value}")
    if spec.above is not None and value <= spec.above:
        raise ConfigError(name, f"must be > {spec.above}, got {value}")
    if spec.high is not None and value > spec.high:
        raise ConfigError(name, f"must be <= {spec.high}, got {value}")


class Settings:
    """Mixin of a frozen dataclass of settings (fields made with :func:`setting`).

    Subclasses may override :meth:`defaults` (defaults that depend on the dataset or on
    other given settings) and :meth:`check` (constraints involving the experiment)."""

    def __post_init__(self):
        hints = type_hints(type(self))
        for f in dataclasses.fields(self):
            spec = f.metadata.get("spec")
            if spec is not None:
                value = coerce(spec.name or f.name, getattr(self, f.name), hints[f.name], spec)
                object.__setattr__(self, f.name, value)

    @classmethod
    def fields(cls) -> dict[str, dataclasses.Field]:
        """``{setting name: dataclass field}`` of every setting."""
        return {f.metadata["spec"].name or f.name: f for f in dataclasses.fields(cls) if "spec" in f.metadata}

    @classmethod
    def defaults(cls, given: Mapping[str, Any], dataset: str | None) -> dict:
        """Setting values (by name) that replace the field defaults; ``given`` wins over them."""
        del given, dataset
        return {}

    @classmethod
    def parse(cls, given: Mapping[str, Any] | None, owner: str, dataset: str | None = None):
        """The settings from ``{name: value}`` (None values count as unset) over
        :meth:`defaults`; ConfigError naming the setting and ``owner`` for an unknown name
        or a bad value."""
        if isinstance(given, cls):
            return given
        fields = cls.fields()
        given = {k: v for k, v in (given or {}).items() if v is not None}
        for name in given:
            if name not in fields:
                raise unknown_setting(name, owner, fields)
        values = {**cls.defaults(given, dataset), **given}
        try:
            return cls(**{fields[k].name: v for k, v in values.items()})
        except ConfigError as e:
            raise ConfigError(e.flag, f"{e.message} ({owner})") from None

    def check(self, experiment) -> None:
        """Raises ConfigError when the settings do not fit ``experiment`` (an ExperimentConfig)."""
        del experiment

    def as_dict(self) -> dict:
        """``{setting name: value}`` of every setting."""
        return {name: getattr(self, f.name) for name, f in self.fields().items()}


def unknown_setting(name: str, owner: str, known) -> ConfigError:
    """ConfigError for ``name``, not among the ``known`` settings of ``owner``."""
    if not known:
        return ConfigError(name, f"not a setting of {owner}, which takes none")
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    return ConfigError(name, f"not a setting of {owner}{hint} (it takes {', '.join(sorted(known))})")


@dataclasses.dataclass(frozen=True)
class NoSettings(Settings):
    """The settings of a plug-in that has none."""
