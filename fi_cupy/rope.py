"""Rotary position embedding (cuda_src/rope.cu): FlashInfer's apply_rope* family.

q (nnz, num_qo_heads, head_dim) and k (nnz, num_kv_heads, head_dim) in float16 / bfloat16 / float32,
any (token, head) strides with a contiguous head dim. Positions come from pos_ids (nnz,), or from a
ragged batch: indptr (batch_size + 1,) and offsets (batch_size,), token i of request b at position
offsets[b] + i. Index arrays are int32 or int64 (one dtype per call). The *_inplace functions write
into q and k and return None, except for JAX callers (immutable arrays), who get (q_rope, k_rope).
With a cos_sin_cache, a position outside the cache gives NaN rows (never a read outside it).
"""
from __future__ import annotations

import math

from ._core import checks, kernels
from ._core import dtypes as dt
from ._core.call import Call
from ._core.docs import KERNEL_GLOSSARY, document
from ._core.fastpath import Signatures
from ._core.kernels import KernelSpec, Program, i32, i64, ptr, struct_arg

DTYPES = (dt.float16, dt.bfloat16, dt.float32)
INDEX_DTYPES = (dt.int32, dt.int64)
POS = {"pos_ids": 0, "indptr": 1}
FREQ = {"theta": 0, "llama31": 1, "cache": 2}
HEAD_CHUNK = 8       # kHeadChunk in rope.cu
MAX_ROTARY_DIM = 1024  # 2 * kMaxHalfRotary in rope.cu
CTA_THREADS = 128
MAX_THREADS = 256  # kRopeMaxThreads in rope.cu (its launch bound): wider rows take more CTAs along z


