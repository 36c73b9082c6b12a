import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
jax.config.update("jax_platforms", "cpu")

SHARED_DATA = os.environ.get("FEDREDEFENSE_DATA")


@pytest.fixture(scope="session")
def shared_data():
    """Root of the shared datasets (env FEDREDEFENSE_DATA), or skip with the reason."""
    if not SHARED_DATA:
        pytest.skip("FEDREDEFENSE_DATA is not set: real-data tests need ../shared/data (.ci/run sets it)")
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"FEDREDEFENSE_DATA={SHARED_DATA} is not a directory")
    return SHARED_DATA
