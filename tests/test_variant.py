"""Custom attention variants (fi_cupy/variant.py) on the GPU, CuPy callers, against float64 references.

Each example of examples/attention_variants.py runs through each entry point that takes a variant:
single prefill and single decode (FlashInfer's *_with_jit_module, fi_cupy.jit modules), the ragged and
paged prefill wrappers and the decode wrapper (jit_args: FlashInfer's tuple or an AttentionVariant), at
groups 1 and 4, page sizes 1 and 7, lengths 0, 1 and off the tiles, qo_len > kv_len under causal,
head dims 64 / 128 / 256, fp16 / bf16. Outputs are poisoned with NaN first. Accuracy: tolerances.OUT_TOL
per output dtype, against fi_cupy.reference (sigmoid_attention, prefill_attention with the mask /
bias / scaled q the variant stands for) on the inputs as rounded.
"""
import math

import cupy as cp
import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference
from fi_cupy._core.alibi import slopes as alibi_slopes
from attention_variants import ALIBI, DOC_MASK, GATE, KEY_SCALE, SIGMOID, SOFTMAX, TEMPERATURE
from gpu_arrays import cast, f64, f64_dev, nan_like, rand, rng
from tolerances import assert_close, assert_lse_close

pytestmark = pytest.mark.gpu

WS = 64 << 20


def _check(out, ref, dtype):
    assert_close(f64(out), cp.asnumpy(ref) if isinstance(ref, cp.ndarray) else ref, dtype)