def rope_program(dtype: dt.DType, index: dt.DType, pos: str, freq: str) -> Program:
    """Every (vector width, interleave) variant of one (dtype, index dtype, position and frequency mode)."""
    return Program("rope.cu", tuple(
        KernelSpec("fic::rope_kernel", (dtype.cpp, index.cpp, vec, kernels.cpp_bool(il), POS[pos], FREQ[freq]))
        for vec in _widths(dtype) for il in (False, True) if not (il and vec == 1)),
        (("fic::kHeadChunk", HEAD_CHUNK), ("fic::kMaxHalfRotary", MAX_ROTARY_DIM // 2),
         ("fic::kRopeMaxThreads", MAX_THREADS)))


def _widths(d: dt.DType) -> tuple:
    return tuple(w for w in (8, 4, 2, 1) if w * d.itemsize <= 16)


def all_programs() -> list:
    return [rope_program(d, i, p, f) for d in DTYPES for i in INDEX_DTYPES
            for p, f in (("pos_ids", "theta"), ("indptr", "theta"), ("pos_ids", "llama31"), ("indptr", "llama31"),
                         ("pos_ids", "cache"))]


def _heads_view(c: Call, x, name: str, head_size: int | None):
    """(info, heads, head_dim, token stride, head stride) of a (nnz, heads, head_dim) array, or of a
    (nnz, heads * head_size) one when head_size is given."""
    info = c.arg(x, name)
    checks.dtype_in(info, DTYPES)
    checks.last_dim_contiguous(info)
    if head_size is not None and info.ndim == 2:
        if info.shape[1] % head_size:
            raise ValueError(f"{name}: last dim {info.shape[1]} is not a multiple of head_size {head_size}")
        return info, info.shape[1] // head_size, head_size, info.strides[0], head_size
    checks.ndim(info, 3, "(nnz, num_heads, head_dim)")
    if head_size is not None and info.shape[2] != head_size:
        raise ValueError(f"{name}: head_dim {info.shape[2]} does not match head_size {head_size}")
    return info, info.shape[1], info.shape[2], info.strides[0], info.strides[1]


def _index(c: Call, x, name: str, length: int):
    info = c.arg(x, name)
    checks.dtype_in(info, INDEX_DTYPES)
    checks.shape(info, (length,), f"({length},)")
    checks.contiguous(info)
    return info


_SIGS = Signatures()  # recorded calls by signature: an eager call of a known signature only launches


def _rope(q, k, *, inplace: bool, pos_ids=None, indptr=None, offsets=None, rotary_dim=None, interleave=False,
          freq: str = "theta", rope_scale=1.0, rope_theta=1e4, low_freq_factor=1.0, high_freq_factor=4.0,
          old_context_len=8192, cos_sin_cache=None, head_size=None, stream=None):
    # the options as a tuple (the signature's scalars); the keywords are spelled out only for a full call
    opts = (inplace, rotary_dim, interleave, freq, rope_scale, rope_theta, low_freq_factor, high_freq_factor,
            old_context_len, head_size)
    return _SIGS((q, k, pos_ids, indptr, offsets, cos_sin_cache), opts, stream, lambda: _rope_call(
        q, k, inplace=inplace, pos_ids=pos_ids, indptr=indptr, offsets=offsets, rotary_dim=rotary_dim,
        interleave=interleave, freq=freq, rope_scale=rope_scale, rope_theta=rope_theta,
        low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor, old_context_len=old_context_len,
        cos_sin_cache=cos_sin_cache, head_size=head_size, stream=stream))


def _rope_call(q, k, *, inplace: bool, pos_ids=None, indptr=None, offsets=None, rotary_dim=None, interleave=False,
               freq: str = "theta", rope_scale=1.0, rope_theta=1e4, low_freq_factor=1.0, high_freq_factor=4.0,
               old_context_len=8192, cos_sin_cache=None, head_size=None, stream=None):
    c = Call(q, stream, name="q" if head_size is None else "query")
    qi, hq, d, q_tok, q_head = _heads_view(c, q, "q" if head_size is None else "query", head_size)
    ki, hk, dk, k_tok, k_head = _heads_view(c, k, "k" if head_size is None else "key", head_size)
    if ki.dtype != qi.dtype or dk != d or ki.shape[0] != qi.shape[0]:
        raise ValueError(f"{ki.name}: must have {qi.name}'s dtype, nnz and head_dim; got {ki.dtype}, "
                         f"{ki.shape[0]}, {dk} vs {qi.dtype}, {qi.shape[0]}, {d}")
    nnz = qi.shape[0]
    rd = d if rotary_dim is None else checks.positive_int("rotary_dim", rotary_dim)
    if freq != "cache" and (rd > d or rd % 2 or rd > MAX_ROTARY_DIM):  # the cache's width is checked below
        raise ValueError(f"rotary_dim: must be even and at most head_dim ({d}) and {MAX_ROTARY_DIM}, got {rd}")
    # Positions.
    batch, pi, ipi, ofi = 0, None, None, None
    if indptr is not None:
        ipi = c.arg(indptr, "indptr")
        checks.dtype_in(ipi, INDEX_DTYPES)
        checks.ndim(ipi, 1, "(batch_size + 1,)")
        checks.contiguous(ipi)
        batch = ipi.shape[0] - 1
        if batch < 1:
            raise ValueError(f"indptr: expected batch_size + 1 >= 2 entries, got {ipi.shape[0]}")
        ofi = _index(c, offsets, "offsets", batch)
        checks.dtype_is(ofi, ipi.dtype, "indptr's dtype")
        index = ipi.dtype
    else:
        pi = _index(c, pos_ids, "pos_ids" if head_size is None else "positions", nnz)
        index = pi.dtype
    # Frequencies.
    cs, cs_stride, max_pos = None, 0, 0
    if freq == "cache":
        cs = c.arg(cos_sin_cache, "cos_sin_cache")
        checks.dtype_is(cs, dt.float32, "float32 (cos_sin_cache)")
        checks.ndim(cs, 2, "(max_position, rotary_dim)")
        rd = cs.shape[1]
        if rd > d or rd % 2:
            raise ValueError(f"cos_sin_cache: its last dim (rotary_dim) must be even and at most head_size {d}, "
                             f"got {rd}")
        checks.last_dim_contiguous(cs)
        cs_stride, max_pos = cs.strides[0], cs.shape[0]
    scale = checks.float_or_none("rope_scale", rope_scale) or 1.0
    theta = checks.float_or_none("rope_theta", rope_theta) or 1e4
    if scale <= 0 or theta <= 0:
        raise ValueError(f"rope_scale and rope_theta must be positive, got {rope_scale}, {rope_theta}")
    if freq == "llama31" and float(high_freq_factor) == float(low_freq_factor):
        raise ValueError("high_freq_factor and low_freq_factor must differ")
    fa = struct_arg("ffffd", 1.0 / scale, float(low_freq_factor), float(high_freq_factor), float(old_context_len),
                    math.log2(theta))
    # Outputs.
    if inplace and c.writable(qi) and c.writable(ki):
        checks.no_overlap(qi)
        checks.no_overlap(ki)
        qo_obj, qo, ko_obj, ko = None, qi, None, ki
    else:
        qo_obj, qo = c.new(qi.shape, qi.dtype, "q_rope")
        ko_obj, ko = c.new(ki.shape, ki.dtype, "k_rope")
    out_of_place = qo is not qi
    (qo_tok, qo_head), (ko_tok, ko_head) = [
        (o.strides[0], src_head if o.ndim == 2 else o.strides[1]) for o, src_head in ((qo, head_size), (ko, head_size))]
    if nnz and hq + hk:
        span = math.gcd(d, rd if interleave else rd // 2)
        vec = checks.vector_width([qi, ki, qo, ko], span)
        if interleave and vec < 2:
            raise ValueError(f"{qi.name}, {ki.name}: interleave=True needs pointers and strides aligned to two "
                             f"elements")
        pos_mode = "indptr" if ipi is not None else "pos_ids"
        fn = kernels.cached_function(c.device, ("rope", qi.dtype.name, index.name, pos_mode, freq, vec, interleave),
                                     lambda: (rope_program(qi.dtype, index, pos_mode, freq), KernelSpec(
                                         "fic::rope_kernel", (qi.dtype.cpp, index.cpp, vec, kernels.cpp_bool(interleave),
                                                              POS[pos_mode], FREQ[freq]))))
        rot = (rd if interleave else rd // 2) // vec
        lanes = rot + ((d - rd) // vec if out_of_place else 0)
        bx = min(lanes, MAX_THREADS)
        by = max(1, CTA_THREADS // bx)
        grid = (-(-nnz // by), -(-(hq + hk) // HEAD_CHUNK), -(-lanes // bx))
        c.launch(fn, grid, (bx, by), [
            ptr(qi), ptr(qo), struct_arg("qqqq", q_tok, q_head, qo_tok, qo_head), i32(hq),
            ptr(ki), ptr(ko), struct_arg("qqqq", k_tok, k_head, ko_tok, ko_head), i32(hk),
            ptr(pi), ptr(ipi), ptr(ofi), i32(batch), ptr(cs), i64(cs_stride), i64(max_pos), fa,
            i64(nnz), i32(d), i32(rd)])
    if qo_obj is None:
        c.result()
        return None
    return c.result(qo_obj, ko_obj)


# Each parameter's entry, once for the module (docs.document writes the Parameters sections).
_PARAMS = {**KERNEL_GLOSSARY,
           "q": ("array\n"
                 "    ``(nnz, num_qo_heads, head_dim)``, float16, bfloat16 or float32, on a CUDA device (torch,\n"
                 "    JAX, CuPy or any DLPack producer). The head dim must be contiguous; the token and head\n"
                 "    strides are free (e.g. a view of a fused qkv buffer)."),
           "k": ("array\n"
                 "    ``(nnz, num_kv_heads, head_dim)``: q's dtype, nnz and head_dim (the number of heads may\n"
                 "    differ); strides as for q."),
           "indptr": ("array\n"
                      "    ``(batch_size + 1,)`` int32 or int64 device array, contiguous, ``batch_size >= 1``:\n"
                      "    request b's tokens are rows ``indptr[b]`` to ``indptr[b + 1]`` of q and k (``indptr[-1]\n"
                      "    = nnz``)."),
           "offsets": ("array\n"
                       "    ``(batch_size,)`` in indptr's dtype, contiguous: the position of each request's first\n"
                       "    token; token i of request b is rotated at position ``offsets[b] + i``."),
           "rotary_dim": ("int, optional\n"
                          "    Rotate only the first ``rotary_dim`` dims of each head (even, at most head_dim and\n"
                          "    1024); the others pass through unchanged. None (the default): the whole head_dim,\n"
                          "    which must then be even and at most 1024."),
           "interleave": ("bool, default False\n"
                          "    How dims pair up for rotation. False: \"rotate half\" (Llama, GPT-NeoX), dim ``j``\n"
                          "    with ``j + rotary_dim // 2``. True: GPT-J style, dims ``2i`` and ``2i + 1``; q and\n"
                          "    k (and their strides) must then be aligned to two elements."),
           "rope_scale": ("float, default 1\n"
                          "    Linear position interpolation: the frequencies are divided by it (positive)."),
           "rope_theta": ("float, default 1e4\n"
                          "    The base of the frequencies ``rope_theta ** (-2i / rotary_dim)`` (positive)."),
           "pos_ids": ("array\n"
                       "    ``(nnz,)`` int32 or int64 device array, contiguous: the position of each token."),
           "low_freq_factor": ("float, default 1\n"
                               "    Llama 3.1's ``low_freq_factor``: frequencies whose wavelength exceeds\n"
                               "    ``old_context_len / low_freq_factor`` are divided by ``rope_scale``."),
           "high_freq_factor": ("float, default 4\n"
                                "    Llama 3.1's ``high_freq_factor``: frequencies whose wavelength is below\n"
                                "    ``old_context_len / high_freq_factor`` are kept. Must differ from\n"
                                "    low_freq_factor."),
           "old_context_len": ("int, default 8192\n"
                               "    Llama 3.1's ``original_max_position_embeddings``, the context length the model\n"
                               "    was trained on."),
           "positions": ("array\n"
                         "    ``(nnz,)`` int32 or int64 device array, contiguous: the position of each token, a row\n"
                         "    of cos_sin_cache."),
           "query": ("array\n"
                     "    ``(nnz, num_q_heads * head_size)`` (vLLM / SGLang's layout) or ``(nnz, num_q_heads,\n"
                     "    head_size)``; float16, bfloat16 or float32, on a CUDA device. The last dim must be\n"
                     "    contiguous; the token stride (and the head stride of the 3-D form) is free."),
           "key": ("array\n"
                   "    ``(nnz, num_k_heads * head_size)`` or ``(nnz, num_k_heads, head_size)``: query's dtype and\n"
                   "    nnz (the number of heads may differ); strides as for query."),
           "head_size": ("int\n"
                         "    The head dim: it divides the last dim of 2-D query / key, or equals it for 3-D ones."),
           "cos_sin_cache": ("array\n"
                             "    ``(max_position, rotary_dim)`` float32, last dim contiguous: row p holds ``cos(p\n"
                             "    * f_i)`` for ``i < rotary_dim // 2``, then ``sin(p * f_i)``. rotary_dim (even, at\n"
                             "    most head_size) is taken from its width: the first rotary_dim dims of each head\n"
                             "    are rotated, the rest pass through."),
           "is_neox": ("bool, default True\n"
                       "    True: \"rotate half\" (GPT-NeoX, Llama), dim ``j`` paired with ``j + rotary_dim // 2``.\n"
                       "    False: GPT-J style, dims ``2i`` and ``2i + 1`` (q and k aligned to two elements).")}

_ROTATED = ("q_rope : array\n"
            "    A new array of q's shape and dtype (contiguous), in the caller's framework.\n"
            "k_rope : array\n"
            "    A new array of k's shape and dtype (contiguous).")

_IN_PLACE = ("None or tuple of array\n"
             "    None: q and k were rotated in place. JAX callers (immutable arrays) get new ``(q_rope, k_rope)``\n"
             "    instead, the inputs untouched.")

_ROPE_NOTES = ("``inv_freq_i = rope_theta ** (-2i / rotary_dim) / rope_scale`` is computed in float64 and rounded\n"
               "to float32; the angle ``position * inv_freq_i`` is a float32 product and its sin / cos are taken in\n"
               "float32, as Hugging Face's LlamaRotaryEmbedding computes them. fi_cupy also takes float32 q / k,\n"
               "JAX arrays and ``stream``.")

_ROPE_INPLACE_NOTES = ("``inv_freq_i = rope_theta ** (-2i / rotary_dim) / rope_scale`` is computed in float64 and\n"
                       "rounded to float32; the angle ``position * inv_freq_i`` is a float32 product and its sin /\n"
                       "cos are taken in float32, as Hugging Face's LlamaRotaryEmbedding computes them. q and k are\n"
                       "written in place, so neither may have elements that share memory. fi_cupy also takes\n"
                       "float32 q / k, JAX arrays (the rotated pair is returned) and ``stream``.")

_LLAMA31_NOTES = ("The frequencies are Hugging Face's Llama 3 rescaling of ``rope_theta ** (-2i / rotary_dim)``,\n"
                  "computed in float64 and rounded to float32; the angle is a float32 product of position and\n"
                  "frequency, its sin / cos in float32. fi_cupy also takes float32 q / k, JAX arrays and\n"
                  "``stream``.")

_LLAMA31_INPLACE_NOTES = ("The frequencies are Hugging Face's Llama 3 rescaling of ``rope_theta ** (-2i /\n"
                          "rotary_dim)``, computed in float64 and rounded to float32; the angle is a float32\n"
                          "product of position and frequency, its sin / cos in float32. q and k are written in\n"
                          "place, so neither may have elements that share memory. fi_cupy also takes float32 q / k,\n"
                          "JAX arrays (the rotated pair is returned) and ``stream``.")

_LLAMA31_PARAMS = {"rope_scale": ("float, default 8\n"
                                  "    Llama 3.1's ``factor``: low frequencies are divided by it, high ones kept,\n"
                                  "    the band between blended (positive). Positions are not divided."),
                   "rope_theta": ("float, default 5e5\n"
                                  "    The base of the frequencies ``rope_theta ** (-2i / rotary_dim)`` before the\n"
                                  "    rescaling (positive).")}


@document("Rotary position embedding of a ragged batch of queries and keys, out of place.", returns=_ROTATED,
          glossary=_PARAMS, notes=_ROPE_NOTES)
def apply_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4, stream=None):
    """Token i of request b (rows ``indptr[b]`` to ``indptr[b + 1]``) sits at position ``offsets[b] + i``;
    cos / sin are computed in the kernel.
    """
    return _rope(q, k, inplace=False, indptr=indptr, offsets=offsets, rotary_dim=rotary_dim, interleave=interleave,
                 rope_scale=rope_scale, rope_theta=rope_theta, stream=stream)


@document("Rotary position embedding of a ragged batch of queries and keys, in place.", returns=_IN_PLACE,
          glossary=_PARAMS, notes=_ROPE_INPLACE_NOTES)
def apply_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4,
                       stream=None):
    """Token i of request b (rows ``indptr[b]`` to ``indptr[b + 1]``) sits at position ``offsets[b] + i``;
    cos / sin are computed in the kernel.
    """
    return _rope(q, k, inplace=True, indptr=indptr, offsets=offsets, rotary_dim=rotary_dim, interleave=interleave,
                 rope_scale=rope_scale, rope_theta=rope_theta, stream=stream)


@document("Rotary position embedding of queries and keys at explicit positions, out of place.", returns=_ROTATED,
          glossary=_PARAMS, notes=_ROPE_NOTES)
def apply_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4, stream=None):
    """Token t sits at position ``pos_ids[t]``; cos / sin are computed in the kernel."""
    return _rope(q, k, inplace=False, pos_ids=pos_ids, rotary_dim=rotary_dim, interleave=interleave,
                 rope_scale=rope_scale, rope_theta=rope_theta, stream=stream)


@document("Rotary position embedding of queries and keys at explicit positions, in place.", returns=_IN_PLACE,
          glossary=_PARAMS, notes=_ROPE_INPLACE_NOTES)
def apply_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1, rope_theta=1e4,
                               stream=None):
    """Token t sits at position ``pos_ids[t]``; cos / sin are computed in the kernel."""
    return _rope(q, k, inplace=True, pos_ids=pos_ids, rotary_dim=rotary_dim, interleave=interleave,
                 rope_scale=rope_scale, rope_theta=rope_theta, stream=stream)


@document("Llama 3.1 rotary embedding of a ragged batch of queries and keys, out of place.", returns=_ROTATED,
          glossary=_PARAMS, params=_LLAMA31_PARAMS, notes=_LLAMA31_NOTES)
def apply_llama31_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8, rope_theta=5e5,
                       low_freq_factor=1, high_freq_factor=4, old_context_len=8192, stream=None):
    """Token i of request b (rows ``indptr[b]`` to ``indptr[b + 1]``) sits at position ``offsets[b] + i``;
    the frequencies are rescaled as Llama 3.1 does for long context, and cos / sin computed in the kernel.
    """
    return _rope(q, k, inplace=False, indptr=indptr, offsets=offsets, rotary_dim=rotary_dim, interleave=interleave,
                 freq="llama31", rope_scale=rope_scale, rope_theta=rope_theta, low_freq_factor=low_freq_factor,
                 high_freq_factor=high_freq_factor, old_context_len=old_context_len, stream=stream)


@document("Llama 3.1 rotary embedding of a ragged batch of queries and keys, in place.", returns=_IN_PLACE,
          glossary=_PARAMS, params=_LLAMA31_PARAMS, notes=_LLAMA31_INPLACE_NOTES)
def apply_llama31_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8,
                               rope_theta=5e5, low_freq_factor=1, high_freq_factor=4, old_context_len=8192,
                               stream=None):
    """Token i of request b (rows ``indptr[b]`` to ``indptr[b + 1]``) sits at position ``offsets[b] + i``;
    the frequencies are rescaled as Llama 3.1 does for long context, and cos / sin computed in the kernel.
    """
    return _rope(q, k, inplace=True, indptr=indptr, offsets=offsets, rotary_dim=rotary_dim, interleave=interleave,
                 freq="llama31", rope_scale=rope_scale, rope_theta=rope_theta, low_freq_factor=low_freq_factor,
                 high_freq_factor=high_freq_factor, old_context_len=old_context_len, stream=stream)


@document("Llama 3.1 rotary embedding of queries and keys at explicit positions, out of place.", returns=_ROTATED,
          glossary=_PARAMS, params=_LLAMA31_PARAMS, notes=_LLAMA31_NOTES)
def apply_llama31_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8, rope_theta=5e5,
                               low_freq_factor=1, high_freq_factor=4, old_context_len=8192, stream=None):
    """Token t sits at position ``pos_ids[t]``; the frequencies are rescaled as Llama 3.1 does for long
    context, and cos / sin computed in the kernel.
    """
    return _rope(q, k, inplace=False, pos_ids=pos_ids, rotary_dim=rotary_dim, interleave=interleave,
                 freq="llama31", rope_scale=rope_scale, rope_theta=rope_theta, low_freq_factor=low_freq_factor,
                 high_freq_factor=high_freq_factor, old_context_len=old_context_len, stream=stream)


