"""The README's Python examples run as written (on a GPU)."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_example(i, tmp_path):
    code = BLOCKS[i]
    for mod in ("torch", "jax"):
        if f"import {mod}" in code or f", {mod}" in code.split("\n")[0]:
            pytest.importorskip(mod)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false"))
    assert r.returncode == 0, r.stderr[-3000:]
