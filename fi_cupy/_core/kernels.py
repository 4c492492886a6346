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
from .streams import cuda_runtime


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
    # (label, C++ text) pieces compiled after the family file: a custom attention variant's code
    # (fi_cupy/variant.py), which a template argument of the kernels names
    extra: tuple = ()

    def compile(self, arch: str) -> cc.Compiled:
        return cc.compile_program(self.filename, tuple(k.name_expr for k in self.kernels), arch,
                                  asserts=self.asserts, extra=self.extra)


def cpp_bool(b: bool) -> str:
    return "true" if b else "false"


# ---------------------------------------------------------------------------------------------
# Devices

_props: dict = {}


SMEM_EVERY_GPU = 99 * 1024  # dynamic shared memory a CTA may have on every sm_80+ GPU (sm_86 / sm_89: 99 KB)


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


class DevPtr(int):
    """A device-address kernel argument that knows where it points: `src`, the ArrayInfo it points
    into (at byte `off`), or None for an address known only as a number. A launch recorded for the
    per-signature fast path (call.Signatures) re-reads `src`'s pointer on the next call; an address
    with no src makes the recording unusable unless `stable` (it stays valid while the key holds:
    a plan's workspace, a module's scratch)."""
    src = None
    off = 0
    stable = False


NULL = DevPtr(0)


def ptr(x, off: int = 0, stable: bool = False) -> DevPtr:
    """Pointer argument from an ArrayInfo (plus `off` bytes), an int address, or None (nullptr).
    stable: an int address that does not change while the calling op's signature holds."""
    if x is None:
        return NULL
    if isinstance(x, int):
        if isinstance(x, DevPtr) and not off:
            return x
        p = DevPtr(x + off)
        if isinstance(x, DevPtr):
            p.src, p.off, p.stable = x.src, x.off + off, x.stable
        else:
            p.stable = stable
        return p
    p = DevPtr(x.ptr + off)
    p.src, p.off = x, off
    return p


i32, i64, u32, f32, f64 = np.int32, np.int64, np.uint32, np.float32, np.float64
# struct format of each argument type in its 8-byte slot
_SLOT = {DevPtr: "Q", np.uint64: "Q", np.int64: "q", np.int32: "i4x", np.uint32: "I4x", np.float32: "f4x", np.float64: "d"}
u64 = np.uint64


class StructArg(bytes):
    """A struct parameter's bytes (struct_arg); ptrs: the device addresses packed in it, which a recorded
    launch cannot re-read (call.Signatures refuses to record it)."""
    ptrs = ()


class FreshArg(StructArg):
    """A struct parameter drawn anew for every call (a random seed and offset): `redraw()` gives the bytes
    for the next call, which a recorded launch asks for at each replay."""
    redraw = None


def fresh_arg(redraw) -> FreshArg:
    """The struct parameter `redraw()` gives now, redrawn by each replay of a recorded call."""
    b = FreshArg(redraw())
    b.ptrs, b.redraw = b.ptrs, redraw
    return b


def struct_arg(fmt: str, *fields) -> StructArg:
    """A kernel parameter that is a C++ struct, packed with struct format `fmt` (little-endian, no
    padding added: order the fields so that each is naturally aligned, as the C++ struct is)."""
    b = StructArg(struct.pack("<" + fmt, *fields))
    b.ptrs = tuple(f for f in fields if isinstance(f, DevPtr) and f)
    return b


# cuLaunchKernelEx through ctypes: parameters packed into a per-thread buffer reused for each launch
# of the same signature (the driver copies them at launch), and launch attributes when asked for:
# programmatic dependent launch, thread-block cluster size. The launch function has no argtypes and takes
# c_void_p objects made once per Prepared and thread: ctypes then converts nothing per call.
_tls = threading.local()
_PDL_ATTR = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_CLUSTER_ATTR = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
_ATTR_BYTES = 72  # CUlaunchAttribute: id, pad, 64-byte value union
_NON_PORTABLE_CLUSTER = 14  # CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED
_CONFIG_FMT = "<7I4xQQI4x"  # CUlaunchConfig: grid, block, smem, stream, attrs, numAttrs
_CONFIG_BYTES = struct.calcsize(_CONFIG_FMT)  # 56
_CONFIG_STREAM_AT = struct.calcsize("<7I4x")  # the stream's offset in CUlaunchConfig
_STREAM = struct.Struct("<Q")
_libcuda: list = []


def _pack_cluster_attr(buf, at: int, cluster: int) -> None:
    """A CUlaunchAttribute at byte `at` of `buf`: clusters of `cluster` CTAs along x."""
    struct.pack_into("<i4x3I", buf, at, _CLUSTER_ATTR, cluster, 1, 1)


def _cuda():
    """(libcuda, cuLaunchKernelEx taking c_void_p objects only) loaded once."""
    if not _libcuda:
        lib = ctypes.CDLL("libcuda.so.1")
        f = lib["cuLaunchKernelEx"]  # its own function object: argtypes stay unset
        f.restype = ctypes.c_int
        lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        _libcuda.append((lib, f))
    return _libcuda[0]


def _buffers(sig: tuple):
    """(param buffer, kernelParams as a c_void_p, the packer of the buffer, the pointer array) for an
    argument signature, this thread."""
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
        got = cache[sig] = (buf, ctypes.c_void_p(ctypes.addressof(params)), struct.Struct(fmt).pack_into, params)
    return got


