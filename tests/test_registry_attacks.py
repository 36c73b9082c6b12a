import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedredefense_jax import attacks, defenses


def _input(updates, malicious, valid=None, glob=None):
    s = updates.shape[0]
    valid = np.ones(s, bool) if valid is None else valid
    glob = jnp.zeros(updates.shape[1]) if glob is None else glob
    return attacks.AttackInput(glob, jnp.asarray(updates), jnp.asarray(malicious), jnp.asarray(valid),
                               jnp.arange(s, dtype=jnp.int32), 1, jax.random.key(0))


def _ctx(init=None, **config):
    init = jnp.zeros(3) if init is None else init
    return attacks.AttackContext(4, 2, init, "fedavg", config)


def test_register_attack_from_outside_the_package():
    @attacks.register("test_negate_and_scale")
    def make(ctx):
        def apply(state, inp):
            return attacks.replace_malicious(inp, -5.0 * inp.updates), state
        return attacks.Attack("test_negate_and_scale", lambda num_clients, key: (), apply)

    try:
        assert "test_negate_and_scale" in attacks.names()
        a = attacks.make("test_negate_and_scale", _ctx())
        u = np.arange(12, dtype=np.float32).reshape(4, 3)
        out, _ = a.apply(a.init(4, None), _input(u, np.array([False, False, True, True])))
        np.testing.assert_array_equal(out[:2], u[:2])
        np.testing.assert_array_equal(out[2:], -5 * u[2:])
        with pytest.raises(ValueError, match="already registered"):
            attacks.register("test_negate_and_scale")(make)
    finally:
        attacks.unregister("test_negate_and_scale")
    assert "test_negate_and_scale" not in attacks.names()
    with pytest.raises(KeyError):
        attacks.unregister("test_negate_and_scale")


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match="registered: .*mpaf"):
        attacks.make("nope", _ctx())
    with pytest.raises(ValueError, match="registered: .*fedavg"):
        defenses.make("nope", None)


def test_mpaf_points_at_the_initial_model():
    init = jnp.array([1.0, 2.0, 3.0])
    glob = jnp.array([0.0, 1.0, 5.0])
    a = attacks.make("mpaf", _ctx(init))
    u = np.ones((4, 3), np.float32)
    out, _ = a.apply((), _input(u, np.array([False, True, False, True]), glob=glob))
    np.testing.assert_allclose(out[1], 3 * (init - glob))
    np.testing.assert_allclose(out[3], 3 * (init - glob))
    np.testing.assert_array_equal(out[0], u[0])


def test_sign_flip_and_padding_slots_untouched():
    a = attacks.make("sign_flip", _ctx())
    u = np.arange(12, dtype=np.float32).reshape(4, 3) + 1
    out, _ = a.apply((), _input(u, np.array([True, True, False, True]), valid=np.array([True, True, True, False])))
    np.testing.assert_array_equal(out[:2], -u[:2])
    np.testing.assert_array_equal(out[2:], u[2:])


def test_fedavg_ignores_padding_and_nonfinite_rows():
    d = defenses.make("fedavg", None)
    u = jnp.array([[1.0, 2.0], [3.0, 4.0], [jnp.nan, 0.0], [100.0, 100.0]])
    inp = defenses.DefenseInput(jnp.zeros(2), u, jnp.arange(4), jnp.array([True, True, True, False]), 1,
                                jax.random.key(0))
    out, _ = d.apply(d.init(4, None), inp)
    np.testing.assert_allclose(out.aggregate, [2.0, 3.0])
    assert out.weights.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert bool(out.info["nonfinite"][2]) and not bool(out.flagged.any())
