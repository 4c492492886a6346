"""What the planned attention families (decode, prefill) share: the wrapper's float workspace, layout
and CUDA-graph flag; the host-to-device copy of a plan's metadata; per-(device, stream) scratch for
the single-request calls; scale arguments; outputs handed back in the caller's framework."""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from . import arrays, checks, streams
from . import dtypes as dt
from .call import IMMUTABLE
from .docs import document
from .fastpath import Signatures

ALIGN = 256  # bytes: the partial-state regions of a workspace start on this boundary


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def pack_meta(parts, alloc=None) -> tuple:
    """(int32 metadata block, {name: element offset}) of parts [(name, int values, capacity)]: each part
    at its offset, padded to its capacity and to 16 bytes (the kernels read int4 vectors). Values None:
    a part the device writes (left zero here). alloc(n): where the block goes (PinnedSlots.empty: pinned
    memory that upload() sends as it is); None: a new numpy array."""
    offsets, cur = {}, 0
    for name, _, cap in parts:
        offsets[name] = cur
        cur += (cap + 3) & -4
    # Zeroed around the large parts (page indices: 32K at batch 512), which are written over at once.
    meta, zero_from = np.empty(cur, dtype=np.int32) if alloc is None else alloc(cur), 0
    for name, a, _ in parts:
        if a is not None and a.size >= _LARGE_PART:
            start = offsets[name]
            meta[zero_from: start] = 0
            meta[start: start + a.size] = a
            zero_from = start + a.size
    meta[zero_from:] = 0
    for name, a, _ in parts:
        if a is not None and 0 < a.size < _LARGE_PART:  # plan() packs every step: an empty part costs no call
            start = offsets[name]
            meta[start: start + a.size] = a
    return meta, offsets


_LARGE_PART = 4096  # elements: pack_meta writes a part this large over uninitialised memory


class PlanCache:
    """The plans of single-request calls, by shape key: a small LRU (a decode loop grows kv_len every
    step, so an unbounded cache would grow with it)."""

    def __init__(self, size: int = 64):
        self.size, self._plans = size, OrderedDict()

    def get(self, key, make):
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = make()
            if len(self._plans) > self.size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def __len__(self) -> int:
        return len(self._plans)

    def values(self):
        return self._plans.values()


def attention_outputs(c, q: arrays.ArrayInfo, out, lse, return_lse: bool, o_layout: str, l_layout: str,
                      head_dim_vo: int | None = None) -> tuple:
    """(out object, its ArrayInfo, lse object or None, its ArrayInfo or None) of an attention call on Call
    `c`: `out` (q's shape and dtype, last dim contiguous, 16-byte aligned rows; head_dim_vo: its last
    dim) and `lse` (q's shape less head_dim, float32, contiguous) checked, or new arrays in q's
    framework. Immutable (JAX) arrays cannot be `out`."""
    o_shape = q.shape if head_dim_vo is None else tuple(q.shape[:-1]) + (head_dim_vo,)
    out_obj, o = c.new(o_shape, q.dtype, "out") if out is None else (out, c.arg(out, "out"))
    checks.shape(o, o_shape, o_layout)
    checks.dtype_is(o, q.dtype, "q's dtype")
    checks.last_dim_contiguous(o)
    checks.vector_aligned(o)
    if out is not None:
        checks.no_overlap(o)
        if o.framework in IMMUTABLE:
            raise TypeError(f"out: {o.framework} arrays are immutable and cannot be written; leave out=None")
    lse_obj, l_info = None, None
    if return_lse or lse is not None:
        l_shape = q.shape[:-1]
        lse_obj, l_info = c.new(l_shape, dt.float32, "lse") if lse is None else (lse, c.arg(lse, "lse"))
        checks.shape(l_info, l_shape, l_layout)
        checks.dtype_is(l_info, dt.float32, "the lse dtype")
        checks.contiguous(l_info)
        if lse is not None and l_info.framework in IMMUTABLE:
            raise TypeError(f"lse: {l_info.framework} arrays are immutable and cannot be written; leave lse=None")
    return out_obj, o, lse_obj, l_info


