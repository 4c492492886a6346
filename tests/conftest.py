"""Shared test set-up: the `gpu` marker skips with the reason when no CUDA GPU is visible."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX beside CuPy/torch
# examples/fi_llama (the end-to-end example's modules) is imported by its tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def _gpu_skip_reason():
    try:
        import cupy
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CuPy raises various errors without a driver
        return f"no CUDA GPU visible ({type(e).__name__}: {e})"
    return None if n > 0 else "no CUDA GPU visible (device count 0)"


GPU_SKIP_REASON = _gpu_skip_reason()


def pytest_collection_modifyitems(config, items):
    if GPU_SKIP_REASON is None:
        return
    skip = pytest.mark.skip(reason=GPU_SKIP_REASON)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _isolated_kernel_cache(tmp_path_factory):
    """Tests that compile use a cache folder of their own unless FI_CUPY_CACHE_DIR is set."""
    if "FI_CUPY_CACHE_DIR" not in os.environ:
        os.environ["FI_CUPY_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel_cache"))
    yield


@pytest.fixture(autouse=True)
def _fresh_signatures():
    """Each test starts with no recorded calls (fi_cupy/_core/fastpath.py): a test that patches what a full
    call decides (a launch, a plan) must not meet a recording of an earlier test's call."""
    try:
        from fi_cupy._core import fastpath
    except ImportError:
        yield
        return
    fastpath.clear_all()
    yield
