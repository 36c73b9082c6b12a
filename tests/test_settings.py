"""Typed settings: every attack's and defense's settings round-trip through the flags, the
key=value strings and config.json; an unknown name, a wrong type or an out-of-range value
stops at start with one line naming the setting and the plug-in."""

import dataclasses
import json

import pytest

from fedredefense_jax import attacks, cli, config, defenses, records
from fedredefense_jax.settings import ConfigError, Settings, base_type, setting, type_hints

PLUGINS = [("attack", n) for n in attacks.names()] + [("defense", n) for n in defenses.names()]
REGISTRY = {"attack": attacks, "defense": defenses}


def _other_value(name: str, field, hint):
    """A valid value of the setting that differs from its default."""
    spec, default = field.metadata["spec"], field.default
    kind, _ = base_type(hint)
    if spec.choices is not None:
        return next(c for c in spec.choices if c != default)
    if name == "trigger_pixels":
        return ((1, 2), (3, 4))
    if name == "redefense_inner_unroll":
        return 2
    if name == "redefense_reject_above":  # at least gamma (doubled to 1.2 here)
        return 1.5
    if kind is bool:
        return not default
    if kind is int:
        return (default or 1) + 1
    return 0.5 if default is None else default * 2


def _changed(kind: str, plugin: str) -> dict:
    cls = REGISTRY[kind].settings(plugin)
    hints = type_hints(cls)
    return {name: _other_value(name, f, hints[f.name]) for name, f in cls.fields().items()}