def pdl_supported(device: int) -> bool:
    """Programmatic dependent launch (griddepcontrol): compute capability 9.0 and later."""
    return device_props(device)["cc"] >= 90


def clusters_supported(device: int) -> bool:
    """Thread-block clusters and distributed shared memory: compute capability 9.0 and later."""
    return device_props(device)["cc"] >= 90


class Prepared:
    """One launch with everything fixed but the argument values and the stream: kernel, grid, block,
    shared memory, launch attributes, the argument signature. launch() keeps one per configuration; the
    per-signature fast path (call.Signatures) keeps it and replays it with new pointers."""
    __slots__ = ("fn", "fnptr", "sig", "head", "attr", "attr_addr", "n_attr", "device", "local")

    def __init__(self, fn: Function, grid, block, sig: tuple, device: int, smem: int = 0, pdl: bool = False,
                 cluster: int = 0):
        self.fn, self.fnptr, self.sig, self.device = fn, fn.ptr, sig, device
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        bx, by, bz = (tuple(block) + (1, 1))[:3]
        self.head = (gx, gy, gz, bx, by, bz, smem)
        n_attr = 0
        self.attr = ctypes.create_string_buffer(2 * _ATTR_BYTES)  # read by the driver at each launch
        if pdl:
            struct.pack_into("<i4xi", self.attr, 0, _PDL_ATTR, 1)
            n_attr = 1
        if cluster:
            _pack_cluster_attr(self.attr, n_attr * _ATTR_BYTES, cluster)
            n_attr += 1
            fn.allow_cluster(cluster)
        self.attr_addr = ctypes.addressof(self.attr) if n_attr else 0
        self.n_attr = n_attr
        self.local = threading.local()  # this thread's packed config (all but the stream fixed)
        fn.allow_smem(smem)

    def _thread_state(self) -> list:
        """[param buffer, its packer, kernelParams, config buffer, config as a c_void_p, the stream packed
        in it, the function as a c_void_p]."""
        buf, params, pack, _ = _buffers(self.sig)
        cbuf = ctypes.create_string_buffer(_CONFIG_BYTES)
        struct.pack_into(_CONFIG_FMT, cbuf, 0, *self.head, 0, self.attr_addr, self.n_attr)
        st = self.local.st = [buf, pack, params, cbuf, ctypes.c_void_p(ctypes.addressof(cbuf)), 0,
                              ctypes.c_void_p(self.fnptr)]
        return st

    def __call__(self, values, stream: int) -> None:
        """Launch with `values` (one per argument of sig: ints, floats, bytes) on `stream`."""
        if cuda_runtime().getDevice() != self.device:
            import cupy
            with cupy.cuda.Device(self.device):
                self.here(values, stream)
        else:
            self.here(values, stream)

    def here(self, values, stream: int) -> None:
        """__call__ where the caller knows that self.device is the current device (a replay checked it)."""
        try:
            st = self.local.st
        except AttributeError:
            st = self._thread_state()
        st[1](st[0], 0, *values)
        if stream != st[5]:
            _STREAM.pack_into(st[3], _CONFIG_STREAM_AT, stream)
            st[5] = stream
        err = (_libcuda[0] if _libcuda else _cuda())[1](st[4], st[6], st[2], None)
        if err:
            lib = _libcuda[0][0]
            msg = ctypes.c_char_p()
            lib.cuGetErrorString(err, ctypes.byref(msg))
            gx, gy, gz, bx, by, bz, smem = self.head
            raise RuntimeError(f"launch of {self.fn.name} failed: CUDA error {err} "
                               f"({(msg.value or b'unknown').decode()}), grid {(gx, gy, gz)}, block {(bx, by, bz)}, "
                               f"smem {smem}")


def signature_of(args) -> tuple:
    """The argument signature of a launch: each argument's numpy scalar type, DevPtr, or a struct's size."""
    return tuple([len(a) if isinstance(a, bytes) else a.__class__ for a in args])


def launch(fn: Function, grid, block, args, stream: int, device: int, smem: int = 0, pdl: bool = False,
           cluster: int = 0) -> Prepared:
    """Launch `fn` with `args` given as numpy scalars whose types match the kernel's parameters, DevPtr
    pointers (ptr()), or bytes from struct_arg for a struct parameter. pdl=True lets the kernel start
    while the previous one on the stream finishes: only for kernels that call pdl_begin() before
    touching memory. cluster > 0 groups that many consecutive CTAs along x into a cluster (sm_90+).
    Returns the Prepared launch (a recording keeps it)."""
    sig = signature_of(args)
    key = (fn, tuple(grid), tuple(block), sig, device, smem, pdl, cluster)
    p = _prepared.get(key)
    if p is None:  # a Prepared costs ~15 us of buffers and launch config: an eager call reuses its own
        if len(_prepared) >= _PREPARED_KEPT:  # grids that follow a batch size: bounded, not an LRU
            _prepared.clear()
        p = _prepared[key] = Prepared(fn, grid, block, sig, device, smem, pdl, cluster)
    p(args, stream)
    return p


_PREPARED_KEPT = 4096
_prepared: dict = {}  # launch()'s Prepared per (fn, grid, block, signature, device, smem, pdl, cluster)
