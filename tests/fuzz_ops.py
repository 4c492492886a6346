"""Differential fuzz cases of the small-op families, run by tests/test_fuzz.py: paged-KV append, norms,
gated activations, RoPE and sampling. FAMILIES = {name: (weight, draw, check)}.

A case draws a random *valid* configuration from the whole supported space with a pure function of
the numpy Generator (draw_*: dry-run them on the CPU to see the distribution), reports it, then runs
fi_cupy on data made from the configuration's own seed (so the printed dict alone reproduces the
case) and compares every output against fi_cupy.reference under the rules of tolerances.py. Outputs
taken through out= are poisoned with NaN; what a call must not write (padding around strided views,
other pages, the inputs of out-of-place calls) is compared before and after. Sizes are log-uniform
and capped so that a case costs a few ms: the numpy references run on small data, or on a sample of
the rows of a large output (the rest is checked for unwritten NaN).

Inputs are CuPy arrays (CuPy callers; bfloat16 as ml_dtypes.bfloat16, never computed on). Torch
enters in two places only, where torch with CUDA is importable: the sampling randomness form
"torch_generator" (drawn only there), and float8 page appends, whose API takes float8 from the
arrays' own dtype: a torch caller there, elsewhere the same bytes as uint8 CuPy arrays (the append is
a byte copy either way).
"""
import math

import cupy
import numpy as np

import fi_cupy
from fi_cupy import reference, sampling
from gpu_arrays import BF16, cast, dtype_name, empty, f64, host_dtype, nan_like, to_torch
from tolerances import OUT_TOL, assert_close

try:
    import torch
except ImportError:
    torch = None
# the torch callers here (a torch.Generator, float8 appends) need torch built with CUDA
TORCH = torch is not None and torch.cuda.is_available()
FLOATS = ("float16", "bfloat16", "float32")
FP8 = ("float8_e4m3fn", "float8_e5m2")
INDEX_DTYPES = ("int32", "int64")


# ---------------------------------------------------------------------------------------------
# Drawing (numpy Generator only; plain Python values so a config prints and reproduces)


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _chance(rng, p: float) -> bool:
    return bool(rng.random() < p)


