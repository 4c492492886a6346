"""Kernel variants described as data, their compiled functions (memoised per device), and launch.

A Program is one NVRTC compile: a family file and the kernel instantiations it provides. Family
modules build Programs from their template arguments; nothing else talks to NVRTC.
"""
from __future__ import annotations

import ctypes
import struct
import threading
from dataclasses import dataclass

import numpy as np

from . import compile as cc


@dataclass(frozen=True)
class KernelSpec:
    kernel: str       # e.g. "fic::batch_decode_kernel"
    targs: tuple      # template arguments as C++ text

    @property
    def name_expr(self) -> str:
        return f"{self.kernel}<{', '.join(str(a) for a in self.targs)}>" if self.targs else self.kernel


@dataclass(frozen=True)
class Program:
    filename: str           # family file in cuda_src/
    kernels: tuple          # KernelSpec, ...

    def compile(self, arch: str) -> cc.Compiled:
        return cc.compile_program(self.filename, tuple(k.name_expr for k in self.kernels), arch)


def cpp_bool(b: bool) -> str:
    return "true" if b else "false"


# ---------------------------------------------------------------------------------------------
# Devices

_props: dict = {}


def device_props(device: int) -> dict:
    if device not in _props:
        from cupy.cuda import runtime
        p = runtime.getDeviceProperties(device)
        _props[device] = {"cc": p["major"] * 10 + p["minor"], "sms": p["multiProcessorCount"],
                          "name": p["name"].decode() if isinstance(p["name"], bytes) else p["name"],
                          "smem_optin": p.get("sharedMemPerBlockOptin", 49152)}
    return _props[device]


def device_arch(device: int) -> str:
    return cc.target_arch(device_props(device)["cc"])


# ---------------------------------------------------------------------------------------------
# Loaded functions

_loaded: dict = {}
_load_lock = threading.Lock()


class Function:
    """A loaded kernel: its CUfunction handle and the module that owns it."""

    def __init__(self, module, name: str):
        self.module = module
        self.fn = module.get_function(name)
        self.ptr = int(self.fn.ptr)
        self.name = name
        self.smem_limit = 0  # dynamic shared memory checked so far

    def allow_smem(self, nbytes: int) -> None:
        """Opt in to `nbytes` of dynamic shared memory where static + dynamic exceeds 48 KB (once)."""
        if nbytes > self.smem_limit:
            from cupy_backends.cuda.api import driver
            static = driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, self.ptr)
            if static + nbytes > 48 * 1024:
                driver.funcSetAttribute(self.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
            self.smem_limit = nbytes

    def occupancy(self, block: int, smem: int) -> int:
        """Resident CTAs per SM for this block size and dynamic shared memory."""
        from cupy_backends.cuda.api import driver
        self.allow_smem(smem)
        return int(driver.occupancyMaxActiveBlocksPerMultiprocessor(self.ptr, block, smem))


def functions(program: Program, device: int) -> dict:
    """KernelSpec -> Function for `program` on `device` (compiled or read from the cache once)."""
    key = (program, device)
    got = _loaded.get(key)
    if got is not None:
        return got
    with _load_lock:
        got = _loaded.get(key)
        if got is None:
            import cupy
            compiled = program.compile(device_arch(device))
            with cupy.cuda.Device(device):
                mod = cupy.cuda.function.Module()
                mod.load(compiled.binary)
                got = {k: Function(mod, compiled.lowered[k.name_expr]) for k in program.kernels}
            _loaded[key] = got
    return got


# ---------------------------------------------------------------------------------------------
# Arguments and launch


def ptr(x) -> np.uint64:
    """Pointer argument from an ArrayInfo, an int address, or None (nullptr)."""
    if x is None:
        return np.uint64(0)
    return np.uint64(x if isinstance(x, int) else x.ptr)


i32, i64, u32, f32, f64 = np.int32, np.int64, np.uint32, np.float32, np.float64
# struct format of each argument type in its 8-byte slot
_SLOT = {np.uint64: "Q", np.int64: "q", np.int32: "i4x", np.uint32: "I4x", np.float32: "f4x", np.float64: "d"}


def struct_arg(fmt: str, *fields) -> bytes:
    """A kernel parameter that is a C++ struct, packed with struct format `fmt` (little-endian, no
    padding added: order the fields so that each is naturally aligned, as the C++ struct is)."""
    return struct.pack("<" + fmt, *fields)


def launch(fn: Function, grid, block, args, stream: int, device: int, smem: int = 0) -> None:
    """cuLaunchKernel with `args` given as numpy scalars whose types match the kernel's parameters
    (or bytes from struct_arg for a struct parameter).

    Each argument gets its own 8-byte-aligned slot in one buffer and kernelParams points at each slot.
    """
    from cupy_backends.cuda.api import driver
    from cupy.cuda import runtime
    n = len(args)
    try:
        parts = [a + bytes(-len(a) % 8) if isinstance(a, bytes) else struct.pack("<" + _SLOT[type(a)], a)
                 for a in args]
    except KeyError as e:
        raise TypeError(f"kernel argument of type {e} is not one of {list(_SLOT)} or bytes") from None
    buf = b"".join(parts)
    store = ctypes.create_string_buffer(buf, max(8, len(buf)))
    base = ctypes.addressof(store)
    offsets, at = [], 0
    for part in parts:
        offsets.append(base + at)
        at += len(part)
    params = (ctypes.c_void_p * max(1, n))(*offsets)
    fn.allow_smem(smem)
    gx, gy, gz = (tuple(grid) + (1, 1))[:3]
    bx, by, bz = (tuple(block) + (1, 1))[:3]
    if runtime.getDevice() != device:
        import cupy
        with cupy.cuda.Device(device):
            driver.launchKernel(fn.ptr, gx, gy, gz, bx, by, bz, smem, stream, ctypes.addressof(params), 0)
    else:
        driver.launchKernel(fn.ptr, gx, gy, gz, bx, by, bz, smem, stream, ctypes.addressof(params), 0)
