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