@document("Llama 3.1 rotary embedding of queries and keys at explicit positions, in place.", returns=_IN_PLACE,
          glossary=_PARAMS, params=_LLAMA31_PARAMS, notes=_LLAMA31_INPLACE_NOTES)
def apply_llama31_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8,
                                       rope_theta=5e5, low_freq_factor=1, high_freq_factor=4, old_context_len=8192,
                                       stream=None):
    """Token t sits at position ``pos_ids[t]``; the frequencies are rescaled as Llama 3.1 does for long
    context, and cos / sin computed in the kernel.
    """
    return _rope(q, k, inplace=True, pos_ids=pos_ids, rotary_dim=rotary_dim, interleave=interleave,
                 freq="llama31", rope_scale=rope_scale, rope_theta=rope_theta, low_freq_factor=low_freq_factor,
                 high_freq_factor=high_freq_factor, old_context_len=old_context_len, stream=stream)


@document("Rotary position embedding of queries and keys from a cos / sin cache, out of place.",
          returns=("query_out : array\n"
                   "    A new array of query's shape and dtype (contiguous), in the caller's framework.\n"
                   "key_out : array\n"
                   "    A new array of key's shape and dtype (contiguous)."), glossary=_PARAMS,
          notes=("A position outside ``[0, max_position)`` gives NaN in that token's rotated dims rather than a\n"
                 "read outside the cache. fi_cupy also takes float32 query / key, JAX arrays and ``stream``."))
