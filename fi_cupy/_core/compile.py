"""NVRTC compilation of the kernels in cuda_src/, with an on-disk cache that needs no GPU.

The source handed to NVRTC is the family file with our own headers inlined (so the cache key covers
every line we ship); the CUDA headers (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h) come from -I.
Cache key: sha256 of inlined source + name expressions + options + arch + NVRTC version + package
version. Entries are written atomically (temp file + rename) and carry a checksum; a corrupt entry
is compiled again. The folder is $FI_CUPY_CACHE_DIR, else $XDG_CACHE_HOME/fi_cupy, else
~/.cache/fi_cupy. Each compile is logged on the "fi_cupy" logger (FI_CUPY_LOG=1 prints it).
FI_CUPY_LINEINFO=1 adds -lineinfo (compute-sanitizer and ncu then name source lines; another cache key).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__

log = logging.getLogger("fi_cupy")
_MAGIC = b"FICUPY-CUBIN-1\n"
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_BASE_OPTIONS = ("-std=c++17", "-DNDEBUG", "-Xptxas=-v")


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel. The message has the kernel, its template arguments, the options,
    NVRTC's log and the numbered source lines around each error."""


class CudaEnvironmentError(RuntimeError):
    """NVRTC or the CUDA headers could not be found."""


# ---------------------------------------------------------------------------------------------
# Where things are


def cuda_src_dir() -> Path:
    """The kernel sources: inside the installed package (wheel), else beside it (source tree)."""
    pkg = Path(__file__).resolve().parent.parent
    for cand in (pkg / "cuda_src", pkg.parent / "cuda_src"):
        if (cand / "decode.cu").is_file():
            return cand
    raise CudaEnvironmentError(f"kernel sources not found in {pkg / 'cuda_src'} or {pkg.parent / 'cuda_src'}")


def _header_candidates() -> list[Path]:
    cands = []
    if os.environ.get("FI_CUPY_CUDA_INCLUDE"):
        cands.append(Path(os.environ["FI_CUPY_CUDA_INCLUDE"]))
    for sp in sys.path:  # pip wheels: nvidia-cuda-runtime (13.x: nvidia/cu13, 12.x: nvidia/cuda_runtime)
        if sp and os.path.isdir(os.path.join(sp, "nvidia")):
            cands += [Path(sp, "nvidia", "cu13", "include"), Path(sp, "nvidia", "cuda_runtime", "include")]
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var], "include"))
    cands += [Path("/usr/local/cuda/include"), Path("/usr/include")]
    return cands


_include_dir: list = []


def cuda_include_dir() -> Path:
    """Folder holding cuda_fp16.h / cuda_bf16.h / cuda_fp8.h."""
    if not _include_dir:
        cands = _header_candidates()
        for c in cands:
            if all((c / h).is_file() for h in ("cuda_fp16.h", "cuda_bf16.h", "cuda_fp8.h")):
                _include_dir.append(c)
                break
        else:
            raise CudaEnvironmentError(
                "CUDA headers (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h) not found; looked in: "
                + ", ".join(str(c) for c in cands)
                + ". Install fi_cupy[cuda13] (or [cuda12]), or set FI_CUPY_CUDA_INCLUDE.")
    return _include_dir[0]


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception as e:  # noqa: BLE001 - CuPy raises several types when libnvrtc is missing
        raise CudaEnvironmentError(
            f"NVRTC could not be loaded through CuPy ({e}). Install fi_cupy[cuda13] "
            "(nvidia-cuda-nvrtc) or fi_cupy[cuda12] (nvidia-cuda-nvrtc-cu12), or a CUDA toolkit.") from e


def nvrtc_version() -> tuple:
    return tuple(_nvrtc().getVersion())


MIN_CC = 80  # Ampere: cp.async, bf16 mma.sync


