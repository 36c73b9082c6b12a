"""Hostile updates: whatever malicious clients send, the server keeps running and the global
model stays finite; FedREDefense flags every malformed row; a malformed update matrix from
an attack is a clear error naming the attack."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from fedredefense_jax import attacks, defenses, experiment, simulation
from fedredefense_jax.config import ExperimentConfig
from test_data import write_idx_dir

pytestmark = pytest.mark.slow  # builds and steps a federation per defense

KINDS = ("hostile_nan", "hostile_inf", "hostile_neg_inf", "hostile_huge", "hostile_zero", "hostile_copy")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fm")
    write_idx_dir(d, n_train=160, n_test=40)
    return str(d)


def _federation(data_dir, defense, tmp):
    caps = {"first_cap": 20, "later_cap": 20} if defense == "fedredefense" else {}
    cfg = ExperimentConfig(data_dir=data_dir, num_clients=4, num_malicious=2, defense=defense, batch_size=16,
                           output_dir=str(tmp), defense_config=caps)
    return experiment.build(cfg).federation


@pytest.mark.parametrize("defense", sorted(defenses.names()))
def test_every_hostile_kind_against_every_defense(defense, data_dir, tmp_path):
    fed = _federation(data_dir, defense, tmp_path)
    ctx = attacks.AttackContext(4, 2, fed.init_params, defense, {})
    for kind in KINDS:
        f = dataclasses.replace(fed, attack=attacks.make(kind, ctx))
        state = simulation.init_state(f)
        for _ in range(2):
            state, rec = simulation.step(f, state)
            assert rec["global_finite"], (defense, kind, rec["round"])
        assert np.isfinite(np.asarray(state.params)).all()
        if defense == "fedredefense" and kind != "hostile_copy":
            # malformed rows are flagged at their first participation and expelled
            assert state.expelled[2:].all() and not state.expelled[:2].any(), (kind, state.expelled)


@pytest.mark.parametrize("bad,expect", [
    (lambda u: u[:, :-1], "shape"),
    (lambda u: u[:1], "shape"),
    (lambda u: u.astype(jnp.int32), "dtype"),
    (lambda u: [1, 2, 3], "not an update matrix"),
])
def test_malformed_attack_output_is_a_clear_error(bad, expect, data_dir, tmp_path):
    fed = _federation(data_dir, "fedavg", tmp_path)
    evil = attacks.Attack("evil", lambda n, k: (), lambda state, inp: (bad(inp.updates), state))
    f = dataclasses.replace(fed, attack=evil)
    with pytest.raises(simulation.AttackOutputError, match=f"'evil'.*{expect}"):
        simulation.step(f, simulation.init_state(f))