def apply_rope_with_cos_sin_cache(positions, query, key, head_size, cos_sin_cache, is_neox=True, stream=None):
    """The SGLang / vLLM form: cos and sin come from a precomputed table indexed by position."""
    return _rope(query, key, inplace=False, pos_ids=positions, interleave=not is_neox, freq="cache",
                 cos_sin_cache=cos_sin_cache, head_size=checks.positive_int("head_size", head_size), stream=stream)


@document("Rotary position embedding of queries and keys from a cos / sin cache, in place.",
          returns=("None or tuple of array\n"
                   "    None: query and key were rotated in place. JAX callers (immutable arrays) get new\n"
                   "    ``(query_out, key_out)`` instead, the inputs untouched."), glossary=_PARAMS,
          notes=("A position outside ``[0, max_position)`` gives NaN in that token's rotated dims rather than a\n"
                 "read outside the cache. query and key are written in place, so neither may have elements that\n"
                 "share memory. fi_cupy also takes float32 query / key, JAX arrays (the rotated pair is returned)\n"
                 "and ``stream``."))
def apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cos_sin_cache, is_neox=True,
                                          stream=None):
    """The SGLang / vLLM form: cos and sin come from a precomputed table indexed by position."""
    return _rope(query, key, inplace=True, pos_ids=positions, interleave=not is_neox, freq="cache",
                 cos_sin_cache=cos_sin_cache, head_size=checks.positive_int("head_size", head_size), stream=stream)
