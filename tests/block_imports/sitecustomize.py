"""Put this folder first on PYTHONPATH to run Python as if some packages were not installed:
FI_CUPY_BLOCK_IMPORTS="torch,jax" (the default) makes `import torch` / `import jax` (and their submodules)
raise ImportError, as on a machine with only fi_cupy's own install. bench/gpu_suite.sh uses it for the
no-torch run of the test suite (issue 27: every kernel test runs with CuPy alone)."""
import os
import sys

_BLOCKED = tuple(n for n in os.environ.get("FI_CUPY_BLOCK_IMPORTS", "torch,jax").split(",") if n)


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named '{name}' (blocked by FI_CUPY_BLOCK_IMPORTS)")
        return None


sys.meta_path.insert(0, _Blocker())