def target_arch(cc: int) -> str:
    """NVRTC -arch for compute capability cc (e.g. 90): the 'a' target on Hopper and later so
    wgmma/setmaxnreg are available; 'compute_XX' (PTX for the driver) if NVRTC is older than the GPU.
    Below 8.0 (Volta, Turing) there is nothing to run: the kernels need cp.async and bf16 mma."""
    if cc < MIN_CC:
        raise CudaEnvironmentError(f"this GPU has compute capability {cc // 10}.{cc % 10}; fi_cupy's kernels need "
                                   f"{MIN_CC // 10}.{MIN_CC % 10} or newer (Ampere, Ada, Hopper, Blackwell)")
    supported = tuple(_nvrtc().getSupportedArchs())
    if cc in supported:
        return f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    older = [a for a in supported if a <= cc and a // 10 == cc // 10] or [a for a in supported if a <= cc]
    if not older:
        raise CudaEnvironmentError(f"NVRTC {nvrtc_version()} supports none of compute capability {cc}")
    return f"compute_{max(older)}"


def cache_dir() -> Path:
    if os.environ.get("FI_CUPY_CACHE_DIR"):
        return Path(os.environ["FI_CUPY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base, "fi_cupy")


def cached_variants() -> dict:
    """Custom attention variants compiled into the cache: {(variant name, arch): programs}."""
    out: dict = {}
    d = cache_dir()
    for f in (d.glob("*.bin") if d.is_dir() else ()):
        try:
            with open(f, "rb") as fh:
                meta = json.loads(fh.readline()) if fh.readline() == _MAGIC else {}  # the JSON line after it
        except (OSError, ValueError):
            continue
        if "variant" in meta:
            key = (meta["variant"], meta.get("arch", "?"))
            out[key] = out.get(key, 0) + 1
    return out


def cache_stats() -> tuple:
    """(entries, bytes) of the kernel cache folder."""
    d = cache_dir()
    files = list(d.glob("*.bin")) if d.is_dir() else []
    return len(files), sum(f.stat().st_size for f in files)


# ---------------------------------------------------------------------------------------------
# Source


def inline_source(filename: str) -> tuple[str, dict]:
    """The family file with our quoted includes inlined once each, and #line directives so NVRTC's
    messages name the real file and line. Returns (source, {file name: its lines})."""
    root = cuda_src_dir()
    files: dict = {}

    def expand(rel: str, seen: set) -> str:
        path = (root / rel).resolve()
        if str(path) in seen:
            return ""
        seen.add(str(path))
        text = path.read_text()
        name = str(path.relative_to(root))
        files[name] = text.splitlines()
        out, last = [f'#line 1 "{name}"\n'], 0
        for m in _INCLUDE_RE.finditer(text):
            out.append(text[last:m.start()])
            inc = str(Path(rel).parent / m.group(1))
            out.append(expand(inc, seen))
            line = text.count("\n", 0, m.end()) + 1
            out.append(f'\n#line {line + 1} "{name}"\n')
            last = m.end() + 1 if m.end() < len(text) and text[m.end()] == "\n" else m.end()
        out.append(text[last:])
        return "".join(out)

    return expand(filename, set()), files


# ---------------------------------------------------------------------------------------------
# Compile


@dataclass
class Compiled:
    binary: bytes          # cubin, or PTX text when the arch is compute_XX
    lowered: dict          # name expression -> mangled name
    log: str               # NVRTC log (has ptxas -v resource usage)
    seconds: float         # compile time, 0 for a cache hit
    from_cache: bool
    key: str


def _error_context(log_text: str, files: dict, around: int = 3) -> str:
    out = []
    for m in re.finditer(r'^(.+?)\((\d+)\): (?:catastrophic )?error', log_text, re.M):
        name, line = m.group(1), int(m.group(2))
        lines = files.get(name) or files.get(os.path.basename(name))
        if not lines:
            continue
        out.append(f"--- {name}:{line}")
        for i in range(max(1, line - around), min(len(lines), line + around) + 1):
            out.append(f"{'>' if i == line else ' '}{i:5d} | {lines[i - 1]}")
    return "\n".join(out)


def _read_entry(path: Path):
    try:
        raw = path.read_bytes()
        if not raw.startswith(_MAGIC):
            return None
        head_end = raw.index(b"\n", len(_MAGIC))
        meta = json.loads(raw[len(_MAGIC):head_end])
        binary = raw[head_end + 1:]
        if hashlib.sha256(binary).hexdigest() != meta["sha256"]:
            return None
        return binary, meta
    except (OSError, ValueError, KeyError):
        return None


def _write_entry(path: Path, binary: bytes, meta: dict) -> None:
    meta = dict(meta, sha256=hashlib.sha256(binary).hexdigest())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".bin")
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + json.dumps(meta).encode() + b"\n" + binary)
        os.replace(tmp, path)  # atomic: readers see the old entry or the whole new one
    except OSError as e:
        log.warning("fi_cupy: could not write kernel cache entry %s: %s", path, e)


_compile_locks: dict = {}
_locks_guard = threading.Lock()


def static_asserts(asserts) -> str:
    """C++ static_asserts that each (constant expression, value) pair agrees: a size computed in
    Python is checked against the kernel's constant at compile time."""
    return "".join(f'\nstatic_assert(({e}) == {int(v)}, "fi_cupy: the Python side computes {int(v)} for {e}");'
                   for e, v in asserts)


def compile_program(filename: str, name_exprs: tuple, arch: str, options: tuple = (), asserts: tuple = (),
                    extra: tuple = ()) -> Compiled:
    """Compile cuda_src/<filename> for `arch`, instantiating `name_exprs`, with static_asserts for
    `asserts` ((expression, value) pairs, see static_asserts); cached on disk. extra: (label, text)
    pieces appended to the source (a custom variant's code), each numbered from its own line 1 under
    its label, so NVRTC's messages and the error context name the piece and its line."""
    source, files = inline_source(filename)
    for label, text in extra:
        source += f'\n#line 1 "{label}"\n{text}'
        files[label] = text.splitlines()
    source += static_asserts(asserts)
    opts = _BASE_OPTIONS + (f"-arch={arch}",) + tuple(options)
    if os.environ.get("FI_CUPY_LINEINFO", "") not in ("", "0"):
        opts += ("-lineinfo",)
    ver = nvrtc_version()
    key = hashlib.sha256(json.dumps([source, list(name_exprs), list(opts), arch, list(ver), __version__])
                         .encode()).hexdigest()[:40]
    path = cache_dir() / f"{key}.bin"
    with _locks_guard:
        lock = _compile_locks.setdefault(key, threading.Lock())
    with lock:
        hit = _read_entry(path)
        if hit is not None and _usage_complete(arch, hit[1]["lowered"], hit[1]["log"]):
            binary, meta = hit
            return Compiled(whole_elf(binary), meta["lowered"], meta["log"], 0.0, True, key)
        t0 = time.perf_counter()
        for attempt in range(5):
            binary, lowered, text = _nvrtc_compile(source, filename, name_exprs, opts, arch, files)
            # ptxas -v lines missing for a kernel: seen (rarely, on the H200 machine with NVRTC 13.0) while other
            # threads or processes compiled too, once three times in a row (14 pytest workers compiling). The log
            # is how spills are checked (and it is cached), so compile again, a little later each time.
            if _usage_complete(arch, lowered, text):
                break
            time.sleep(0.05 * (attempt + 1))
        dt = time.perf_counter() - t0
        meta = {"lowered": lowered, "log": text, "arch": arch, "file": filename}
        variants = [label[len("variant "):] for label, _ in extra if label.startswith("variant ")]
        if variants:
            meta["variant"] = variants[0]  # `python -m fi_cupy` lists the custom variants in the cache
        _write_entry(path, binary, meta)
        return Compiled(binary, lowered, text, dt, False, key)


def _usage_complete(arch: str, lowered: dict, log_text: str) -> bool:
    """Whether the log has ptxas -v's resource lines for every kernel (PTX has none). An entry whose log
    lacks some (written before compile_program retried such compiles) is compiled again, not trusted."""
    if arch.startswith("compute_"):
        return True
    usage = resource_usage(log_text)
    return all(m in usage for m in lowered.values())


def whole_elf(binary: bytes) -> bytes:
    """The cubin padded with NULs to the extent its ELF header declares: CuPy's getCUBIN returns one byte
    less than nvrtcGetCUBINSize (it drops the last, the high byte of the last program header's alignment,
    which is 0). The driver loads the short image, but tools that read the program headers (nvdisasm,
    cuobjdump) refuse it. Anything that is not a 64-bit ELF is returned as it is."""
    if len(binary) < 64 or binary[:5] != b"\x7fELF\x02":
        return binary
    phoff, shoff = struct.unpack_from("<QQ", binary, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", binary, 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    return binary + bytes(end - len(binary)) if end > len(binary) else binary


def _nvrtc_compile(source: str, filename: str, name_exprs, opts: tuple, arch: str, files: dict) -> tuple:
    """(binary, lowered names, log) of one NVRTC compile; KernelCompileError when NVRTC refuses."""
    nvrtc = _nvrtc()
    t0 = time.perf_counter()
    prog = nvrtc.createProgram(source, filename, [], [])
    try:
        for e in name_exprs:
            nvrtc.addNameExpression(prog, e)
        all_opts = list(opts) + [f"-I{cuda_include_dir()}"]
        try:
            nvrtc.compileProgram(prog, all_opts)
        except nvrtc.NVRTCError as e:
            text = nvrtc.getProgramLog(prog)
            raise KernelCompileError(
                f"NVRTC failed to compile {filename} ({e})\n"
                f"kernels: {', '.join(name_exprs)}\noptions: {' '.join(all_opts)}\n"
                f"log:\n{text}\n{_error_context(text, files)}") from None
        text = nvrtc.getProgramLog(prog)
        lowered = {e: nvrtc.getLoweredName(prog, e) for e in name_exprs}
        if arch.startswith("compute_"):
            binary = nvrtc.getPTX(prog)
            binary = binary.encode() if isinstance(binary, str) else binary
        else:
            binary = whole_elf(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)
    log.info("fi_cupy: compiled %s [%s] for %s in %.2f s", filename, "; ".join(name_exprs), arch,
             time.perf_counter() - t0)
    return binary, lowered, text


_RES_RE = re.compile(
    r"Compiling entry function '(?P<fn>[^']+)' for '(?P<arch>[^']+)'.*?"
    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads.*?"
    r"Used (?P<regs>\d+) registers", re.S)


def resource_usage(log_text: str) -> dict:
    """ptxas -v report per mangled kernel: registers, stack frame and spill bytes."""
    out = {}
    for m in _RES_RE.finditer(log_text):
        out[m.group("fn")] = {"registers": int(m.group("regs")), "stack": int(m.group("stack")),
                              "spill_stores": int(m.group("st")), "spill_loads": int(m.group("ld"))}
    return out


def _setup_logging() -> None:
    if os.environ.get("FI_CUPY_LOG", "") not in ("", "0") and not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)


_setup_logging()
