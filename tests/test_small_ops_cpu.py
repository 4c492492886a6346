"""Bad input to the element-wise families raises a Python error naming the argument, before any
launch. Runs on the CPU: arrays are described by ArrayInfo records (what DLPack would give)."""
import pytest

import fi_cupy
from fi_cupy._core import dtypes as dt
from fi_cupy._core.arrays import ArrayInfo, contiguous_strides


def arr(name, shape, dtype=dt.bfloat16, strides=None, ptr=1 << 20, device=0):
    return ArrayInfo(name, ptr, tuple(shape), strides or contiguous_strides(shape), dtype, device, "cupy")


X = arr("input", (4, 4096))
W = arr("weight", (4096,))


@pytest.mark.parametrize("call,match", [
    (lambda: fi_cupy.rmsnorm(X, arr("weight", (4095,)), stream=0), "weight: expected shape"),
    (lambda: fi_cupy.rmsnorm(arr("input", (4, 4096), dt.int32), W, stream=0), "input: dtype int32"),
    (lambda: fi_cupy.rmsnorm(X, arr("weight", (4096,), dt.float16), stream=0), "weight: dtype float16"),
    (lambda: fi_cupy.rmsnorm(arr("input", (4, 4096), strides=(4096, 2)), W, stream=0), "input: the last dim"),
    (lambda: fi_cupy.rmsnorm(X, arr("weight", (4096,), device=1), stream=0), "weight: is on cuda:1"),
    (lambda: fi_cupy.rmsnorm(arr("input", (2, 3, 4, 64), strides=(10000, 1000, 128, 1)), arr("weight", (64,)),
                             stream=0), "at most two strided row axes"),
    (lambda: fi_cupy.fused_add_rmsnorm(X, arr("residual", (4, 4095)), W, stream=0), "residual: expected shape"),
    (lambda: fi_cupy.layernorm(X, arr("gemma", (4096,), dt.float32), arr("beta", (4096,)), stream=0),
     "beta: dtype bfloat16 does not match"),
    (lambda: fi_cupy.silu_and_mul(arr("input", (4, 4095)), stream=0), "input: the last dim must be even"),
    (lambda: fi_cupy.silu_and_mul(arr("input", (4, 64)), out=arr("out", (4, 64)), stream=0), "out: expected shape"),
    (lambda: fi_cupy.gelu_and_mul(arr("input", (4, 64), dt.float8_e4m3fn), stream=0), "input: dtype float8"),
])
def test_norm_and_activation_errors(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


Q, K = arr("q", (8, 32, 128)), arr("k", (8, 8, 128))
POS = arr("pos_ids", (8,), dt.int32)


@pytest.mark.parametrize("call,match", [
    (lambda: fi_cupy.apply_rope_pos_ids(Q, K, arr("pos_ids", (7,), dt.int32), stream=0), "pos_ids: expected shape"),
    (lambda: fi_cupy.apply_rope_pos_ids(Q, K, arr("pos_ids", (8,), dt.float32), stream=0), "pos_ids: dtype float32"),
    (lambda: fi_cupy.apply_rope_pos_ids(Q, K, POS, rotary_dim=129, stream=0), "rotary_dim"),
    (lambda: fi_cupy.apply_rope_pos_ids(Q, arr("k", (8, 8, 64)), POS, stream=0), "k: must have q's"),
    (lambda: fi_cupy.apply_rope_pos_ids(arr("q", (8, 128)), K, POS, stream=0), "q: expected 3 dims"),
    (lambda: fi_cupy.apply_rope(Q, K, arr("indptr", (3,), dt.int32), arr("offsets", (3,), dt.int32), stream=0),
     "offsets: expected shape"),
    (lambda: fi_cupy.apply_rope(Q, K, arr("indptr", (3,), dt.int32), arr("offsets", (2,), dt.int64), stream=0),
     "offsets: dtype int64 does not match"),
    (lambda: fi_cupy.apply_llama31_rope_pos_ids(Q, K, POS, low_freq_factor=4, high_freq_factor=4, stream=0),
     "high_freq_factor"),
    (lambda: fi_cupy.apply_rope_with_cos_sin_cache(arr("positions", (8,), dt.int64), arr("query", (8, 4000)),
                                                   arr("key", (8, 1024)), 128, arr("cos_sin_cache", (10, 128),
                                                                                   dt.float32), stream=0),
     "query: last dim 4000"),
    (lambda: fi_cupy.apply_rope_with_cos_sin_cache(arr("positions", (8,), dt.int64), arr("query", (8, 4096)),
                                                   arr("key", (8, 1024)), 128, arr("cos_sin_cache", (10, 128)),
                                                   stream=0), "cos_sin_cache: dtype bfloat16"),
])
def test_rope_errors(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


CACHE = arr("paged_kv_cache", (10, 2, 16, 8, 128))
KEY = arr("append_key", (5, 8, 128))
I32 = dt.int32


def _append(**kw):
    a = dict(append_key=KEY, append_value=arr("append_value", (5, 8, 128)), batch_indices=arr("batch_indices", (5,), I32),
             positions=arr("positions", (5,), I32), paged_kv_cache=CACHE, kv_indices=arr("kv_indices", (4,), I32),
             kv_indptr=arr("kv_indptr", (3,), I32), kv_last_page_len=arr("kv_last_page_len", (2,), I32))
    a.update(kw)
    return fi_cupy.append_paged_kv_cache(**a, stream=0)


@pytest.mark.parametrize("kw,match", [
    (dict(paged_kv_cache=arr("paged_kv_cache", (10, 16, 8, 128))), "paged_kv_cache: expected shape"),
    (dict(append_key=arr("append_key", (5, 4, 128)), append_value=arr("append_value", (5, 4, 128))),
     "num_kv_heads, head_dim"),
    (dict(append_value=arr("append_value", (5, 8, 128), dt.float16)), "append_value: must match"),
    (dict(paged_kv_cache=arr("paged_kv_cache", (10, 2, 16, 8, 128), dt.float8_e4m3fn)), "quantise"),
    (dict(positions=arr("positions", (4,), I32)), "positions: expected 5 entries"),
    (dict(positions=arr("positions", (5,), dt.int64)), "positions: dtype int64 must match"),
    (dict(kv_last_page_len=arr("kv_last_page_len", (3,), I32)), "kv_last_page_len: expected 2 entries"),
    (dict(kv_layout="NDH"), "kv_layout"),
])
def test_append_errors(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        _append(**kw)


V = arr("v_a", (8, 4, 128))
S = arr("s_a", (8, 4), dt.float32)


@pytest.mark.parametrize("call,match", [
    (lambda: fi_cupy.merge_state(V, arr("s_a", (8, 4)), arr("v_b", (8, 4, 128)), arr("s_b", (8, 4), dt.float32),
                                 stream=0), "s_a: dtype bfloat16 does not match"),
    (lambda: fi_cupy.merge_state(V, S, arr("v_b", (8, 4, 128)), arr("s_b", (8, 5), dt.float32), stream=0),
     "s_b: expected shape"),
    (lambda: fi_cupy.merge_state(V, S, arr("v_b", (8, 4, 64)), arr("s_b", (8, 4), dt.float32), stream=0),
     "v_b: must match v_a"),
    (lambda: fi_cupy.merge_state(V, S, arr("v_b", (8, 4, 128), dt.float16), arr("s_b", (8, 4), dt.float32),
                                 stream=0), "v_b: must match v_a"),
    (lambda: fi_cupy.merge_states(arr("v", (8, 4, 128)), arr("s", (8, 4), dt.float32), stream=0), "v: expected 4 dims"),
    (lambda: fi_cupy.merge_state_in_place(arr("v", (8, 4, 128)), arr("s", (8, 4), dt.float32), V, S,
                                          mask=arr("mask", (7,), dt.bool_), stream=0), "mask: expected shape"),
])
def test_merge_errors(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


PR = arr("probs", (4, 64), dt.float32)
DQ = arr("draft_probs", (2, 3, 64), dt.float32)
IDS = arr("draft_token_ids", (2, 3), dt.int32)
SMP = fi_cupy.sampling


@pytest.mark.parametrize("call,match", [
    (lambda: SMP.sampling_from_probs(arr("probs", (4, 64), dt.float64), stream=0), "probs: dtype float64"),
    (lambda: SMP.sampling_from_probs(arr("probs", (4, 8, 8), dt.float32), stream=0), "probs: expected 2 dims"),
    (lambda: SMP.sampling_from_probs(arr("probs", (4, 64), dt.float32, strides=(128, 2)), stream=0),
     "probs: the last dim"),
    (lambda: SMP.top_p_sampling_from_probs(PR, 1.5, stream=0), "top_p: must lie in"),
    (lambda: SMP.top_p_sampling_from_probs(PR, arr("top_p", (4,), dt.bool_), stream=0), "top_p: dtype bool"),
    (lambda: SMP.top_k_sampling_from_probs(PR, arr("top_k", (3,), dt.int32), stream=0), "top_k: expected shape"),
    (lambda: SMP.top_k_sampling_from_probs(PR, 2.5, stream=0), "top_k: expected an int"),
    (lambda: SMP.min_p_sampling_from_probs(PR, -0.1, stream=0), "min_p: must lie in"),
    (lambda: SMP.top_k_top_p_sampling_from_probs(PR, 5, 0.9, filter_apply_order="bogus", stream=0),
     "filter_apply_order"),
    (lambda: SMP.softmax(PR, temperature=0.0, stream=0), "temperature: must be > 0"),
    (lambda: SMP.top_k_renorm_probs(PR, arr("top_k", (4,), dt.float8_e4m3fn), stream=0), "top_k: dtype float8_e4m3fn"),
    (lambda: SMP.top_p_renorm_probs(PR, 0.0, stream=0), "top_p: must lie in"),
    (lambda: SMP.top_k_mask_logits(arr("logits", (4, 64), dt.int32), 5, stream=0), "logits: dtype int32"),
    (lambda: SMP.chain_speculative_sampling(DQ, IDS, arr("target_probs", (2, 3, 64), dt.float32), stream=0),
     "target_probs: expected shape"),
    (lambda: SMP.chain_speculative_sampling(DQ, arr("draft_token_ids", (2, 3), dt.float32),
                                          arr("target_probs", (2, 4, 64), dt.float32), stream=0),
     "draft_token_ids: dtype float32"),
    (lambda: SMP.chain_speculative_sampling(arr("draft_probs", (2, 3, 64), dt.float32, strides=(512, 128, 2)), IDS,
                                          arr("target_probs", (2, 4, 64), dt.float32), stream=0),
     "draft_probs: must be contiguous"),
])
def test_sampling_errors(call, match):
    with pytest.raises((TypeError, ValueError), match=match):
        call()


def test_softmax_ring_shape():
    """The cheapest (cluster, CTAs an SM) by rounds x (slice + a row's stall), with the resident
    clusters the H100 reports (GPCs of 14-18 SMs strand SMs for most cluster sizes); only slices
    that leave a chunk buffer spare beyond the chunks held in registers (7 at one CTA an SM), and a
    slice longer than the ring for at most 4 rounds; None where the two-pass kernel runs instead."""
    r1 = [132, 66, 39, 30, 22, 17, 15, 15, 9, 7, 7, 7, 7, 7, 7, 7]
    r2 = [264, 132, 79, 62, 47, 39, 32, 30, 23, 21, 16, 16, 14, 14, 14, 14]
    props = {"smem_optin": 232448, "smem_sm": 233472}
    sampling = fi_cupy.sampling
    assert sampling.ring_slots(props, 1) == 14 and sampling.ring_slots(props, 2) == 7
    assert sampling.ring_slots({"smem_optin": 232448, "smem_sm": 0}, 2) == 0

    def shape(vocab, batch):
        return sampling.softmax_ring_shape(vocab, batch, lambda m: sampling.ring_slots(props, m),
                                           lambda c, m: (r1 if m == 1 else r2)[c - 1])
    assert shape(128256, 128) == (2, 1, 64128)  # 66 clusters: 2 rounds, 16 chunks a slice in 14 buffers
    assert shape(128256, 32) == (7, 2, 18324)  # 32 clusters of 7: one round
    assert shape(128256, 512) == (4, 1, 32064)  # 2@1 would take 8 rounds
    assert shape(128256, 1) == (16, 1, 8016)  # one row over the most SMs
    assert shape(32000, 512) == (1, 1, 32000) and shape(4, 128) == (1, 1, 4)
    assert shape(256000, 128) == (8, 1, 32000)
    assert shape(16 * 13 * 4096, 3) == (16, 1, 53248)  # 13 chunks of 14 buffers
    assert shape(16 * 20 * 4096, 3) == (16, 1, 81920)  # 20 chunks: 7 held, 13 of 14 buffers
    assert shape(16 * 20 * 4096 + 4, 3) is None  # longer: two passes
    assert sampling.softmax_ring_shape(128256, 128, lambda m: 0, lambda c, m: 1) is None
