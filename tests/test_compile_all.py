"""NVRTC compiles the kernels for sm_80 and sm_90a with no GPU, without register spills and with every
size the Python side computes checked against the kernel (Program.asserts); the disk cache;
KernelCompileError.

By default a representative set compiles: per family and arch, hand-picked heavy variants plus enough
others that every kernel template sees each value of each of its template arguments. The exhaustive
sweep (every instantiation, about 10 minutes on 2 cores) runs with FI_CUPY_COMPILE_ALL=1, as in .ci/run.
"""
import importlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pytest

from fi_cupy import decode, prefill, probe
from fi_cupy._core import compile as cc
from fi_cupy._core import dtypes as dt
from fi_cupy._core.kernels import KernelSpec, Program

ARCHS = ("sm_80", "sm_90a")
COMPILE_ALL = os.environ.get("FI_CUPY_COMPILE_ALL", "") not in ("", "0")
COMPILE_ALL_REASON = ("the exhaustive compile sweep runs with FI_CUPY_COMPILE_ALL=1 (about 10 minutes on 2 cores; "
                      ".ci/run sets it); by default a representative set compiles")


# ---------------------------------------------------------------------------------------------
# Grouped compiles


def _threads() -> int:
    """Compile threads: the cores shared among pytest-xdist workers, but at least 2, so that a worker
    left alone with the longest test still keeps two cores busy."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(2, (os.cpu_count() or 2) // workers)


def compile_grouped(programs, arch: str, group) -> tuple:
    """Compile `programs` for `arch`, those with the same group(program) key (and file) as one NVRTC
    program, so headers are parsed once per group: their name expressions and asserts merged, the
    groups in parallel threads. Returns (ptxas resource usage per mangled name, name expr -> mangled,
    name expr -> its program's log, headed cached or compiled)."""
    groups: dict = {}
    for p in programs:
        names, asserts = groups.setdefault((p.filename, group(p)), ({}, {}))
        names.update(dict.fromkeys(k.name_expr for k in p.kernels))
        asserts.update(dict.fromkeys(p.asserts))
    jobs = sorted(((fn, tuple(n), tuple(a)) for (fn, _), (n, a) in groups.items()), key=lambda j: -len(j[1]))
    with ThreadPoolExecutor(max_workers=_threads()) as ex:  # largest groups first: a shorter tail
        results = list(ex.map(lambda j: cc.compile_program(j[0], j[1], arch, asserts=j[2]), jobs))
    usage, lowered, logs = {}, {}, {}
    for r in results:
        usage.update(cc.resource_usage(r.log))
        lowered.update(r.lowered)
        logs.update(dict.fromkeys(r.lowered, f"[{'cached' if r.from_cache else 'compiled'} {r.key}]\n{r.log}"))
    return usage, lowered, logs


def check_compiles_without_spills(programs, arch: str, group) -> None:
    usage, lowered, logs = compile_grouped(programs, arch, group)
    unreported = sorted(e for e, m in lowered.items() if m not in usage)
    assert not unreported, (f"ptxas reported no resource usage on {arch} for {unreported}; the log of the first:\n"
                            f"{logs[unreported[0]][-3000:] if unreported else ''}")
    spills = {k: v for k, v in usage.items() if v["spill_stores"] or v["spill_loads"]}
    assert not spills, f"kernels spilling to local memory on {arch}: {spills}"
    assert max(v["registers"] for v in usage.values()) <= 255


# ---------------------------------------------------------------------------------------------
# Families: every instantiation, how to group it, and the variants the default run always takes


def _features(p: Program) -> set:
    return {(k.kernel, i, str(a)) for k in p.kernels for i, a in enumerate(k.targs)} | {k.kernel for k in p.kernels}


def representatives(programs: list, picked: list) -> list:
    """`picked`, then the first programs that bring a kernel template or a value of one of its template
    arguments not yet seen: every template and every value compiles at least once, not their product."""
    out, seen = [], set()
    for p in list(picked) + list(programs):
        if p not in out and (p in picked or not _features(p) <= seen):
            out.append(p)
            seen |= _features(p)
    return out


def _decode_picked() -> list:
    f16, bf16, e4m3, e5m2 = dt.float16, dt.bfloat16, dt.float8_e4m3fn, dt.float8_e5m2
    return [decode.decode_program(128, 8, bf16, bf16, False),   # tensor cores, a full GQA block
            decode.decode_program(256, 1, f16, f16, False),     # tensor cores, group size 1, widest head
            decode.decode_program(128, 1, f16, e4m3, False),    # tensor cores, group size 1, fp8 converted
            decode.decode_program(128, 1, f16, e4m3, True),     # CUDA cores, group size 1, fp8 (issue 19's crash)
            decode.decode_program(128, 1, f16, f16, True),      # CUDA cores, group size 1, RoPE
            decode.decode_program(256, 8, bf16, e5m2, True),    # CUDA cores, fp8 + RoPE, widest: most registers
            decode.decode_program(256, 8, bf16, bf16, False, True),   # tensor cores, ALiBi, widest
            decode.decode_program(256, 8, bf16, e4m3, False, True)]   # tensor cores, fp8 + ALiBi, widest


def _prefill_picked() -> list:
    bf16, e4m3 = dt.bfloat16, dt.float8_e4m3fn
    out = []
    for d in (128, 256):
        large, small = prefill.tile_shapes(d)
        rope_large, rope_small = prefill.tile_shapes(d, rope=True)
        out += [prefill.prefill_program(d, large, bf16, bf16, True, False, 0),                     # paged
                prefill.prefill_program(d, rope_small, bf16, e4m3, True, True, prefill.SOFT_CAP | prefill.CUSTOM_MASK),
                prefill.prefill_program(d, rope_small, bf16, bf16, False, True, prefill.CUSTOM_MASK)]  # ragged
    out.append(prefill.prefill_program(256, prefill.tile_shapes(256, rope=True)[0], bf16, e4m3, True, True, 3))
    out.append(prefill.prefill_program(256, prefill.tile_shapes(256)[0], bf16, bf16, False, False,
                                       prefill.SOFT_CAP | prefill.CUSTOM_MASK))  # split stages, ragged, the most flags
    out.append(prefill.prefill_program(64, prefill.tile_shapes(64)[0], bf16, e4m3, True, False,
                                       prefill.ALIBI | prefill.CUSTOM_MASK))  # ALiBi, fp8, the large tile
    # 192 / 128 at 4 warps x 32 rows, paged: its K rows in 16 + 8 chunks (255 registers)
    out.append(prefill.prefill_program(192, prefill.tile_shapes(192, 128)[0], bf16, bf16, True, False, 0, 128))
    return out


def _hopper_picked() -> list:
    return [prefill.prefill_program(128, prefill.SM90_TILE, dt.bfloat16, dt.bfloat16, paged, False, flags)
            for paged, flags in ((True, 0), (False, prefill.SOFT_CAP | prefill.CUSTOM_MASK))]


@dataclass(frozen=True)
class Family:
    name: str
    programs: Callable    # () -> every instantiation the API can launch
    group: Callable       # Program -> key: programs with one key compile as one NVRTC program
    picked: Callable = list  # () -> programs the default run always compiles
    archs: tuple = ARCHS


def _small_op(name: str) -> Family:
    return Family(name, lambda: importlib.import_module(f"fi_cupy.{name}").all_programs(),
                  lambda p: p.kernels[0].targs[:1])  # by the first template argument (the dtype, mostly)


FAMILIES = (
    Family("decode", decode.all_programs, lambda p: p.kernels[0].targs[0], _decode_picked),  # by head dim
    Family("prefill", prefill.all_programs, lambda p: p.kernels[0].targs[:4], _prefill_picked),  # head dim, tile, q
    Family("prefill_sm90", prefill.sm90_programs, lambda p: p.kernels[0].targs[:2], _hopper_picked, ("sm_90a",)),
    *(_small_op(n) for n in ("norm", "activation", "rope", "page", "cascade", "sampling", "decode_schedule")),
)
CASES = [pytest.param(f, a, id=f"{f.name}-{a}") for f in FAMILIES for a in f.archs]


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name) for f in FAMILIES])
def test_representatives_reach_every_kernel_template(family):
    grid = family.programs()
    reps = representatives(grid, family.picked())
    assert set(family.picked()) <= set(grid)  # the hand-picked variants are real ones
    assert set().union(*map(_features, reps)) == set().union(*map(_features, grid))


