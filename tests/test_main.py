"""`python -m fi_cupy`: the report and self-check on a GPU, or its non-GPU parts and one line saying
there is no GPU (exit status 2); --help explains every option, an unknown command says so; precompile
fills the cache with a progress bar, GPU or not.
examples/llama_decode.py without a GPU: one line, exit status 2."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GPU_SKIP_REASON
from fi_cupy import __main__ as cli
from fi_cupy import decode, decode_schedule, prefill
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
    r = _run(["--help"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m fi_cupy [-h] [command [options]]"), \
        r.stdout + r.stderr
    for needle in ("environment report", "Exit status 2 when\nno GPU is visible", "precompile", "FI_CUPY_CACHE_DIR",
                   "FI_CUPY_CUDA_INCLUDE", "FI_CUPY_LOG"):
        assert needle in r.stdout, r.stdout
    r = _run(["precompile", "--help"], tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m fi_cupy precompile [-h] [--arch ARCH] [--all] "
                                                     "[-j N]"), r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    for needle in ("--arch ARCH the GPU target to compile for", "--all every supported head dim",
                   "-j N, --jobs N compile N kernel programs at a time"):
        assert needle in text, r.stdout


def test_every_option_is_explained():
    ap = cli.parser()
    subs = [a for a in ap._actions if a.__class__.__name__ == "_SubParsersAction"]
    parsers = [ap] + [p for s in subs for p in s.choices.values()]
    assert [p.prog.split()[-1] for p in parsers[1:]] == list(cli.COMMANDS)
    for p in parsers:
        for a in p._actions:
            assert a.help and a.help.strip(), f"{p.prog}: {a.option_strings or a.dest} has no help text"


@pytest.mark.parametrize("args, says", [
    (["bogus"], "python -m fi_cupy: error: unknown command 'bogus'; expected one of: precompile (or none, for the "
                "environment report)"),
    (["precompile", "-j", "0"], "error: argument -j/--jobs: expected a positive number of threads, got '0'"),
    (["precompile", "--arch", "90"], "error: argument --arch: expected an NVRTC target such as sm_80, sm_90a or "
                                     "compute_90, got '90'"),
])
def test_bad_command_line_says_what_is_wrong(tmp_path, args, says):
    r = _run(args, tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert r.stderr.startswith("usage: python -m fi_cupy") and r.stderr.strip().endswith(says), r.stderr


def test_console_script_names_itself(tmp_path):
    """pyproject's `fi_cupy` command (installed beside this Python) is the same command under its own name."""
    script = shutil.which("fi_cupy", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the fi_cupy command is not installed beside this Python (pip install . installs it)")
    r = _run([script, "--help"], tmp_path, module=False)  # a Python script: run with this interpreter
    assert r.returncode == 0 and r.stdout.startswith("usage: fi_cupy [-h] [command [options]]"), r.stdout + r.stderr
    r = _run([script, "bogus"], tmp_path, module=False)
    assert r.returncode == 2 and "fi_cupy: error: unknown command 'bogus'" in r.stderr, r.stderr


def test_precompile_one_arch(tmp_path, monkeypatch, capsys):
    """The command's path (arguments, jobs, progress bar, cache) on two programs in place of the standard
    set, which the exhaustive run below compiles for real, and decode plan()'s schedule kernel."""
    monkeypatch.setenv("FI_CUPY_CACHE_DIR", str(tmp_path))
    two = [decode.decode_program(64, 1, dt.float16, dt.float16, False),
           prefill.prefill_program(64, prefill.tile_shapes(64)[1], dt.float16, dt.float16, False, False, 0)]
    monkeypatch.setattr(decode, "all_programs", lambda head_dims: two[:1])
    monkeypatch.setattr(prefill, "standard_programs", lambda: two[1:])
    assert cli.main(["precompile", "--arch", "sm_80", "-j", "2"]) == 0
    out, err = capsys.readouterr()
    assert "3 kernel programs ready" in out and "precompile (sm_80)" in err  # tqdm writes to stderr
    assert len(list(tmp_path.glob("*.bin"))) == 3
    three = two + decode_schedule.all_programs()
    assert all(p.compile("sm_80").from_cache for p in three)  # what precompile wrote is what a call reads


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
