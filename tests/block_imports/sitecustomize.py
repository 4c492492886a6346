"""Put this folder first on PYTHONPATH to run Python as if some packages were not installed:
FI_CUPY_BLOCK_IMPORTS="torch,jax" (the default) makes `import torch` / `import jax` raise
ModuleNotFoundError (what pytest.importorskip skips on) and importlib.util.find_spec return None for them,
as on a machine with only fi_cupy's own install: a None entry in sys.modules does both. bench/gpu_suite.sh
uses it for the no-torch run of the test suite (issue 27: every kernel test runs with CuPy alone)."""
import os
import sys

for _name in os.environ.get("FI_CUPY_BLOCK_IMPORTS", "torch,jax").split(","):
    if _name:
        sys.modules[_name] = None
