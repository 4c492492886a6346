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



def test_cubin_is_whole(tmp_path, monkeypatch):
    """The cubin reaches the end its ELF header declares (CuPy's getCUBIN returns one byte less), fresh
    from NVRTC and read back from the cache, so nvdisasm / cuobjdump accept it."""
    import struct
    from fi_cupy import norm
    monkeypatch.setattr(cc, "cache_dir", lambda: tmp_path)
    prog = norm.all_programs()[0]
    got = [prog.compile("sm_90a") for _ in range(2)]  # compiled, then read back
    assert [g.from_cache for g in got] == [False, True]
    for g in got:
        b = g.binary
        phoff, shoff = struct.unpack_from("<QQ", b, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", b, 0x36)
        assert len(b) >= max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    assert cc.whole_elf(b"PTX text") == b"PTX text"
