"""Multi-head latent attention (fi_cupy/mla.py) against reference.mla_attention, on fresh random inputs with
the outputs poisoned first: decode (one query a request) and chunked prefill (causal or not) over paged
compressed caches (ckv 512 + kpe 64), heads 16 / 32 / 64 / 128, page sizes 1, 7, 16 and 64, lengths 0, 1 and
non-multiples of the tiles, qo_len > kv_len, a context long enough to be cut over CTAs (the merge at 512
columns), page tables listing more pages than the lengths need, out= / lse= / sinks, CUDA-graph replay
across re-plans; append_paged_mla_kv_cache; the refusals (GPU). Both kernels: backend "fa2" (the portable
prefill kernel at width 576) and "auto" (cuda_src/mla_sm90.cu on sm_90a, checked through resolved_backend)."""
import math

import cupy as cp
import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference
from fi_cupy._core import kernels
from gpu_arrays import bits, capture, f64, nan_like, poison, rand, replay, rng
from tolerances import assert_close, assert_lse_close

pytestmark = pytest.mark.gpu

CKV, KPE = 512, 64
BACKENDS = ["fa2", "auto"]


def _resolved(backend: str) -> str:
    """The kernel a backend reaches here: "auto" the Hopper one on sm_90a."""
    return "fa3" if backend != "fa2" and kernels.device_arch(cp.cuda.Device().id) == "sm_90a" else "fa2"


def _workspace():
    return cp.empty(128 * 1024 * 1024, dtype=cp.uint8)