def _text(value) -> str:
    if isinstance(value, tuple):
        return ";".join(f"{r}:{c}" for r, c in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def _from_argv(*argv) -> config.ExperimentConfig:
    cli.FLAGS.unparse_flags()
    try:
        cli.parse_flags(["test", *argv])
        return cli.experiment_config()
    finally:
        cli.FLAGS.unparse_flags()


def _assert_settings(settings, want: dict):
    for name, value in want.items():
        assert getattr(settings, type(settings).fields()[name].name) == value, name


@pytest.mark.parametrize("kind,plugin", PLUGINS)
def test_settings_round_trip_flags_key_value_and_config_json(kind, plugin):
    want = _changed(kind, plugin)
    get = config.attack_settings if kind == "attack" else config.defense_settings
    flag_args = [f"--{n}={_text(v).replace(';', ',')}" for n, v in want.items()]
    by_flags = _from_argv(f"--{kind}={plugin}", *flag_args)
    by_strings = _from_argv(f"--{kind}={plugin}", f"--{kind}_config=" + ",".join(
        f"{n}={_text(v)}" for n, v in want.items()))
    for cfg in (by_flags, by_strings):
        config.validate(cfg)
        _assert_settings(get(cfg), want)
    recorded = json.loads(json.dumps(records.recorded_config(by_flags)))
    assert recorded == records.upgrade_config(recorded)
    again = dataclasses.replace(by_flags, **{f"{kind}_config": recorded[f"{kind}_config"]})
    _assert_settings(get(again), want)


@pytest.mark.parametrize("kind,plugin", PLUGINS)
def test_unknown_setting_is_refused_naming_it_and_the_plugin(kind, plugin):
    cfg = config.ExperimentConfig(**{kind: plugin, f"{kind}_config": {"gama": "0.01"}})
    with pytest.raises(ConfigError) as e:
        config.validate(cfg)
    assert e.value.flag == "gama" and f"{kind} {plugin}" in str(e.value)
    assert len(str(e.value).splitlines()) == 1


@pytest.mark.parametrize("given,message", [
    ({"gamma": "high"}, "--gamma: must be a number, got 'high' (defense fedredefense)"),
    ({"gamma": "0"}, "--gamma: must be > 0, got 0.0 (defense fedredefense)"),
    ({"first_cap": "2.5"}, "--first_cap: must be an integer, got '2.5' (defense fedredefense)"),
    ({"redefense_variant": "sometimes"}, "--redefense_variant: must be one of dynamic, continuous, intermittent"),
    ({"gama": "0.01"}, "--gama: not a setting of defense fedredefense; did you mean gamma?"),
    ({"flcert_groups": 3}, "--flcert_groups: not a setting of defense fedredefense (it is one of flcert)"),
])
def test_bad_values_name_the_setting_and_the_plugin(given, message):
    with pytest.raises(ConfigError) as e:
        config.validate(config.ExperimentConfig(defense="fedredefense", defense_config=given))
    assert str(e.value).startswith(message), str(e.value)


def test_table7_defaults_follow_the_dataset_and_given_values_win():
    cfg = config.ExperimentConfig(defense="fedredefense", dataset="cifar10", defense_config={"later_cap": "7"})
    s = config.defense_settings(cfg)
    assert (s.first_cap, s.later_cap, s.lr_images) == (500, 7, 0.1)
    fm = config.defense_settings(dataclasses.replace(cfg, dataset="fashion_mnist"))
    assert (fm.first_cap, fm.later_cap, fm.lr_images) == (800, 7, 0.5)


def test_old_config_json_names_are_read():
    old = {"attack": "mpaf", "defense": "flcert", "dataset": "fashion_mnist",
           "attack_config": {"scale": 5.0, "backdoor_training": "alternating", "delta_init": 2.0},
           "defense_config": {"groups": 4, "variant": "dynamic", "layout": "auto"}}
    new = records.upgrade_config(old)
    assert new["attack_config"] == {"attack_scale": 5.0}
    assert new["defense_config"] == {"flcert_groups": 4}
    with pytest.raises(ConfigError, match="--flcert_groups: recorded"):
        records.upgrade_config({**old, "defense_config": {"groups": 0}})


def test_a_plugin_registered_elsewhere_declares_settings_the_same_way():
    @dataclasses.dataclass(frozen=True)
    class FactorSettings(Settings):
        test_factor: float = setting(1.0, "Factor.", above=0)
        test_mode: str = setting("a", "Mode.", choices=("a", "b"))

    @attacks.register("test_with_settings", settings=FactorSettings)
    def make(ctx):
        return attacks.Attack("test_with_settings", lambda n, k: (), lambda s, inp: (inp.updates, s))

    try:
        cfg = _from_argv("--attack=test_with_settings", "--attack_config=test_factor=2.5,test_mode=b")
        assert config.attack_settings(cfg) == FactorSettings(2.5, "b")
        for bad, flag in (({"test_factr": "2"}, "test_factr"), ({"test_factor": "-1"}, "test_factor"),
                          ({"test_mode": "c"}, "test_mode")):
            with pytest.raises(ConfigError) as e:
                config.validate(dataclasses.replace(cfg, attack_config=bad))
            assert e.value.flag == flag and "attack test_with_settings" in str(e.value)
    finally:  # other tests (the generated flag reference) see the package's plug-ins only
        attacks.unregister("test_with_settings")
    assert "test_with_settings" not in attacks.names()


@pytest.mark.parametrize("argv,line", [
    (["--gama=0.5"], "error: --gama: unknown flag; did you mean --gamma?"),
    (["--gamma=-1"], "error: --gamma: must be > 0, got -1.0"),
    (["--lr=inf"], "error: --lr: must be a finite number, got inf"),
    (["--dataset=mnist"], "error: --dataset: value should be one of <cifar10|cinic10|fashion_mnist>"),
    (["--flcert_groups=0"], "error: --flcert_groups: 0 is not a positive integer"),
])
def test_flag_errors_are_one_line_with_exit_code_2(argv, line, capsys):
    cli.FLAGS.unparse_flags()
    try:
        with pytest.raises(SystemExit) as e:
            cli.parse_flags(["test", *argv])
    finally:
        cli.FLAGS.unparse_flags()
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_a_setting_given_twice_must_agree():
    assert config.defense_settings(_from_argv("--defense=fedredefense", "--gamma=0.5",
                                              "--defense_config=gamma=0.5")).gamma == 0.5
    with pytest.raises(ConfigError, match="--gamma: given twice"):
        _from_argv("--defense=fedredefense", "--gamma=0.5", "--defense_config=gamma=0.7")
