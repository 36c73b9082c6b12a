"""The README's two set-up commands are the ones CI runs (.ci/run)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands(path, prefix):
    with open(os.path.join(ROOT, path)) as f:
        return [line.strip() for line in f if line.strip().startswith(prefix)]


def test_ci_runs_the_readmes_two_set_up_commands():
    readme = _commands("README.md", "python3 -m venv .venv")
    assert len(readme) == 2, readme
    assert _commands(os.path.join(".ci", "run"), "python3 -m venv .venv") == readme
    install_and_run, tests = readme
    assert re.search(r"experiments/run\.py .*--defense=fedredefense", install_and_run)
    assert "--attack=none" not in install_and_run and "--attack=" in install_and_run
    assert "pytest" in tests


def test_the_readmes_plugin_example_registers_and_runs():
    import jax
    import jax.numpy as jnp
    import numpy as np

    from fedredefense_jax import attacks, defenses

    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"```python\n(# my_plugins\.py\n.*?)# my_run\.py", text, re.S)
    assert block, "README: the my_plugins.py example"
    exec(compile(block.group(1), "README.md:my_plugins.py", "exec"), {})
    try:
        a = attacks.make("negate", attacks.AttackContext(3, 1, jnp.zeros(2), "fedavg", {"negate_factor": "2"}))
        u = jnp.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
        inp = attacks.AttackInput(jnp.zeros(2), u, jnp.array([False, False, True]), jnp.ones(3, bool),
                                  jnp.arange(3, dtype=jnp.int32), 1, jax.random.key(0))
        crafted, _ = a.apply(a.init(3, None), inp)
        np.testing.assert_array_equal(crafted, [[1.0, 0.0], [0.0, 1.0], [-6.0, -8.0]])
        ctx = defenses.DefenseContext(None, None, 3, 1, 10, (28, 28, 1), "fashion_mnist", jnp.zeros(2),
                                      {"max_norm": 2.0})
        d = defenses.make("norm_filter", ctx)
        out, _ = d.apply(d.init(3, None), defenses.DefenseInput(jnp.zeros(2), crafted, jnp.arange(3),
                                                               jnp.ones(3, bool), 1, jax.random.key(0)))
        assert out.flagged.tolist() == [False, False, True]
        np.testing.assert_allclose(out.aggregate, [0.5, 0.5])
    finally:
        attacks.unregister("negate")
        defenses.unregister("norm_filter")
