import os

import jax
import pytest

# Tests run on the CPU unless FEDREDEFENSE_TEST_PLATFORM names another JAX platform ("" = JAX's
# default, e.g. the GPU): experiments/gpu_check.sh runs the numerical tests on an accelerator.
_PLATFORM = os.environ.get("FEDREDEFENSE_TEST_PLATFORM", "cpu")
if _PLATFORM:
    jax.config.update("jax_platforms", _PLATFORM)

SHARED_DATA = os.environ.get("FEDREDEFENSE_DATA")


def pytest_collection_modifyitems(items):
    """Tests that read the real datasets are slow (``pytest -m "not slow"`` leaves them out)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_data():
    """Root of the shared datasets (env FEDREDEFENSE_DATA), or skip with the reason."""
    if not SHARED_DATA:
        pytest.skip("FEDREDEFENSE_DATA is not set: real-data tests need ../shared/data (.ci/run sets it)")
    if not os.path.isdir(SHARED_DATA):
        pytest.skip(f"FEDREDEFENSE_DATA={SHARED_DATA} is not a directory")
    return SHARED_DATA
