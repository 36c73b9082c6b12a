"""The code passes ``ruff check`` with pyproject.toml's configuration (where ruff is installed:
requirements.txt and the ``test`` extra pin it)."""

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_ruff_check_is_clean():
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -r requirements.txt)")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", ROOT], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
