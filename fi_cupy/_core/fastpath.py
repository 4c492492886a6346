"""The per-signature fast path of the one call path (call.Call).

An op's call is decided by its signature: the type, shape, strides, dtype, device and 16-byte alignment
of each array argument, and the values of the other arguments. The first call of a signature runs the op
in full (checks, kernel lookup, grid, argument packing) while a Recorder watches its Call: the arrays it
reads, the outputs it makes, the launches and memsets it queues, what it returns. A later call of the
same signature replays that: it reads the new pointers and the caller's current stream, makes the
outputs, patches the pointer arguments and launches. Every check that passed depends only on the
signature, so none is skipped that could fail; what the checks read beyond it (index ranges on the
host, the contents of any array) would make a signature unfit, and the ops that do such reads are not
wrapped.

    _SIGS = Signatures()
    def op(x, w, eps=1e-6, out=None, stream=None):
        return _SIGS((x, w, out), (eps,), stream, lambda: _op(x, w, eps, out, stream))

Torch tensors, CuPy arrays and JAX arrays on the caller's current stream (stream=None) take the fast
path. Torch and CuPy memory is ordered with that stream: nothing is held alive or synchronised. A JAX
array is exported through DLPack with our stream (which waits for JAX's producer) and its capsule held
until the launch completes (JAX's allocator does not follow our stream); JAX outputs are imported with
the per-device lookups of jax.dlpack.from_dlpack done once (arrays.to_jax). Anything else, or a
recording that saw something it cannot replay (a pointer that does not come from a signature array, a
second Call, an op inside the op, a copy of an immutable input), runs the full path every time.
"""
from __future__ import annotations

import threading
import weakref

from . import arrays, streams
from .kernels import DevPtr, FreshArg

MISS = object()
TORCH, CUPY, JAX = 1, 2, 3
_tls = threading.local()
_kinds: dict = {}  # array type -> TORCH, CUPY, JAX or 0 (no fast path)


def _kind_of(t) -> int:
    mod = t.__module__.split(".")[0]
    name = t.__name__
    kind = (TORCH if mod == "torch" and hasattr(t, "data_ptr") else
            CUPY if mod == "cupy" and name == "ndarray" else
            JAX if mod in ("jaxlib", "jax") and name == "ArrayImpl" else 0)
    _kinds[t] = kind
    return kind


def key_of(arrays_, scalars):
    """(key, kind, device, pointers, held) of a call whose arrays are all torch tensors, all CuPy arrays or
    all JAX arrays (None entries allowed), else None. The key holds each array's shape, strides, dtype,
    device and pointer modulo 16 (vector widths follow alignment), and `scalars`. held is None, or for
    JAX arrays (the launch stream, the arrays' DLPack capsules): each array is exported ordered on the
    current device's CuPy stream, where JAX callers launch, and its capsule holds the memory until the
    launch completes (arrays.hold)."""
    parts = [scalars]
    ptrs = []
    kind = 0
    device = -1
    held = None
    for a in arrays_:
        if a is None:
            parts.append(None)
            ptrs.append(0)
            continue
        t = type(a)
        k = _kinds.get(t)
        if k is None:
            k = _kind_of(t)
        if not k or (kind and k != kind):
            return None
        kind = k
        if k == TORCH:
            p = a.data_ptr()
            d = a.get_device()
            parts.append((a.shape, a.stride(), a.dtype, d, p & 15))
        elif k == CUPY:
            mem = a.data  # one MemoryPointer: its address and device id (a.device builds a Device object)
            p = mem.ptr
            d = mem.device_id
            parts.append((a.shape, a.strides, a.dtype, d, p & 15))
        else:
            if held is None:
                if not streams.gpu_seen():  # before any CUDA call: the full path says what is missing
                    return None
                held = (streams.cupy_current_here(), [])
            try:
                cap = a.__dlpack__(stream=arrays.dlpack_stream_arg(held[0]))
            except Exception:  # noqa: BLE001 - a host array, or no export (a float8 JAX cannot export)
                return None
            shape = a.shape
            p, d, strides = arrays.capsule_head(cap, len(shape))
            if d < 0:
                return None
            held[1].append(cap)
            parts.append((shape, strides, a.dtype, d, p & 15))
        if device < 0:
            device = d
        ptrs.append(p)
    if not kind or device < 0:
        return None
    parts.append(kind)
    return tuple(parts), kind, device, ptrs, held