def attention_sinks(c, sinks, num_qo_heads: int):
    """The `sinks` argument of an attention run() on Call `c` (FlashInfer's attention sinks, as gpt-oss
    uses them): None, or a float32 device array (num_qo_heads,) of one extra logit per query head, in
    the units of sm_scale * q.k, that joins the softmax denominator and carries no value. Returns its
    ArrayInfo or None; the kernels fold it into each finished row (cuda_src/common/softmax.cuh)."""
    if sinks is None:
        return None
    info = c.arg(sinks, "sinks")
    checks.dtype_is(info, dt.float32, "the sink logits' dtype; cast them to float32")
    checks.shape(info, (num_qo_heads,), "(num_qo_heads,)")
    checks.contiguous(info)
    return info


def attention_result(c, out_obj, lse_obj, return_lse: bool):
    """o, or (o, lse) with return_lse, delivered in the caller's framework by Call `c`."""
    return c.result(out_obj, lse_obj) if return_lse else c.result(out_obj)


class PlannedWrapper:
    """Base of the plan/run wrappers: FlashInfer's constructor arguments, the workspace that plan()
    writes its metadata into, and the plan slot (None until plan())."""
    family = "attention"

    def __init__(self, float_workspace_buffer, kv_layout: str, use_cuda_graph: bool, jit_args, layouts):
        checks.choice("kv_layout", kv_layout, layouts)
        if jit_args is not None:
            raise NotImplementedError(f"jit_args: custom attention variants are not supported by {self.family} yet")
        self._kv_layout = kv_layout
        self._use_cuda_graph = bool(use_cuda_graph)
        self.reset_workspace_buffer(float_workspace_buffer)

    @property
    def is_cuda_graph_enabled(self) -> bool:
        """Whether the wrapper was made with use_cuda_graph=True."""
        return self._use_cuda_graph

    @document('Use another workspace buffer.')
    def reset_workspace_buffer(self, float_workspace_buffer, int_workspace_buffer=None) -> None:
        """Use another workspace from now on; the current plan is dropped (plan again)."""
        self._ws = arrays.describe(float_workspace_buffer, "float_workspace_buffer")
        checks.contiguous(self._ws)
        checks.pointer_aligned(self._ws, 16)  # partial states and int4 metadata are read 16 bytes at a time
        self._ws_obj = float_workspace_buffer
        if getattr(self, "_pinned", None) is None or self._pinned.device != self._ws.device:
            self._pinned = PinnedSlots(self._ws.device)  # where plan() packs its metadata
        self._plan = None

    @property
    def _plan(self):
        """The current plan (None until plan())."""
        return self._current_plan

    @_plan.setter
    def _plan(self, plan) -> None:
        # run()'s recorded calls (fastpath.Signatures) hold the plan's grid, workspace addresses and
        # sizes: a plan that launches alike (an equal run_key(): a re-plan of a decode batch of the same
        # size, every step of an engine) keeps them, so run() replays at once; any other starts with none.
        run_key = getattr(plan, "run_key", None)
        key = run_key() if run_key is not None else None
        if key is None or key != getattr(self, "_run_key", None):
            self._sigs = Signatures()
        self._run_key = key
        self._current_plan = plan

    def _room_for(self, plan) -> int:
        """The workspace bytes `plan` needs (its partial states, then its metadata); ValueError when the
        workspace is smaller."""
        need = plan.partial_bytes() + plan.meta.nbytes
        if need > self._ws.nbytes:
            raise ValueError(f"float_workspace_buffer: {self._ws.nbytes} bytes is too small for this batch; "
                             f"need {need} bytes")
        return need

    def end_forward(self) -> None:
        """FlashInfer's legacy call after forward(): nothing to release."""


