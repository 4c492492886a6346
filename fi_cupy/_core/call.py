"""One public call's context, shared by the element-wise families (norm, activation, rope, page,
cascade): the caller's framework, device and stream; inputs described on that stream; outputs made
in the caller's framework; launches; results delivered and inputs kept alive.

    c = Call(input, stream)            # framework, device and stream of the first array
    x = c.arg(input, "input")          # ArrayInfo, ordered on c.stream
    obj, o = c.out(out, shape, dtype, "out")   # given `out=` (checked) or a new array
    c.launch(fn, grid, block, args)    # on c.stream; programmatic dependent launch where supported
    return c.result(obj)               # caller's framework, zero-copy

Immutable producers (JAX): `c.writable(x)` is False, and in-place functions return new arrays.

Ops wrapped in a fastpath.Signatures have their first call of each signature recorded here (the
arrays read, outputs made, launches, memsets) and later calls of it replayed without this class.
"""
from __future__ import annotations

import dataclasses

from . import arrays, checks, fastpath, kernels, streams
from .arrays import ArrayInfo
from .readback import HostCheck

IMMUTABLE = ("jax", "tensorflow")  # frameworks whose arrays must never be written


def device_of(x, name: str = "array") -> int:
    """The CUDA device of a call's first array. A host array is refused here, before the stream is
    resolved (a CUDA call that would fail first on a machine without a GPU)."""
    if isinstance(x, ArrayInfo):
        return x.device
    fw = type(x).__module__.split(".")[0]
    if fw == "torch" and hasattr(x, "device"):
        if x.device.type != "cuda":
            arrays.describe(x, name)  # raises, naming what the device is and, for host memory, what to do
        return x.device.index or 0
    if fw == "cupy" and hasattr(x, "device"):
        return x.device.id
    if hasattr(x, "__dlpack_device__"):
        dev_type, dev_id = x.__dlpack_device__()
        arrays.check_on_cuda(name, x, int(dev_type))
        return int(dev_id)
    raise TypeError(f"{name}: expected an array that supports DLPack (torch, JAX, CuPy, ...), got {type(x).__name__}")


