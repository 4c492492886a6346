"""`python -m fi_cupy`: the report and self-check on a GPU, or its non-GPU parts and one line saying
there is no GPU (exit status 2); --help; precompile fills the cache with a progress bar, GPU or not.
examples/llama_decode.py without a GPU: one line, exit status 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GPU_SKIP_REASON
from fi_cupy import __main__ as cli
from fi_cupy import decode, prefill
from fi_cupy._core import dtypes as dt

REPO = Path(__file__).resolve().parents[1]
COMPILE_ALL = os.environ.get("FI_CUPY_COMPILE_ALL", "") not in ("", "0")


def _run(args, tmp_path, module=True):
    # the subprocess imports the fi_cupy this process tests (installed or the source tree)
    path = os.pathsep.join(filter(None, [str(Path(cli.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, FI_CUPY_CACHE_DIR=str(tmp_path), PYTHONPATH=path)
    cmd = [sys.executable, "-m", "fi_cupy", *args] if module else [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)


def _assert_one_no_gpu_line(r, prefix):
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prefix}: no CUDA GPU visible (") and len(lines[0]) < 300, \
        r.stderr


def test_report_and_self_check(tmp_path):
    r = _run([], tmp_path)
    for needle in ("fi_cupy", "CuPy", "NVRTC", "kernel cache:", "self-check:"):
        assert needle in r.stdout
    if GPU_SKIP_REASON is None:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "max abs error" in r.stdout and "ok" in r.stdout
    else:  # the non-GPU parts ran (the self-check kernel compiled), then one line instead of a traceback
        assert "decode kernel compiled for sm_90a" in r.stdout
        _assert_one_no_gpu_line(r, "fi_cupy")


def test_help_needs_no_gpu(tmp_path):
    for args in (["--help"], ["precompile", "--help"]):
        r = _run(args, tmp_path)
        assert r.returncode == 0 and "usage: python -m fi_cupy" in r.stdout and "precompile" in r.stdout, \
            r.stdout + r.stderr
    r = _run(["no-such-command"], tmp_path)
    assert r.returncode == 2 and "invalid choice" in r.stderr and "Traceback" not in r.stderr


def test_precompile_one_arch(tmp_path, monkeypatch, capsys):
    """The command's path (arguments, jobs, progress bar, cache) on two programs in place of the standard
    set, which the exhaustive run below compiles for real."""
    monkeypatch.setenv("FI_CUPY_CACHE_DIR", str(tmp_path))
    two = [decode.decode_program(64, 1, dt.float16, dt.float16, False),
           prefill.prefill_program(64, prefill.tile_shapes(64)[1], dt.float16, dt.float16, False, False, 0)]
    monkeypatch.setattr(decode, "all_programs", lambda head_dims: two[:1])
    monkeypatch.setattr(prefill, "standard_programs", lambda: two[1:])
    assert cli.main(["precompile", "--arch", "sm_80", "-j", "2"]) == 0
    out, err = capsys.readouterr()
    assert "2 kernel programs ready" in out and "precompile (sm_80)" in err  # tqdm writes to stderr
    assert len(list(tmp_path.glob("*.bin"))) == 2
    assert all(p.compile("sm_80").from_cache for p in two)  # what precompile wrote is what a call reads


@pytest.mark.skipif(not COMPILE_ALL, reason="precompiling the standard kernels takes 100 s on 2 cores: "
                    "FI_CUPY_COMPILE_ALL=1 runs it (.ci/run sets it)")
def test_precompile_standard_kernels_one_arch(tmp_path):
    r = _run(["precompile", "--arch", "sm_80"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kernel programs ready" in r.stdout and "precompile (sm_80)" in r.stderr  # tqdm writes to stderr
    assert len(list(tmp_path.glob("*.bin"))) >= 100


def test_llama_example_without_gpu_says_so_in_one_line(tmp_path):
    example = str(REPO / "examples" / "llama_decode.py")
    r = _run([example, "--help"], tmp_path, module=False)
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout, r.stdout + r.stderr
    if GPU_SKIP_REASON is None:
        pytest.skip("a GPU is visible: the example would run (tests/test_llama_example.py covers it)")
    r = _run([example, "--random", "tiny", "--max-new-tokens", "1"], tmp_path, module=False)
    _assert_one_no_gpu_line(r, "llama_decode.py")
