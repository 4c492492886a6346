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
    # (C++ constant expression, value) pairs: sizes the launch computes in Python (shared memory,
    # tiles), checked against the kernel's own constants by a static_assert in the same compile.
    asserts: tuple = ()

    def compile(self, arch: str) -> cc.Compiled:
        return cc.compile_program(self.filename, tuple(k.name_expr for k in self.kernels), arch,
                                  asserts=self.asserts)


def cpp_bool(b: bool) -> str:
    return "true" if b else "false"


# ---------------------------------------------------------------------------------------------
# Devices

_props: dict = {}


def device_props(device: int) -> dict:
    if device not in _props:
        from cupy.cuda import runtime
        from .streams import require_gpu
        require_gpu()  # no GPU: one clear error, not CuPy's driver message
        p = runtime.getDeviceProperties(device)
        _props[device] = {"cc": p["major"] * 10 + p["minor"], "sms": p["multiProcessorCount"],
                          "name": p["name"].decode() if isinstance(p["name"], bytes) else p["name"],
                          "smem_optin": p.get("sharedMemPerBlockOptin", 49152),
                          "smem_sm": p.get("sharedMemPerMultiprocessor", 0)}
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
        self.big_clusters = False
        self._clusters: dict = {}  # (cluster, block, smem) -> max_active_clusters

    def allow_smem(self, nbytes: int) -> None:
        """Opt in to `nbytes` of dynamic shared memory where static + dynamic exceeds 48 KB (once)."""
        if nbytes > self.smem_limit:
            from cupy_backends.cuda.api import driver
            static = driver.funcGetAttribute(driver.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, self.ptr)
            if static + nbytes > 48 * 1024:
                driver.funcSetAttribute(self.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)
            self.smem_limit = nbytes

    def allow_cluster(self, size: int) -> None:
        """Opt in to clusters above the portable size of 8 (once)."""
        if size > 8 and not self.big_clusters:
            from cupy_backends.cuda.api import driver
            driver.funcSetAttribute(self.ptr, _NON_PORTABLE_CLUSTER, 1)
            self.big_clusters = True

    def max_active_clusters(self, cluster: int, block: int, smem: int) -> int:
        """Clusters of `cluster` CTAs that the GPU holds at once (cuOccupancyMaxActiveClusters): what a
        persistent kernel launches. Memoised; at least 1."""
        key = (cluster, block, smem)
        memo = self._clusters
        if key not in memo:
            self.allow_smem(smem)
            self.allow_cluster(cluster)
            cfg = ctypes.create_string_buffer(_CONFIG_BYTES)
            attr = ctypes.create_string_buffer(_ATTR_BYTES)
            _pack_cluster_attr(attr, 0, cluster)
            struct.pack_into(_CONFIG_FMT, cfg, 0, cluster, 1, 1, block, 1, 1, smem, 0, ctypes.addressof(attr), 1)
            lib, _ = _cuda()
            n = ctypes.c_int(0)
            err = lib.cuOccupancyMaxActiveClusters(ctypes.byref(n), ctypes.c_void_p(self.ptr), cfg)
            if err:
                raise RuntimeError(f"cuOccupancyMaxActiveClusters({self.name}, cluster {cluster}): CUDA error {err}")
            memo[key] = max(1, n.value)
        return memo[key]

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


_by_key: dict = {}


def cached_function(device: int, key: tuple, build) -> Function:
    """The Function for `key` (a tuple of plain values naming one variant) on `device`; on a miss,
    build() gives (Program, KernelSpec). The per-call path of a family then costs one dict lookup."""
    fn = _by_key.get((device, key))
    if fn is None:
        prog, spec = build()
        fn = _by_key[(device, key)] = functions(prog, device)[spec]
    return fn


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
u64 = np.uint64


def struct_arg(fmt: str, *fields) -> bytes:
    """A kernel parameter that is a C++ struct, packed with struct format `fmt` (little-endian, no
    padding added: order the fields so that each is naturally aligned, as the C++ struct is)."""
    return struct.pack("<" + fmt, *fields)


# cuLaunchKernelEx through ctypes: parameters packed into a per-thread buffer reused for each launch
# of the same signature (the driver copies them at launch), and launch attributes when asked for:
# programmatic dependent launch, thread-block cluster size.
_tls = threading.local()
_PDL_ATTR = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_CLUSTER_ATTR = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
_ATTR_BYTES = 72  # CUlaunchAttribute: id, pad, 64-byte value union
_NON_PORTABLE_CLUSTER = 14  # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
_CONFIG_FMT = "<7I4xQQI4x"  # CUlaunchConfig: grid, block, smem, stream, attrs, numAttrs
_CONFIG_BYTES = struct.calcsize(_CONFIG_FMT)  # 56
_libcuda: list = []