class MlaBatch:
    """Requests with qo_lens queries on kv_lens tokens of a paged compressed cache (pages in random order,
    `extra_pages` more listed per request than its tokens need)."""

    def __init__(self, qo_lens, kv_lens, page_size=16, heads=16, dtype="bfloat16", extra_pages=0, spare_pages=3):
        r = rng()
        self.qo_lens, self.kv_lens, self.page_size, self.heads, self.dtype = qo_lens, kv_lens, page_size, heads, dtype
        pages = [-(-n // page_size) + extra_pages for n in kv_lens]
        total = sum(pages) + spare_pages
        self.kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        self.kv_indices = r.permutation(total).astype(np.int32)[:sum(pages)]
        self.kv_len_arr = np.array(kv_lens, np.int32)
        self.qo_indptr = np.concatenate([[0], np.cumsum(qo_lens)]).astype(np.int32)
        n = int(self.qo_indptr[-1])
        self.q_nope, self.q_pe = rand((n, heads, CKV), dtype), rand((n, heads, KPE), dtype)
        self.ckv, self.kpe = rand((total, page_size, CKV), dtype), rand((total, page_size, KPE), dtype)

    def plan(self, w, causal=False, sm_scale=None):
        w.plan(self.qo_indptr, self.kv_indptr, self.kv_indices, self.kv_len_arr, self.heads, CKV, KPE,
               self.page_size, causal, sm_scale, self.dtype, self.dtype)

    def reference(self, causal=False, sm_scale=None, sinks=None):
        qn, qp, ck, kp = f64(self.q_nope), f64(self.q_pe), f64(self.ckv), f64(self.kpe)
        os_, ls = [], []
        for b, (lq, lk) in enumerate(zip(self.qo_lens, self.kv_lens)):
            pg = self.kv_indices[self.kv_indptr[b]: self.kv_indptr[b + 1]]
            q0 = self.qo_indptr[b]
            o, lse = reference.mla_attention(qn[q0:q0 + lq], qp[q0:q0 + lq], ck[pg].reshape(-1, CKV)[:lk],
                                             kp[pg].reshape(-1, KPE)[:lk], causal, sm_scale)
            if sinks is not None:
                o, lse = reference.with_sinks(o, lse, sinks)
            os_.append(o)
            ls.append(lse)
        return np.concatenate(os_), np.concatenate(ls)


def check(b, causal=False, sm_scale=None, sinks=None, w=None, backend="auto"):
    w = w or fi_cupy.BatchMLAPagedAttentionWrapper(_workspace(), backend=backend)
    b.plan(w, causal, sm_scale)
    assert w.resolved_backend() == _resolved(backend)
    out = nan_like(b.q_nope)
    lse = cp.full(b.q_nope.shape[:2], np.nan, dtype=cp.float32)
    o, l2 = w.run(b.q_nope, b.q_pe, b.ckv, b.kpe, out=out, lse=lse, return_lse=True, sinks=sinks)
    assert o is out and l2 is lse
    ro, rl = b.reference(causal, sm_scale, None if sinks is None else cp.asnumpy(sinks))
    assert_close(f64(out), ro, b.dtype)
    assert_lse_close(f64(lse), rl)
    return w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", [16, 32, 64, 128])
@pytest.mark.parametrize("page_size", [1, 7, 16, 64])
def test_decode(heads, page_size, backend):
    b = MlaBatch([1] * 6, [0, 1, 17, 300, 1023, 2049], page_size, heads, "bfloat16" if heads != 32 else "float16")
    check(b, sm_scale=1 / math.sqrt(192), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("heads", [16, 128])
def test_chunked_prefill(causal, dtype, heads, backend):
    """Queries on cached tokens: qo_len > kv_len (causal rows that see nothing: o = 0, lse = -inf), an empty
    request, and tails that are not multiples of the 64-row tile or the key tiles (16, 64)."""
    b = MlaBatch([5, 1, 33, 0, 70, 8], [105, 1, 40, 10, 70, 3], page_size=16, heads=heads, dtype=dtype)
    check(b, causal=causal, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_context_cut_over_ctas(backend):
    """One request, a long context: its KV is cut over many CTAs and the partial states merged (512 columns)."""
    check(MlaBatch([1, 2], [30000, 4097], page_size=64, heads=128), causal=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_pages_sinks_and_default_scale(backend):
    """Page tables that list more pages than kv_len_arr needs (only the needed ones are read), attention sinks,
    and sm_scale None (1 / sqrt(576))."""
    b = MlaBatch([1, 3, 1], [50, 9, 0], page_size=16, heads=32, extra_pages=2)
    check(b, causal=True, sinks=rand((32,), "float32"), backend=backend)


def test_new_outputs_and_replays_within_a_plan():
    b = MlaBatch([1] * 4, [100, 7, 64, 1000], heads=16)
    w = fi_cupy.BatchMLAPagedAttentionWrapper(_workspace())
    b.plan(w)
    ro, _ = b.reference()
    for _ in range(3):  # the first call records, the next replay
        o = w.run(b.q_nope, b.q_pe, b.ckv, b.kpe)
        assert o.shape == (4, 16, CKV) and o.dtype == b.q_nope.dtype
        assert_close(f64(o), ro, "bfloat16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_replan_replay(backend):
    b1 = MlaBatch([1] * 4, [100, 2000, 5, 7000], heads=64)
    b2 = MlaBatch([1] * 4, [3000, 1, 64, 9000], heads=64)
    ckv = cp.concatenate([bits(b1.ckv), bits(b2.ckv)]).view(b1.ckv.dtype)
    kpe = cp.concatenate([bits(b1.kpe), bits(b2.kpe)]).view(b1.kpe.dtype)
    off = b1.ckv.shape[0]
    w = fi_cupy.BatchMLAPagedAttentionWrapper(_workspace(), use_cuda_graph=True, backend=backend)
    b1.plan(w)
    qn, qp = bits(b1.q_nope).copy().view(b1.q_nope.dtype), bits(b1.q_pe).copy().view(b1.q_pe.dtype)
    out = nan_like(qn)
    g, s = capture(lambda: w.run(qn, qp, ckv, kpe, out=out))
    b2.kv_indices = b2.kv_indices + off
    b2.plan(w)
    bits(qn)[...] = bits(b2.q_nope)
    bits(qp)[...] = bits(b2.q_pe)
    poison(out)
    replay(g, s)
    b2.ckv, b2.kpe = ckv, kpe
    assert_close(f64(out), b2.reference()[0], "bfloat16")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sglang_fused_buffers(backend):
    """SGLang's FlashInfer MLA backend: q_nope / q_pe are column slices of one (n, heads, 576) query, the caches
    column slices of one (tokens, 1, 576) KV buffer with page_size 1 (page stride 576, kpe at a 1 KB offset), and
    the tables device arrays."""
    r = rng()
    heads, lens = 16, [1, 300, 77, 1025]
    tokens = sum(lens) + 5
    q = rand((len(lens), heads, CKV + KPE), "bfloat16")
    kbuf = rand((tokens, 1, CKV + KPE), "bfloat16")
    perm = r.permutation(tokens).astype(np.int32)[:sum(lens)]
    kv_indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    w = fi_cupy.BatchMLAPagedAttentionWrapper(_workspace(), backend=backend)
    w.plan(cp.arange(len(lens) + 1, dtype=cp.int32), cp.asarray(kv_indptr), cp.asarray(perm),
           cp.asarray(np.array(lens, np.int32)), heads, CKV, KPE, 1, False, 0.1, "bfloat16", "bfloat16")
    assert w.resolved_backend() == _resolved(backend)
    out = nan_like(q[:, :, :CKV])
    w.run(q[:, :, :CKV], q[:, :, CKV:], kbuf[:, :, :CKV], kbuf[:, :, CKV:], out=out)
    fq, fk = f64(q), f64(kbuf)[:, 0]
    for b, n in enumerate(lens):
        rows = fk[perm[kv_indptr[b]:kv_indptr[b + 1]]]
        want, _ = reference.mla_attention(fq[b:b + 1, :, :CKV], fq[b:b + 1, :, CKV:], rows[:, :CKV], rows[:, CKV:],
                                          False, 0.1)
        assert_close(f64(out[b:b + 1]), want, "bfloat16")


def test_append_paged_mla_kv_cache():
    """New tokens land in their pages and slots of both caches; nothing else is written."""
    page_size, pages = 16, 12
    ckv, kpe = rand((pages, page_size, CKV), "bfloat16"), rand((pages, page_size, KPE), "bfloat16")
    before = (f64(ckv), f64(kpe))
    kv_indptr = np.array([0, 3, 4, 7], np.int32)
    kv_indices = np.array([5, 0, 9, 2, 11, 7, 1], np.int32)
    last = np.array([4, 16, 1], np.int32)
    seq = (kv_indptr[1:] - kv_indptr[:-1] - 1) * page_size + last
    appended = np.array([3, 16, 1])  # the last tokens of each request
    bi = np.repeat(np.arange(3), appended).astype(np.int32)
    pos = np.concatenate([np.arange(s - a, s) for s, a in zip(seq, appended)]).astype(np.int32)
    new_c, new_k = rand((bi.size, CKV), "bfloat16"), rand((bi.size, KPE), "bfloat16")
    fi_cupy.append_paged_mla_kv_cache(new_c, new_k, cp.asarray(bi), cp.asarray(pos), ckv, kpe, cp.asarray(kv_indices),
                                      cp.asarray(kv_indptr), cp.asarray(last))
    want_c, want_k = before[0].copy(), before[1].copy()
    for i, (b, p) in enumerate(zip(bi, pos)):
        page = kv_indices[kv_indptr[b] + p // page_size]
        want_c[page, p % page_size] = f64(new_c)[i]
        want_k[page, p % page_size] = f64(new_k)[i]
    assert np.array_equal(f64(ckv), want_c) and np.array_equal(f64(kpe), want_k)


def test_refusals():
    b = MlaBatch([1, 1], [5, 9], heads=16)
    w = fi_cupy.BatchMLAPagedAttentionWrapper(_workspace())
    args = (b.qo_indptr, b.kv_indptr, b.kv_indices, b.kv_len_arr, 16)
    with pytest.raises(NotImplementedError, match="^head_dim_ckv"):
        w.plan(*args, 256, KPE, 16, False, None, "bfloat16")
    with pytest.raises(NotImplementedError, match="^kv_data_type"):
        w.plan(*args, CKV, KPE, 16, False, None, "bfloat16", "float8_e4m3fn")
    with pytest.raises(ValueError, match="^kv_len_arr: request 1 has 99 tokens"):
        w.plan(b.qo_indptr, b.kv_indptr, b.kv_indices, np.array([5, 99], np.int32), 16, CKV, KPE, 16)
    with pytest.raises(RuntimeError, match="before plan"):
        w.run(b.q_nope, b.q_pe, b.ckv, b.kpe)
    b.plan(w)
    with pytest.raises(NotImplementedError, match="^return_lse_base_on_e"):
        w.run(b.q_nope, b.q_pe, b.ckv, b.kpe, return_lse_base_on_e=True)
    with pytest.raises(ValueError, match="^q_pe: expected shape"):
        w.run(b.q_nope, b.q_pe[:, :, :32], b.ckv, b.kpe)
    with pytest.raises(ValueError, match="^kpe_cache: expected shape"):
        w.run(b.q_nope, b.q_pe, b.ckv, b.kpe[:-1])
    with pytest.raises(TypeError, match="^q_nope: dtype"):
        w.run(b.q_nope.view(cp.float16), b.q_pe, b.ckv, b.kpe)
    with pytest.raises(ValueError, match="^kv_indices: page"):
        w.run(b.q_nope, b.q_pe, b.ckv[:1], b.kpe[:1])