@pytest.mark.parametrize("backend", ["fa2", "auto"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("qo,kv,hq,hkv,causal", [(1, 7, 4, 4, False), (128, 1027, 8, 2, False),
                                                 (200, 50, 4, 1, True), (77, 300, 4, 4, True), (5, 0, 4, 4, False)])
def test_sigmoid_single_prefill(backend, dtype, d, qo, kv, hq, hkv, causal):
    """Both kernels: "auto" runs the Hopper one on sm_90a where the packed rows are over 64 at d64 / 128."""
    mod = fi_cupy.jit.gen_customize_single_prefill_module(
        backend, "sigmoid", dtype, dtype, dtype, d, d, [], [], ["logits_scale", "sigmoid_bias"], ["double", "double"],
        SIGMOID.name, SIGMOID.decl).build_and_load()
    q, k, v = rand((qo, hq, d), dtype), rand((kv, hkv, d), dtype), rand((kv, hkv, d), dtype)
    out = nan_like(q)
    scale, bias = 1 / math.sqrt(d), 0.25
    got = fi_cupy.single_prefill_with_kv_cache_with_jit_module(mod, q, k, v, scale, bias, mask_mode=int(causal),
                                                               out=out)
    assert got is out
    _check_sigmoid(out, q, k, v, scale, bias, causal, dtype)


# Unit roundoff of the 16-bit P the kernel multiplies V with (sigmoid weights are not normalised, so their
# rounding error grows with the sum of |p v| rather than staying below the output's magnitude).
P_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def _check_sigmoid(out, q, k, v, scale, bias, causal, dtype):
    """out against reference.sigmoid_attention, allowing each weight's rounding to the q dtype: err <= u *
    sum_j p_ij |v_j| + the output dtype's tolerance."""
    from tolerances import OUT_TOL
    q64, k64, v64 = f64_dev(q), f64_dev(k), f64_dev(v)
    ref = cp.asnumpy(reference.sigmoid_attention(q64, k64, v64, scale, bias, causal))
    mag = cp.asnumpy(reference.sigmoid_attention(q64, k64, cp.abs(v64), scale, bias, causal))
    got = f64(out)
    atol, rtol = OUT_TOL[dtype]
    bad = np.abs(got - ref) > atol + rtol * np.abs(ref) + 2 * P_ROUNDOFF[dtype] * mag
    assert not np.isnan(got).any() and not bad.any(), f"{int(bad.sum())} of {bad.size} elements off"


def _doc_ids(lens, stride):
    ids = np.zeros((len(lens), stride), np.int32)
    for b, n in enumerate(lens):  # 1-4 documents a request, boundaries anywhere
        cuts = np.sort(rng().integers(0, max(n, 1), rng().integers(0, 4)))
        ids[b, :n] = np.searchsorted(cuts, np.arange(n), side="right")
    return ids


def _doc_ref(q, k, v, qo_lens, kv_lens, ids, sm_scale, causal):
    outs, lses = [], []
    qs, ks = np.concatenate([[0], np.cumsum(qo_lens)]), np.concatenate([[0], np.cumsum(kv_lens)])
    for b in range(len(qo_lens)):
        lq, lk = qo_lens[b], kv_lens[b]
        qpos = np.arange(lq) + lk - lq
        mask = ids[b, np.clip(qpos, 0, None)][:, None] == ids[b, :lk][None, :] if lk else np.zeros((lq, 0), bool)
        o, lse = reference.prefill_attention(q[qs[b]:qs[b + 1]], k[ks[b]:ks[b + 1]], v[ks[b]:ks[b + 1]], causal=causal,
                                             custom_mask=mask, sm_scale=sm_scale)
        outs.append(cp.asnumpy(o))
        lses.append(cp.asnumpy(lse))
    return np.concatenate(outs), np.concatenate(lses)


@pytest.mark.parametrize("backend", ["fa2", "auto"])
@pytest.mark.parametrize("source", ["ragged", "paged1", "paged7"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_doc_mask_batch(backend, source, hq, hkv, causal):
    """The document mask through the batch wrappers, FlashInfer's jit_args tuple (ragged) or an
    AttentionVariant (paged), on both kernels ("auto": the Hopper one on sm_90a); lse too."""
    dtype, d = "bfloat16", 128
    qo_lens = np.array([1, 0, 37, 130, 5])
    kv_lens = np.array([9, 4, 37, 300, 0])
    qo_ip, kv_ip = np.concatenate([[0], np.cumsum(qo_lens)]), np.concatenate([[0], np.cumsum(kv_lens)])
    stride = int(kv_lens.max())
    ids = _doc_ids(kv_lens, stride)
    q, k, v = rand((qo_ip[-1], hq, d), dtype), rand((kv_ip[-1], hkv, d), dtype), rand((kv_ip[-1], hkv, d), dtype)
    ws = cp.empty(WS, cp.uint8)
    sm = 1 / math.sqrt(d)
    if source == "ragged":
        jit_args = ("doc_mask", dtype, dtype, dtype, "int32", d, d, ["doc_ids"], ["int32_t"],
                    ["doc_stride", "sm_scale"], ["int64_t", "double"], DOC_MASK.name, DOC_MASK.decl)
        w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(ws, jit_args=jit_args, backend=backend)
        w.plan(qo_ip, kv_ip, hq, hkv, d, causal=causal, q_data_type=dtype)
        out = nan_like(q)
        o, lse = w.run(q, k, v, cp.asarray(ids.ravel()), stride, sm, out=out, return_lse=True)
    else:
        page = int(source[5:])
        pages = -(-kv_lens // page)
        ip = np.concatenate([[0], np.cumsum(pages)])
        perm = rng().permutation(int(ip[-1]) + 3)[: ip[-1]]
        cache = cp.zeros((int(ip[-1]) + 3, 2, page, hkv, d), dtype=q.dtype)
        for b in range(len(kv_lens)):
            for j in range(kv_lens[b]):
                pg, sl = perm[ip[b] + j // page], j % page
                cache[pg, 0, sl] = k[kv_ip[b] + j]
                cache[pg, 1, sl] = v[kv_ip[b] + j]
        last = np.where(pages > 0, kv_lens - (pages - 1) * page, 0)
        w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(ws, jit_args=DOC_MASK, backend=backend)
        w.plan(qo_ip, ip, perm, last, hq, hkv, d, page, causal=causal, q_data_type=dtype)
        out = nan_like(q)
        o, lse = w.run(q, cache, cp.asarray(ids.ravel()), stride, sm, out=out, return_lse=True)
    ref_o, ref_lse = _doc_ref(f64_dev(q), f64_dev(k), f64_dev(v), qo_lens, kv_lens, ids, sm, causal)
    _check(out, ref_o, dtype)
    assert_lse_close(cp.asnumpy(lse), ref_lse)
    assert w.resolved_backend() == ("fa2" if backend == "fa2" or cp.cuda.Device().compute_capability != "90" else "fa3")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("qo,kv", [(1, 500), (64, 64), (100, 333)])
def test_alibi_variant_matches_builtin(dtype, qo, kv):
    """ALiBi written as a user variant against the built-in pos_encoding_mode="ALIBI" (FlashInfer's
    slopes) and the reference."""
    hq, hkv, d = 8, 2, 128
    q, k, v = rand((qo, hq, d), dtype), rand((kv, hkv, d), dtype), rand((kv, hkv, d), dtype)
    sm = 1 / math.sqrt(d)
    slopes = cp.asarray(alibi_slopes(hq))
    got = fi_cupy.single_prefill_with_kv_cache_with_jit_module(ALIBI, q, k, v, slopes, sm, mask_mode=1)
    builtin = fi_cupy.single_prefill_with_kv_cache(q, k, v, causal=True, pos_encoding_mode="ALIBI")
    ref, _ = reference.prefill_attention(f64_dev(q), f64_dev(k), f64_dev(v), causal=True, alibi=True)
    _check(got, ref, dtype)
    _check(builtin, ref, dtype)


@pytest.mark.parametrize("backend", ["fa2", "auto"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("qo,kv,hq,hkv", [(1, 1, 4, 4), (129, 200, 8, 2), (3, 1000, 8, 1), (300, 77, 4, 4)])
def test_temperature_query_transform(backend, d, qo, kv, hq, hkv):
    """QueryTransform on both prefill kernels ("auto": the Hopper one on sm_90a past 64 packed rows)."""
    dtype = "bfloat16"
    q, k, v = rand((qo, hq, d), dtype), rand((kv, hkv, d), dtype), rand((kv, hkv, d), dtype)
    temp = cp.asarray(rng().uniform(0.5, 2.0, hq).astype(np.float32))
    sm = 1 / math.sqrt(d)
    mod = fi_cupy.jit.gen_customize_single_prefill_module(
        backend, "temp", dtype, dtype, dtype, d, d, ["temperature"], ["float"], ["sm_scale"], ["double"],
        TEMPERATURE.name, TEMPERATURE.decl).build_and_load()
    out = fi_cupy.single_prefill_with_kv_cache_with_jit_module(mod, q, k, v, temp, sm, out=nan_like(q))
    # the kernel rounds q / t to bf16 in shared memory: the reference takes the same rounded q
    qt = f64_dev(cast((f64_dev(q) / cp.asarray(temp, cp.float64)[None, :, None]).astype(cp.float32), dtype))
    ref, _ = reference.prefill_attention(qt, f64_dev(k), f64_dev(v), sm_scale=sm)
    _check(out, ref, dtype)


@pytest.mark.parametrize("backend", ["fa2", "auto"])
@pytest.mark.parametrize("name", ["key_scale", "gate"])
@pytest.mark.parametrize("qo,kv,hq,hkv,causal", [(7, 300, 4, 4, False), (200, 330, 8, 2, True), (130, 0, 4, 1, True)])
def test_key_and_output_transforms_prefill(backend, name, qo, kv, hq, hkv, causal):
    """KeyTransform and OutputTransform on both prefill kernels ("auto": the Hopper one on sm_90a past 64 packed
    rows) in single prefill, d128 bf16."""
    dtype, d = "bfloat16", 128
    q, k, v = rand((qo, hq, d), dtype), rand((kv, hkv, d), dtype), rand((kv, hkv, d), dtype)
    sm = 1 / math.sqrt(d)
    k_mul = cp.asarray(rng().uniform(0.5, 1.5, (hkv, d)).astype(np.float32))
    gate = cp.asarray(rng().uniform(-1.0, 1.0, hq).astype(np.float32))
    variant, args = (KEY_SCALE, (k_mul.ravel(), sm, d)) if name == "key_scale" else (GATE, (gate, sm))
    mod = fi_cupy.jit.gen_customize_single_prefill_module(
        backend, name, dtype, dtype, dtype, d, d, [t for t, _ in variant.tensors], [c for _, c in variant.tensors],
        [t for t, _ in variant.scalars], [c for _, c in variant.scalars], variant.name, variant.decl).build_and_load()
    out = fi_cupy.single_prefill_with_kv_cache_with_jit_module(mod, q, k, v, *args, mask_mode=int(causal),
                                                               out=nan_like(q))
    kr = f64_dev(k)
    if name == "key_scale":  # the kernel rounds k * k_mul to bf16 in shared memory
        kr = f64_dev(cast((kr * cp.asarray(k_mul, cp.float64)[None]).astype(cp.float32), dtype))
    ref, _ = reference.prefill_attention(f64_dev(q), kr, f64_dev(v), causal=causal, sm_scale=sm)
    if name == "gate":
        ref = ref * cp.asarray(gate, cp.float64)[None, :, None]
    _check(out, ref, dtype)


@pytest.mark.parametrize("backend", ["fa2", "auto"])
@pytest.mark.parametrize("page", [1, 7, 16])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (8, 2, 128), (8, 1, 128)])
def test_key_scale_paged_prefill(backend, page, hq, hkv, d):
    """KeyTransform through the paged prefill wrapper, causal, on both kernels ("auto": the Hopper one on
    sm_90a, where each thread rewrites the K chunks it copied): requests of 0 / 1 keys, tiles cut by the
    request's end, qo_len > kv_len; lse too."""
    dtype = "float16"
    qo_lens, kv_lens = np.array([3, 1, 200, 70, 140]), np.array([0, 1, 129, 333, 100])
    qo_ip = np.concatenate([[0], np.cumsum(qo_lens)])
    cache, ip, perm, last, gather = _paged(kv_lens, page, hkv, d, dtype)
    q = rand((int(qo_ip[-1]), hq, d), dtype)
    sm = 1 / math.sqrt(d)
    k_mul = cp.asarray(rng().uniform(0.5, 1.5, (hkv, d)).astype(np.float32))
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(cp.empty(WS, cp.uint8), jit_args=KEY_SCALE, backend=backend)
    w.plan(qo_ip, ip, perm, last, hq, hkv, d, page, causal=True, q_data_type=dtype)
    out = nan_like(q)
    o, lse = w.run(q, cache, k_mul.ravel(), sm, d, out=out, return_lse=True)
    for b in range(kv_lens.size):
        kb, vb = gather(b)
        kb = f64_dev(cast((kb * cp.asarray(k_mul, cp.float64)[None]).astype(cp.float32), dtype))
        rows = slice(int(qo_ip[b]), int(qo_ip[b + 1]))
        ref_o, ref_lse = reference.prefill_attention(f64_dev(q[rows]), kb, vb, causal=True, sm_scale=sm)
        _check(out[rows], ref_o, dtype)
        assert_lse_close(cp.asnumpy(lse[rows]), cp.asnumpy(ref_lse))
    assert w.resolved_backend() == ("fa2" if backend == "fa2" or cp.cuda.Device().compute_capability != "90" else "fa3")


def _paged(kv_lens, page, hkv, d, dtype, kv_dtype=None):
    """A paged cache (k, v pair, pages shuffled, spare pages) holding requests of kv_lens, its table
    (indptr, indices, last_page_len) and gather(b): request b's (k, v) as float64 (kv_len, hkv, d)."""
    kv_lens = np.asarray(kv_lens)
    pages = -(-kv_lens // page)
    ip = np.concatenate([[0], np.cumsum(pages)])
    n_pages = int(ip[-1]) + 2
    perm = rng().permutation(n_pages)[: ip[-1]]
    kc, vc = rand((n_pages, page, hkv, d), kv_dtype or dtype), rand((n_pages, page, hkv, d), kv_dtype or dtype)
    last = np.where(pages > 0, kv_lens - (pages - 1) * page, 0)

    def gather(b):
        j = np.arange(kv_lens[b])
        rows, slots = cp.asarray(perm[ip[b] + j // page]), cp.asarray(j % page)
        return f64_dev(kc)[rows, slots], f64_dev(vc)[rows, slots]
    return (kc, vc), ip, perm, last, gather


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (16, 2)])
@pytest.mark.parametrize("page", [1, 16])
@pytest.mark.parametrize("form", ["tuple", "module"])
def test_sigmoid_batch_decode(hq, hkv, page, form):
    """BatchDecodeWithPagedKVCacheWrapper with jit_args (FlashInfer's tuple, or a fi_cupy.jit module) on the
    decode kernel, lengths 0, 1 and off every tile; a variant without softmax never cuts a request's KV."""
    dtype, d = "float16", 128
    kv_lens = np.array([0, 1, 63, 700, 129, 3000])
    cache, ip, perm, last, gather = _paged(kv_lens, page, hkv, d, dtype)
    args = ("sig_decode", dtype, dtype, dtype, "int32", d, d, [], [], ["logits_scale", "sigmoid_bias"],
            ["double", "double"], SIGMOID.name, SIGMOID.decl)
    jit = args if form == "tuple" else fi_cupy.jit.gen_customize_batch_decode_module(*args)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(cp.empty(WS, cp.uint8), jit_args=jit)
    w.plan(ip, perm, last, hq, hkv, d, page, q_data_type=dtype)
    assert not w._via_prefill and w._plan.num_merges == 0
    q = rand((kv_lens.size, hq, d), dtype)
    out = nan_like(q)
    scale, bias = 0.05, -0.5
    w.run(q, cache, scale, bias, out=out)
    for b in range(kv_lens.size):
        kb, vb = gather(b)
        _check_sigmoid(out[b:b + 1], q[b:b + 1], kb, vb, scale, bias, False, dtype)


@pytest.mark.parametrize("name", ["softmax", "doc_mask", "alibi", "temperature", "key_scale", "gate"])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (8, 2), (16, 2)])
@pytest.mark.parametrize("page,d", [(16, 128), (1, 64), (7, 256)])
def test_decode_kernel_variants(name, hq, hkv, page, d):
    """Softmax variants on the tensor-core decode kernel: each hook (logits mask and transform, query, key
    and output transforms) at groups 1, 4 and 8, pages 1, 7 and 16, head dims 64 / 128 / 256, lengths 0, 1,
    off the tiles and long enough that the plan cuts a request's KV over several CTAs (merged by their lse)
    unless the variant has its own OutputTransform. lse against the reference's."""
    dtype = "bfloat16"
    kv_lens = np.array([0, 1, 37, 700, 9000])
    cache, ip, perm, last, gather = _paged(kv_lens, page, hkv, d, dtype)
    q = rand((kv_lens.size, hq, d), dtype)
    sm = 1 / math.sqrt(d)
    stride = int(kv_lens.max())
    ids = _doc_ids(kv_lens, stride)
    temp = cp.asarray(rng().uniform(0.5, 2.0, hq).astype(np.float32))
    k_mul = cp.asarray(rng().uniform(0.5, 1.5, (hkv, d)).astype(np.float32))
    gate = cp.asarray(rng().uniform(-1.0, 1.0, hq).astype(np.float32))
    variant, args = {"softmax": (SOFTMAX, (sm,)), "doc_mask": (DOC_MASK, (cp.asarray(ids.ravel()), stride, sm)),
                     "alibi": (ALIBI, (cp.asarray(alibi_slopes(hq)), sm)), "temperature": (TEMPERATURE, (temp, sm)),
                     "key_scale": (KEY_SCALE, (k_mul.ravel(), sm, d)), "gate": (GATE, (gate, sm))}[name]
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(cp.empty(WS, cp.uint8), jit_args=variant)
    w.plan(ip, perm, last, hq, hkv, d, page, q_data_type=dtype)
    assert not w._via_prefill
    assert (w._plan.num_merges > 0) == (name != "gate")
    out = nan_like(q)
    o, lse = w.run(q, cache, *args, out=out, return_lse=True)
    for b in range(kv_lens.size):
        kb, vb = gather(b)
        qb = f64_dev(q[b:b + 1])
        mask = None
        if name == "temperature":  # the kernel rounds q / t to bf16, as the reference's q here
            qb = f64_dev(cast((qb / cp.asarray(temp, cp.float64)[None, :, None]).astype(cp.float32), dtype))
        if name == "key_scale":
            kb = f64_dev(cast((kb * cp.asarray(k_mul, cp.float64)[None]).astype(cp.float32), dtype))
        if name == "doc_mask":
            n = int(kv_lens[b])
            mask = (ids[b, max(n - 1, 0)] == ids[b, :n])[None, :]
        ref_o, ref_lse = reference.prefill_attention(qb, kb, vb, sm_scale=sm, custom_mask=mask, alibi=name == "alibi")
        if name == "gate":
            ref_o = ref_o * cp.asarray(gate, cp.float64)[None, :, None]
        _check(out[b:b + 1], ref_o, dtype)
        assert_lse_close(cp.asnumpy(lse[b:b + 1]), cp.asnumpy(ref_lse))


def test_decode_variant_routes():
    """fp8 KV (not the tensor-core decode kernel's) runs a variant on the prefill kernel, with the same
    answer as the default decode; a q or k scale beside a variant is refused (its logits are raw q.k)."""
    hq, hkv, d, page = 8, 2, 128, 16
    kv_lens = np.array([5, 300, 2000])
    cache, ip, perm, last, _ = _paged(kv_lens, page, hkv, d, "bfloat16", "float8_e4m3fn")
    q = rand((kv_lens.size, hq, d), "bfloat16")
    outs = []
    for jit in (None, SOFTMAX):
        w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(cp.empty(WS, cp.uint8), jit_args=jit)
        w.plan(ip, perm, last, hq, hkv, d, page, q_data_type="bfloat16", kv_data_type="float8_e4m3fn")
        assert w._via_prefill == (jit is not None)
        outs.append(f64(w.run(q, cache, *(() if jit is None else (1 / math.sqrt(d),)))))
    assert_close(outs[1], outs[0], "bfloat16")
    cache, ip, perm, last, _ = _paged(kv_lens, page, hkv, d, "bfloat16")
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(cp.empty(WS, cp.uint8), jit_args=SOFTMAX)
    w.plan(ip, perm, last, hq, hkv, d, page, q_data_type="bfloat16")
    with pytest.raises(NotImplementedError, match="k_scale"):
        w.run(q, cache, 0.1, k_scale=0.5)
    with pytest.raises(NotImplementedError, match="sm_scale"):
        w.plan(ip, perm, last, hq, hkv, d, page, q_data_type="bfloat16", sm_scale=0.1)


@pytest.mark.parametrize("kv", [0, 1, 254, 4097])
def test_single_decode_with_jit_module(kv):
    """single_decode_with_kv_cache_with_jit_module: the document mask with one query (the last position)."""
    dtype, d, hq, hkv = "bfloat16", 128, 8, 2
    mod = fi_cupy.jit.gen_customize_single_decode_module(
        "doc_decode", dtype, dtype, dtype, d, d, ["doc_ids"], ["int32_t"], ["doc_stride", "sm_scale"],
        ["int64_t", "double"], DOC_MASK.name, DOC_MASK.decl).build_and_load()
    q, k, v = rand((hq, d), dtype), rand((kv, hkv, d), dtype), rand((kv, hkv, d), dtype)
    ids = _doc_ids([kv], max(kv, 1))
    sm = 1 / math.sqrt(d)
    o, lse = fi_cupy.single_decode_with_kv_cache_with_jit_module(mod, q, k, v, cp.asarray(ids.ravel()), max(kv, 1),
                                                                  sm, return_lse=True)
    assert o.shape == (hq, d) and lse.shape == (hq,)
    ref_o, ref_lse = _doc_ref(f64_dev(q[None]), f64_dev(k), f64_dev(v), [1], [kv], ids, sm, False)
    _check(o, ref_o[0], dtype)
    assert_lse_close(cp.asnumpy(lse), ref_lse[0])


def test_softmax_variant_matches_default_kernel():
    """The default attention as a variant gives the default kernel's answer (fp8 K/V too)."""
    for kv_dtype in ("bfloat16", "float8_e4m3fn"):
        q = rand((300, 8, 128), "bfloat16")
        k, v = rand((700, 2, 128), kv_dtype), rand((700, 2, 128), kv_dtype)
        ws = cp.empty(WS, cp.uint8)
        qo_ip, kv_ip = np.array([0, 300]), np.array([0, 700])
        outs = []
        for jit in (None, SOFTMAX):
            w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(ws, jit_args=jit)
            w.plan(qo_ip, kv_ip, 8, 2, 128, causal=True, q_data_type="bfloat16",
                   kv_data_type=None if kv_dtype == "bfloat16" else kv_dtype)
            outs.append(f64(w.run(q, k, v, *(() if jit is None else (1 / math.sqrt(128),)))))
        assert_close(outs[1], outs[0], "bfloat16")


def test_variant_refusals():
    ws = cp.empty(WS, cp.uint8)
    w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(ws, jit_args=SIGMOID)
    with pytest.raises(NotImplementedError, match="logits_soft_cap"):
        w.plan(np.array([0, 4]), np.array([0, 4]), 4, 4, 64, logits_soft_cap=30.0)
    w.plan(np.array([0, 4]), np.array([0, 4]), 4, 4, 64)
    q, k = rand((4, 4, 64), "float16"), rand((4, 4, 64), "float16")
    with pytest.raises(TypeError, match="2 extra positional arguments"):
        w.run(q, k, k, 0.1)
    with pytest.raises(NotImplementedError, match="return_lse"):
        w.run(q, k, k, 0.1, 0.0, return_lse=True)
    with pytest.raises(TypeError, match="extra positional"):
        fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(ws).run(q, k, k, 0.1)
