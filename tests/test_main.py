"""`python -m fi_cupy` works with or without a GPU; precompile fills the cache with a progress bar."""
import os
import subprocess
import sys


def _run(args, tmp_path):
    env = dict(os.environ, FI_CUPY_CACHE_DIR=str(tmp_path))
    return subprocess.run([sys.executable, "-m", "fi_cupy", *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)


def test_report_and_self_check(tmp_path):
    r = _run([], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for needle in ("fi_cupy", "CuPy", "NVRTC", "kernel cache:", "self-check:"):
        assert needle in r.stdout
    assert ("GPU execution skipped" in r.stdout) or ("max abs error" in r.stdout and "ok" in r.stdout)


def test_precompile_one_arch(tmp_path):
    r = _run(["precompile", "--arch", "sm_80"], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kernel programs ready" in r.stdout and "precompile (sm_80)" in r.stderr  # tqdm writes to stderr
    assert len(list(tmp_path.glob("*.bin"))) >= 100