@pytest.mark.parametrize("family, arch", CASES)
def test_representative_instantiations_compile_without_spills(family, arch):
    check_compiles_without_spills(representatives(family.programs(), family.picked()), arch, family.group)


@pytest.mark.skipif(not COMPILE_ALL, reason=COMPILE_ALL_REASON)
@pytest.mark.parametrize("family, arch", CASES)
def test_every_instantiation_compiles_without_spills(family, arch):
    check_compiles_without_spills(family.programs(), arch, family.group)


def test_grouped_compile_checks_every_programs_asserts(tmp_path, monkeypatch):
    """A group's asserts are the union of its programs': a wrong size in any one of them fails the compile."""
    monkeypatch.setenv("FI_CUPY_CACHE_DIR", str(tmp_path))
    good = decode.decode_program(64, 1, dt.float16, dt.float16, False)
    (expr, value), = good.asserts
    bad = Program(good.filename, good.kernels[:1], ((expr, value + 16),))
    with pytest.raises(cc.KernelCompileError, match="the Python side computes"):
        compile_grouped([good, bad], "sm_80", lambda p: 0)


# ---------------------------------------------------------------------------------------------
# The Hopper probe, the cache, compile errors


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
    # An entry whose log lacks a kernel's ptxas resource lines (older versions cached such logs) is not trusted:
    # the spill checks read that log.
    binary, meta = cc._read_entry(entries[0])
    cc._write_entry(entries[0], binary, dict(meta, log="ptxas info: nothing about the kernel"))
    healed = prog.compile("sm_80")
    assert not healed.from_cache and set(cc.resource_usage(healed.log)) >= set(healed.lowered.values())
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
