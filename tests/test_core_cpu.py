"""Runtime core pieces that need no GPU: dtypes, fast division, checks, DLPack refusals."""
import numpy as np
import pytest

from fi_cupy._core import arrays, checks
from fi_cupy._core import dtypes as dt
from fi_cupy._core.fastdiv import fastdiv_params, fastdiv_quot


@pytest.mark.parametrize("x,expected", [
    ("float16", dt.float16), ("bf16", dt.bfloat16), ("torch.bfloat16", dt.bfloat16),
    (np.float16, dt.float16), (np.dtype("float32"), dt.float32), ("float8_e4m3fn", dt.float8_e4m3fn),
    ("e5m2", dt.float8_e5m2), ("int32", dt.int32), (dt.int64, dt.int64),
])
def test_as_dtype(x, expected):
    assert dt.as_dtype(x) is expected


def test_as_dtype_unknown_names_argument():
    with pytest.raises(TypeError, match="q_data_type: unknown dtype"):
        dt.as_dtype("float7", "q_data_type")


def test_dlpack_codes():
    assert dt.from_dlpack_code(4, 16) is dt.bfloat16
    assert dt.from_dlpack_code(2, 16) is dt.float16
    assert dt.from_dlpack_code(10, 8) is dt.float8_e4m3fn
    assert dt.from_dlpack_code(12, 8) is dt.float8_e5m2
    with pytest.raises(TypeError, match="unsupported DLPack dtype"):
        dt.from_dlpack_code(5, 64)  # complex


@pytest.mark.parametrize("d", [1, 2, 3, 7, 15, 16, 17, 64, 100, 1000, 4097, 65535, 2 ** 20 + 3, 2 ** 31 - 1])
def test_fastdiv_exact(d):
    _, mul, shift = fastdiv_params(d)
    rng = np.random.default_rng(d)
    ns = np.concatenate([np.arange(0, 3000), rng.integers(0, 2 ** 31, 3000), [2 ** 31 - 1, d - 1, d, d + 1]])
    for n in ns.tolist():
        if 0 <= n < 2 ** 31:
            assert fastdiv_quot(n, mul, shift) == n // d, (n, d)
    assert 0 <= mul < 2 ** 32


def test_describe_refuses_host_and_non_arrays():
    with pytest.raises(ValueError, match="q: expected an array on a CUDA device, got one on CPU"):
        arrays.describe(np.zeros((2, 8), np.float16), "q")
    with pytest.raises(TypeError, match="k: expected an array that supports DLPack"):
        arrays.describe([1, 2, 3], "k")


def test_contiguity_helpers():
    info = arrays.ArrayInfo("x", 0, (2, 3, 4), (12, 4, 1), dt.float16, 0, "cupy")
    assert info.is_contiguous() and info.byte_strides == (24, 8, 2)
    info2 = arrays.ArrayInfo("x", 0, (2, 1, 4), (4, 999, 1), dt.float16, 0, "cupy")
    assert info2.is_contiguous()  # size-1 dims do not count
    with pytest.raises(ValueError, match="x: the last dim must be contiguous"):
        checks.last_dim_contiguous(arrays.ArrayInfo("x", 0, (2, 4), (1, 2), dt.float16, 0, "cupy"))
    with pytest.raises(ValueError, match="x: strides must be multiples of 8"):
        checks.vector_aligned(arrays.ArrayInfo("x", 0, (2, 4), (4, 1), dt.float16, 0, "cupy"))
    with pytest.raises(ValueError, match="x: data pointer must be 16-byte aligned"):
        checks.vector_aligned(arrays.ArrayInfo("x", 8, (2, 8), (8, 1), dt.float16, 0, "cupy"))
    # An empty array is never read: a paged cache of 0 pages with head_dim 19 (fuzz page_append:1003725 on the
    # H200) passes, whatever its strides and pointer.
    checks.vector_aligned(arrays.ArrayInfo("x", 8, (0, 2, 2, 5, 19), (380, 190, 95, 19, 1), dt.bfloat16, 0, "cupy"))


def test_host_index_checks():
    a = checks.host_int_array("indptr", [0, 3, 2])
    with pytest.raises(ValueError, match=r"indptr: must be non-decreasing, but indptr\[1\]=3 > indptr\[2\]=2"):
        checks.indptr("indptr", a)
    with pytest.raises(ValueError, match="indptr: must start at 0"):
        checks.indptr("indptr", np.array([1, 2]))
    with pytest.raises(TypeError, match="indices: expected an integer array"):
        checks.host_int_array("indices", np.array([0.5]))
    with pytest.raises(ValueError, match="indices: expected a 1-D array"):
        checks.host_int_array("indices", np.zeros((2, 2), np.int32))


def test_stream_handles():
    from fi_cupy._core import streams

    class S:
        def __cuda_stream__(self):
            return (0, 1234)

    assert streams.handle_of(5) == 5 and streams.handle_of(S()) == 1234
    with pytest.raises(TypeError, match="stream: expected"):
        streams.handle_of("default")
    assert arrays.dlpack_stream_arg(0) == 1 and arrays.dlpack_stream_arg(77) == 77