def _log_int(rng, lo: int, hi: int) -> int:
    """An int in [lo, hi] (1 <= lo), log-uniform."""
    hi = max(lo, hi)
    return int(min(hi, math.floor(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


def _log_float(rng, lo: float, hi: float, digits: int = 4) -> float:
    return float(f"{math.exp(rng.uniform(math.log(lo), math.log(hi))):.{digits}g}")


def _count(rng, hi: int, p_zero: float = 0.05, p_one: float = 0.1) -> int:
    """A size in [0, hi]: the edges 0 and 1 often, else log-uniform."""
    u = rng.random()
    if u < p_zero or hi < 1:
        return 0
    if u < p_zero + p_one:
        return 1
    return _log_int(rng, 1, hi)


def _f32(x: float) -> float:
    """x as the float32 the kernels receive, so that the reference sees the same value."""
    return float(np.float32(x))


def _seed(rng) -> int:
    return int(rng.integers(2 ** 62))


def _draw_out(rng, cfg: dict) -> None:
    """The out= argument of an op that takes one: none, a new contiguous array, or rows with a stride."""
    cfg["out"] = _pick(rng, ("none", "given", "strided"))
    cfg["out_pad"], cfg["out_off"] = _pad(rng, force=True) if cfg["out"] == "strided" else (0, 0)


def _pad(rng, p: float = 0.4, force: bool = False) -> tuple:
    """(pad, offset): extra elements a row of the allocation has, and where the view starts in it."""
    if not (force or _chance(rng, p)):
        return 0, 0
    pad = _log_int(rng, 1, 64)
    return pad, int(rng.integers(0, pad + 1))


def _lead(rng, ndim_probs, max_rows: int) -> list:
    """Leading dims: a token axis of 0..300 (0 and 1 often), then small head-like axes."""
    nd = int(rng.choice(len(ndim_probs), p=ndim_probs))
    if nd == 0:
        return []
    rest = [_log_int(rng, 1, 8) for _ in range(nd - 1)]
    first = _count(rng, 300)
    return [min(first, max(1, max_rows // math.prod(rest)))] + rest


def _eps(rng) -> float:
    return _pick(rng, (1e-6, 1e-5)) if _chance(rng, 0.6) else float(f"{10 ** rng.uniform(-8, -1):.3g}")


# ---------------------------------------------------------------------------------------------
# Device data and checks


def _gen(seed: int):
    return cupy.random.default_rng(seed)


def _randn(g, shape, dtype="float32", scale=1.0, shift=0.0):
    """Normal values as `dtype` (float8: their bytes, uint8)."""
    return cast(g.standard_normal(tuple(shape), dtype=cupy.float32) * np.float32(scale) + np.float32(shift), dtype)


def _nan(shape, dtype):
    return nan_like(empty(tuple(shape), dtype))


def _dev(a, dtype: str):
    """Host values as a CuPy array of `dtype`, a float (bfloat16: ml_dtypes) or an integer type."""
    a = np.asarray(a)
    with np.errstate(over="ignore"):  # counts past float16's range become inf, as any cast makes them
        return cupy.asarray(a.astype(host_dtype(dtype) if dtype in FLOATS + ("float64",) else dtype))


def _f64(x) -> np.ndarray:
    """A CuPy array (any layout, any float or integer dtype) as float64 numpy."""
    return f64(x)


def _f64_dev(x):
    """A CuPy array as float64 CuPy (bfloat16 widened through its bits: no bfloat16 arithmetic)."""
    if x.dtype == BF16:
        return (x.view(cupy.uint16).astype(cupy.uint32) << 16).view(cupy.float32).astype(cupy.float64)
    return x.astype(cupy.float64)


def _bits(x):
    """x viewed as unsigned integers of its item size: copies, gathers and bit-exact compares without
    float operations on bfloat16."""
    return x.view({1: cupy.uint8, 2: cupy.uint16, 4: cupy.uint32, 8: cupy.uint64}[x.dtype.itemsize])


def _clone(x):
    """A contiguous copy of x (copied as bits)."""
    return _bits(x).copy().view(x.dtype)


def _take(x, rows):
    """Rows `rows` (host ints) of the 2-D x, gathered as bits (any dtype)."""
    return _bits(x)[cupy.asarray(np.asarray(rows, np.int64))].view(x.dtype)


def _at(x, rows, cols) -> np.ndarray:
    """x[rows[i], cols[i]] (host int arrays) as float64 numpy."""
    idx = (cupy.asarray(np.asarray(rows, np.int64)), cupy.asarray(np.asarray(cols, np.int64)))
    return _f64(_bits(x)[idx].view(x.dtype))


def _has_nan(x) -> bool:
    if x.dtype == BF16:
        return bool(((x.view(cupy.uint16) & 0x7FFF) > 0x7F80).any())
    return bool(cupy.isnan(x).any())


def _rows(g, lead, width: int, pad: int, off: int, dtype: str, scale=1.0, shift=0.0):
    """(allocation, view): rows of `width` elements `width + pad` apart, starting at `off`."""
    base = _randn(g, list(lead) + [width + pad], dtype, scale, shift)
    return base, base[..., off:off + width]


def _nan_rows(lead, width: int, pad: int, off: int, dtype: str):
    base = _nan(list(lead) + [width + pad], dtype)
    return base, base[..., off:off + width]


def _outside(base, off: int, width: int) -> list:
    """The parts of `base` around its view [..., off:off + width] (the padding)."""
    return [base[..., :off], base[..., off + width:]]


def _check(cond, msg: str) -> None:
    if not cond:
        raise AssertionError(msg)


def _same(after, before, what: str) -> None:
    """after == before bit for bit (arrays, or lists of arrays)."""
    pairs = zip(after, before) if isinstance(after, list) else [(after, before)]
    _check(all(cupy.array_equal(_bits(a), _bits(b)) for a, b in pairs), f"{what}: changed, but the call must not "
                                                                          f"write it")


def _still_nan(x, what: str) -> None:
    """Every element NaN (an array, or a list of arrays)."""
    _check(all(bool(np.isnan(_f64(p)).all()) for p in (x if isinstance(x, list) else [x])),
           f"{what}: written, but the call must not write it")


def _round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to `dtype` (via float32: exact for the sum of two values of dtype)."""
    return np.asarray(a, np.float32).astype(host_dtype(dtype)).astype(np.float64)


def _sample_rows(n: int, budget: int, seed: int) -> np.ndarray:
    """Rows to check against a numpy reference: all of them when they fit `budget`, else a sorted
    random sample that includes the first and the last."""
    if n <= budget:
        return np.arange(n)
    pick = np.random.default_rng(seed).choice(n, size=max(1, budget), replace=False)
    return np.unique(np.concatenate([[0, n - 1], pick]))


# ---------------------------------------------------------------------------------------------
# Norms


NORM_OPS = ("rmsnorm", "gemma_rmsnorm", "fused_add_rmsnorm", "gemma_fused_add_rmsnorm", "layernorm")
NORM_HIDDEN_EDGES = (1, 2, 3, 5, 8, 9, 64, 127, 128, 2048, 4095, 4096, 4097, 5120, 8191, 8192, 16383, 16384)
NORM_ELEMS = 1 << 21  # rows * hidden at most


def draw_norm(rng) -> dict:
    op = _pick(rng, NORM_OPS)
    dtype = _pick(rng, FLOATS)
    hidden = _pick(rng, NORM_HIDDEN_EDGES) if _chance(rng, 0.3) else _log_int(rng, 1, 16384)
    cfg = dict(op=op, dtype=dtype, wdtype=dtype if dtype == "float32" or _chance(rng, 0.6) else "float32",
               hidden=hidden, lead=_lead(rng, (0.1, 0.7, 0.2), NORM_ELEMS // hidden), eps=_eps(rng),
               scale=_log_float(rng, 0.05, 20), shift=0.0)
    if op == "layernorm" and _chance(rng, 0.7):  # a mean far from 0
        cfg["shift"] = float(f"{rng.uniform(-10, 10) * cfg['scale']:.4g}")
    cfg["pad"], cfg["off"] = _pad(rng)
    if "fused" in op:
        cfg["res_pad"], cfg["res_off"] = _pad(rng)
    elif op != "layernorm":
        _draw_out(rng, cfg)
    cfg["seed"] = _seed(rng)
    return cfg


def run_norm(cfg: dict) -> None:
    g = _gen(cfg["seed"])
    op, dtype, hidden, lead, eps = cfg["op"], cfg["dtype"], cfg["hidden"], cfg["lead"], cfg["eps"]
    gemma = op.startswith("gemma")
    x_base, x = _rows(g, lead, hidden, cfg["pad"], cfg["off"], dtype, cfg["scale"], cfg["shift"])
    w = _randn(g, (hidden,), cfg["wdtype"])
    x_keep = _clone(x_base)
    if op == "layernorm":
        b = _randn(g, (hidden,), cfg["wdtype"])
        got = fi_cupy.layernorm(x, w, b, eps)
        _check(tuple(got.shape) == tuple(x.shape) and got.dtype == x.dtype, f"output {got.shape} {got.dtype}")
        _same(x_base, x_keep, "input")
        x64, w64 = _f64(x), _f64(w)
        want = reference.layernorm(x64, w64, _f64(b), eps)
        if dtype == "float32":
            # A float32 mean carries an error of about ulp(|mean|), which x - mean turns into |mean| * 2^-23
            # / std of the output: far from 0 and with a small spread (hidden 2, say) that exceeds the fixed
            # tolerance whatever the kernel does. Allow it, on top of the dtype's rule.
            mean = x64.mean(axis=-1, keepdims=True)
            cond = np.abs(mean) / np.sqrt(x64.var(axis=-1, keepdims=True) + eps) * np.abs(w64)
            err = np.abs(_f64(got) - want)
            atol, rtol = OUT_TOL[dtype]
            ok = err <= atol + rtol * np.abs(want) + 4 * 2.0 ** -23 * cond
            _check(bool(ok.all()), f"layernorm: {int((~ok).sum())} of {ok.size} elements off; max abs err "
                                   f"{err.max(initial=0.0):.3g}")
            return
        assert_close(_f64(got), want, dtype, "layernorm")
        return
    if "fused" not in op:
        out_base = out = None
        if cfg["out"] != "none":
            out_base, out = _nan_rows(lead, hidden, cfg["out_pad"], cfg["out_off"], dtype)
        got = (fi_cupy.gemma_rmsnorm if gemma else fi_cupy.rmsnorm)(x, w, eps=eps, out=out)
        if out is not None:
            _check(got is out, "out= was given but another array came back")
            _still_nan(_outside(out_base, cfg["out_off"], hidden), "out's padding")
        _check(tuple(got.shape) == tuple(x.shape) and got.dtype == x.dtype, f"output {got.shape} {got.dtype}")
        _same(x_base, x_keep, "input")
        assert_close(_f64(got), reference.rmsnorm(_f64(x), _f64(w), eps, gemma), dtype, op)
        return
    r_base, r = _rows(g, lead, hidden, cfg["res_pad"], cfg["res_off"], dtype, cfg["scale"])
    r_keep = _clone(r_base)
    x0, r0 = _f64(x), _f64(r)
    fn = fi_cupy.gemma_fused_add_rmsnorm if gemma else fi_cupy.fused_add_rmsnorm
    _check(fn(x, r, w, eps=eps) is None, "returned a value (expected None: it works in place)")
    summed = _round_to(x0 + r0, dtype)
    bad = _f64(r) != summed
    _check(not bad.any(), f"residual: {int(bad.sum())} of {bad.size} elements are not input + residual "
                          f"rounded to {dtype}")
    assert_close(_f64(x), reference.rmsnorm(summed, _f64(w), eps, gemma), dtype, "input (normed in place)")
    _same(_outside(x_base, cfg["off"], hidden), _outside(x_keep, cfg["off"], hidden), "input's padding")
    _same(_outside(r_base, cfg["res_off"], hidden), _outside(r_keep, cfg["res_off"], hidden), "residual's padding")


# ---------------------------------------------------------------------------------------------
# Gated activations


ACTS = {"silu": "silu_and_mul", "gelu": "gelu_and_mul", "gelu_tanh": "gelu_tanh_and_mul"}
ACT_D_EDGES = (1, 2, 3, 4, 7, 8, 9, 15, 16, 127, 4095, 4096, 11008, 13824, 14336)
ACT_ELEMS = 1 << 21       # input elements at most
ACT_REF = 1 << 20         # input elements checked against numpy (gelu's erf is slow there: 1 << 15)


def draw_activation(rng) -> dict:
    act = _pick(rng, tuple(ACTS))
    d = _pick(rng, ACT_D_EDGES) if _chance(rng, 0.3) else _log_int(rng, 1, 16384)
    if _chance(rng, 0.03):  # more rows than a grid's y dimension holds (65535): the kernel's row loop
        d = min(d, 8)
        lead = [int(rng.integers(65536, 70001))]
    else:
        lead = _lead(rng, (0.1, 0.6, 0.2, 0.1), ACT_ELEMS // (2 * d))
    cfg = dict(op=ACTS[act], dtype=_pick(rng, FLOATS), d=d, lead=lead, scale=_log_float(rng, 0.1, 8))
    cfg["pad"], cfg["off"] = _pad(rng)
    _draw_out(rng, cfg)
    cfg["seed"] = _seed(rng)
    return cfg


def run_activation(cfg: dict) -> None:
    g = _gen(cfg["seed"])
    op, dtype, d, lead = cfg["op"], cfg["dtype"], cfg["d"], cfg["lead"]
    act = next(a for a, name in ACTS.items() if name == op)
    x_base, x = _rows(g, lead, 2 * d, cfg["pad"], cfg["off"], dtype, cfg["scale"])
    x_keep = _clone(x_base)
    out_base = out = None
    if cfg["out"] != "none":
        out_base, out = _nan_rows(lead, d, cfg["out_pad"], cfg["out_off"], dtype)
    got = getattr(fi_cupy, op)(x, out=out)
    if out is not None:
        _check(got is out, "out= was given but another array came back")
        _still_nan(_outside(out_base, cfg["out_off"], d), "out's padding")
    _check(tuple(got.shape) == tuple(lead) + (d,) and got.dtype == x.dtype, f"output {got.shape} {got.dtype}")
    _same(x_base, x_keep, "input")
    rows = math.prod(lead)
    if not rows:
        return
    # rows as 2-D arrays (reshaped as bits: a copy, if one is needed, is no bfloat16 operation)
    x2, got2 = (_bits(a).reshape(rows, -1).view(a.dtype) for a in (x, got))
    _check(not _has_nan(got2), "NaN in the output (elements left unwritten)")
    budget = (1 << 15 if act == "gelu" else ACT_REF) // (2 * d)
    idx = _sample_rows(rows, budget, cfg["seed"])
    assert_close(_f64(_take(got2, idx)), reference.act_and_mul(_f64(_take(x2, idx)), act), dtype, op)


# ---------------------------------------------------------------------------------------------
# RoPE


ROPE_APIS = ("apply_rope", "apply_rope_inplace", "apply_rope_pos_ids", "apply_rope_pos_ids_inplace",
             "apply_llama31_rope", "apply_llama31_rope_inplace", "apply_llama31_rope_pos_ids",
             "apply_llama31_rope_pos_ids_inplace", "apply_rope_with_cos_sin_cache",
             "apply_rope_with_cos_sin_cache_inplace")
ROPE_HEAD_DIMS = (64, 128, 256, 32, 80, 96, 112, 160, 192, 16, 8, 2)
ROPE_ELEMS = 1 << 20  # nnz * (heads of q + heads of k) * head_dim at most
MAX_ROTARY_DIM = 1024


def _rotary_dim(rng, d: int) -> int:
    """An even rotary dim <= min(d, 1024): the whole head (when even), half of it, or any."""
    top = min(d - d % 2, MAX_ROTARY_DIM)
    u = rng.random()
    if u < 0.5:
        return top
    if u < 0.75:
        return max(2, (d // 2) - (d // 2) % 2)
    return 2 * int(rng.integers(1, top // 2 + 1))


def draw_rope(rng) -> dict:
    api = _pick(rng, ROPE_APIS)
    cache, llama = "cos_sin" in api, "llama31" in api
    ragged = "pos_ids" not in api and not cache
    interleave = _chance(rng, 0.35)
    d = _pick(rng, ROPE_HEAD_DIMS) if _chance(rng, 0.8) else _log_int(rng, 2, 600)
    if d % 2 and (interleave or cache):  # interleaved pairs: two-element vectors; the cache API takes
        d += 1                           # head_size as its default rotary_dim, which must be even
    rd = _rotary_dim(rng, d)
    hq = _log_int(rng, 1, 64)
    hk = hq if _chance(rng, 0.2) else _log_int(rng, 1, 16)
    cfg = dict(op=api, dtype=_pick(rng, FLOATS), index_dtype=_pick(rng, INDEX_DTYPES), head_dim=d, rotary_dim=rd,
               interleave=interleave, hq=hq, hk=hk, layout=_pick(rng, ("contiguous", "qkv", "padded")))
    if cache:
        cfg["flat"] = _chance(rng, 0.5)  # query (nnz, heads * head_size) as vLLM passes it
        cfg["cache_len"] = _log_int(rng, 1, min(65536, (1 << 24) // rd))
        cfg["cache_pad"] = _pad(rng, 0.3)[0]
        cfg["hit_last"] = _chance(rng, 0.5)  # position cache_len - 1 appears
    else:
        cfg["pass_rotary_dim"] = rd != d or _chance(rng, 0.5)  # rotary_dim=None when it is the whole head
        cfg["maxpos"] = _log_int(rng, 1, 1 << 22)
        if llama:
            cfg["rope_scale"] = _pick(rng, (8.0, 32.0, 16.0, 4.0, 2.0))
            cfg["rope_theta"] = 5e5 if _chance(rng, 0.7) else _pick(rng, (1e4, 1e6, 2e5))
            cfg["low_freq_factor"] = _pick(rng, (1.0, 0.5, 2.0))
            cfg["high_freq_factor"] = _pick(rng, tuple(f for f in (4.0, 8.0, 2.0, 16.0)
                                                       if f > cfg["low_freq_factor"]))
            cfg["old_context_len"] = _pick(rng, (8192, 4096, 2048, 32768))
        else:
            cfg["rope_scale"] = 1.0 if _chance(rng, 0.5) else _log_float(rng, 0.25, 16, 3)
            cfg["rope_theta"] = _pick(rng, (1e4, 5e5, 1e6)) if _chance(rng, 0.7) else _log_float(rng, 100, 1e7, 3)
    max_nnz = max(1, ROPE_ELEMS // ((hq + hk) * d))
    cfg["nnz"] = _count(rng, min(2048, max_nnz), p_zero=0.03)
    if ragged:
        cfg["batch"] = _log_int(rng, 1, 64)
    else:
        cfg["positions"] = _pick(rng, ("random", "runs"))  # runs: consecutive positions, as a prefill has
    cfg["seed"] = _seed(rng)
    return cfg


def _rope_inputs(g, cfg: dict):
    """(q, k, regions the call must leave alone [(after, before)]) in the configured layout."""
    dtype, d, hq, hk, nnz, layout = cfg["dtype"], cfg["head_dim"], cfg["hq"], cfg["hk"], cfg["nnz"], cfg["layout"]
    flat = cfg.get("flat", False)
    keep = []
    if layout == "qkv":  # q, k and v of one projection output
        if flat:
            buf = _randn(g, (nnz, (hq + 2 * hk) * d), dtype)
            q, k, rest = buf[:, :hq * d], buf[:, hq * d:(hq + hk) * d], buf[:, (hq + hk) * d:]
        else:
            buf = _randn(g, (nnz, hq + 2 * hk, d), dtype)
            q, k, rest = buf[:, :hq], buf[:, hq:hq + hk], buf[:, hq + hk:]
        keep.append(rest)
    elif layout == "padded":  # rows (2-D) or heads (3-D) further apart than the data
        pad = 2 + 2 * (cfg["seed"] % 7)
        views = []
        for h in (hq, hk):
            shape = (nnz, h * d + pad) if flat else (nnz, h, d + pad)
            base = _randn(g, shape, dtype)
            views.append(base[..., :h * d] if flat else base[..., :d])
            keep.append(base[..., h * d:] if flat else base[..., d:])
        q, k = views
    else:
        q = _randn(g, (nnz, hq * d) if flat else (nnz, hq, d), dtype)
        k = _randn(g, (nnz, hk * d) if flat else (nnz, hk, d), dtype)
    return q, k, [(r, _clone(r)) for r in keep]


def _rope_positions(nprng, cfg: dict) -> tuple:
    """(positions (nnz,), indptr or None, offsets or None), int64 numpy."""
    nnz, maxpos = cfg["nnz"], cfg.get("maxpos") or cfg["cache_len"]
    if "batch" in cfg:
        cuts = np.sort(nprng.integers(0, nnz + 1, cfg["batch"] - 1))  # some requests empty
        indptr = np.concatenate([[0], cuts, [nnz]]).astype(np.int64)
        offsets = nprng.integers(0, maxpos, cfg["batch"]).astype(np.int64)
        return reference.ragged_positions(indptr, offsets), indptr, offsets
    if cfg["positions"] == "runs" and nnz:
        starts = nprng.integers(0, maxpos, nnz)
        run = np.minimum(nprng.integers(1, 64, nnz), nnz)
        pos = np.concatenate([s + np.arange(n) for s, n in zip(starts, run)])[:nnz]
        pos = np.minimum(pos, maxpos - 1)
    else:
        pos = nprng.integers(0, maxpos, nnz)
    if cfg.get("hit_last") and nnz:
        pos[nprng.integers(nnz)] = maxpos - 1
    return pos.astype(np.int64), None, None


def run_rope(cfg: dict) -> None:
    g, nprng = _gen(cfg["seed"]), np.random.default_rng(cfg["seed"])
    api, dtype, d, rd, hq, hk, nnz = (cfg[k] for k in ("op", "dtype", "head_dim", "rotary_dim", "hq", "hk", "nnz"))
    inplace, cache = api.endswith("_inplace"), "cos_sin" in api
    q, k, untouched = _rope_inputs(g, cfg)
    q_keep, k_keep = _clone(q), _clone(k)
    pos, indptr, offsets = _rope_positions(nprng, cfg)
    idt = cfg["index_dtype"]
    fn = getattr(fi_cupy, api)
    if cache:
        cs_base = g.random((cfg["cache_len"], rd + cfg["cache_pad"]), dtype=cupy.float32) * 2 - 1
        cs = cs_base[:, :rd]
        pos_t = _dev(pos, idt)
        got = fn(pos_t, q, k, d, cs, is_neox=not cfg["interleave"])
        cs_rows = cupy.asnumpy(cs[pos_t.astype(cupy.int64)])  # the cache rows of the tokens (reference.rope's cos_sin)
        ref_pos, inv = np.arange(nnz), None
    else:
        kw = dict(interleave=cfg["interleave"], rope_scale=cfg["rope_scale"], rope_theta=cfg["rope_theta"])
        if cfg["pass_rotary_dim"]:
            kw["rotary_dim"] = rd
        if "llama31" in api:
            kw.update({n: cfg[n] for n in ("low_freq_factor", "high_freq_factor", "old_context_len")})
            inv = reference.llama31_inv_freq(rd, cfg["rope_theta"], cfg["rope_scale"], cfg["low_freq_factor"],
                                             cfg["high_freq_factor"], cfg["old_context_len"])
        else:  # FlashInfer's convention: the float32 frequency times the float32 1 / rope_scale
            inv = reference.rope_inv_freq(rd, cfg["rope_theta"], 1.0) * np.float32(1.0 / cfg["rope_scale"])
        if indptr is not None:
            got = fn(q, k, _dev(indptr, idt), _dev(offsets, idt), **kw)
        else:
            got = fn(q, k, _dev(pos, idt), **kw)
        cs_rows, ref_pos = None, pos
    if inplace:
        _check(got is None, "returned a value (expected None: it works in place)")
        q_out, k_out = q, k
    else:
        q_out, k_out = got
        _same(q, q_keep, "q")
        _same(k, k_keep, "k")
    for after, before in untouched:
        _same(after, before, "the memory around q and k (v, padding)")
    for name, out, x, h in (("q", q_out, q_keep, hq), ("k", k_out, k_keep, hk)):
        _check(tuple(out.shape) == tuple(x.shape) and out.dtype == x.dtype, f"{name}: output {out.shape} {out.dtype}")
        if nnz:
            ref = reference.rope(_f64(x).reshape(nnz, h, d), ref_pos, inv, rd, cfg["interleave"], cs_rows)
            assert_close(_f64(out).reshape(nnz, h, d), ref, dtype, name)


# ---------------------------------------------------------------------------------------------
# Paged KV append


KV_DTYPES = ("float16", "bfloat16", "float32", "float8_e4m3fn", "float8_e5m2")
KV_HEAD_DIMS = (64, 128, 256, 96, 80, 112, 192, 32, 16, 8, 40)
PAGE_SIZE_EDGES = (1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 48, 63, 64)
CACHE_ELEMS = 1 << 22  # elements of the used part of the cache at most
APPEND_TOKENS = 2048


def draw_page_append(rng) -> dict:
    d = _pick(rng, KV_HEAD_DIMS) if _chance(rng, 0.75) else _log_int(rng, 1, 256)
    cfg = dict(op="append_paged_kv_cache", dtype=_pick(rng, KV_DTYPES), index_dtype=_pick(rng, INDEX_DTYPES),
               layout=_pick(rng, ("NHD", "HND")), form=_pick(rng, ("5d", "pair_of_5d", "two_4d")),
               page_size=_pick(rng, PAGE_SIZE_EDGES) if _chance(rng, 0.5) else _log_int(rng, 1, 64),
               num_kv_heads=_log_int(rng, 1, 8) if _chance(rng, 0.85) else _log_int(rng, 1, 32), head_dim=d,
               # the cache's last dim padded to a multiple of 8 elements (vector-aligned rows): any head_dim
               strided=d % 8 != 0 or _chance(rng, 0.25), batch=_log_int(rng, 1, 300),
               mode=str(rng.choice(("decode", "prefill", "mixed", "none"), p=(0.3, 0.3, 0.32, 0.08))),
               source=_pick(rng, ("helper", "direct")))
    cfg["spare_pages"] = _count(rng, 16, p_zero=0.3, p_one=0.1)
    cfg["max_old"] = _count(rng, 2000, p_zero=0.1)
    cfg["kv_source"] = _pick(rng, ("contiguous", "qkv"))
    cfg["check"] = _chance(rng, 0.8)
    cfg["helper_extra"] = _count(rng, 8, p_zero=0.7, p_one=0.1) if cfg["source"] == "helper" else 0
    cfg["seed"] = _seed(rng)
    return cfg


def _append_plan(cfg: dict):
    """(old lengths, new lengths) per request, within the size caps."""
    r = np.random.default_rng(cfg["seed"])
    batch, mode = cfg["batch"], cfg["mode"]
    old = np.minimum(np.floor(np.exp(r.uniform(0, np.log(cfg["max_old"] + 2), batch)) - 1), cfg["max_old"])
    old = np.where(r.random(batch) < 0.1, 0, old).astype(np.int64)
    if mode == "decode":
        new = np.ones(batch, np.int64)
    elif mode == "none":
        new = np.zeros(batch, np.int64)
    else:
        new = np.floor(np.exp(r.uniform(0, np.log(513), batch))).astype(np.int64)
        if mode == "mixed":
            new = np.where(r.random(batch) < 0.5, r.integers(0, 2, batch), new)
    total = old + new
    per_token = 2 * cfg["num_kv_heads"] * cfg["head_dim"]
    scale = min(1.0, CACHE_ELEMS / max(1, (total.sum() + batch * cfg["page_size"]) * per_token),
                APPEND_TOKENS / max(1, new.sum()))
    if scale < 1.0:
        old, new = np.floor(old * scale).astype(np.int64), np.floor(new * scale).astype(np.int64)
    return old, new


def _append_cache(g, cfg: dict, num_pages: int):
    """(allocations, the cache argument, pages of the allocations before the cache's first). A
    strided cache sits in a larger allocation: head_dim padded to a multiple of 8 elements (rows
    stay vector-aligned) and a few pages before it (its base pointer is not the allocation's)."""
    dtype, ps, h, d = cfg["dtype"], cfg["page_size"], cfg["num_kv_heads"], cfg["head_dim"]
    dp = (-(-d // 8) * 8 + (8 if d % 8 == 0 else 0)) if cfg["strided"] else d
    first = cfg["seed"] % 3 if cfg["strided"] else 0
    inner = (ps, h, dp) if cfg["layout"] == "NHD" else (h, ps, dp)
    if cfg["form"] == "two_4d":
        kb, vb = (_randn(g, (num_pages + first,) + inner, dtype) for _ in range(2))
        return [kb, vb], (kb[first:, ..., :d], vb[first:, ..., :d]), first
    base = _randn(g, (num_pages + first, 2) + inner, dtype)
    cache = base[first:, ..., :d]
    return [base], cache if cfg["form"] == "5d" else (cache[:, 0], cache[:, 1]), first


def _u8(t) -> np.ndarray:
    """The bytes of an array (any layout, copied contiguous), numpy uint8 (last dim in bytes)."""
    return cupy.asnumpy(cupy.ascontiguousarray(_bits(t))).view(np.uint8)


def run_page_append(cfg: dict) -> None:
    g, r = _gen(cfg["seed"]), np.random.default_rng(cfg["seed"] + 1)
    ps, h, d, idt, layout = cfg["page_size"], cfg["num_kv_heads"], cfg["head_dim"], cfg["index_dtype"], cfg["layout"]
    old, new = _append_plan(cfg)
    kv_lens = old + new
    pages = -(-kv_lens // ps)
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int64)
    num_pages = int(indptr[-1]) + cfg["spare_pages"]
    indices = r.permutation(num_pages)[: indptr[-1]].astype(np.int64)
    last = np.where(pages > 0, kv_lens - (pages - 1) * ps, 0).astype(np.int64)
    nnz = int(new.sum())
    ip_t, ix_t, last_t = _dev(indptr, idt), _dev(indices, idt), _dev(last, idt)
    # Which (request, position) each appended token goes to.
    if cfg["source"] == "helper":
        seq_lens = fi_cupy.get_seq_lens(ip_t, last_t, ps)
        _check(seq_lens.dtype == np.int32 and np.array_equal(cupy.asnumpy(seq_lens), kv_lens),
               f"get_seq_lens: {cupy.asnumpy(seq_lens)[:16]} ({seq_lens.dtype}), expected {kv_lens[:16]}")
        app_indptr = _dev(np.concatenate([[0], np.cumsum(new)]), idt)
        bi, pos = fi_cupy.get_batch_indices_positions(app_indptr, seq_lens.astype(idt), nnz + cfg["helper_extra"])
        exp_b = np.concatenate([np.repeat(np.arange(cfg["batch"]), new), np.full(cfg["helper_extra"], -1)])
        exp_p = np.concatenate([np.arange(o, o + n) for o, n in zip(old, new)] + [np.full(cfg["helper_extra"], -1)])
        for name, got, want in (("batch_indices", bi, exp_b), ("positions", pos, exp_p)):
            _check(got.dtype == np.int32 and np.array_equal(cupy.asnumpy(got), want),
                   f"get_batch_indices_positions: {name} differ from the expected (first of {want.size}: {want[:8]})")
        bi_h, pos_h = exp_b[:nnz], exp_p[:nnz]
        bi, pos = bi[:nnz].astype(idt), pos[:nnz].astype(idt)
    else:  # any free positions of each request, in any order (rewrites of cached tokens included)
        bi_h = np.repeat(np.arange(cfg["batch"]), new)
        pos_h = np.concatenate([r.choice(n_all, size=n, replace=False) for n_all, n in zip(kv_lens, new)]
                               + [np.zeros(0, np.int64)]).astype(np.int64)
        order = r.permutation(nnz)
        bi_h, pos_h = bi_h[order], pos_h[order]
        bi, pos = _dev(bi_h, idt), _dev(pos_h, idt)
    bases, cache_arg, first = _append_cache(g, cfg, num_pages)
    if cfg["kv_source"] == "qkv":  # k and v as slices of one projection output
        hq = int(r.integers(0, 9))
        buf = _randn(g, (nnz, hq + 2 * h, d), cfg["dtype"])
        key, value = buf[:, hq:hq + h], buf[:, hq + h:]
    else:
        key, value = _randn(g, (nnz, h, d), cfg["dtype"]), _randn(g, (nnz, h, d), cfg["dtype"])
    before = [_u8(b) for b in bases]
    args = [key, value, bi, pos, cache_arg, ix_t, ip_t, last_t]
    if cfg["dtype"] in FP8 and TORCH:
        # append_paged_kv_cache takes float8 from the arrays' own dtype, which CuPy has not: where torch
        # is importable the float8 case is a torch caller (the same memory); elsewhere it appends the
        # bytes as uint8 arrays (the same byte copy)
        def fp8(x):
            return to_torch(x, cfg["dtype"])
        cache_t = tuple(map(fp8, cache_arg)) if isinstance(cache_arg, tuple) else fp8(cache_arg)
        bi_t, pos_t, ix, ip, last_p = (to_torch(x, idt) for x in (bi, pos, ix_t, ip_t, last_t))
        args = [fp8(key), fp8(value), bi_t, pos_t, cache_t, ix, ip, last_p]
    ret = fi_cupy.append_paged_kv_cache(*args, kv_layout=layout, check=cfg["check"])
    _check(ret is None, "returned a value (expected None: it writes the cache in place)")
    # Expected bytes: the old allocation with the reference's rows written into the cache's part.
    item = bases[0].itemsize  # float8: bytes (uint8)
    expect = [b.copy() for b in before]
    if len(bases) == 2:
        regions = [expect[0][first:, ..., :d * item], expect[1][first:, ..., :d * item]]
    else:
        regions = [expect[0][first:, 0, ..., :d * item], expect[0][first:, 1, ..., :d * item]]
    ck, cv = reference.append_paged_kv(regions[0], regions[1], _u8(key), _u8(value), bi_h, pos_h, indices,
                                       indptr, ps, layout)
    regions[0][...], regions[1][...] = ck, cv
    for i, (b, want) in enumerate(zip(bases, expect)):
        got = _u8(b)
        if not np.array_equal(got, want):
            diff = np.argwhere((got != want).reshape(got.shape[0], -1).any(axis=1))[:, 0]
            raise AssertionError(f"cache allocation {i}: {diff.size} pages differ from the expected bytes "
                                 f"(allocation pages {diff[:8].tolist()}; the cache starts at page {first}, "
                                 f"pages in use: {int(indptr[-1])} of {num_pages})")


# ---------------------------------------------------------------------------------------------
# Sampling


SAMPLING_OPS = {  # op: weight
    "softmax": 1.0, "top_k_renorm_probs": 0.6, "top_p_renorm_probs": 0.6, "top_k_mask_logits": 0.6,
    "sampling_from_probs": 0.4, "top_k_sampling_from_probs": 0.5, "top_p_sampling_from_probs": 0.5,
    "min_p_sampling_from_probs": 0.4, "top_k_top_p_sampling_from_probs": 0.6, "sampling_from_logits": 0.4,
    "top_k_top_p_sampling_from_logits": 0.4, "chain_speculative_sampling": 0.5}
REAL_VOCABS = (32000, 32064, 50257, 100352, 128256, 151936, 152064, 256000)
VOCAB_EDGES = (2, 3, 4, 5, 7, 8, 1023, 1024, 1025, 4096)
PROB_KINDS = ("peaked", "sparse", "ties", "flat", "onehot")
SAMPLING_ELEMS = 1 << 21  # batch * vocab at most
SAMPLING_REF = 1 << 17    # elements checked against the numpy reference (a sample of the rows)
# Per-row parameter arrays: the dtypes each parameter is drawn in (any integer or float dtype is taken;
# top_p / min_p / temperature values live in (0, 1] or (0, 4], so only float dtypes hold them).
TOP_K_DTYPES = ("int32", "int64", "float32", "float64", "float16", "bfloat16")
FLOAT_PARAM_DTYPES = ("float32", "float16", "bfloat16", "float64")
RNG_FORMS = ("seed", "generator", "torch_generator", "per_row")
INT_MAX = 2 ** 31 - 1


def _rng_form(rng) -> str:
    """One of RNG_FORMS. "torch_generator" (a torch.Generator seeding a CuPy caller's call) needs torch
    with CUDA: without it, one of the others takes its place, drawn from a stream of its own, so the
    rest of the case is drawn as where torch is importable."""
    form = _pick(rng, RNG_FORMS)
    if form == "torch_generator" and not TORCH:
        own = np.random.default_rng(rng.bit_generator.state["state"]["state"])  # rng's state, not consumed
        form = _pick(own, tuple(f for f in RNG_FORMS if f != "torch_generator"))
    return form


def _vocab(rng) -> int:
    if _chance(rng, 0.25):  # a real vocabulary (only sometimes: they are expensive to check)
        return _pick(rng, REAL_VOCABS) + _pick(rng, (0, 0, 0, 1, -1, 3))
    return _pick(rng, VOCAB_EDGES) if _chance(rng, 0.25) else _log_int(rng, 2, 65536)


def _top_k(rng, vocab: int) -> int:
    return _pick(rng, (1, 1, vocab - 1, vocab, vocab + 7, 0)) if _chance(rng, 0.3) else _log_int(rng, 1, vocab)


def _top_p(rng) -> float:
    return _f32(_pick(rng, (1.0, 0.999, 1e-3, 0.5)) if _chance(rng, 0.25) else rng.uniform(0.01, 1.0))


def _min_p(rng) -> float:
    return _f32(_pick(rng, (0.0, 1.0, 1e-4)) if _chance(rng, 0.2) else rng.uniform(0.0, 1.0))


def _draw_param_form(rng, cfg: dict, name: str, per_row: bool, value) -> None:
    """cfg[name]: "per_row" (an array of dtype cfg[name + "_dtype"]) or a scalar, passed as a Python or a
    numpy scalar (cfg[name + "_form"])."""
    if per_row:
        cfg[name] = "per_row"
        cfg[name + "_dtype"] = _pick(rng, TOP_K_DTYPES if name == "top_k" else FLOAT_PARAM_DTYPES)
    else:
        cfg[name] = value
        cfg[name + "_form"] = _pick(rng, ("python", "numpy"))


def draw_sampling(rng) -> dict:
    names = tuple(SAMPLING_OPS)
    w = np.array([SAMPLING_OPS[n] for n in names])
    op = names[int(rng.choice(len(names), p=w / w.sum()))]
    vocab = _vocab(rng)
    dtype = _pick(rng, FLOATS)
    if op == "chain_speculative_sampling":
        n = 0 if _chance(rng, 0.05) else _log_int(rng, 1, 8)
        batch = _log_int(rng, 1, max(1, min(64, SAMPLING_ELEMS // ((2 * n + 1) * vocab))))
        return dict(op=op, vocab=vocab, batch=batch, n=n, kind=_pick(rng, PROB_KINDS), dtype=dtype,
                    target_dtype=_pick(rng, FLOATS) if _chance(rng, 0.2) else dtype,
                    ids_dtype=_pick(rng, INDEX_DTYPES), relation=_pick(rng, ("independent", "equal", "zero_at_draft")),
                    ids=_pick(rng, ("from_draft", "uniform")), counters=_chance(rng, 0.5),
                    rng=_rng_form(rng), seed=_seed(rng))
    batch = _count(rng, max(1, min(300, SAMPLING_ELEMS // vocab)), p_zero=0.03, p_one=0.15)
    cfg = dict(op=op, vocab=vocab, batch=batch, dtype=dtype)
    cfg["pad"], cfg["off"] = _pad(rng, 0.3)
    if "logits" in op or op == "softmax":
        # masked: some logits -inf, or finite but so low that their float64 probability is 0
        cfg.update(scale=_log_float(rng, 0.5, 8), masked=_pick(rng, ("none", "none", "-inf", "finite")))
        if op == "top_k_mask_logits":
            cfg.update(ties=_chance(rng, 0.3), nan=_chance(rng, 0.15))
    else:
        cfg.update(kind=_pick(rng, PROB_KINDS), unnormalised=_chance(rng, 0.3), temp=_log_float(rng, 0.1, 10))
    if op == "softmax":
        cfg["temperature"] = _pick(rng, ("none", "scalar", "per_row"))
        cfg["temp_value"] = _f32(_log_float(rng, 0.1, 4))
        cfg["temperature_dtype"] = _pick(rng, FLOAT_PARAM_DTYPES)
    per_row = _chance(rng, 0.35)
    if "top_k" in op:
        _draw_param_form(rng, cfg, "top_k", per_row, _top_k(rng, vocab))
    if "top_p" in op:
        _draw_param_form(rng, cfg, "top_p", per_row, _top_p(rng))
    if "min_p" in op:
        _draw_param_form(rng, cfg, "min_p", per_row, _min_p(rng))
    if "top_k_top_p" in op:
        cfg["order"] = _pick(rng, ("top_k_first", "joint"))
    if "sampling" in op:
        cfg["rows_out"] = _log_int(rng, 1, 300) if batch and _chance(rng, 0.25) else None  # indices=
        cfg["index_dtype"] = _pick(rng, INDEX_DTYPES)
        cfg["rng"] = _rng_form(rng)
        cfg["philox"] = [int(rng.integers(2 ** 63)), int(rng.integers(2 ** 40))]
        cfg["check_nan"] = _chance(rng, 0.2)  # the host-side NaN scan (no NaN here: it must pass)
        cfg["return_valid"] = op.endswith("_probs") and _chance(rng, 0.3)
    cfg["seed"] = _seed(rng)
    return cfg


def _probs(g, shape, kind: str, temp: float):
    """Probability rows of `kind` (float32, each with a positive entry; no denormals)."""
    vocab = shape[-1]
    rows = math.prod(shape[:-1])
    shape = tuple(shape)
    if kind == "flat":
        p = cupy.ones(shape, dtype=cupy.float32)
    elif kind == "onehot":
        p = cupy.zeros((rows, vocab), dtype=cupy.float32)
        p[cupy.arange(rows), g.integers(vocab, size=rows)] = 1.0
    elif kind == "ties":
        p = g.integers(1, 6, size=shape).astype(cupy.float32)
    else:
        p = _softmax32(g.standard_normal(shape, dtype=cupy.float32) * np.float32(temp))
        if kind == "sparse":  # exact zeros, a random share of the row
            keep = g.random(shape, dtype=cupy.float32) < g.random(shape[:-1] + (1,), dtype=cupy.float32)
            keep = keep.reshape(rows, vocab)
            keep[cupy.arange(rows), g.integers(vocab, size=rows)] = True
            p = p * keep.reshape(shape)
    p = p.reshape(shape)
    p = p / p.sum(-1, keepdims=True)
    return cupy.where(p < 1e-30, cupy.float32(0), p)


def _softmax32(x):
    """Softmax over the last axis in float32."""
    e = cupy.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _as_read(values, dtype: str, name: str) -> list:
    """Per-row values as the kernel reads them from an array of `dtype`: rounded to it; counts truncated
    toward zero and clamped to int32 (NaN: 0), as in sampling.cu's param_int."""
    v = _f64(_dev(values, dtype))
    if name != "top_k":
        return v.tolist()
    return [0 if np.isnan(x) else int(np.clip(np.trunc(x), -INT_MAX - 1, INT_MAX)) for x in v]


def _param_values(rng, cfg: dict, name: str, rows: int):
    """(argument for the call, per-row float/int values for the reference)."""
    value = cfg[name]
    if value != "per_row":
        if cfg.get(name + "_form") == "numpy":
            return (np.int64(value) if name == "top_k" else np.float32(value)), [value] * rows
        return value, [value] * rows
    vocab = cfg["vocab"]
    draw = {"top_k": lambda: _top_k(rng, vocab), "top_p": lambda: _top_p(rng), "min_p": lambda: _min_p(rng)}[name]
    vals = [draw() for _ in range(rows)]
    dtype = cfg[name + "_dtype"]
    return _dev(vals, dtype), _as_read(vals, dtype, name)


def _support(p, top_k=None, top_p=None, min_p=None, order="top_k_first", slack=0.0) -> np.ndarray:
    """The reference's kept set (fi_cupy.reference masks, as filtered_distribution combines them) with
    the top-p and min-p bounds moved by a relative `slack`: > 0 loosens them (what a kernel may keep),
    < 0 tightens them (what it must keep). The slack covers the float32 row mass the kernels take for
    top-p and the float32 product of min-p."""
    keep = p > 0
    if top_k is not None:
        keep &= reference.top_k_mask(p, top_k)
    if top_p is not None and top_p < 1.0:
        mass = p[keep].sum() if top_k is not None and order == "top_k_first" else None
        keep &= reference.top_p_mask(p, top_p * (1 + slack), mass)
    if min_p is not None and min_p > 0:
        keep &= reference.min_p_mask(p, min_p * (1 - np.sign(slack) * 2.0 ** -21))
    return keep


def _slack(vocab: int, mass: float) -> float:
    """Relative error of a float32 sum of `vocab` terms (by 1024 threads, then a tree) and of the
    2^-40 fixed-point masses of the exact select, with a margin of 4."""
    return 4 * (2.0 ** -24 * (vocab / 1024 + 16) + vocab * 2.0 ** -40 / max(mass, 1e-30))


def _logits(g, cfg: dict, rows: int):
    vocab = cfg["vocab"]
    x = g.standard_normal((rows, vocab), dtype=cupy.float32) * np.float32(cfg["scale"])
    if cfg.get("ties"):
        x = cupy.rint(x)  # half to even, as torch.round
    if cfg["masked"] != "none" and rows:  # a random share of each row masked, never a whole row
        low = float("-inf") if cfg["masked"] == "-inf" else -3e4
        share = g.random((rows, 1), dtype=cupy.float32)
        x = cupy.where(g.random((rows, vocab), dtype=cupy.float32) < share, cupy.float32(low), x)
        x[cupy.arange(rows), g.integers(vocab, size=rows)] = 1.0
    if cfg.get("nan") and rows:
        x = cupy.where(g.random((rows, vocab), dtype=cupy.float32) < 0.01, cupy.float32(np.nan), x)
    return x


def _matrix(g, cfg: dict, x):
    """x in the case's dtype, placed in rows `vocab + pad` apart (a stride on the batch axis)."""
    x = cast(x, cfg["dtype"])
    if not cfg["pad"]:
        return x
    bits = _bits(x)  # placed as bits: no bfloat16 operation
    base = cupy.zeros((x.shape[0], cfg["vocab"] + cfg["pad"]), dtype=bits.dtype)
    base[:, cfg["off"]:cfg["off"] + cfg["vocab"]] = bits
    return base.view(x.dtype)[:, cfg["off"]:cfg["off"] + cfg["vocab"]]


def _softmax_tol(x64: np.ndarray, temp, want: np.ndarray) -> float:
    """rtol of a float32 softmax: 1e-4 plus the float32 rounding of the scaled logits (|x| / t in base
    2) of the tokens whose probability is above the atol (the others compare by the atol)."""
    y = np.abs(np.where(want > 1e-12, x64, 0.0)) / np.reshape(np.asarray(temp, np.float64), (-1, 1))
    return 1e-4 + 2.0 ** -22 * 1.4427 * float(y.max(initial=0.0))


def run_softmax(cfg: dict) -> None:
    g, r = _gen(cfg["seed"]), np.random.default_rng(cfg["seed"])
    batch, vocab = cfg["batch"], cfg["vocab"]
    x = _matrix(g, cfg, _logits(g, cfg, batch))
    temp, t_ref = None, np.ones(batch)
    if cfg["temperature"] == "scalar":
        temp, t_ref = cfg["temp_value"], np.full(batch, cfg["temp_value"])
    elif cfg["temperature"] == "per_row":
        temp = _dev([_f32(_log_float(r, 0.1, 4)) for _ in range(batch)], cfg["temperature_dtype"])
        t_ref = _f64(temp)  # the values as the kernel reads them
    got = sampling.softmax(x, temp)
    _check(tuple(got.shape) == (batch, vocab) and got.dtype == np.float32, f"output {got.shape} {got.dtype}")
    if not batch:
        return
    _check(not _has_nan(got), "NaN in the output")
    idx = _sample_rows(batch, SAMPLING_REF // vocab, cfg["seed"])
    x64 = _f64(_take(x, idx))
    want = reference.softmax(x64, t_ref[idx])
    np.testing.assert_allclose(_f64(_take(got, idx)), want,
                               rtol=_softmax_tol(x64, t_ref[idx], want), atol=1e-9, err_msg="softmax")


OUT_ROUNDING = {"float32": 0.0, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}  # relative, round to nearest


def _row_mass(g, batch: int):
    """(batch, 1) float32 factors log-uniform in [0.01, 4): rows of unnormalised probabilities."""
    lo, hi = math.log(0.01), math.log(4)
    return cupy.exp(g.random((batch, 1), dtype=cupy.float32) * np.float32(hi - lo) + np.float32(lo))


def run_renorm(cfg: dict) -> None:
    g, r = _gen(cfg["seed"]), np.random.default_rng(cfg["seed"])
    op, batch, vocab = cfg["op"], cfg["batch"], cfg["vocab"]
    p = _probs(g, (batch, vocab), cfg["kind"], cfg["temp"])
    if cfg["unnormalised"] and batch:
        p = p * _row_mass(g, batch)
    p = _matrix(g, cfg, p)
    name = "top_k" if op == "top_k_renorm_probs" else "top_p"
    arg, vals = _param_values(r, cfg, name, batch)
    got = getattr(sampling, op)(p, arg)
    out_dt = cfg["dtype"] if name == "top_k" else "float32"  # FlashInfer: top-p renorm returns float32
    _check(tuple(got.shape) == (batch, vocab) and dtype_name(got) == out_dt, f"output {got.shape} {got.dtype}")
    if not batch:
        return
    _check(not _has_nan(got), "NaN in the output")
    idx = _sample_rows(batch, SAMPLING_REF // vocab, cfg["seed"])
    P, G = _f64(_take(p, idx)), _f64(_take(got, idx))
    rtol = 1e-5 + 4 * 2.0 ** -24 * (vocab / 1024 + 16) + 2 * OUT_ROUNDING[out_dt]
    atol = 2.0 ** -24 if out_dt == "float16" else 1e-9  # float16 subnormals are 2^-24 apart
    for j, row in enumerate(idx):
        kw = {name: vals[row]}
        eps = _slack(vocab, P[j].sum())
        must, may = _support(P[j], slack=-eps, **kw), _support(P[j], slack=eps, **kw)
        kept = G[j] > 0
        # tokens that round to 0 in the output dtype even at the smallest kept mass cannot show as kept
        seen = _round_to(P[j] / max(P[j][may].sum(), 1e-300), out_dt) > 0
        _check(not np.any(must & seen & ~kept), f"row {row} ({kw}): dropped {int((must & seen & ~kept).sum())} "
                                                f"tokens the reference keeps")
        _check(not np.any(kept & ~may), f"row {row} ({kw}): kept {int((kept & ~may).sum())} tokens the reference "
                                        f"drops")
        kept |= must & ~seen
        want = np.where(kept, P[j], 0.0) / np.where(kept, P[j], 0.0).sum()
        np.testing.assert_allclose(G[j], want, rtol=rtol, atol=atol, err_msg=f"row {row} ({kw})")


def run_mask_logits(cfg: dict) -> None:
    g, r = _gen(cfg["seed"]), np.random.default_rng(cfg["seed"])
    batch, vocab = cfg["batch"], cfg["vocab"]
    x = _matrix(g, cfg, _logits(g, cfg, batch))
    arg, vals = _param_values(r, cfg, "top_k", batch)
    got = sampling.top_k_mask_logits(x, arg)
    _check(tuple(got.shape) == (batch, vocab) and got.dtype == x.dtype, f"output {got.shape} {got.dtype}")
    idx = _sample_rows(batch, SAMPLING_REF // vocab, cfg["seed"])
    X, G = _f64(_take(x, idx)), _f64(_take(got, idx))
    for j, row in enumerate(idx):
        want = reference.top_k_mask_logits(X[j], vals[row])
        bad = G[j] != want
        _check(not bad.any(), f"row {row} (top_k {vals[row]}): {int(bad.sum())} of {vocab} logits differ from "
                              f"the reference mask")


SAMPLER_PARAMS = {  # op: the filters it takes, in its positional order
    "sampling_from_probs": (), "top_k_sampling_from_probs": ("top_k",), "top_p_sampling_from_probs": ("top_p",),
    "min_p_sampling_from_probs": ("min_p",), "top_k_top_p_sampling_from_probs": ("top_k", "top_p"),
    "sampling_from_logits": (), "top_k_top_p_sampling_from_logits": ("top_k", "top_p")}


def _rng_kw(cfg: dict, rows: int) -> dict:
    """The call's randomness, made afresh (a generator's state advances): explicit seed and offset, a
    fi_cupy Generator, a torch generator on the data's device (both seeded from cfg's Philox seed), or
    per-row seed / offset arrays (int64 or uint64, length `rows` or 1) drawn from it."""
    seed, offset = cfg["philox"]
    form = cfg["rng"]
    if form == "seed":
        return dict(seed=seed, offset=offset)
    if form == "generator":
        return dict(generator=sampling.Generator(seed))
    if form == "torch_generator":  # drawn only where torch with CUDA is importable (see _rng_form)
        g = torch.Generator(device="cuda")
        g.manual_seed(seed)
        return dict(generator=g)
    nr = np.random.default_rng(seed)
    n = 1 if nr.random() < 0.2 else rows
    s = cupy.asarray(nr.integers(-2 ** 63, 2 ** 63, n, dtype=np.int64))
    o = cupy.asarray(nr.integers(0, 2 ** 40, n, dtype=np.int64))
    if nr.random() < 0.3:
        s = s.view(cupy.uint64)
    return dict(seed=s, offset=o)


def _row_alone(kw: dict, row: int) -> dict:
    """The scalar seed and offset that output row `row` of a per-row call takes."""
    def at(a):
        a = a.view(cupy.int64) if a.dtype != np.int64 else a
        return int(a[row if a.size > 1 else 0]) % 2 ** 64
    return dict(seed=at(kw["seed"]), offset=at(kw["offset"]))


def run_sampler(cfg: dict) -> None:
    g, r = _gen(cfg["seed"]), np.random.default_rng(cfg["seed"])
    op, batch, vocab = cfg["op"], cfg["batch"], cfg["vocab"]
    from_logits = op.endswith("_logits")
    if from_logits:
        data = _logits(g, cfg, batch)
    else:
        data = _probs(g, (batch, vocab), cfg["kind"], cfg["temp"])
        if cfg["unnormalised"] and batch:
            data = data * _row_mass(g, batch)
    data = _matrix(g, cfg, data)
    rows_out = cfg["rows_out"] if cfg["rows_out"] is not None else batch
    src = r.integers(0, batch, rows_out) if cfg["rows_out"] is not None else np.arange(batch)
    params = SAMPLER_PARAMS[op]
    args, vals = [], {}
    for name in params:
        a, vals[name] = _param_values(r, cfg, name, rows_out)
        args.append(a)
    kw = {"indices": _dev(src, cfg["index_dtype"])} if cfg["rows_out"] is not None else {}
    out_dt = cfg["index_dtype"] if cfg["rows_out"] is not None else "int32"  # FlashInfer: the indices' dtype
    if cfg["check_nan"]:
        kw["check_nan"] = True
    if "order" in cfg:
        kw["filter_apply_order"] = cfg["order"]
    if cfg.get("return_valid"):
        kw["return_valid"] = True
    rng_kw = _rng_kw(cfg, rows_out)

    def draw(**rng):
        got = getattr(sampling, op)(data, *args, **kw, **(rng or _rng_kw(cfg, rows_out)))
        return got if cfg.get("return_valid") else (got, None)

    tok, valid = draw(**rng_kw)
    _check(tuple(tok.shape) == (rows_out,) and dtype_name(tok) == out_dt, f"tokens {tok.shape} {tok.dtype}")
    _check(cupy.array_equal(draw()[0], tok), "the same seed and offset drew other tokens")
    if valid is not None:  # every row here has positive mass
        _check(valid.dtype == np.bool_ and tuple(valid.shape) == (rows_out,), f"valid {valid.shape} {valid.dtype}")
        _check(bool(valid.all()), f"rows with positive mass not valid: {cupy.flatnonzero(~valid)[:8].tolist()}")
    if not rows_out:
        return
    if cfg["rng"] == "per_row":  # a row's token depends on its own seed and offset (and position) only
        row = int(r.integers(rows_out))
        alone, _ = draw(**_row_alone(rng_kw, row))
        _check(int(alone[row]) == int(tok[row]), f"output row {row}: per-row seed and offset drew {int(tok[row])}, "
                                                  f"the same values as scalars {int(alone[row])}")
    t = cupy.asnumpy(tok).astype(np.int64)
    _check(t.min() >= 0 and t.max() < vocab, f"token ids {t.min()}..{t.max()} outside [0, {vocab})")
    if op == "sampling_from_logits":
        # support: the tokens of float64 probability > 0, i.e. logits above -inf and above max - 700
        x64, src_d = _f64_dev(data), cupy.asarray(src)
        low = cupy.asnumpy(x64[src_d, cupy.asarray(t)] < x64.max(-1)[src_d] - 700)
        _check(not low.any(), f"drew tokens of probability 0 (logit -inf or far below the row's max) in output "
                              f"rows {np.flatnonzero(low)[:8].tolist()}")
        idx = _sample_rows(rows_out, SAMPLING_REF // vocab, cfg["seed"])
        P = reference.softmax(_f64(_take(data, src[idx])))
        zero = P[np.arange(idx.size), t[idx]] <= 0
        _check(not zero.any(), f"drew tokens outside softmax's support in output rows {idx[zero][:8].tolist()}")
        return
    # Probabilities the filters see: from the logits path, its own softmax (checked by the softmax case).
    probs = sampling.softmax(data) if from_logits else data
    picked = _at(probs, src, t)
    bad = ~(picked > 0)  # NaN too (a NaN softmax row): `picked <= 0` named no row for it
    _check(not bad.any(), f"drew tokens of probability 0 or NaN (output rows {np.flatnonzero(bad)[:8].tolist()}, "
                          f"probabilities {picked[bad][:8].tolist()})")
    idx = _sample_rows(rows_out, SAMPLING_REF // vocab, cfg["seed"])
    P = _f64(_take(probs, src[idx]))
    for j, row in enumerate(idx):
        f = {name: vals[name][row] for name in params}
        if "order" in cfg:
            f["order"] = cfg["order"]
        may = _support(P[j], slack=_slack(vocab, P[j].sum()), **f)
        _check(may[t[row]], f"output row {row} (probs row {src[row]}, {f}): token {t[row]} of probability "
                            f"{P[j][t[row]]:.6g} is outside the reference's filtered support ({int(may.sum())} tokens)")
        if f.get("top_k") == 1:
            _check(P[j][t[row]] == P[j].max(), f"output row {row}: top_k=1 drew {t[row]}, not the argmax")


def _categorical(g, p):
    """One token a row of the (rows, vocab) probabilities p (each row with positive mass), drawn by
    inverse CDF: u in (0, mass], the first token whose float64 cumulative mass reaches u, which is
    never a token of probability 0."""
    c = cupy.cumsum(p.astype(cupy.float64), axis=-1)
    u = (1.0 - g.random((p.shape[0], 1))) * c[:, -1:]
    return cupy.minimum((c < u).sum(axis=-1), p.shape[1] - 1)


def run_chain(cfg: dict) -> None:
    g = _gen(cfg["seed"])
    batch, n, vocab = cfg["batch"], cfg["n"], cfg["vocab"]
    q = _probs(g, (batch, n, vocab), cfg["kind"], 2.0) if n else cupy.zeros((batch, 0, vocab), dtype=cupy.float32)
    p = _probs(g, (batch, n + 1, vocab), cfg["kind"], 2.0)
    if n and cfg["ids"] == "from_draft":
        ids = _categorical(g, q.reshape(-1, vocab)).reshape(batch, n).astype(cupy.int32)
    else:
        ids = g.integers(vocab, size=(batch, n), dtype=cupy.int32)
    if n and cfg["relation"] == "equal":  # p == q on the drafts: every draft accepted
        p[:, :n] = q
    elif n and cfg["relation"] == "zero_at_draft":  # draft 0 has target probability 0: rejected
        p[cupy.arange(batch), 0, ids[:, 0].astype(cupy.int64)] = 0.0
        p[:, 0] = cupy.where(p[:, 0].sum(-1, keepdims=True) > 0, p[:, 0], cupy.float32(1.0 / vocab))
    q, p = cast(q, cfg["dtype"]), cast(p, cfg["target_dtype"])  # two dtypes: converted to float32 first
    ids = ids.astype(cfg["ids_dtype"])
    acc0 = emi0 = None
    init_acc = init_emi = np.zeros(batch, np.int64)
    if cfg["counters"]:
        acc0 = g.integers(0, 100, size=batch, dtype=cupy.int32)
        emi0 = g.integers(0, 100, size=batch, dtype=cupy.int32)
        init_acc, init_emi = cupy.asnumpy(acc0).astype(np.int64), cupy.asnumpy(emi0).astype(np.int64)
    rng = cfg.get("rng", "seed")
    cfg_rng = dict(cfg, philox=[cfg["seed"] % 2 ** 63, 7], rng=rng)
    out, acc, emi = sampling.chain_speculative_sampling(q, ids, p, acc0, emi0, **_rng_kw(cfg_rng, batch))
    _check(tuple(out.shape) == (batch, n + 1) and out.dtype == np.int32, f"output_token_ids {out.shape} {out.dtype}")
    for name, got, given in (("accepted", acc, acc0), ("emitted", emi, emi0)):
        _check(tuple(got.shape) == (batch,) and got.dtype == np.int32, f"{name} {got.shape} {got.dtype}")
        _check(given is None or got is given, f"{name}: the given counter was not the array returned")
    again, _, _ = sampling.chain_speculative_sampling(q, ids, p, **_rng_kw(cfg_rng, batch))
    _check(cupy.array_equal(again, out), "the same seed and offset gave other tokens")
    O, I = cupy.asnumpy(out), cupy.asnumpy(ids).astype(np.int64)
    d_acc, d_emi = cupy.asnumpy(acc) - init_acc, cupy.asnumpy(emi) - init_emi
    Q = _f64(q).astype(np.float32)  # the values the kernel reads, in float32 (exact)
    Pn = _f64(p).astype(np.float32)
    for b in range(batch):
        j = int(d_emi[b])
        _check(0 <= j <= n, f"request {b}: emitted {j} drafts of {n}")
        pd = np.array([Pn[b, i, I[b, i]] for i in range(n)], np.float32)
        qd = np.array([Q[b, i, I[b, i]] for i in range(n)], np.float32)
        sure_accept, sure_reject = (pd >= qd) & (pd > 0), pd <= 0  # u * q < p with u in [0, 1)
        ctx = f"request {b} (emitted {j}, row {O[b].tolist()[:12]})"
        _check(np.array_equal(O[b, :j], I[b, :j]), f"{ctx}: the accepted prefix is not the drafts")
        _check(np.all(O[b, j + 1:] == -1), f"{ctx}: entries after the drawn token are not -1")
        _check(not sure_reject[:j].any(), f"{ctx}: accepted a draft of target probability 0")
        _check(j == n or not sure_accept[j], f"{ctx}: rejected draft {j} with p >= q")
        _check(max(j, int(sure_accept.sum())) <= d_acc[b] <= n - int(sure_reject.sum()),
               f"{ctx}: accepted count {int(d_acc[b])} impossible (sure accepts {int(sure_accept.sum())}, "
               f"sure rejects {int(sure_reject.sum())})")
        tok = int(O[b, j])
        _check(0 <= tok < vocab, f"{ctx}: token {tok} outside [0, {vocab})")
        if j < n:
            resid = Pn[b, j] > Q[b, j]  # max(p - q, 0) > 0 in float32
            _check(resid[tok] or (not resid.any() and Pn[b, j, tok] > 0),
                   f"{ctx}: token {tok} has no residual mass (p {Pn[b, j, tok]:.6g}, q {Q[b, j, tok]:.6g})")
        else:
            _check(Pn[b, n, tok] > 0, f"{ctx}: bonus token {tok} has target probability 0")


def run_sampling(cfg: dict) -> None:
    op = cfg["op"]
    if op == "softmax":
        run_softmax(cfg)
    elif op.endswith("renorm_probs"):
        run_renorm(cfg)
    elif op == "top_k_mask_logits":
        run_mask_logits(cfg)
    elif op == "chain_speculative_sampling":
        run_chain(cfg)
    else:
        run_sampler(cfg)


# ---------------------------------------------------------------------------------------------

FAMILIES = {  # weights on the scale of fuzz_attention's (which sum to 90): these are ~37% of a run
    "page_append": (10, draw_page_append, run_page_append),
    "norm": (10, draw_norm, run_norm),
    "activation": (7, draw_activation, run_activation),
    "rope": (10, draw_rope, run_rope),
    "sampling": (15, draw_sampling, run_sampling),
}


# ---------------------------------------------------------------------------------------------
# The drawn distribution, without a GPU: `python tests/fuzz_ops.py [draws per family]`


def _distribution(n: int) -> None:
    from collections import Counter

    def show(name, values):
        if values:
            c = Counter(values)
            print(f"  {name}: " + ", ".join(f"{k[1] if isinstance(k, tuple) else k} {100 * v / len(values):.0f}%"
                                            for k, v in sorted(c.items(), key=str)))

    def size(x, edges=(0, 1, 2, 9, 65, 513, 4097, 65536)):
        """(bucket number, 'lo-hi') of x: sorts in order."""
        i = next((i for i, e in enumerate(edges[1:]) if x < e), len(edges) - 1)
        lo, hi = edges[i], edges[i + 1] - 1 if i + 1 < len(edges) else None
        return i, str(lo) if lo == hi else f"{lo}-{'' if hi is None else hi}"

    for fam, (_, draw, _) in FAMILIES.items():
        cfgs = [draw(np.random.default_rng(10 ** 9 + i)) for i in range(n)]
        print(f"{fam} ({n} draws)")
        show("op", [c["op"] for c in cfgs])
        show("dtype", [c["dtype"] for c in cfgs if "dtype" in c])
        if fam in ("norm", "activation"):
            width = [c["hidden"] if fam == "norm" else c["d"] for c in cfgs]
            show("width", [size(w) for w in width])
            show("width odd", [w % 2 == 1 for w in width])
            show("rows", [size(math.prod(c["lead"])) for c in cfgs])
            show("leading dims", [len(c["lead"]) for c in cfgs])
            show("strided rows", [c["pad"] > 0 for c in cfgs])
            show("out=", [c.get("out", "-") for c in cfgs])
        elif fam == "rope":
            show("head_dim", [c["head_dim"] if c["head_dim"] in ROPE_HEAD_DIMS else "other" for c in cfgs])
            show("partial rotary", [c["rotary_dim"] < c["head_dim"] for c in cfgs])
            show("interleave", [c["interleave"] for c in cfgs])
            show("layout", [c["layout"] for c in cfgs])
            show("index", [c["index_dtype"] for c in cfgs])
            show("nnz", [size(c["nnz"]) for c in cfgs])
            show("max position", [size(c["maxpos"], (1, 2, 1025, 65537, 400001, 1 << 23))
                                  for c in cfgs if "maxpos" in c])
        elif fam == "page_append":
            show("page_size", [size(c["page_size"], (1, 2, 8, 9, 16, 17, 64, 65)) for c in cfgs])
            show("layout", [c["layout"] for c in cfgs])
            show("form", [c["form"] for c in cfgs])
            show("strided cache", [c["strided"] for c in cfgs])
            show("mode", [c["mode"] for c in cfgs])
            show("appended tokens", [size(int(_append_plan(c)[1].sum())) for c in cfgs[:2000]])
        else:
            show("vocab", [size(c["vocab"], (2, 3, 9, 1025, 8193, 32000, 65537, 256004)) for c in cfgs])
            show("batch", [size(c["batch"], (0, 1, 2, 9, 65, 301)) for c in cfgs])
            show("top_k", [c["top_k"] if c["top_k"] in (1, "per_row") else ">= vocab" if c["top_k"] >= c["vocab"]
                           else "other" for c in cfgs if "top_k" in c])
            show("per-row parameter dtype", [c[k + "_dtype"] for c in cfgs for k in ("top_k", "top_p", "min_p")
                                             if c.get(k) == "per_row"])
            show("randomness", [c["rng"] for c in cfgs if "rng" in c])
            show("indices dtype", [c["index_dtype"] for c in cfgs if c.get("rows_out") is not None])
            show("return_valid", [c["return_valid"] for c in cfgs if "return_valid" in c])
            show("chain target dtype differs", [c["target_dtype"] != c["dtype"] for c in cfgs if "target_dtype" in c])


if __name__ == "__main__":
    import sys
    _distribution(int(sys.argv[1]) if len(sys.argv) > 1 else 5000)
