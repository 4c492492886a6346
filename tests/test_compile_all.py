"""NVRTC compiles every kernel instantiation for sm_80 and sm_90a with no GPU; the disk cache;
KernelCompileError. Decode kernels must not spill registers to local memory."""
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from fi_cupy import decode, probe
from fi_cupy._core import compile as cc
from fi_cupy._core.kernels import KernelSpec, Program

ARCHS = ("sm_80", "sm_90a")


def _compile_grid(arch):
    progs = decode.all_programs()
    # One NVRTC program per (head_dim, dtypes): the same instantiations, fewer header parses.
    groups = {}
    for p in progs:
        groups.setdefault(p.kernels[0].targs[0], []).extend(k.name_expr for k in p.kernels)
    jobs = [tuple(dict.fromkeys(v)) for v in groups.values()]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        return list(ex.map(lambda names: cc.compile_program("decode.cu", names, arch), jobs)), len(progs)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_decode_instantiation_compiles_without_spills(arch):
    results, n_programs = _compile_grid(arch)
    usage = {}
    for r in results:
        usage.update(cc.resource_usage(r.log))
    decode_kernels = {k: v for k, v in usage.items() if "batch_decode_kernel" in k or "batch_decode_tc_kernel" in k}
    assert len(decode_kernels) == n_programs  # every instantiation reported by ptxas
    spills = {k: v for k, v in usage.items() if v["spill_stores"] or v["spill_loads"]}
    assert not spills, f"kernels spilling to local memory on {arch}: {spills}"
    assert max(v["registers"] for v in usage.values()) <= 255


def test_wgmma_needs_sm90a():
    """The Hopper path: a wgmma instruction assembles for sm_90a and is rejected for plain sm_90."""
    c = probe.PROGRAM.compile("sm_90a")
    assert c.binary.startswith(b"\x7fELF") and "wgmma_probe_kernel" in next(iter(c.lowered.values()))
    with pytest.raises(cc.KernelCompileError, match="wgmma"):
        probe.PROGRAM.compile("sm_90")


def test_cache_hit_memo_and_corrupt_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("FI_CUPY_CACHE_DIR", str(tmp_path))
    prog = decode.decode_program(64, 1, decode.Q_DTYPES[0], decode.Q_DTYPES[0], False)
    first = prog.compile("sm_80")
    assert not first.from_cache and first.seconds > 0
    again = prog.compile("sm_80")
    assert again.from_cache and again.binary == first.binary and again.key == first.key
    entries = list(tmp_path.glob("*.bin"))
    assert len(entries) == 1 and not list(tmp_path.glob(".tmp-*"))
    assert cc.cache_stats()[0] == 1
    # A torn / corrupt entry is compiled again, not loaded.
    raw = entries[0].read_bytes()
    entries[0].write_bytes(raw[: len(raw) // 2])
    redo = prog.compile("sm_80")
    assert not redo.from_cache and redo.binary.startswith(b"\x7fELF") and redo.lowered == first.lowered
    assert prog.compile("sm_80").from_cache  # the rewritten entry is whole again
    # Another arch or option is another key.
    assert prog.compile("sm_90a").key != first.key


def test_compile_error_reports_kernel_options_and_source(tmp_path, monkeypatch):
    src = tmp_path / "cuda_src"
    (src / "common").mkdir(parents=True)
    (src / "decode.cu").write_text("// placeholder so the folder is recognised\n")
    (src / "broken.cu").write_text(
        "template <int N>\n__global__ void k(float* x) {\n  x[0] = N +* 1;\n}\n")
    monkeypatch.setattr(cc, "cuda_src_dir", lambda: src)
    monkeypatch.setenv("FI_CUPY_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(cc.KernelCompileError) as ei:
        Program("broken.cu", (KernelSpec("k", (3,)),)).compile("sm_80")
    msg = str(ei.value)
    assert "k<3>" in msg and "-arch=sm_80" in msg and "broken.cu" in msg
    assert ">    3 |   x[0] = N +* 1;" in msg  # numbered source line around the error


def test_inline_source_has_no_quoted_includes():
    text, files = cc.inline_source("decode.cu")
    assert '#include "' not in text and "common/types.cuh" in files
    assert "#include <cuda_fp16.h>" in text  # CUDA headers stay with -I


SMALL_OP_FAMILIES = ("norm", "activation", "rope", "page", "cascade", "sampling")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("family", SMALL_OP_FAMILIES)
def test_every_small_op_instantiation_compiles_without_spills(family, arch):
    import importlib
    progs = importlib.import_module(f"fi_cupy.{family}").all_programs()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        results = list(ex.map(lambda p: p.compile(arch), progs))
    usage = {}
    for r in results:
        usage.update(cc.resource_usage(r.log))
    assert len(usage) == sum(len(p.kernels) for p in progs)  # every instantiation reported by ptxas
    spills = {k: v for k, v in usage.items() if v["spill_stores"] or v["spill_loads"]}
    assert not spills, f"{family} kernels spilling to local memory on {arch}: {spills}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_prefill_instantiation_compiles_without_spills(arch):
    """Every prefill variant (head dim x tile x dtypes x paged/ragged x RoPE x soft cap / custom mask),
    one NVRTC program per (head dim, tile, q dtype) so headers are parsed once."""
    from fi_cupy import prefill
    groups = {}
    for p in prefill.all_programs():
        groups.setdefault(p.kernels[0].targs[:4], []).extend(k.name_expr for k in p.kernels)
    jobs = [tuple(dict.fromkeys(v)) for v in groups.values()]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        results = list(ex.map(lambda names: cc.compile_program("prefill.cu", names, arch), jobs))
    usage = {}
    for r in results:
        usage.update(cc.resource_usage(r.log))
    mains = {k: v for k, v in usage.items() if "prefill_kernel" in k}
    assert len(mains) == len(prefill.all_programs())
    spills = {k: v for k, v in usage.items() if v["spill_stores"] or v["spill_loads"]}
    assert not spills, f"prefill kernels spilling to local memory on {arch}: {spills}"


def test_every_hopper_prefill_instantiation_compiles_without_spills():
    """The wgmma prefill kernel (backend "fa3"): every variant for sm_90a, no spills."""
    from fi_cupy import prefill
    progs = prefill.sm90_programs()
    groups = {}
    for p in progs:
        groups.setdefault(p.kernels[0].targs[:2], []).extend(k.name_expr for k in p.kernels)
    jobs = [tuple(dict.fromkeys(v)) for v in groups.values()]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        results = list(ex.map(lambda names: cc.compile_program("prefill_sm90.cu", names, "sm_90a"), jobs))
    usage = {}
    for r in results:
        usage.update(cc.resource_usage(r.log))
    assert len(usage) == len(progs)
    spills = {k: v for k, v in usage.items() if v["spill_stores"] or v["spill_loads"]}
    assert not spills, f"Hopper prefill kernels spilling to local memory: {spills}"