class FakeCudaArray:
    """A DLPack producer with chosen shape, strides (None = NULL), dtype code and a fake pointer:
    describe() must read all of it without touching the memory."""

    def __init__(self, shape, strides, code=2, bits=16, ptr=0x10000, offset=0):
        import ctypes
        self.shape_arr = (ctypes.c_int64 * len(shape))(*shape)
        self.strides_arr = None if strides is None else (ctypes.c_int64 * len(shape))(*strides)
        mt = arrays._DLManagedTensor()
        mt.dl_tensor.data = ptr
        mt.dl_tensor.device = arrays._DLDevice(arrays.KDL_CUDA, 0)
        mt.dl_tensor.ndim = len(shape)
        mt.dl_tensor.dtype = arrays._DLDataType(code, bits, 1)
        mt.dl_tensor.shape = ctypes.cast(self.shape_arr, ctypes.POINTER(ctypes.c_int64))
        mt.dl_tensor.strides = None if strides is None else ctypes.cast(self.strides_arr,
                                                                         ctypes.POINTER(ctypes.c_int64))
        mt.dl_tensor.byte_offset = offset
        self.mt = mt

    def __dlpack_device__(self):
        return (arrays.KDL_CUDA, 0)

    def __dlpack__(self, stream=None):
        import ctypes
        return arrays._capsule_new(ctypes.addressof(self.mt), b"dltensor", None)


def stub_h100_host(monkeypatch) -> None:
    """A wrapper's plan() without a GPU: the current stream is 0, plan metadata packs into numpy memory
    (not pinned), and the device is an H100 (132 SMs, 227 KB of shared memory a CTA, sm_90a). Uploads and
    CTA counts are the caller's to stand in."""
    from fi_cupy._core import kernels, streams, workspace
    monkeypatch.setattr(workspace.PinnedSlots, "empty", lambda self, n: np.empty(n, np.int32))
    monkeypatch.setattr(streams, "resolve", lambda stream, framework, device: 0)
    props = {"name": "H100 (stub)", "sms": 132, "smem_optin": 227 * 1024, "smem_sm": 228 * 1024, "cc": 90}
    monkeypatch.setattr(kernels, "device_props", lambda device=0: props)
    monkeypatch.setattr(kernels, "device_arch", lambda device=0: "sm_90a")


def test_describe_strides_from_producers():
    info = arrays.describe(FakeCudaArray((2, 3, 8), None), "old")  # NULL strides: contiguous
    assert info.strides == (24, 8, 1) and info.is_contiguous() and info.dtype is dt.float16
    info = arrays.describe(FakeCudaArray((4, 1, 8), (8, 12345, 1)), "s1")  # size-1 stride arbitrary
    assert info.strides == (8, 8, 1) and info.is_contiguous()
    info = arrays.describe(FakeCudaArray((0, 8), (8, 1)), "empty")
    assert info.size == 0 and info.shape == (0, 8)
    info = arrays.describe(FakeCudaArray((4, 8), (16, 1), ptr=0x20000, offset=64), "off")
    assert info.ptr == 0x20000 + 64 and not info.is_contiguous()
    with pytest.raises(ValueError, match="neg: negative strides are not supported"):
        arrays.describe(FakeCudaArray((4, 8), (-8, 1)), "neg")
    assert arrays.describe(FakeCudaArray((3,), (1,), code=4, bits=16), "b").dtype is dt.bfloat16
    assert arrays.describe(FakeCudaArray((3,), (1,), code=10, bits=8), "f8").dtype is dt.float8_e4m3fn
    with pytest.raises(TypeError, match="unsupported DLPack dtype"):
        arrays.describe(FakeCudaArray((3,), (1,), code=5, bits=64), "c")


def test_target_arch_refuses_gpus_older_than_ampere():
    from fi_cupy._core import compile as cc
    with pytest.raises(cc.CudaEnvironmentError, match=r"compute capability 7\.5.*8\.0 or newer"):
        cc.target_arch(75)


def test_memo_of_plain_args_keys_by_value_and_type_and_never_remembers_errors():
    """plan()'s option checks (make_params) are memoised: immutable arguments only, True kept apart from 1,
    a mutable argument (a list here, a 0-d tensor in use) recomputed every call, an error raised again."""
    from fi_cupy._core import memo
    from fi_cupy import decode, prefill
    calls = []

    @memo.of_plain_args
    def f(a, b=None, *, c=1.0):
        calls.append((a, b, c))
        if a == "bad":
            raise ValueError("a: bad")
        return [a, b, c]
    assert f(1, dt.bfloat16, c=2.0) is f(1, dt.bfloat16, c=2.0) and len(calls) == 1
    assert f(True, dt.bfloat16, c=2.0) == [True, dt.bfloat16, 2.0] and len(calls) == 2  # True is not 1
    assert f(1, np.dtype("int32")) is f(1, np.dtype("int32")) and len(calls) == 3
    f([1], None), f([1], None)
    assert len(calls) == 5  # a list: not memoised
    for _ in range(2):
        with pytest.raises(ValueError, match="a: bad"):
            f("bad")
    assert len(calls) == 7
    # the wrappers' option checks go through it, and their errors stay the same on every call
    assert decode.make_params(32, 8, 128, 16, "NONE", -1, None, "float16", None, None, None, None) is \
        decode.make_params(32, 8, 128, 16, "NONE", -1, None, "float16", None, None, None, None)
    for _ in range(2):
        with pytest.raises(ValueError, match="num_qo_heads"):
            prefill.make_params(0, 8, 128, None, True, "NONE", -1, None, None, None, None, "float16", None, True)