def split(*values) -> tuple:
    """(arrays, scalars) of arguments that are either a device array or a number: each value goes to one
    side, None to the other (a per-row parameter given as an array is part of the signature's arrays)."""
    arrays_ = tuple(v if hasattr(v, "__dlpack__") else None for v in values)
    return arrays_, tuple(None if a is not None else v for a, v in zip(arrays_, values))


def plain(values) -> bool:
    """Whether no value is an array: a scalar argument given as a device array (a 0-d tensor as k_scale)
    is read by the full path, so a call holding one is never keyed by it."""
    return not any(hasattr(v, "__dlpack__") for v in values)


class Recorder:
    """Watches one Call of a signature's first call and turns it into a Recipe (None when unfit)."""

    def __init__(self, arrays_, kind: int):
        self.arrays, self.kind = arrays_, kind
        self.call = None
        self.why = ""        # why the call cannot be replayed ("" while it can)
        self.sources = {}    # id(ArrayInfo) -> index in arrays (>= 0) or -1 - index of a new output
        self.news = []       # (shape, dtype, object) of each new output
        self.steps = []      # (Prepared, values, slots, fresh) launches; (None, source, nbytes, ()) memsets
        self.results = None  # (single, specs): what the op returns, each array by source
        self.delivered_as = {}  # id(delivered output) -> -1 - index of the new output
        self.fixed = set()      # id(ArrayInfo) of memory the op owns, at an address fixed while the recipe lives

    def refuse(self, why: str) -> None:
        self.why = self.why or why

    def attach(self, call) -> bool:
        if self.call is None:
            self.call = call
            return True
        self.refuse("a second Call")
        return False

    def arg(self, x, info) -> None:
        for k, a in enumerate(self.arrays):
            if a is x:
                self.sources[id(info)] = k
                return
        self.refuse(f"{info.name}: not an array of the signature")

    def alias(self, view, of) -> None:
        """`view` starts where `of` does (its leading rows): it follows of's source."""
        if id(of) in self.sources:
            self.sources[id(view)] = self.sources[id(of)]
        elif id(of) in self.fixed:
            self.fixed.add(id(view))

    def new(self, obj, info) -> None:
        self.sources[id(info)] = -1 - len(self.news)
        self.news.append((info.shape, info.dtype, obj))

    def launch(self, prepared, args) -> None:
        if prepared is None:  # a launch that did not go through kernels.launch (a test's stand-in)
            self.refuse("a launch without a Prepared")
        values, slots, fresh = [], [], []
        for i, a in enumerate(args):
            if isinstance(a, FreshArg):
                fresh.append((i, a.redraw))
            if isinstance(a, DevPtr):
                src = self.sources.get(id(a.src)) if a.src is not None else None
                if src is not None:
                    slots.append((i, src, a.off))
                elif a and not a.stable and id(a.src) not in self.fixed:
                    self.refuse(f"argument {i}: an address outside the signature's arrays")
                values.append(int(a))
            elif isinstance(a, bytes):
                if getattr(a, "ptrs", ()):
                    self.refuse(f"argument {i}: a struct holding addresses")
                values.append(bytes(a))
            else:
                values.append(a.item())
        self.steps.append((prepared, values, tuple(slots), tuple(fresh)))

    def host_check(self, check, infos) -> None:
        """A workspace.HostCheck of signature arrays `infos`: replayed like a launch whose arguments are
        their addresses."""
        slots = []
        for i, info in enumerate(infos):
            src = self.sources.get(id(info))
            if src is None:
                self.refuse(f"{info.name}: a host check of an array outside the signature")
            slots.append((i, src, 0))
        self.steps.append((check, [0] * len(infos), tuple(slots), ()))

    def memset(self, info, nbytes: int) -> None:
        src = self.sources.get(id(info))
        if src is None:
            self.refuse(f"{info.name}: memset of an array outside the signature")
        self.steps.append((None, src, nbytes, ()))

    def delivered(self, obj, got) -> None:
        """Call.result delivered new output `obj` to the caller as `got`."""
        for j, n in enumerate(self.news):
            if n[2] is obj:
                self.delivered_as[id(got)] = -1 - j

    def returned(self, value) -> None:
        """The op returned `value`: None, an array, or a tuple of arrays and None."""
        single = not isinstance(value, tuple)
        specs = []
        for o in ((value,) if single else value):
            k = None if o is None else next((k for k, a in enumerate(self.arrays) if a is o),
                                            self.delivered_as.get(id(o)))
            if o is not None and k is None:
                self.refuse("returns something other than its arrays and outputs")
            specs.append(k)
        self.results = (single, tuple(specs))

    def recipe(self):
        if self.why or self.call is None or self.results is None:
            return None
        c = self.call
        return Recipe(self.kind, c.device, c.framework, tuple((s, d) for s, d, _ in self.news), tuple(self.steps),
                      self.results, self.arrays)


