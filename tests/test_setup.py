"""Set-up errors say what to install and where they looked; compiles are logged with their duration."""
import os
import subprocess
import sys

import pytest

from fi_cupy._core import compile as cc


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))


def test_import_without_cupy_names_the_extra():
    r = _python("import sys; sys.modules['cupy'] = None\nimport fi_cupy")
    assert r.returncode != 0
    assert "fi_cupy[cuda13]" in r.stderr and "fi_cupy[cuda12]" in r.stderr


def test_missing_headers_say_where_they_looked(monkeypatch, tmp_path):
    monkeypatch.setattr(cc, "_header_candidates", lambda: [tmp_path / "nope", tmp_path / "neither"])
    monkeypatch.setattr(cc, "_include_dir", [])
    with pytest.raises(cc.CudaEnvironmentError, match="looked in: .*nope.*neither.*FI_CUPY_CUDA_INCLUDE"):
        cc.cuda_include_dir()


def test_compile_is_logged_with_duration(tmp_path):
    code = ("from fi_cupy import decode\nfrom fi_cupy._core import dtypes as dt\n"
            "decode.decode_program(64, 1, dt.float16, dt.float16, False).compile('sm_80')")
    r = _python(code, FI_CUPY_LOG="1", FI_CUPY_CACHE_DIR=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "fi_cupy: compiled decode.cu" in r.stderr and " s" in r.stderr and "sm_80" in r.stderr