def _pack_cluster_attr(buf, at: int, cluster: int) -> None:
    """A CUlaunchAttribute at byte `at` of `buf`: clusters of `cluster` CTAs along x."""
    struct.pack_into("<i4x3I", buf, at, _CLUSTER_ATTR, cluster, 1, 1)


def _cuda():
    if not _libcuda:
        lib = ctypes.CDLL("libcuda.so.1")
        f = lib.cuLaunchKernelEx
        f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        f.restype = ctypes.c_int
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        _libcuda.append((lib, f))
    return _libcuda[0]


def _buffers(sig: tuple):
    """(param buffer, kernelParams address, struct format) for an argument signature, this thread."""
    cache = _tls.__dict__.setdefault("params", {})
    got = cache.get(sig)
    if got is None:
        fmt, offsets, at = "<", [], 0
        for s in sig:
            offsets.append(at)
            if isinstance(s, int):  # a struct_arg of s bytes
                pad = -s % 8
                fmt += f"{s}s" + ("x" * pad)
                at += s + pad
            else:
                try:
                    fmt += _SLOT[s]
                except KeyError:
                    raise TypeError(f"kernel argument of type {s.__name__} is not one of {list(_SLOT)} or "
                                    f"bytes") from None
                at += 8
        buf = ctypes.create_string_buffer(max(8, at))
        base = ctypes.addressof(buf)
        params = (ctypes.c_void_p * max(1, len(sig)))(*[base + o for o in offsets])
        got = cache[sig] = (buf, ctypes.addressof(params), fmt, params)
    return got


def _config():
    cfg = _tls.__dict__.get("config")
    if cfg is None:
        buf = ctypes.create_string_buffer(_CONFIG_BYTES)
        attr = ctypes.create_string_buffer(2 * _ATTR_BYTES)
        cfg = _tls.config = (buf, ctypes.addressof(buf), attr, ctypes.addressof(attr))
    return cfg


def pdl_supported(device: int) -> bool:
    """Programmatic dependent launch (griddepcontrol): compute capability 9.0 and later."""
    return device_props(device)["cc"] >= 90


def clusters_supported(device: int) -> bool:
    """Thread-block clusters and distributed shared memory: compute capability 9.0 and later."""
    return device_props(device)["cc"] >= 90


def launch(fn: Function, grid, block, args, stream: int, device: int, smem: int = 0, pdl: bool = False,
           cluster: int = 0) -> None:
    """Launch `fn` with `args` given as numpy scalars whose types match the kernel's parameters (or
    bytes from struct_arg for a struct parameter). pdl=True lets the kernel start while the previous
    one on the stream finishes: only for kernels that call pdl_begin() before touching memory.
    cluster > 0 groups that many consecutive CTAs along x into a cluster (sm_90+)."""
    sig = tuple([a.__class__ if a.__class__ is not bytes else len(a) for a in args])
    buf, params, fmt, _ = _buffers(sig)
    struct.pack_into(fmt, buf, 0, *args)
    cbuf, cfg, abuf, attr = _config()
    gx, gy, gz = (tuple(grid) + (1, 1))[:3]
    bx, by, bz = (tuple(block) + (1, 1))[:3]
    n_attr = 0
    if pdl:
        struct.pack_into("<i4xi", abuf, 0, _PDL_ATTR, 1)
        n_attr = 1
    if cluster:
        _pack_cluster_attr(abuf, n_attr * _ATTR_BYTES, cluster)
        n_attr += 1
        fn.allow_cluster(cluster)
    struct.pack_into(_CONFIG_FMT, cbuf, 0, gx, gy, gz, bx, by, bz, smem, stream, attr if n_attr else 0, n_attr)
    fn.allow_smem(smem)
    lib, launch_ex = _cuda()
    from cupy.cuda import runtime
    if runtime.getDevice() != device:
        import cupy
        with cupy.cuda.Device(device):
            err = launch_ex(cfg, fn.ptr, params, None)
    else:
        err = launch_ex(cfg, fn.ptr, params, None)
    if err:
        msg = ctypes.c_char_p()
        lib.cuGetErrorString(err, ctypes.byref(msg))
        raise RuntimeError(f"launch of {fn.name} failed: CUDA error {err} "
                           f"({(msg.value or b'unknown').decode()}), grid {grid}, block {block}, smem {smem}")