class Recipe:
    """A recorded call: outputs to make, launches and memsets with their pointer slots, what to return.
    What a replay looks up is resolved here once: the device query, the framework's current-stream query,
    each output's maker, and the value returned when it is one of the caller's arrays."""
    __slots__ = ("kind", "device", "framework", "news", "steps", "results", "get_device", "current", "returns")

    def __init__(self, kind, device, framework, news, steps, results, arrays_=()):
        """arrays_: the recorded call's arrays (a torch output is made like one of them where it can be)."""
        self.kind, self.device, self.framework = kind, device, framework
        self.news = tuple(_maker(framework, shape, dtype, device, arrays_) for shape, dtype in news)
        self.steps, self.results = steps, results
        self.get_device = streams.cuda_runtime().getDevice
        self.current = streams.current_query(framework, device)  # None for JAX: key_of gives its stream
        single, specs = results
        # a single result that is one of the caller's arrays (out=, an in-place op): its index
        self.returns = specs[0] if single and specs[0] is not None and specs[0] >= 0 else None

    def replay(self, caller_arrays, ptrs, held=None):
        """The op's return value for a call with these arrays, their pointers and key_of's `held` (MISS:
        run it in full)."""
        dev = self.device
        if self.get_device() != dev:  # the full path switches devices; rare enough to leave to it
            return MISS
        stream = self.current() if held is None else held[0]
        outs = []
        for make, address in self.news:
            o = make(caller_arrays, stream)
            outs.append(o)
            ptrs.append(address(o))
        n_in = len(ptrs) - len(outs)
        for prepared, values, slots, fresh in self.steps:
            if prepared is None:  # memset of (source, nbytes)
                streams.cuda_runtime().memsetAsync(ptrs[values if values >= 0 else n_in - 1 - values], 0, slots,
                                                   stream)
                continue
            if slots or fresh:
                values = values.copy()
                for i, src, off in slots:
                    values[i] = ptrs[src if src >= 0 else n_in - 1 - src] + off
                for i, redraw in fresh:
                    values[i] = bytes(redraw())
            prepared.here(values, stream)
        if held is not None:
            arrays.hold(dev, stream, held[1])
        if self.returns is not None:
            return caller_arrays[self.returns]
        single, specs = self.results
        got = tuple(None if k is None else caller_arrays[k] if k >= 0 else
                    arrays.deliver(outs[-1 - k], self.framework) for k in specs)
        return got[0] if single else got


_all = weakref.WeakSet()  # every Signatures, for clear_all


def clear_all() -> None:
    """Forget every recorded call (tests that patch what a full call decides start from here)."""
    for sigs in list(_all):
        sigs.clear()