def test_pack_meta_zero_fills_everything_but_the_values():
    """pack_meta writes its large parts over uninitialised memory: every element that no part's values
    cover must still be zero (capacity padding, device-written parts, the 16-byte rounding), whatever the
    mix of large, small, empty and None parts, and in a block that held other values (alloc)."""
    from fi_cupy._core.workspace import _LARGE_PART, pack_meta
    rng = np.random.default_rng(3)
    for _ in range(200):
        parts = []
        for i in range(rng.integers(1, 7)):
            n = int(rng.choice([0, 1, 3, 17, _LARGE_PART - 1, _LARGE_PART, 3 * _LARGE_PART + 5]))
            a = None if rng.random() < 0.2 else rng.integers(1, 1 << 30, n, dtype=rng.choice([np.int32, np.int64]))
            parts.append((f"p{i}", a, n + int(rng.integers(0, 9))))
        dirty = rng.random() < 0.5  # a reused pinned slot holds the last plan's values
        meta, offsets = pack_meta(parts, (lambda n: np.full(n, -7, np.int32)) if dirty else None)
        want = np.zeros(sum((cap + 3) & -4 for _, _, cap in parts), np.int32)
        at = 0
        for name, a, cap in parts:
            assert offsets[name] == at and at % 4 == 0
            if a is not None:
                want[at: at + a.size] = a
            at += (cap + 3) & -4
        assert meta.dtype == np.int32
        np.testing.assert_array_equal(meta, want)


def test_pinned_slots_alternate_on_each_upload_and_wait_before_reuse(monkeypatch):
    """A wrapper's PinnedSlots: packing twice before an upload reuses one slot; upload() sends the block
    from where it lies (no staging copy) and records an event on the caller's stream; the next plan packs
    into the other slot, and the one after waits for the first copy's event before writing over it. A
    caller's host array goes through the device's staging ring of the same slots. The CUDA runtime and
    pinned allocation stand in (numpy memory, calls recorded)."""
    import cupyx
    from cupy.cuda import runtime
    from fi_cupy._core import streams, workspace
    calls, events = [], iter(range(100, 200))
    monkeypatch.setattr(cupyx, "empty_pinned", lambda n, dtype: np.empty(n, dtype))
    monkeypatch.setattr(runtime, "eventCreateWithFlags", lambda flags: next(events))
    for name in ("eventRecord", "eventSynchronize", "memcpyAsync"):
        monkeypatch.setattr(runtime, name, lambda *a, _n=name: calls.append((_n,) + a))
    monkeypatch.setattr(streams, "on_device", lambda device, fn, *a: fn(*a))
    monkeypatch.setattr(streams, "is_capturing", lambda stream: False)
    p = workspace.PinnedSlots(0)
    first = p.empty(10)
    again = p.empty(40000)  # a CUDA-graph plan packs twice: the same slot, grown
    workspace.upload(again, 0x1000, 0, 7, p)
    assert calls == [("memcpyAsync", 0x1000, again.ctypes.data, again.nbytes, runtime.memcpyHostToDevice, 7),
                     ("eventRecord", 100, 7)]
    other = p.empty(10)
    assert not np.shares_memory(other, again) and not calls[2:]  # a fresh slot: nothing to wait for
    workspace.upload(other, 0x2000, 0, 8, p)
    assert calls[2:] == [("memcpyAsync", 0x2000, other.ctypes.data, other.nbytes, runtime.memcpyHostToDevice, 8),
                         ("eventRecord", 101, 8)]
    third = p.empty(20)
    assert np.shares_memory(third, again) and calls[4:] == [("eventSynchronize", 100)]
    assert first.size == 10 and third.size == 20
    p.events = [None, None]  # the stand-in events are not CUDA's: nothing for __del__ to wait for
    # A host array of the caller's goes through the device's staging ring: copied into a slot, sent from it.
    monkeypatch.setattr(workspace, "_staging", {})
    host = np.arange(5, dtype=np.int64)
    workspace.upload(host, 0x3000, 0, 9)
    ring = workspace._staging[0]
    sent = ring.bufs[0][:host.nbytes]
    assert sent.tobytes() == host.tobytes() and ring.slot == 1 and len(ring.bufs) == workspace.STAGING_SLOTS
    assert calls[5:] == [("memcpyAsync", 0x3000, sent.ctypes.data, host.nbytes, runtime.memcpyHostToDevice, 9),
                         ("eventRecord", 102, 9)]
    ring.events = [None] * len(ring.events)
