"""Attention families of the differential fuzz suite (test_fuzz.py runs them): batch and single
decode, paged / ragged / single prefill, the attention-state merges, and MLA (absorbed multi-head latent
attention: heads 16 / 32 / 64 / 128 and others, decode and chunked prefill, any page size). Each case is a random valid
configuration checked against fi_cupy.reference, computed in float64 on the GPU (CuPy arrays).

A case is two steps. draw_<family>(rng) -> config: pure (numpy only), every choice made there, so
the distribution can be inspected without a GPU (`python tests/fuzz_attention.py` prints it). Then
check_<family>(config) builds every array from config["data_seed"] alone and checks the result: a
config reproduces its case by itself.

Inputs are CuPy arrays (CuPy callers): bfloat16 as ml_dtypes.bfloat16, float8 K/V as their bytes
(uint8), which the paged wrappers read as the planned kv_data_type. single_decode_with_kv_cache takes
float8 from k/v's own dtype, which CuPy lacks: those cases call it as a torch caller (the same memory
through DLPack), and are drawn only where torch with CUDA is importable.

Rules: decode and the merges as tolerances.py (assert_close, assert_lse_close); prefill as
test_prefill.py (per request, the max error at most twice that of the same attention computed
naively in the input dtype; OUT_TOL element-wise is accepted too, for requests so small that the
naive computation happens to be almost exact). Everywhere: no NaN, and a row that sees no key gives
o = 0 and lse = -inf exactly (with attention sinks, drawn for batch decode and paged prefill: lse = the
sink alone, sinks[h] / ln 2, within LSE_TOL).

Decode head dims: every multiple of 16 up to 256, and 512 for about WIDE_DECODE_P of the cases.
Prefill head dims: about half the cases 64 / 128 / 256, the rest the other multiples of 16 up to 256
and 512 (the portable kernel: backend "fa3" keeps 64 / 128, "auto" falls back); RoPE on the fly only at
64 / 128 / 256; head_dim_vo != head_dim_qk (QK_VO_PAIRS) for about QK_VO_P of the QK_VO_KINDS cases;
fp8 K/V on every prefill kind (head_dim_vo equal; single prefill reads float8 from
k / v's dtype, so those cases are torch callers too, drawn only where torch with CUDA is importable).

pos_encoding_mode is NONE, ROPE_LLAMA or, for about ALIBI_P of the decode and prefill cases, ALIBI
(drawn last, see _draw_alibi: never with a soft cap, and on the portable prefill kernel); the references
and the naive baseline add reference.alibi_bias. The cascade family draws no attention options.
"""
from __future__ import annotations

import math

import cupy
import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference
from gpu_arrays import BF16, cast, empty, host_dtype, nan_like, to_torch
from tolerances import OUT_TOL, assert_close, assert_lse_close

try:
    import torch
except ImportError:
    torch = None
# torch callers (float8 single decode) are drawn only here: torch built with CUDA
TORCH = torch is not None and torch.cuda.is_available()

Q_DTYPES = ("float16", "bfloat16")
FP8 = ("float8_e4m3fn", "float8_e5m2")
GROUPS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16)
GROUP_P = (0.3,) + (0.7 / 9,) * 9  # group size 1 (MHA) often: a crash there slipped through before
NOTABLE_PAGE_SIZES = (1, 2, 3, 4, 5, 7, 8, 12, 15, 16, 17, 31, 32, 33, 48, 63, 64)
MAX_LEN = 5000
WORKSPACE_BYTES = 256 << 20
# Bounds on one case (elements), so the float64 references stay quick: a batch over them loses
# requests from its end; a lone request over them has its lengths halved.
KV_ELEMS = 1 << 24     # sum over requests of kv_len * num_kv_heads * head_dim
OUT_ELEMS = 1 << 22    # queries * num_qo_heads * head_dim
SCORE_ELEMS = 1 << 24  # prefill: sum over requests of qo_len * kv_len * num_qo_heads
MERGE_ELEMS = 1 << 22  # merges: seq_len * num_states * num_heads * head_dim
SINKS_P = 0.25  # run(sinks=) on the wrappers that take it: batch decode, paged prefill
ALIBI_P = 0.15  # pos_encoding_mode "ALIBI" (decode and prefill, batch and single)
WIDE_DECODE_P = 0.1  # decode at head_dim 512 (batch and single)
# Prefill head dims: the long-standing ones (the only ones RoPE on the fly takes), and the others
PREFILL_HEAD_DIMS = (64, 128, 256)
NEW_PREFILL_HEAD_DIMS = tuple(d for d in range(16, 257, 16) if d not in PREFILL_HEAD_DIMS) + (512,)
QK_VO_PAIRS = ((192, 128), (128, 64))  # (head_dim_qk, head_dim_vo) other than equal
QK_VO_P = 0.1
QK_VO_KINDS = ("ragged", "single", "paged")  # paged: a (k_cache, v_cache) pair, v with its own head dim


# ---------------------------------------------------------------------------------------------
# Drawing (numpy only)


def _pick(rng, options, p=None):
    return options[int(rng.choice(len(options), p=p))]


