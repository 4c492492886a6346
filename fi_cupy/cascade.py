"""Attention-state merge: merge_state, merge_state_in_place, merge_states (cuda_src/cascade.cu).

A state is (v, s): v (seq_len, num_heads, head_dim) in float16 / bfloat16 / float32, and s
(seq_len, num_heads) float32, the log-sum-exp of the logits in base 2 (what decode and prefill return
with return_lse=True). A state with s = -inf contributes nothing; merging only such states gives
v = 0 and s = -inf. Any (token, head) strides are accepted; the head dim must be contiguous.
merge_state_in_place writes into v and s, except for JAX callers (immutable arrays): they get the
merged (v, s) back as new arrays.
"""
from __future__ import annotations

from ._core import checks, kernels
from ._core import dtypes as dt
from ._core.call import Call
from ._core.kernels import KernelSpec, Program, i32, i64, ptr, struct_arg

DTYPES = (dt.float16, dt.bfloat16, dt.float32)
THREADS = 256
WAVES = 32  # CTAs per SM of the grid-stride loop (8 gave 83% of copy on H100, 32 gave 92%)


def merge_program(dtype: dt.DType, vec: int) -> Program:
    return Program("cascade.cu", (KernelSpec("fic::merge_state_kernel", (dtype.cpp, vec)),
                                  KernelSpec("fic::merge_states_n_kernel", (dtype.cpp, vec))))


def all_programs() -> list:
    return [merge_program(d, v) for d in DTYPES for v in (8, 4, 2, 1) if v * d.itemsize <= 16]


def _state(c: Call, v, s, vname: str, sname: str, states_axis: bool = False):
    vi, si = c.arg(v, vname), c.arg(s, sname)
    checks.dtype_in(vi, DTYPES)
    checks.dtype_is(si, dt.float32, "the lse dtype (float32)")
    if states_axis:
        checks.ndim(vi, 4, "(seq_len, num_states, num_heads, head_dim)")
        checks.shape(si, vi.shape[:3], "(seq_len, num_states, num_heads)")
    else:
        checks.ndim(vi, 3, "(seq_len, num_heads, head_dim)")
        checks.shape(si, vi.shape[:2], "(seq_len, num_heads)")
    checks.last_dim_contiguous(vi)
    return vi, si


def _ref(vi, si) -> bytes:
    """StateRef: (token, head) strides of v and s (the last two non-head-dim axes)."""
    return struct_arg("qqqq", vi.strides[0], vi.strides[-2], si.strides[0], si.strides[-1])


def _shape(c: Call, rows: int, d: int, vec: int) -> tuple:
    """(grid, block): a team of up to 32 lanes per row (one warp), THREADS // team rows a CTA."""
    if rows >= 2 ** 31:
        raise ValueError(f"seq_len * num_heads = {rows} exceeds 2^31 - 1; merge in chunks of tokens")
    team = min(32, 1 << max(0, (d // vec - 1).bit_length()))
    rpc = THREADS // team
    sms = kernels.device_props(c.device)["sms"]
    return (max(1, min(-(-rows // rpc), sms * WAVES)),), (team, rpc)


def _same(a, b) -> None:
    if a.shape != b.shape or a.dtype != b.dtype:
        raise ValueError(f"{b.name}: must match {a.name} in shape and dtype; got {b.shape}/{b.dtype} vs "
                         f"{a.shape}/{a.dtype}")


def _pair(c: Call, a, sa, b, sb, vo, so, mask) -> None:
    rows, d = a.shape[0] * a.shape[1], a.shape[2]
    if rows and d:
        vec = checks.vector_width([a, b, vo], d)
        fn = kernels.cached_function(c.device, ("merge_state", a.dtype.name, vec), lambda: (
            merge_program(a.dtype, vec), merge_program(a.dtype, vec).kernels[0]))
        c.launch(fn, *_shape(c, rows, d, vec), [
            ptr(a), ptr(sa), _ref(a, sa), ptr(b), ptr(sb), _ref(b, sb), ptr(vo), ptr(so), _ref(vo, so),
            ptr(mask), i32(rows), i32(a.shape[1]), i32(d)])


def merge_state(v_a, s_a, v_b, s_b, stream=None):
    """Merge two attention states; returns (v_merged, s_merged)."""
    c = Call(v_a, stream, name="v_a")
    a, sa = _state(c, v_a, s_a, "v_a", "s_a")
    b, sb = _state(c, v_b, s_b, "v_b", "s_b")
    _same(a, b)
    vo_obj, vo = c.new(a.shape, a.dtype, "v_merged")
    so_obj, so = c.new(a.shape[:2], dt.float32, "s_merged")
    _pair(c, a, sa, b, sb, vo, so, None)
    return c.result(vo_obj, so_obj)


def merge_state_in_place(v, s, v_other, s_other, mask=None, stream=None):
    """v, s <- merge((v, s), (v_other, s_other)) where mask (seq_len,) bool is True (everywhere
    without a mask). Returns None; JAX callers get the merged (v, s) as new arrays."""
    c = Call(v, stream, name="v")
    a, sa = _state(c, v, s, "v", "s")
    b, sb = _state(c, v_other, s_other, "v_other", "s_other")
    _same(a, b)
    m = c.arg(mask, "mask")
    if m is not None:
        checks.dtype_in(m, (dt.bool_, dt.uint8, dt.int8))
        checks.shape(m, (a.shape[0],), "(seq_len,)")
        checks.contiguous(m)
    if c.writable(a) and c.writable(sa):
        checks.no_overlap(a)
        checks.no_overlap(sa)
        _pair(c, a, sa, b, sb, a, sa, m)
        c.result()
        return None
    if m is not None:  # rows the mask leaves alone keep the old state: start from a copy
        why = "for an immutable (JAX) caller with a mask"
        (vo_obj, vo), (so_obj, so) = c.copy_of(a, why), c.copy_of(sa, why)
    else:
        vo_obj, vo = c.new(a.shape, a.dtype, "v")
        so_obj, so = c.new(a.shape[:2], dt.float32, "s")
    _pair(c, a, sa, b, sb, vo, so, m)
    return c.result(vo_obj, so_obj)


def merge_states(v, s, stream=None):
    """Merge num_states states per (token, head): v (seq_len, num_states, num_heads, head_dim),
    s (seq_len, num_states, num_heads) -> (v_merged (seq_len, num_heads, head_dim), s_merged)."""
    c = Call(v, stream, name="v")
    vi, si = _state(c, v, s, "v", "s", states_axis=True)
    seq, n, heads, d = vi.shape
    vo_obj, vo = c.new((seq, heads, d), vi.dtype, "v_merged")
    so_obj, so = c.new((seq, heads), dt.float32, "s_merged")
    rows = seq * heads
    if rows and d:
        vec = checks.vector_width([vi, vo], d)
        fn = kernels.cached_function(c.device, ("merge_states", vi.dtype.name, vec), lambda: (
            merge_program(vi.dtype, vec), merge_program(vi.dtype, vec).kernels[1]))
        c.launch(fn, *_shape(c, rows, d, vec), [
            ptr(vi), ptr(si), _ref(vi, si), i64(vi.strides[1]), i64(si.strides[1]), i32(n), ptr(vo), ptr(so),
            _ref(vo, so), i32(rows), i32(heads), i32(d)])
    return c.result(vo_obj, so_obj)