def _maker(framework: str, shape, dtype, device: int, arrays_=()) -> tuple:
    """(make(caller's arrays, stream) -> a new output like arrays.empty's, its address) with the framework's
    arguments resolved once: a replay then costs the allocation alone. A torch output is made like a
    signature array of its dtype: torch.empty_like of a contiguous one of its shape, else new_empty (about
    half of torch.empty's argument parsing); the key fixes those arrays' shape, strides, dtype and device."""
    shape = tuple(int(n) for n in shape)
    if framework == "torch":
        import torch
        tdt = getattr(torch, dtype.name)
        like = None
        plain = (torch.Tensor, torch.nn.Parameter)  # a subclass's empty_like may return the subclass
        for k, a in enumerate(arrays_):
            if type(a) in plain and a.dtype == tdt and a.get_device() == device:
                if tuple(a.shape) == shape and a.is_contiguous():
                    empty_like = torch.empty_like
                    return (lambda arrs, stream: empty_like(arrs[k])), _torch_address
                like = k if like is None else like
        if like is not None:
            return (lambda arrs, stream: arrs[like].new_empty(shape)), _torch_address
        tdev = torch.device("cuda", device)
        return (lambda arrs, stream: torch.empty(shape, dtype=tdt, device=tdev)), _torch_address
    cdt = arrays.cupy_dtype(dtype) if framework == "cupy" else None
    import cupy
    if cdt is not None:
        nd = cupy.ndarray  # what cupy.empty calls, one Python frame less; the replay checked the device
        return (lambda arrs, stream: nd(shape, cdt)), _cupy_address
    here, alloc = arrays.DeviceBuffer.here, cupy.cuda.alloc
    nbytes = arrays.DeviceBuffer.nbytes_of(shape, dtype)
    return (lambda arrs, stream: here(alloc, shape, dtype, device, stream, nbytes)), _buffer_address


def _torch_address(t) -> int:
    return t.data_ptr()


def _cupy_address(a) -> int:
    return a.data.ptr


def _buffer_address(b) -> int:
    return b.ptr


def recorder():
    """The Recorder of the signature call in progress on this thread, if any."""
    return getattr(_tls, "rec", None)


class Signatures:
    """One op's recorded calls, by signature (at most `size`; the cache is emptied when full: a workload
    cycles through few signatures). per_stream: the caller's current stream is part of the signature, for
    ops whose scratch memory is per stream (the single-request attention calls)."""

    def __init__(self, size: int = 256, per_stream: bool = False):
        self._recipes: dict = {}
        self.size = size
        self._streams = {} if per_stream else None  # (kind, device) -> the current-stream query
        _all.add(self)

    def _stream_of(self, kind: int, device: int) -> int:
        query = self._streams.get((kind, device))
        if query is None:
            query = streams.current_query("torch" if kind == TORCH else "cupy", device)
            self._streams[(kind, device)] = query
        return query()

    def __call__(self, arrays_, scalars, stream, slow):
        """The op's result: a replay of this signature's recording, else slow() (recorded when fit)."""
        outer = getattr(_tls, "rec", None)
        if outer is not None:  # an op inside an op being recorded: the outer call cannot be replayed
            outer.refuse("calls another op")
        got = key_of(arrays_, scalars) if stream is None else None
        if got is None:
            return self._run(slow, None, outer)
        key, kind, device, ptrs, held = got
        if self._streams is not None:
            key = (key, held[0] if held is not None else self._stream_of(kind, device))
        try:
            r = self._recipes.get(key)
        except TypeError:  # an unhashable argument: no signature
            return self._run(slow, None, outer)
        if r is not None:
            got = r.replay(arrays_, ptrs, held)
            return got if got is not MISS else self._run(slow, None, outer)
        rec = Recorder(arrays_, kind)
        res = self._run(slow, rec, outer)
        rec.returned(res)
        recipe = rec.recipe()
        if recipe is not None:
            if len(self._recipes) >= self.size:
                self._recipes.clear()
            self._recipes[key] = recipe
        return res

    @staticmethod
    def _run(slow, rec, outer):
        _tls.rec = rec
        try:
            return slow()
        finally:
            _tls.rec = outer

    def clear(self) -> None:
        self._recipes.clear()

    def __len__(self) -> int:
        return len(self._recipes)