def _log_int(rng, lo: int, hi: int) -> int:
    """An integer in [lo, hi] (lo >= 1), log-uniform: small values common, large ones present."""
    return int(min(hi, math.floor(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


def _log_float(rng, lo: float, hi: float) -> float:
    return float(round(math.exp(rng.uniform(math.log(lo), math.log(hi))), 4))


def _length(rng, longest: int) -> int:
    """0 and 1 often, else log-uniform in 2..longest."""
    u = rng.random()
    return 0 if u < 0.07 else 1 if u < 0.14 else _log_int(rng, 2, max(longest, 2))


def _heads(rng) -> tuple:
    """(num_qo_heads, num_kv_heads)."""
    group = GROUPS[int(rng.choice(len(GROUPS), p=GROUP_P))]
    hkv = int(rng.integers(1, 9))
    return group * hkv, hkv


def _page_size(rng) -> int:
    return _pick(rng, NOTABLE_PAGE_SIZES) if rng.random() < 0.5 else int(rng.integers(1, 65))


def _storage(rng, kinds: tuple, align: int = 8) -> list:
    """[kind, before, after]: how an array sits in memory. "contiguous", or a view into a larger
    allocation padded along one axis ("page", "head", "token"; "dim": the last axis, padded by
    multiples of `align` elements, the vector alignment the API asks for), or "interleaved" (k and
    v as [..., 0, :] and [..., 1, :] of one allocation)."""
    kind = _pick(rng, ("contiguous",) + kinds)
    if kind in ("contiguous", "interleaved"):
        return [kind, 0, 0]
    if kind == "dim":
        return [kind, align * int(rng.integers(0, 3)), align * int(rng.integers(1, 3))]
    before = int(rng.integers(0, 3))
    return [kind, before, int(rng.integers(0 if before else 1, 3))]


def _window(rng, longest: int) -> int:
    u = rng.random()
    if u < 0.55:
        return -1
    if u < 0.65:
        return 0
    if u < 0.8:
        return int(rng.integers(1, 17))
    return _log_int(rng, 1, 2 * max(longest, 1))


def _options(rng, head_dim: int, longest: int, rope: bool) -> dict:
    """Options shared by decode and prefill (None: the API's default)."""
    return {
        "window_left": _window(rng, longest),
        "logits_soft_cap": float(round(rng.uniform(1.0, 50.0), 3)) if rng.random() < 0.3 else None,
        "sm_scale": _log_float(rng, 0.25, 4.0) / math.sqrt(head_dim) if rng.random() < 0.3 else None,
        "rope_scale": _log_float(rng, 0.25, 8.0) if rope and rng.random() < 0.5 else None,
        "rope_theta": _pick(rng, (1e3, 5e5, 1e6, 2.5e4)) if rope and rng.random() < 0.5 else None,
    }


def _scales(rng, fp8: bool) -> dict:
    """k_scale / v_scale: fp8 KV nearly always (random, not 1); 16-bit KV sometimes."""
    if rng.random() < (0.9 if fp8 else 0.15):
        return {"k_scale": _log_float(rng, 0.25, 4.0), "v_scale": _log_float(rng, 0.25, 4.0)}
    return {"k_scale": None, "v_scale": None}


def _outputs(rng) -> dict:
    return {"return_lse": bool(rng.random() < 0.6), "out_given": bool(rng.random() < 0.5),
            "lse_given": bool(rng.random() < 0.3)}


def _fit_decode(kv_lens: list, hq: int, hkv: int, d: int) -> list:
    keep, kv_total = [], 0
    for n in kv_lens:
        if keep and (kv_total + n) * hkv * d > KV_ELEMS or (len(keep) + 1) * hq * d > OUT_ELEMS:
            break
        keep.append(n)
        kv_total += n
    while keep[0] * hkv * d > KV_ELEMS:
        keep[0] //= 2
    return keep


def _fit_prefill(qo_lens: list, kv_lens: list, hq: int, hkv: int, d: int) -> tuple:
    def cost(qo, kv):
        return np.array([qo * max(kv, 1) * hq, qo * hq * d, kv * hkv * d])

    caps = np.array([SCORE_ELEMS, OUT_ELEMS, KV_ELEMS])
    qs, ks, total = [], [], np.zeros(3, np.int64)
    for qo, kv in zip(qo_lens, kv_lens):
        if qs and np.any(total + cost(qo, kv) > caps):
            break
        qs.append(qo)
        ks.append(kv)
        total += cost(qo, kv)
    while np.any(cost(qs[0], ks[0]) > caps):
        if qs[0] >= ks[0]:
            qs[0] //= 2
        else:
            ks[0] //= 2
    return qs, ks


def _paged_choices(rng, batch: int, align: int = 8) -> dict:
    """A paged cache: page size, 5-D array or (k, v) pair (views of one 5-D array, or two arrays),
    storage, spare pages in the shuffled table, and index arrays on the host or the device."""
    return {"page_size": _page_size(rng), "cache": _pick(rng, ("5d", "tuple_views", "tuple_pair")),
            "kv_storage": _storage(rng, ("page", "head", "dim"), align),
            "spare_pages": int(rng.integers(0, 2 * batch + 4)), "index_on_device": bool(rng.random() < 0.5)}


def _draw_alibi(rng, cfg: dict) -> None:
    """pos_encoding_mode "ALIBI" for about ALIBI_P of the cases, in place of the mode drawn before. Drawn
    last, after the data seed, so every other choice of a seed (and its arrays) stays as it was without
    ALiBi. With it: no soft cap (NotImplementedError) and no RoPE options; decode's kernel follows the
    mode (tensor cores unless RoPE); prefill keeps its backend (both kernels take ALiBi)."""
    if rng.random() >= ALIBI_P:
        return
    cfg.update(pos_encoding_mode="ALIBI", logits_soft_cap=None, rope_scale=None, rope_theta=None)
    if "kernel" in cfg:
        cfg["kernel"] = "tensor_cores"  # ALiBi draws no RoPE: 16-bit and fp8 KV on tensor cores


def draw_decode(rng, single: bool = False) -> dict:
    q_dtype = _pick(rng, Q_DTYPES)
    kv_dtype = _pick(rng, (q_dtype,) + FP8, p=[0.5, 0.25, 0.25])
    if single and kv_dtype in FP8 and not TORCH:
        # single_decode_with_kv_cache reads float8 from k/v's own dtype (no kv_data_type to plan with),
        # which CuPy has not: float8 single decode is a torch caller, drawn only where torch is importable
        kv_dtype = q_dtype
    rope = bool(rng.random() < 0.25)
    d = 16 * int(rng.integers(1, 17))
    if rng.random() < WIDE_DECODE_P:  # batch_decode_wide_kernel (16-bit or fp8 KV); no RoPE on the fly there
        d, rope = 512, False
    hq, hkv = _heads(rng)
    longest = _log_int(rng, 8, MAX_LEN)
    long_kv = bool(rng.random() < 0.2)  # few long requests: cut over CTAs, then merged
    batch = 1 if single else _log_int(rng, 1, 4 if long_kv else 300)
    kv_lens = [_log_int(rng, 256, MAX_LEN) if long_kv else _length(rng, longest) for _ in range(batch)]
    kv_lens = _fit_decode(kv_lens, hq, hkv, d)
    cfg = {"q_dtype": q_dtype, "kv_dtype": kv_dtype, "long_kv": long_kv,
           "kernel": "cuda_cores" if rope else "tensor_cores",
           "head_dim": d, "num_qo_heads": hq, "num_kv_heads": hkv, "group_size": hq // hkv,
           "pos_encoding_mode": "ROPE_LLAMA" if rope else "NONE", "layout": _pick(rng, ("NHD", "HND")),
           **_options(rng, d, longest, rope), **_scales(rng, kv_dtype in FP8), **_outputs(rng),
           "q_storage": _storage(rng, ("head", "dim")), "q_amp": _pick(rng, (1.0, 3.0), p=[0.8, 0.2])}
    if single:
        cfg.update(kv_len=kv_lens[0], kv_storage=_storage(rng, ("token", "head", "dim", "interleaved")),
                   q_scale=_log_float(rng, 0.5, 2.0) if rng.random() < 0.2 else None)
    else:
        cfg.update(kv_lens=kv_lens, **_paged_choices(rng, len(kv_lens)), use_cuda_graph=bool(rng.random() < 0.15))
    cfg["data_seed"] = int(rng.integers(2 ** 62))
    if not single:  # drawn last: every earlier choice of a seed stays as it was before sinks
        cfg["sinks"] = bool(rng.random() < SINKS_P)
    _draw_alibi(rng, cfg)  # after sinks, for the same reason
    return cfg


def draw_prefill(rng, kind: str) -> dict:
    """kind: "paged", "ragged" or "single"."""
    backend = _pick(rng, ("fa2", "fa3", "auto"), p=[0.4, 0.3, 0.3])
    q_dtype = _pick(rng, Q_DTYPES)
    d_vo = None  # head_dim_vo; None: V and the output have head_dim_qk
    if backend == "fa3":  # the Hopper kernel's space: head_dim 64/128, K/V in the q dtype, no RoPE
        d, kv_dtype, rope = _pick(rng, (64, 128)), q_dtype, False
    else:
        # 64 / 128 / 256 here and the fa3 draws: about half the cases; RoPE (those head dims only) about
        # as often as when every case had them
        d = _pick(rng, PREFILL_HEAD_DIMS) if rng.random() < 0.3 else _pick(rng, NEW_PREFILL_HEAD_DIMS)
        rope = d in PREFILL_HEAD_DIMS and bool(rng.random() < 0.5)
        # fp8 K/V (equal head dims); single prefill reads float8 from k / v's own dtype, which CuPy has
        # not: those cases are torch callers, drawn only where torch is importable (as single decode's)
        fp8_ok = kind != "single" or TORCH
        kv_dtype = _pick(rng, (q_dtype,) + FP8, p=[0.6, 0.2, 0.2]) if fp8_ok else q_dtype
        if kind in QK_VO_KINDS and rng.random() < QK_VO_P:  # no RoPE and no fp8 beside it
            (d, d_vo), rope, kv_dtype = _pick(rng, QK_VO_PAIRS), False, q_dtype
    dv = d if d_vo is None else d_vo
    hq, hkv = _heads(rng)
    long_kv = bool(rng.random() < 0.2)  # few query tiles on long contexts: KV split + merge
    batch = 1 if kind == "single" else _log_int(rng, 1, 4 if long_kv else 128)
    if long_kv:
        qo_lens = [_log_int(rng, 1, 64) for _ in range(batch)]
        kv_lens = [_log_int(rng, 1024, MAX_LEN) for _ in range(batch)]
    else:
        lq, lk = _log_int(rng, 8, MAX_LEN), _log_int(rng, 8, MAX_LEN)
        qo_lens = [_length(rng, lq) for _ in range(batch)]
        kv_lens = [_length(rng, lk) for _ in range(batch)]
    qo_lens, kv_lens = _fit_prefill(qo_lens, kv_lens, hq, hkv, max(d, dv))
    # mask: "none", or a random custom mask ("bool" or "packed"); "causal_vs_mask" plans the batch
    # with causal=True and again with the equivalent custom mask: both must match the reference.
    mask = _pick(rng, ("none", "bool", "packed", "causal_vs_mask"), p=[0.55, 0.15, 0.15, 0.15])
    cfg = {"backend": backend, "q_dtype": q_dtype, "kv_dtype": kv_dtype, "head_dim": d, "head_dim_vo": dv,
           "num_qo_heads": hq, "num_kv_heads": hkv, "group_size": hq // hkv, "qo_lens": qo_lens, "kv_lens": kv_lens,
           "long_kv": long_kv,
           "mask": mask, "causal": mask == "causal_vs_mask" or (mask == "none" and bool(rng.random() < 0.5)),
           "mask_kind": _pick(rng, ("bool", "packed")) if mask == "causal_vs_mask" else mask,
           "mask_density": float(round(rng.uniform(0.0, 1.0), 3)), "mask_dead_rows": bool(rng.random() < 0.3),
           "pos_encoding_mode": "ROPE_LLAMA" if rope else "NONE",
           **_options(rng, d, max(max(kv_lens), 1), rope), **_outputs(rng),
           "q_storage": _storage(rng, ("head", "dim")), "q_amp": _pick(rng, (1.0, 3.0), p=[0.8, 0.2])}
    # fp8 K/V: prefill copies 16 values at a time, so the API asks for 16-element alignment
    align = 16 if kv_dtype in FP8 else 8
    if kind == "paged":
        cfg.update(layout=_pick(rng, ("NHD", "HND")), **_paged_choices(rng, len(kv_lens), align),
                   **_scales(rng, kv_dtype in FP8))
        if dv != d:  # two head dims: only a (k_cache, v_cache) pair of separate arrays holds them
            cfg["cache"] = "tuple_pair"
    else:
        # k and v of two head dims cannot be the halves of one allocation ("interleaved")
        kinds = ("token", "head", "dim") + (("interleaved",) if dv == d else ())
        cfg.update(layout=_pick(rng, ("NHD", "HND")), kv_storage=_storage(rng, kinds, align))
        if kind == "ragged":
            cfg.update(index_on_device=bool(rng.random() < 0.5), **_scales(rng, kv_dtype in FP8))
        elif kv_dtype in FP8:
            cfg.update(**_scales(rng, True))
        else:
            cfg.update(k_scale=None, v_scale=None)
    if kind != "single":
        # q_extra_rows: q (and out) longer than qo_indptr[-1]; run() must leave those rows alone
        cfg.update(use_cuda_graph=bool(rng.random() < 0.2),
                   q_extra_rows=int(rng.integers(1, 17)) if rng.random() < 0.15 else 0)
    cfg["data_seed"] = int(rng.integers(2 ** 62))
    if kind == "paged":  # drawn last, as in draw_decode
        cfg["sinks"] = bool(rng.random() < SINKS_P)
    _draw_alibi(rng, cfg)  # after sinks, as in draw_decode
    return cfg


def draw_cascade(rng) -> dict:
    op = _pick(rng, ("merge_state", "merge_state_in_place", "merge_states"))
    d = 8 * int(rng.integers(1, 33)) if rng.random() < 0.6 else int(rng.integers(1, 301))
    heads = _log_int(rng, 1, 64)
    states = _log_int(rng, 1, 16) if op == "merge_states" else 2
    seq = 0 if rng.random() < 0.03 else _log_int(rng, 1, 4096)
    seq = max(0, min(seq, MERGE_ELEMS // (states * heads * d)))
    v_storage = _pick(rng, (["contiguous", 0, 0], ["token", 0, 1], ["head", 1, 1], ["dim", 0, 0]))
    if v_storage[0] == "dim":  # any offset and padding: the kernel picks its vector width from them
        v_storage = ["dim", int(rng.integers(0, 4)), int(rng.integers(1, 9))]
    return {"op": op, "dtype": _pick(rng, ("float16", "bfloat16", "float32")), "seq_len": seq, "num_heads": heads,
            "head_dim": d, "num_states": states, "v_storage": v_storage,
            "s_storage": _pick(rng, ("contiguous", "head_padded", "transposed")),
            "lse_amp": _pick(rng, (1.0, 4.0, 16.0)), "empty_frac": float(round(rng.uniform(0.0, 0.5), 3)),
            "all_empty_rows": bool(rng.random() < 0.5),
            "mask": _pick(rng, (None, "bool", "uint8", "int8")) if op == "merge_state_in_place" else None,
            "data_seed": int(rng.integers(2 ** 62))}


# ---------------------------------------------------------------------------------------------
# Building arrays (from config["data_seed"])


def _gens(cfg: dict) -> tuple:
    return cupy.random.default_rng(cfg["data_seed"]), np.random.default_rng(cfg["data_seed"])


def _randn(shape, dtype: str, g, amp: float = 1.0):
    """Normal values as `dtype` (float8: their bytes, uint8)."""
    return cast(g.standard_normal(tuple(shape), dtype=cupy.float32) * np.float32(amp), dtype)


def _view(shape, storage, axes: dict, dtype: str, g, amp: float = 1.0):
    """Random values of `shape` laid out as `storage` asks: a view into a larger allocation padded
    along axis axes[kind] (before, after elements), or a contiguous array."""
    kind, before, after = storage
    if kind not in axes:
        return _randn(shape, dtype, g, amp)
    ax = axes[kind]
    full = list(shape)
    full[ax] += before + after
    idx = [slice(None)] * len(shape)
    idx[ax] = slice(before, before + shape[ax])
    return _randn(full, dtype, g, amp)[tuple(idx)]


def _sinks(cfg: dict, g):
    """The sinks argument: float32 (num_qo_heads,), N(0, 2), or None. Drawn after a case's other arrays,
    so those are the same with sinks or without."""
    if not cfg.get("sinks"):
        return None
    return g.standard_normal(cfg["num_qo_heads"], dtype=cupy.float32) * np.float32(2.0)


def _kv_views(shape, storage, axes: dict, dtype: str, g):
    """(k, v) of one shape and the same strides (the API requires it)."""
    if storage[0] == "interleaved":
        both = _randn(tuple(shape[:-1]) + (2, shape[-1]), dtype, g)
        return both[..., 0, :], both[..., 1, :]
    return _view(shape, storage, axes, dtype, g), _view(shape, storage, axes, dtype, g)


_FP8_VALUES = {}


def _f64(x, dtype: str | None = None):
    """A CuPy array (any layout) as a float64 CuPy array; `dtype` names the float8 type of uint8 bytes.
    No arithmetic on bfloat16 (CuPy may have none): its bits are widened as integers."""
    if dtype in FP8:  # the 256 byte values looked up in a table
        if dtype not in _FP8_VALUES:
            _FP8_VALUES[dtype] = cupy.asarray(np.arange(256, dtype=np.uint8).view(host_dtype(dtype)).astype(np.float64))
        return _FP8_VALUES[dtype][x.astype(cupy.int32)]
    if x.dtype == BF16:
        return (x.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32).astype(cupy.float64)
    return x.astype(cupy.float64)


def _round32(x, dtype: str):
    """A float32 CuPy array rounded to `dtype` (to nearest even), kept in float32."""
    if dtype == "float16":
        return x.astype(cupy.float16).astype(cupy.float32)
    if dtype == "bfloat16":
        return (cast(x, "bfloat16").view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32)
    return x


def _round64(x, dtype: str):
    """A float64 CuPy array rounded to `dtype` (through float32, as the kernels round their float32
    results), as float64."""
    return _round32(x.astype(cupy.float32), dtype).astype(cupy.float64)


def _bits(x):
    """x viewed as unsigned integers of its item size: copies and bit-exact compares without float
    arithmetic on bfloat16."""
    return x.view({1: cupy.uint8, 2: cupy.uint16, 4: cupy.uint32, 8: cupy.uint64}[x.dtype.itemsize])


def _clone(x):
    """A contiguous copy of x (any dtype: copied as bits)."""
    return _bits(x).copy().view(x.dtype)


def _nan(shape, dtype: str = "float32"):
    return nan_like(empty(tuple(shape), dtype))


def _from_torch(t):
    """A torch tensor (not float8) as a CuPy array on the same memory (bfloat16: ml_dtypes)."""
    if t.dtype == torch.bfloat16:
        return _from_torch(t.view(torch.int16)).view(BF16)
    if t.numel() == 0:
        return cupy.empty(tuple(t.shape), dtype=str(t.dtype).replace("torch.", ""))
    return cupy.from_dlpack(t)


class PagedKV:
    """A paged cache as the config asks (layout, 5-D or (k, v) pair, storage), its shuffled page
    table with spare pages, and every request's K/V rows in float64 for the reference."""

    def __init__(self, cfg: dict, kv_lens: list, g, rng):
        ps, hkv, d, layout = cfg["page_size"], cfg["num_kv_heads"], cfg["head_dim"], cfg["layout"]
        dv = cfg.get("head_dim_vo", d)  # V's head dim (prefill); other than d: a "tuple_pair" cache
        npages = [-(-n // ps) for n in kv_lens]
        used = sum(npages)
        total = max(used + cfg["spare_pages"], 1)  # at least one page, even when every request is empty
        self.indptr = np.concatenate([[0], np.cumsum(npages)]).astype(np.int32)
        self.indices = rng.permutation(total)[:used].astype(np.int32)
        self.last_page_len = np.array([n - (p - 1) * ps if p else 0 for n, p in zip(kv_lens, npages)], np.int32)
        self.kv_lens, self.ps, self.hkv, self.d, self.dtype = kv_lens, ps, hkv, d, cfg["kv_dtype"]
        inner = (ps, hkv, d) if layout == "NHD" else (hkv, ps, d)
        head = 2 if layout == "NHD" else 1
        if cfg["cache"] == "tuple_pair":
            axes = {"page": 0, "head": head, "dim": 3}
            if dv == d:
                k, v = _kv_views((total,) + inner, cfg["kv_storage"], axes, cfg["kv_dtype"], g)
            else:  # v_cache of head_dim_vo, laid out as k_cache
                k = _view((total,) + inner, cfg["kv_storage"], axes, cfg["kv_dtype"], g)
                v = _view((total,) + inner[:2] + (dv,), cfg["kv_storage"], axes, cfg["kv_dtype"], g)
            self.arg = (k, v)
        else:
            axes = {"page": 0, "head": head + 1, "dim": 4}
            cache = _view((total, 2) + inner, cfg["kv_storage"], axes, cfg["kv_dtype"], g)
            k, v = cache[:, 0], cache[:, 1]
            self.arg = cache if cfg["cache"] == "5d" else (k, v)
        hnd = (0, 2, 1, 3)
        self.k, self.v = (k, v) if layout == "NHD" else (k.transpose(hnd), v.transpose(hnd))  # (P, ps, H, D)

    def index_arrays(self, on_device: bool) -> tuple:
        arrays = (self.indptr, self.indices, self.last_page_len)
        return tuple(cupy.asarray(a) for a in arrays) if on_device else arrays

    def rows_f64(self) -> tuple:
        """(k, v) float64 CuPy (pages in table order x page_size, H, D / head_dim_vo): request r's rows
        start at indptr[r] * page_size."""
        idx = cupy.asarray(self.indices.astype(np.int64))
        return tuple(_f64(x, self.dtype)[idx].reshape(-1, self.hkv, x.shape[-1]) for x in (self.k, self.v))

    def request_rows(self, r: int) -> slice:
        a = int(self.indptr[r]) * self.ps
        return slice(a, a + self.kv_lens[r])


# ---------------------------------------------------------------------------------------------
# Checks


def _check_dead_rows(out, dead, what: str) -> None:
    """Every row (or (row, head)) that sees no key (`dead`, a bool mask of out's leading axes) must give
    o = 0 exactly."""
    assert np.all(out[dead] == 0), f"{what}: rows that see no key are not exactly 0"


def _check_decode_like(o, lse, ref_o, ref_lse, dtype: str, what: str, dead=None, slack=None) -> None:
    """dead: the rows that see no key; None: those of reference lse -inf (with sinks it is finite).
    slack: an element-wise allowance added to OUT_TOL's (see _rope_slack), or None."""
    out, ro, rl = cupy.asnumpy(_f64(o)), cupy.asnumpy(ref_o), cupy.asnumpy(ref_lse)
    if slack is not None:
        slack = cupy.asnumpy(slack)
        atol, rtol = OUT_TOL[dtype]
        err = np.abs(out - ro)
        excess = err - (atol + rtol * np.abs(ro))  # > 0: outside OUT_TOL alone
        if excess.size:
            k = int(np.nanargmax(excess)) if not np.isnan(excess).all() else 0
            print(f"{what}: element {np.unravel_index(k, err.shape)} nearest OUT_TOL's bound: err {err.flat[k]:.3g}, "
                  f"ref {ro.flat[k]:.3g}, RoPE slack {slack.flat[k]:.3g}")  # shown with a failure (or -s)
        ro = np.where(err <= atol + rtol * np.abs(ro) + slack, out, ro)  # within both: passes (NaN stays NaN)
    assert_close(out, ro, dtype, what)
    _check_dead_rows(out, np.isneginf(rl) if dead is None else dead, what)
    if lse is not None:
        assert_lse_close(cupy.asnumpy(lse).astype(np.float64), rl, f"{what} lse")


def _returned(res, cfg: dict, out, lse, kind=cupy.ndarray) -> tuple:
    """(o, lse to check) from a call's return value, arrays of the caller's framework (`kind`); given
    out / lse must come back as themselves."""
    o, lse_back = res if cfg["return_lse"] else (res, None)
    assert isinstance(o, kind), f"returned {type(o).__name__}, not a {kind.__module__}.{kind.__name__}"
    if out is not None:
        assert o is out, "out= given but another array was returned"
    if lse is not None and lse_back is not None:
        assert lse_back is lse, "lse= given but another array was returned"
    return o, (lse_back if lse_back is not None else lse)


def _decode_ref_kw(cfg: dict) -> dict:
    return {"window_left": cfg["window_left"], "logits_soft_cap": cfg["logits_soft_cap"] or 0.0,
            "sm_scale": cfg["sm_scale"], "rope": cfg["pos_encoding_mode"] == "ROPE_LLAMA",
            "alibi": cfg["pos_encoding_mode"] == "ALIBI",
            "rope_scale": cfg["rope_scale"] or 1.0, "rope_theta": cfg["rope_theta"] or 1e4,
            "k_scale": cfg["k_scale"] or 1.0, "v_scale": cfg["v_scale"] or 1.0}


def _api_kw(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("pos_encoding_mode", "window_left", "logits_soft_cap", "sm_scale", "rope_scale",
                                "rope_theta")}


def _rope_slack(ref, kw: dict):
    """|ref(kw) - ref(kw with inv_freq one fp32 ulp larger)|, doubled: how far the reference itself moves
    when the RoPE frequencies round the other way (float32 inv_freq computed through another pow, as
    implementations legitimately differ). Large scores (sm_scale and k_scale above their defaults) turn
    that ulp into visible output changes; None without RoPE. ref(kw) -> the outputs, float64."""
    if not kw["rope"]:
        return None
    nudged = dict(kw, rope_scale=kw["rope_scale"] * (1.0 - 2.0 ** -23))
    return 2.0 * cupy.abs(ref(nudged) - ref(kw))


def check_decode(cfg: dict) -> None:
    g, rng = _gens(cfg)
    hq, hkv, d, lens = cfg["num_qo_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["kv_lens"]
    paged = PagedKV(cfg, lens, g, rng)
    q = _view((len(lens), hq, d), cfg["q_storage"], {"head": 1, "dim": 2}, cfg["q_dtype"], g, cfg["q_amp"])
    sinks = _sinks(cfg, g)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8),
                                                   cfg["layout"], use_cuda_graph=cfg["use_cuda_graph"])
    # a float8 cache is its bytes (uint8): the wrapper reads it as the planned kv_data_type
    w.plan(*paged.index_arrays(cfg["index_on_device"]), hq, hkv, d, cfg["page_size"], q_data_type=cfg["q_dtype"],
           kv_data_type=cfg["kv_dtype"], **_api_kw(cfg))
    out = _nan(q.shape, cfg["q_dtype"]) if cfg["out_given"] else None
    lse = _nan((len(lens), hq)) if cfg["lse_given"] else None
    res = w.run(q, paged.arg, k_scale=cfg["k_scale"], v_scale=cfg["v_scale"], out=out, lse=lse,
                return_lse=cfg["return_lse"], sinks=sinks)
    o, lse = _returned(res, cfg, out, lse)
    qc = _f64(q)
    kc, vc = paged.rows_f64()
    kw = _decode_ref_kw(cfg)
    def ref(kw):
        return [reference.decode_attention(qc[r], kc[paged.request_rows(r)], vc[paged.request_rows(r)], sinks=sinks,
                                           **kw) for r in range(len(lens))]
    refs = ref(kw)
    slack = _rope_slack(lambda kw: cupy.stack([a for a, _ in ref(kw)]), kw)
    _check_decode_like(o, lse, cupy.stack([a for a, _ in refs]), cupy.stack([b for _, b in refs]), cfg["q_dtype"],
                       "decode", dead=np.array(lens) == 0, slack=slack)


def check_single_decode(cfg: dict) -> None:
    g, _ = _gens(cfg)
    hq, hkv, d, n = cfg["num_qo_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["kv_len"]
    nhd = cfg["layout"] == "NHD"
    shape = (n, hkv, d) if nhd else (hkv, n, d)
    k, v = _kv_views(shape, cfg["kv_storage"], {"token": 0 if nhd else 1, "head": 1 if nhd else 0, "dim": 2},
                     cfg["kv_dtype"], g)
    q = _view((hq, d), cfg["q_storage"], {"head": 0, "dim": 1}, cfg["q_dtype"], g, cfg["q_amp"])
    out = _nan(q.shape, cfg["q_dtype"]) if cfg["out_given"] else None
    lse = _nan((hq,)) if cfg["lse_given"] else None
    # float8 k/v: this API takes float8 from the arrays' own dtype, which CuPy has not; the case is a
    # torch caller (drawn only where torch is importable) on the same memory
    torch_call = cfg["kv_dtype"] in FP8
    if torch_call:
        args = [to_torch(q, cfg["q_dtype"]), to_torch(k, cfg["kv_dtype"]), to_torch(v, cfg["kv_dtype"])]
        out_t = None if out is None else to_torch(out, cfg["q_dtype"])
        lse_t = None if lse is None else to_torch(lse, "float32")
    else:
        args, out_t, lse_t = [q, k, v], out, lse
    res = fi_cupy.single_decode_with_kv_cache(*args, kv_layout=cfg["layout"], q_scale=cfg["q_scale"],
                                              k_scale=cfg["k_scale"], v_scale=cfg["v_scale"],
                                              return_lse=cfg["return_lse"], out=out_t, lse=lse_t, **_api_kw(cfg))
    o, lse = _returned(res, cfg, out_t, lse_t, torch.Tensor if torch_call else cupy.ndarray)
    if torch_call:
        o, lse = _from_torch(o), None if lse is None else _from_torch(lse)
    kw = _decode_ref_kw(cfg)
    if cfg["q_scale"] is not None:
        kw["sm_scale"] = (cfg["sm_scale"] or 1.0 / math.sqrt(d)) * cfg["q_scale"]
    kc, vc = (_f64(x if nhd else x.transpose(1, 0, 2), cfg["kv_dtype"]) for x in (k, v))
    ref_o, ref_lse = reference.decode_attention(_f64(q), kc, vc, **kw)
    slack = _rope_slack(lambda kw: reference.decode_attention(_f64(q), kc, vc, **kw)[0], kw)
    _check_decode_like(o, lse, ref_o, ref_lse, cfg["q_dtype"], "single_decode", slack=slack)


def _masks(cfg: dict, g) -> list:
    """Each request's (qo_len, kv_len) bool mask (CuPy), or None without a custom mask."""
    if cfg["mask"] == "none":
        return None
    out = []
    for qo, kv in zip(cfg["qo_lens"], cfg["kv_lens"]):
        if cfg["mask"] == "causal_vs_mask":  # key j visible to row i when j <= i + kv - qo
            m = cupy.arange(kv)[None, :] <= cupy.arange(qo)[:, None] + (kv - qo)
        else:
            m = g.random((qo, kv), dtype=cupy.float32) < cfg["mask_density"]
            if cfg["mask_dead_rows"]:
                m &= ~(g.random(qo, dtype=cupy.float32) < 0.2)[:, None]
        out.append(m)
    return out


def _mask_kwargs(cfg: dict, masks: list, single: bool) -> dict:
    """plan() / single_prefill arguments of a custom mask: bool, or packed little-endian."""
    if single:
        flat = masks[0].reshape(-1)
        if cfg["mask_kind"] == "bool":
            return {"custom_mask": masks[0]}
        return {"packed_custom_mask": fi_cupy.packbits(flat, bitorder="little")}
    flat = cupy.concatenate([m.reshape(-1) for m in masks])
    if cfg["mask_kind"] == "bool":
        return {"custom_mask": flat}
    bit_indptr = np.concatenate([[0], np.cumsum([m.size for m in masks])]).astype(np.int64)
    packed, _ = fi_cupy.segment_packbits(flat, bit_indptr, bitorder="little")
    return {"packed_custom_mask": packed}


def _keep(lq: int, lk: int, cfg: dict, mask):
    """The reference's visibility rule (CuPy bool (lq, lk)), for the naive baseline."""
    qpos = cupy.arange(lq) + lk - lq
    j = cupy.arange(lk)[None, :]
    keep = cupy.ones((lq, lk), dtype=bool)
    if cfg["causal"]:
        keep &= j <= qpos[:, None]
    if cfg["window_left"] >= 0:
        keep &= j >= qpos[:, None] - cfg["window_left"]
    if mask is not None:
        keep &= mask
    return keep


def _rotated_in(dtype: str, q64, k64, cfg: dict) -> tuple:
    """(q, k) of one request rotated by RoPE in float64 and rounded to `dtype`, as float64 CuPy."""
    lq, lk = q64.shape[0], k64.shape[0]
    rs, rt = cfg["rope_scale"] or 1.0, cfg["rope_theta"] or 1e4
    q = reference.rope_llama(q64.transpose(1, 0, 2), cupy.arange(lq) + lk - lq, rs, rt).transpose(1, 0, 2)
    k = reference.rope_llama(k64.transpose(1, 0, 2), cupy.arange(lk), rs, rt).transpose(1, 0, 2)
    return _round64(q, dtype), _round64(k, dtype)


def _naive(q, k, v, keep, cfg: dict, dtype: str, sinks=None):
    """The same attention computed in the input dtype: float64 CuPy q, k, v holding values of `dtype`;
    scores, softmax and P V computed in float32 and rounded to `dtype` after each step, as torch's
    16-bit matmul / softmax / elementwise ops do. The error baseline of test_prefill.py's rule (RoPE
    already applied; ALiBi's bias added to the scaled scores in float32, the sum not rounded to `dtype`,
    as test_prefill.py's `attention` does). Returns (o float64 (Lq, Hq, Dv), base-2 lse float64 (Lq, Hq)),
    Dv v's head dim; the default scale 1 / sqrt(q's)."""
    lq, hq, d = q.shape
    if k.shape[0] == 0:  # no keys: o = 0, lse = -inf (with sinks: the sink alone)
        return reference.with_sinks(cupy.zeros((lq, hq, v.shape[-1])), cupy.full((lq, hq), -cupy.inf), sinks)
    g = hq // k.shape[1]
    scale = cfg["sm_scale"] or 1.0 / math.sqrt(d)
    q, k, v = (x.astype(cupy.float32) for x in (q, k, v))  # exact: the values are of `dtype`
    kh = cupy.repeat(k, g, axis=1).transpose(1, 2, 0)  # (Hq, D, Lk)
    vh = cupy.repeat(v, g, axis=1).transpose(1, 0, 2)  # (Hq, Lk, D)
    s = _round32(cupy.matmul(q.transpose(1, 0, 2), kh), dtype)
    s = _round32(s * np.float32(scale), dtype)
    if cfg["pos_encoding_mode"] == "ALIBI":  # the query at lk - lq + i
        lk = k.shape[0]
        s = s + reference.alibi_bias(hq, cupy.arange(lq) + lk - lq, cupy.arange(lk), cupy).astype(cupy.float32)
    cap = cfg["logits_soft_cap"]
    if cap:
        s = _round32(np.float32(cap) * _round32(cupy.tanh(_round32(s / np.float32(cap), dtype)), dtype), dtype)
    s = cupy.where(keep[None], s, -cupy.inf)
    m = s.max(axis=-1, keepdims=True)
    m = cupy.where(cupy.isfinite(m), m, 0)
    e = cupy.exp(s - m)  # -inf (hidden) -> 0
    den = e.sum(axis=-1, keepdims=True)
    p = _round32(cupy.where(den > 0, e / cupy.where(den > 0, den, 1), 0), dtype)  # a row that sees nothing: 0
    den64 = cupy.exp(s.astype(cupy.float64) - m).sum(axis=-1)
    lse = cupy.where(den64 > 0, m[..., 0] + cupy.log(cupy.where(den64 > 0, den64, 1)), -cupy.inf) / math.log(2.0)
    o = _round32(cupy.matmul(p, vh), dtype).transpose(1, 0, 2).astype(cupy.float64)  # (Lq, Hq, D)
    lse = lse.transpose(1, 0)  # base 2 (Lq, Hq)
    if sinks is None:
        return o, lse
    o, lse = reference.with_sinks(o, lse, sinks)  # the sink scales each finished row: one more step, rounded
    return _round64(o, dtype), lse


def _check_prefill_request(o, ref_o, naive, dtype: str, what: str) -> None:
    """test_prefill.py's rule on one request (CuPy float64 arrays): max error <= 2 x the naive
    error, or within OUT_TOL element-wise."""
    assert not bool(cupy.isnan(o).any()), f"{what}: NaN in output (unwritten or invalid elements)"
    diff = cupy.abs(o - ref_o)
    err, base = float(diff.max()), float(cupy.abs(naive - ref_o).max())
    if err <= 2 * base + 1e-6:
        return
    atol, rtol = OUT_TOL[dtype]
    bad = int((diff > atol + rtol * cupy.abs(ref_o)).sum())
    assert bad == 0, (f"{what}: max error {err:.3g} > 2 x naive {dtype} error {base:.3g}, and {bad} elements "
                      f"are outside OUT_TOL (atol {atol}, rtol {rtol})")


def _prefill_kv(cfg: dict, g, rng, kind: str) -> tuple:
    """K/V of a prefill case: (what run() takes, the PagedKV or None, request r -> its (k, v) rows
    as float64 CuPy (kv_len, H, D)), from the paged cache or the requests' concatenated rows."""
    hkv, d, dv, kv_lens = cfg["num_kv_heads"], cfg["head_dim"], cfg["head_dim_vo"], cfg["kv_lens"]
    if kind == "paged":
        paged = PagedKV(cfg, kv_lens, g, rng)
        kc, vc = paged.rows_f64()
        return paged.arg, paged, lambda r: (kc[paged.request_rows(r)], vc[paged.request_rows(r)])
    nhd = cfg["layout"] == "NHD"
    n = sum(kv_lens)
    shape = (n, hkv, d) if nhd else (hkv, n, d)
    axes = {"token": 0 if nhd else 1, "head": 1 if nhd else 0, "dim": 2}
    if dv == d:
        k, v = _kv_views(shape, cfg["kv_storage"], axes, cfg["kv_dtype"], g)
    else:  # v of head_dim_vo, laid out as k
        k = _view(shape, cfg["kv_storage"], axes, cfg["kv_dtype"], g)
        v = _view(shape[:2] + (dv,), cfg["kv_storage"], axes, cfg["kv_dtype"], g)
    kc, vc = (_f64(x if nhd else x.transpose(1, 0, 2), cfg["kv_dtype"]) for x in (k, v))
    starts = np.concatenate([[0], np.cumsum(kv_lens)])
    rows = [slice(int(starts[r]), int(starts[r + 1])) for r in range(len(kv_lens))]
    return (k, v), None, lambda r: (kc[rows[r]], vc[rows[r]])


def _run_prefill(cfg: dict, kind: str, kv_arg, qo_indptr, q, masks, causal: bool, paged=None, sinks=None):
    """One plan + run (or a single_prefill call) as the config asks; returns (o, lse). sinks: paged only."""
    hq, hkv, d, dv = cfg["num_qo_heads"], cfg["num_kv_heads"], cfg["head_dim"], cfg["head_dim_vo"]
    mask_kw = {} if masks is None else _mask_kwargs(cfg, masks, kind == "single")
    out = _nan(q.shape[:2] + (dv,), cfg["q_dtype"]) if cfg["out_given"] else None
    lse = _nan(q.shape[:2]) if cfg["lse_given"] else None
    opts = _api_kw(cfg)
    scales = {"k_scale": cfg["k_scale"], "v_scale": cfg["v_scale"]}
    if kind == "single":  # head_dim_vo from v's shape
        k, v = kv_arg
        # float8 k/v: single prefill takes float8 from the arrays' own dtype, which CuPy has not; the case
        # is a torch caller (drawn only where torch is importable) on the same memory, its mask too
        torch_call = cfg["kv_dtype"] in FP8
        if torch_call:
            args = [to_torch(q, cfg["q_dtype"]), to_torch(k, cfg["kv_dtype"]), to_torch(v, cfg["kv_dtype"])]
            mask_kw = {n: to_torch(m, str(m.dtype)) for n, m in mask_kw.items()}
            out_t = None if out is None else to_torch(out, cfg["q_dtype"])
            lse_t = None if lse is None else to_torch(lse, "float32")
        else:
            args, out_t, lse_t = [q, k, v], out, lse
        res = fi_cupy.single_prefill_with_kv_cache(*args, causal=causal, kv_layout=cfg["layout"],
                                                   return_lse=cfg["return_lse"], out=out_t, lse=lse_t,
                                                   backend=cfg["backend"], **scales, **mask_kw, **opts)
        o, lse = _returned(res, cfg, out_t, lse_t, torch.Tensor if torch_call else cupy.ndarray)
        if torch_call:
            o, lse = _from_torch(o), None if lse is None else _from_torch(lse)
        return o, lse
    ws = cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8)
    qo_ip = cupy.asarray(qo_indptr) if cfg.get("index_on_device") else qo_indptr
    common = dict(causal=causal, q_data_type=cfg["q_dtype"], kv_data_type=cfg["kv_dtype"], **mask_kw, **opts)
    if dv != d:
        common["head_dim_vo"] = dv
    if kind == "paged":
        w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(ws, cfg["layout"], cfg["use_cuda_graph"],
                                                        backend=cfg["backend"])
        # a float8 cache is its bytes (uint8): the wrapper reads it as the planned kv_data_type
        w.plan(qo_ip, *paged.index_arrays(cfg["index_on_device"]), hq, hkv, d, cfg["page_size"], **common)
        res = w.run(q, kv_arg, out=out, lse=lse, return_lse=cfg["return_lse"], sinks=sinks, **scales)
    else:
        kv_ip = np.concatenate([[0], np.cumsum(cfg["kv_lens"])]).astype(np.int32)
        kv_ip = cupy.asarray(kv_ip) if cfg["index_on_device"] else kv_ip
        w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(ws, cfg["layout"], cfg["use_cuda_graph"],
                                                         backend=cfg["backend"])
        w.plan(qo_ip, kv_ip, hq, hkv, d, **common)
        res = w.run(q, *kv_arg, out=out, lse=lse, return_lse=cfg["return_lse"], **scales)
    o, lse = _returned(res, cfg, out, lse)
    if out is not None and q.shape[0] > qo_indptr[-1]:  # rows past qo_indptr[-1] are left alone
        assert bool(cupy.isnan(_f64(o[int(qo_indptr[-1]):])).all()), f"{kind}: rows past qo_indptr[-1] were written"
    return o, lse


def check_prefill(cfg: dict, kind: str) -> None:
    if cfg["backend"] == "fa3" and cupy.cuda.Device().compute_capability != "90":
        pytest.skip("backend fa3 (the Hopper prefill kernel) needs an sm_90a GPU")
    g, rng = _gens(cfg)
    hq, d, qo_lens = cfg["num_qo_heads"], cfg["head_dim"], cfg["qo_lens"]
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    total = int(qo_indptr[-1])
    kv_arg, paged, kv_f64 = _prefill_kv(cfg, g, rng, kind)
    q = _view((total + cfg.get("q_extra_rows", 0), hq, d), cfg["q_storage"], {"head": 1, "dim": 2}, cfg["q_dtype"],
              g, cfg["q_amp"])
    masks = _masks(cfg, g)
    sinks = _sinks(cfg, g)
    runs = {"custom mask" if masks is not None else "causal" if cfg["causal"] else "no mask":
            _run_prefill(cfg, kind, kv_arg, qo_indptr, q, masks, cfg["causal"] and masks is None, paged, sinks)}
    if cfg["mask"] == "causal_vs_mask":
        runs["causal"] = _run_prefill(cfg, kind, kv_arg, qo_indptr, q, None, True, paged, sinks)
    # Reference and naive baseline, request by request (float64 / rounded to the input dtype, CuPy).
    ks, vs = cfg["k_scale"] or 1.0, cfg["v_scale"] or 1.0
    rope = cfg["pos_encoding_mode"] == "ROPE_LLAMA"
    ref_kw = {"causal": cfg["causal"], "window_left": cfg["window_left"],
              "logits_soft_cap": cfg["logits_soft_cap"] or 0.0, "sm_scale": cfg["sm_scale"],
              "alibi": cfg["pos_encoding_mode"] == "ALIBI"}
    ref_lse = np.full((total, hq), -np.inf)
    dead = np.zeros(total, bool)  # rows that see no key
    lse_tol = np.zeros(total)  # RoPE: per row, twice the naive lse error of its request (see below)
    outs = {name: (_f64(o[:total]), lse) for name, (o, lse) in runs.items()}
    for r, (a, b) in enumerate(zip(qo_indptr[:-1], qo_indptr[1:])):
        if a == b:
            continue
        q64 = _f64(q[a:b])
        k64, v64 = kv_f64(r)
        if rope:  # the kernels rotate Q and K in the 16-bit q dtype (as FlashInfer's prefill does):
            q64, k64 = _rotated_in(cfg["q_dtype"], q64, k64, cfg)  # the references see those rounded values
        k64, v64 = k64 * ks, v64 * vs  # fp8 (or scaled) K/V: the reference sees the dequantised values
        m = None if masks is None else masks[r]
        ro, rl = reference.prefill_attention(q64, k64, v64, custom_mask=m, sinks=sinks, **ref_kw)
        ref_lse[a:b] = cupy.asnumpy(rl)
        qt, kt, vt = (_round64(x, cfg["q_dtype"]) for x in (q64, k64, v64))  # naive: dequantised to the q dtype
        keep = _keep(b - a, k64.shape[0], cfg, m)
        dead[a:b] = cupy.asnumpy(~keep.any(axis=1))
        naive, naive_lse = _naive(qt, kt, vt, keep, cfg, cfg["q_dtype"], sinks)
        if rope:
            nl, rl_np = cupy.asnumpy(naive_lse), ref_lse[a:b]
            fin = np.isfinite(rl_np)
            lse_tol[a:b] = 2 * float(np.abs(nl[fin] - rl_np[fin]).max(initial=0.0))
        for name, (oc, _) in outs.items():
            _check_prefill_request(oc[a:b], ro, naive, cfg["q_dtype"], f"{kind} ({name}) request {r}")
    for name, (o, lse) in runs.items():
        _check_dead_rows(cupy.asnumpy(outs[name][0]), dead, f"{kind} ({name})")
        if lse is None:
            continue
        got = cupy.asnumpy(lse[:total]).astype(np.float64)
        if rope:
            # The fp32 angles of the kernel and of the reference may round a rotated element to
            # neighbouring 16-bit values: the lse is held to the accuracy rule of the outputs (twice the
            # error of the same attention done in the input dtype), or to LSE_TOL.
            fin = np.isfinite(ref_lse)
            err = np.where(fin, np.abs(got - np.where(fin, ref_lse, 0.0)), 0.0)
            if np.all(err <= lse_tol[:, None] + 1e-6):
                assert np.array_equal(np.isinf(got), ~fin), f"{kind} ({name}) lse: -inf mismatch"
                continue
        assert_lse_close(got, ref_lse, f"{kind} ({name}) lse")


def _lse(shape, cfg: dict, g, dead=None):
    """float32 base-2 lse states, some empty (-inf), laid out as cfg["s_storage"] asks."""
    shape = tuple(shape)
    s = g.standard_normal(shape, dtype=cupy.float32) * np.float32(cfg["lse_amp"])
    s = cupy.where(g.random(shape, dtype=cupy.float32) < cfg["empty_frac"], -cupy.inf, s)
    if dead is not None:
        s = cupy.where(dead, -cupy.inf, s)
    layout = cfg["s_storage"]
    if layout == "head_padded":
        big = cupy.zeros(shape[:-1] + (shape[-1] + 3,), dtype=cupy.float32)
        big[..., 1:1 + shape[-1]] = s
        return big[..., 1:1 + shape[-1]]
    if layout == "transposed":  # the first and last axes' strides swapped
        return cupy.ascontiguousarray(cupy.swapaxes(s, 0, -1)).swapaxes(0, -1)
    return s


def check_cascade(cfg: dict) -> None:
    g, _ = _gens(cfg)
    seq, h, d, n, dt = cfg["seq_len"], cfg["num_heads"], cfg["head_dim"], cfg["num_states"], cfg["dtype"]
    dead = g.random((seq, h), dtype=cupy.float32) < 0.1 if cfg["all_empty_rows"] else None
    if cfg["op"] == "merge_states":
        v = _view((seq, n, h, d), cfg["v_storage"], {"token": 0, "head": 2, "dim": 3}, dt, g)
        s = _lse((seq, n, h), cfg, g, None if dead is None else dead[:, None, :])
        vm, sm = fi_cupy.merge_states(v, s)
        ref_v, ref_s = reference.merge_states(_f64(v), _f64(s))
    else:
        axes = {"token": 0, "head": 1, "dim": 2}
        va, vb = _view((seq, h, d), cfg["v_storage"], axes, dt, g), _view((seq, h, d), cfg["v_storage"], axes, dt, g)
        sa, sb = _lse((seq, h), cfg, g, dead), _lse((seq, h), cfg, g, dead)
        ref_v, ref_s = reference.merge_state(_f64(va), _f64(sa), _f64(vb), _f64(sb))
        if cfg["op"] == "merge_state":
            vm, sm = fi_cupy.merge_state(va, sa, vb, sb)
        else:
            v0, s0 = _clone(va), _clone(sa)
            mask = None
            if cfg["mask"] is not None:
                mask = (g.random(seq, dtype=cupy.float32) < 0.5).astype(cfg["mask"])
            assert fi_cupy.merge_state_in_place(va, sa, vb, sb, mask=mask) is None
            vm, sm = va, sa
            if mask is not None:  # rows the mask leaves alone keep their state bit for bit; check the rest
                on = mask.astype(bool)
                assert cupy.array_equal(_bits(vm)[~on], _bits(v0)[~on]) and \
                    cupy.array_equal(_bits(sm)[~on], _bits(s0)[~on]), \
                    "merge_state_in_place changed rows its mask leaves alone"
                vm, sm, ref_v, ref_s = _f64(vm)[on], sm[on], ref_v[on], ref_s[on]
    _check_decode_like(vm, sm, ref_v, ref_s, dt, cfg["op"])


# ---------------------------------------------------------------------------------------------
# MLA (fi_cupy/mla.py): absorbed multi-head latent attention over paged ckv / kpe caches

MLA_HEADS = (16, 32, 64, 128)  # DeepSeek's 128 and its tensor-parallel slices; other counts sometimes


def draw_mla(rng) -> dict:
    q_dtype = _pick(rng, Q_DTYPES)
    heads = _pick(rng, MLA_HEADS) if rng.random() < 0.8 else int(rng.integers(1, 131))
    decode = bool(rng.random() < 0.7)
    longest = _log_int(rng, 8, MAX_LEN)
    batch = _log_int(rng, 1, 64 if decode else 8)
    qo_lens = [1 if decode else _length(rng, 96) for _ in range(batch)]
    # chunked: the new queries' keys included, or (a quarter) a context shorter than the queries: qo > kv
    kv_lens = [_length(rng, longest) if decode else _length(rng, max(q, 1)) if rng.random() < 0.25 else
               _length(rng, longest) + q for q in qo_lens]
    # bounds: the scores, the outputs and the cache of the float64 reference (576 = 512 + 64 columns)
    qo_lens, kv_lens = _fit_prefill(qo_lens, kv_lens, heads, 1, 576)
    return {"q_dtype": q_dtype, "num_qo_heads": heads, "decode": decode, "qo_lens": qo_lens, "kv_lens": kv_lens,
            "causal": bool(rng.random() < (0.5 if decode else 0.75)), "page_size": _page_size(rng),
            "extra_pages": int(rng.integers(0, 3)), "spare_pages": int(rng.integers(0, 2 * len(qo_lens) + 4)),
            "sm_scale": _log_float(rng, 0.25, 4.0) / math.sqrt(576) if rng.random() < 0.7 else None,
            "q_storage": _storage(rng, ("head", "dim")), "cache_storage": _storage(rng, ("page", "dim")),
            "sinks": bool(rng.random() < SINKS_P), "use_cuda_graph": bool(rng.random() < 0.2), **_outputs(rng),
            "backend": _pick(rng, ("auto", "fa2")), "data_seed": int(rng.integers(2 ** 31))}


def check_mla(cfg: dict) -> None:
    g, rng = _gens(cfg)
    h, ps, dt, qo_lens, kv_lens = (cfg[k] for k in ("num_qo_heads", "page_size", "q_dtype", "qo_lens", "kv_lens"))
    pages = [-(-n // ps) + cfg["extra_pages"] for n in kv_lens]
    total = sum(pages) + cfg["spare_pages"]
    kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    kv_indices = rng.permutation(total).astype(np.int32)[:sum(pages)]
    qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
    n = int(qo_indptr[-1])
    q_axes, c_axes = {"head": 1, "dim": 2}, {"page": 0, "dim": 2}
    qn, qp = (_view((n, h, d), cfg["q_storage"], q_axes, dt, g) for d in (512, 64))
    ckv, kpe = (_view((total, ps, d), cfg["cache_storage"], c_axes, dt, g) for d in (512, 64))
    sinks = _sinks(cfg, g)
    w = fi_cupy.BatchMLAPagedAttentionWrapper(cupy.empty(WORKSPACE_BYTES, dtype=cupy.uint8),
                                              use_cuda_graph=cfg["use_cuda_graph"], backend=cfg["backend"])
    w.plan(qo_indptr, kv_indptr, kv_indices, np.array(kv_lens, np.int32), h, 512, 64, ps, cfg["causal"],
           cfg["sm_scale"], dt, dt)
    out = _nan((n, h, 512), dt) if cfg["out_given"] else None
    lse = _nan((n, h)) if cfg["lse_given"] else None
    res = w.run(qn, qp, ckv, kpe, out=out, lse=lse, return_lse=cfg["return_lse"], sinks=sinks)
    o, lse = _returned(res, cfg, out, lse)
    fq, fp, fc, fk = _f64(qn), _f64(qp), _f64(ckv), _f64(kpe)
    refs, dead = [], []
    for b, (lq, lk) in enumerate(zip(qo_lens, kv_lens)):
        pg = cupy.asarray(kv_indices[kv_indptr[b]: kv_indptr[b + 1]])
        q0 = int(qo_indptr[b])
        ro, rl = reference.mla_attention(fq[q0:q0 + lq], fp[q0:q0 + lq], fc[pg].reshape(-1, 512)[:lk],
                                         fk[pg].reshape(-1, 64)[:lk], cfg["causal"], cfg["sm_scale"])
        refs.append(reference.with_sinks(ro, rl, sinks))
        seen = np.maximum(0, lk - lq + np.arange(lq) + 1) if cfg["causal"] else np.full(lq, lk)
        dead.append(np.repeat((seen == 0)[:, None], h, axis=1))
    _check_decode_like(o, lse, cupy.concatenate([a for a, _ in refs]), cupy.concatenate([b for _, b in refs]), dt,
                       "mla", dead=np.concatenate(dead) if dead else None)


# ---------------------------------------------------------------------------------------------
# Families


FAMILIES = {
    "decode": (30, draw_decode, check_decode),
    "single_decode": (8, lambda rng: draw_decode(rng, single=True), check_single_decode),
    "prefill_paged": (22, lambda rng: draw_prefill(rng, "paged"), lambda c: check_prefill(c, "paged")),
    "prefill_ragged": (14, lambda rng: draw_prefill(rng, "ragged"), lambda c: check_prefill(c, "ragged")),
    "single_prefill": (10, lambda rng: draw_prefill(rng, "single"), lambda c: check_prefill(c, "single")),
    "cascade": (6, draw_cascade, check_cascade),
    "mla": (8, draw_mla, check_mla),
}


# ---------------------------------------------------------------------------------------------
# The drawn distribution, without a GPU: `python tests/fuzz_attention.py [cases per family]`


def _split_estimate(cfg: dict, kind: str) -> bool:
    """Whether the plan likely cuts some KV range over CTAs (assumes an H200: 132 SMs; decode 2
    CTAs a SM, prefill 1; prefill tiles of 128 packed rows, 64 when every request fits them)."""
    from fi_cupy import scheduler
    g = cfg["group_size"]
    if kind == "decode":
        lens = np.array(cfg["kv_lens"] if "kv_lens" in cfg else [cfg["kv_len"]])
        wl = cfg["window_left"]
        vis = np.maximum(0, lens - 1 - wl) if wl >= 0 else np.zeros_like(lens)
        blocks = cfg["num_kv_heads"] * scheduler.decode_heads_per_block(g)[1]
        return scheduler.decode_schedule(lens, vis, blocks, 264).merge_pairs.size > 0
    rows = 64 if max(cfg["qo_lens"]) * g <= 64 else 128
    return scheduler.prefill_schedule(cfg["qo_lens"], cfg["kv_lens"], g, cfg["num_kv_heads"], rows, 132,
                                      cfg["causal"]).merges.size > 0


def _distribution(n: int) -> None:
    from collections import Counter

    def show(name, values):
        c = Counter(values)
        print(f"  {name}: " + ", ".join(f"{k} {100 * v / len(values):.0f}%" for k, v in sorted(c.items(), key=str)))

    def page_kind(ps):
        return "1" if ps == 1 else "pow2" if ps & (ps - 1) == 0 else "other"

    for fam in ("decode", "single_decode", "prefill_paged", "prefill_ragged", "single_prefill", "cascade", "mla"):
        kind = {"prefill_paged": "paged", "prefill_ragged": "ragged", "single_prefill": "single"}.get(fam)
        draw = {"decode": draw_decode, "single_decode": lambda r: draw_decode(r, single=True),
                "cascade": draw_cascade, "mla": draw_mla}.get(fam) or (lambda r, k=kind: draw_prefill(r, k))
        cfgs = [draw(np.random.default_rng(10 ** 9 + i)) for i in range(n)]
        print(f"{fam} ({n} draws)")
        if fam == "mla":
            show("heads", [c["num_qo_heads"] if c["num_qo_heads"] in MLA_HEADS else "other" for c in cfgs])
            show("dtype", [c["q_dtype"] for c in cfgs])
            show("decode / chunked", ["decode" if c["decode"] else "chunked" for c in cfgs])
            req = [(q, k) for c in cfgs for q, k in zip(c["qo_lens"], c["kv_lens"])]
            show("request", ["qo 0" if q == 0 else "kv 0" if k == 0 else "qo > kv" if q > k else "qo <= kv"
                             for q, k in req])
            show("page size", [page_kind(c["page_size"]) for c in cfgs])
            show("causal", [c["causal"] for c in cfgs])
            show("backend", [c["backend"] for c in cfgs])
            show("sinks", [c["sinks"] for c in cfgs])
            show("CUDA graph", [c["use_cuda_graph"] for c in cfgs])
            continue
        if fam == "cascade":
            show("op", [c["op"] for c in cfgs])
            show("dtype", [c["dtype"] for c in cfgs])
            show("v storage", [c["v_storage"][0] for c in cfgs])
            continue
        show("group size", [c["group_size"] for c in cfgs])
        show("kv dtype", [c["kv_dtype"][:11] for c in cfgs])
        if "kv_lens" in cfgs[0] or "kv_len" in cfgs[0]:
            lens = [n for c in cfgs for n in (c["kv_lens"] if "kv_lens" in c else [c["kv_len"]])]
            show("kv_len", ["0" if x == 0 else "1" if x == 1 else "2-64" if x <= 64 else "65-1023" if x < 1024 else
                            ">=1024" for x in lens])
        if fam.startswith("decode") or fam == "single_decode":
            show("kernel", [c["kernel"] for c in cfgs])
            show("head_dim", [c["head_dim"] for c in cfgs])
            show("split-KV (estimate)", [_split_estimate(c, "decode") for c in cfgs])
        else:
            show("backend", [c["backend"] for c in cfgs])
            show("head_dim", [c["head_dim"] if c["head_dim"] in PREFILL_HEAD_DIMS else "other" for c in cfgs])
            show("head_dim_qk/vo", [f"{c['head_dim']}/{c['head_dim_vo']}" if c["head_dim_vo"] != c["head_dim"]
                                    else "equal" for c in cfgs])
            show("mask", [c["mask"] if c["mask"] != "none" else "causal" if c["causal"] else "none" for c in cfgs])
            req = [(q, k) for c in cfgs for q, k in zip(c["qo_lens"], c["kv_lens"])]
            show("request", ["qo 0" if q == 0 else "kv 0" if k == 0 else "qo > kv" if q > k else "qo <= kv"
                             for q, k in req])
            show("split-KV (estimate)", [_split_estimate(c, "prefill") for c in cfgs])
        if "page_size" in cfgs[0]:
            show("page size", [page_kind(c["page_size"]) for c in cfgs])
            show("cache", [c["cache"] + "/" + c["kv_storage"][0] for c in cfgs])
            show("indices on device", [c["index_on_device"] for c in cfgs])
        if "kv_lens" in cfgs[0]:
            show("batch", ["1" if len(c["kv_lens"]) == 1 else "2-16" if len(c["kv_lens"]) <= 16 else ">16"
                           for c in cfgs])
        show("pos_encoding_mode", [c["pos_encoding_mode"] for c in cfgs])
        show("window_left", ["-1" if c["window_left"] < 0 else "0" if c["window_left"] == 0 else ">0" for c in cfgs])
        show("soft cap", [c["logits_soft_cap"] is not None for c in cfgs])
        if "sinks" in cfgs[0]:
            show("sinks", [c["sinks"] for c in cfgs])


if __name__ == "__main__":
    import sys
    _distribution(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