class Call:
    __slots__ = ("framework", "device", "stream", "_current", "infos", "pdl", "rec")

    def __init__(self, first, stream=None, enable_pdl=None, name: str = "input"):
        self.framework = arrays.framework_of(first)
        self.device = device_of(first, name)
        self.stream = streams.resolve(stream, self.framework, self.device)
        # Arrays of the framework whose current stream we launch on need no extra ordering.
        self._current = self.framework if stream is None else None
        self.infos: list = []
        # Programmatic dependent launch: FlashInfer's enable_pdl; None = wherever the GPU has it.
        self.pdl = enable_pdl
        rec = fastpath.recorder()  # the signature call being recorded, if any
        self.rec = rec if rec is not None and rec.attach(self) else None

    def arg(self, x, name: str) -> ArrayInfo | None:
        """Describe an input (None passes through), on this call's device."""
        if x is None:
            return None
        info = arrays.describe(x, name, self.stream, self._current)
        if info.device != self.device:
            raise ValueError(f"{name}: is on cuda:{info.device} but the other arrays are on cuda:{self.device}")
        self.infos.append(info)
        if self.rec is not None:
            self.rec.arg(x, info)
        return info

    def rows(self, info: ArrayInfo, n: int) -> ArrayInfo:
        """The first n rows of `info` (an ArrayInfo view: no framework call, no copy)."""
        if info.shape[0] == n:
            return info
        view = dataclasses.replace(info, shape=(n,) + tuple(info.shape[1:]))
        self.infos.append(view)  # alive while the call is (the recorder keys sources by id)
        if self.rec is not None:
            self.rec.alias(view, info)
        return view

    def fixed(self, *infos) -> None:
        """Memory the op owns (a wrapper's scratch), whose addresses stay fixed while a recording of
        this call is kept (the op drops its recordings when it reallocates)."""
        if self.rec is not None:
            self.rec.fixed.update(id(i) for i in infos if i is not None)

    def new(self, shape, dtype, name: str = "out"):
        """(object, ArrayInfo) of a new array in the caller's framework."""
        obj = arrays.empty(self.framework, shape, dtype, self.device, self.stream)
        info = arrays.describe(obj, name, self.stream, self._current)
        self.infos.append(info)
        if self.rec is not None:
            self.rec.new(obj, info)
        return obj, info

    def zeros(self, shape, dtype, name: str = "out"):
        """new() filled with zero bytes on this call's stream."""
        from cupy.cuda import runtime
        obj, info = self.new(shape, dtype, name)
        if info.nbytes:
            runtime.memsetAsync(info.ptr, 0, info.nbytes, self.stream)
            if self.rec is not None:
                self.rec.memset(info, info.nbytes)
        return obj, info

    def copy_of(self, info: ArrayInfo, why: str):
        """(object, ArrayInfo) of a new array holding a copy of contiguous `info`, queued on this
        call's stream: the writable stand-in for an immutable (JAX) input. `why` ends the error
        raised for a non-contiguous one."""
        if not info.is_contiguous():
            raise ValueError(f"{info.name}: must be contiguous {why}")
        import cupy
        from cupy.cuda import runtime
        if self.rec is not None:
            self.rec.refuse("copies an immutable input")
        obj, new = self.new(info.shape, info.dtype, info.name)
        with cupy.cuda.Device(self.device):
            runtime.memcpyAsync(new.ptr, info.ptr, info.nbytes, runtime.memcpyDeviceToDevice, self.stream)
        return obj, new

    def out(self, given, shape, dtype, name: str = "out", layout: str = ""):
        """The output: `given` checked against shape and dtype, else a new array."""
        if given is None:
            return self.new(shape, dtype, name)
        info = self.arg(given, name)
        checks.shape(info, tuple(shape), layout)
        if info.dtype != dtype:
            raise TypeError(f"{name}: dtype {info.dtype} does not match the expected {dtype}")
        checks.no_overlap(info)
        self.writable(info, True)
        return given, info

    def writable(self, info: ArrayInfo, required: bool = False, instead: str = "") -> bool:
        """Whether the kernel may write into `info`. required=True raises for immutable arrays."""
        ok = info.framework not in IMMUTABLE
        if required and not ok:
            hint = f"; use {instead}, which returns new arrays" if instead else ""
            raise TypeError(f"{info.name}: {info.framework} arrays are immutable and cannot be written in place{hint}")
        return ok

    def host_check(self, fn, *infos) -> None:
        """fn(*host copies of contiguous `infos`), which raises on bad values: the arrays are read back
        together (one wait for the stream), before any launch that follows; skipped while the stream is
        being captured. A replay of this call repeats it."""
        check = HostCheck(fn, infos, self.device)
        if self.rec is not None:
            self.rec.host_check(check, infos)
        check.here([i.ptr for i in infos], self.stream)

    def launch(self, fn, grid, block, args, smem: int = 0, pdl: bool = True, cluster: int = 0) -> None:
        """pdl=False for kernels that do not call pdl_begin(); cluster: CTAs a cluster along x."""
        if pdl:
            pdl = kernels.pdl_supported(self.device) if self.pdl is None else bool(self.pdl)
        prepared = kernels.launch(fn, grid, block, args, self.stream, self.device, smem, pdl, cluster)
        if self.rec is not None:
            self.rec.launch(prepared, args)

    def result(self, *objs):
        """Deliver outputs in the caller's framework (one object, or a tuple), keeping inputs alive."""
        arrays.keep_alive(self.device, self.stream, self.infos)
        got = tuple(None if o is None else arrays.deliver(o, self.framework) for o in objs)
        if self.rec is not None:
            for o, g in zip(objs, got):
                self.rec.delivered(o, g)
        return got[0] if len(got) == 1 else got