class PinnedSlots:
    """Pinned host buffers used in turn, for copies to the device: a copy from pageable memory may wait for
    the stream to drain (CUDA's API-sync rules), so a plan() for the next step would wait for the step
    still running on the GPU; from pinned memory it returns at once. A slot is refilled (or freed) only
    once the copy out of it has run (an event), and the turn passes when its block is sent, so filling a
    slot twice before sending it (a CUDA-graph plan sizing its capacities) uses one slot. Two uses: each
    device's staging ring, which upload() copies a host array into; and a wrapper's own pair, which plan()
    packs its metadata into (pack_meta's alloc) and upload() sends from where it lies, with no staging
    copy (32K page indices at batch 512 were otherwise copied twice); a plan's metadata then stays intact
    until the plan after next packs, by when the wrapper holds a newer plan."""

    def __init__(self, device: int, count: int = 2, dtype=np.int32):
        self.device, self.dtype = device, np.dtype(dtype)
        self.bufs, self.events, self.slot = [None] * count, [None] * count, 0

    def empty(self, n: int) -> np.ndarray:
        """n elements in the slot to fill next, free to write."""
        i = self.slot
        if self.events[i] is not None:
            from cupy.cuda import runtime
            runtime.eventSynchronize(self.events[i])  # the copy out of it a round ago: normally long done
        buf = self.bufs[i]
        if buf is None or buf.size < n:
            import cupyx
            buf = self.bufs[i] = streams.on_device(self.device, cupyx.empty_pinned,
                                                   max(n, (1 << 16) // self.dtype.itemsize), self.dtype)
        return buf[:n]

    def send(self, block: np.ndarray, dst_ptr: int, stream: int) -> None:
        """Queue the copy of `block` (in the current slot) to dst_ptr on `stream` (the device is current),
        mark when it has run, and pass the turn."""
        from cupy.cuda import runtime
        i = self.slot
        runtime.memcpyAsync(dst_ptr, block.ctypes.data, block.nbytes, runtime.memcpyHostToDevice, stream)
        if self.events[i] is None:
            self.events[i] = runtime.eventCreateWithFlags(runtime.eventDisableTiming)
        runtime.eventRecord(self.events[i], stream)
        self.slot = (i + 1) % len(self.bufs)

    def pass_turn(self) -> None:
        """Leave the current slot to a copy captured in a CUDA graph (each replay reads it)."""
        self.slot = (self.slot + 1) % len(self.bufs)

    def __del__(self):
        """The buffers go back to CuPy's pinned pool, where a new allocation may take them at once: not
        while a copy still reads them."""
        try:
            from cupy.cuda import runtime
            for ev in self.events:
                if ev is not None:
                    runtime.eventSynchronize(ev)
                    runtime.eventDestroy(ev)
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may be gone, nothing left to guard
            pass


STAGING_SLOTS = 4  # a device's staging ring
_staging: dict = {}  # device -> its staging ring (PinnedSlots of bytes)
_staging_lock = threading.Lock()


def upload(host: np.ndarray, dst_ptr: int, device: int, stream: int, pinned: PinnedSlots | None = None) -> None:
    """Copy a host array to device memory at dst_ptr, queued on `stream`, without waiting for the
    stream (through pinned staging; a direct copy while the stream is being captured). pinned: `host`
    lies in that PinnedSlots' current slot (pack_meta's alloc), and is sent from there."""
    streams.on_device(device, _upload_here, host, dst_ptr, device, stream, pinned)  # plan() uploads every step


def _upload_here(host: np.ndarray, dst_ptr: int, device: int, stream: int, pinned: PinnedSlots | None) -> None:
    from cupy.cuda import runtime
    if streams.is_capturing(stream):
        runtime.memcpyAsync(dst_ptr, host.ctypes.data, host.nbytes, runtime.memcpyHostToDevice, stream)
        if pinned is not None:
            pinned.pass_turn()
        return
    if pinned is not None:
        pinned.send(host, dst_ptr, stream)
        return
    with _staging_lock:
        ring = _staging.get(device)
        if ring is None:
            ring = _staging[device] = PinnedSlots(device, STAGING_SLOTS, np.uint8)
        block = ring.empty(host.nbytes)
        block[:] = np.ascontiguousarray(host).reshape(-1).view(np.uint8)
        ring.send(block, dst_ptr, stream)


def single_call_meta(cache: dict, device: int, stream: int, framework: str, key, meta: np.ndarray,
                     meta_offset: int, sigs=None) -> int:
    """Scratch for a single-request call, cached per (device, stream) in the family's `cache`: a buffer
    of at least meta_offset + meta.nbytes bytes whose metadata (at meta_offset) is uploaded only when
    `key` changes. Returns the buffer's address. sigs: the family's recorded calls (fastpath.Signatures,
    per stream), which read this scratch and its metadata: dropped when either changes."""
    need = meta_offset + meta.nbytes
    buf = cache.get((device, stream))
    if buf is None or buf[1].nbytes < need:
        if sigs is not None:
            sigs.clear()
        obj = arrays.empty(framework if framework == "torch" else "cupy", (max(need, 1 << 20),), dt.uint8, device,
                           stream)
        buf = (obj, arrays.describe(obj, "scratch"), {})
        cache[(device, stream)] = buf
    _, scratch, uploaded = buf
    if uploaded.get("key") != (key, meta_offset):
        if sigs is not None:
            sigs.clear()
        upload(meta, scratch.ptr + meta_offset, device, stream)
        uploaded["key"] = (key, meta_offset)
    return scratch.ptr


def scale(name: str, v) -> float:
    """A k_scale / v_scale argument: None means 1."""
    v = checks.float_or_none(name, v)
    return 1.0 if v is None else v


def kv_split(fixed_split_size, disable_split_kv, page_size: int) -> int | None:
    """FlashInfer's split-KV options as scheduler.decode_schedule's `split` (and prefill's): None
    (split as the heuristics choose), 0 (disable_split_kv: never split a request's KV) or a chunk of
    fixed_split_size pages in tokens. Either makes a request's output independent of the batch around
    it. disable_split_kv wins over fixed_split_size; -1 is FlashInfer's "no fixed size"."""
    if checks.flag("disable_split_kv", disable_split_kv):
        return 0
    if fixed_split_size is None or (isinstance(fixed_split_size, (int, np.integer)) and fixed_split_size == -1):
        return None
    return checks.positive_int("fixed_split_size", fixed_split_size) * page_size


def output_dtype(o_data_type, q_dtype: dt.DType, name: str = "o_data_type") -> None:
    """o_data_type: None or q's dtype (the kernels write the output in q's dtype)."""
    if o_data_type is not None and dt.as_dtype(o_data_type, name) != q_dtype:
        raise NotImplementedError(f"{name}: {dt.as_dtype(o_data_type, name)} is not supported; the output has q's "
                                  f"dtype ({q_dtype}); pass None")


FLASHINFER_BACKENDS = ("auto", "fa2", "fa3", "trtllm-gen", "cute-dsl", "cudnn", "cutlass", "xqa")


def backend_arg(backend, supported: tuple, known: tuple = FLASHINFER_BACKENDS) -> str:
    """A FlashInfer backend name: one we run, NotImplementedError for FlashInfer's others."""
    if backend in supported:
        return backend
    if backend in known:
        raise NotImplementedError(f"backend: {backend!r} is not supported here (only {', '.join(map(repr, supported))})")
    raise ValueError(f"backend: {backend!r} is not one of {', '.join(map(repr, known))}")


def device_copy(src: arrays.ArrayInfo, dst: arrays.ArrayInfo, nbytes: int, stream: int) -> None:
    """Queue a device-to-device copy of nbytes from src to dst on `stream` (skipped when they alias)."""
    if nbytes and src.ptr != dst.ptr:
        import cupy
        from cupy.cuda import runtime
        with cupy.cuda.Device(dst.device):
            runtime.memcpyAsync(dst.ptr, src.ptr, nbytes, runtime.memcpyDeviceToDevice, stream)
