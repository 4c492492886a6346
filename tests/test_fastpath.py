"""The per-signature fast path (fi_cupy/_core/fastpath.py): a call of a known signature replays the recorded
launches; changing one property of the signature at a time (dtype, strides, alignment, out=, stream, a scalar,
a re-plan) must be noticed, and every result matches the reference. CuPy arrays throughout; torch only in the
interop test of a torch caller (marked needs_torch: skipped without torch). CPU tests at the end."""
import numpy as np
import pytest

import fi_cupy
from fi_cupy import activation, norm, reference
from fi_cupy._core import fastpath, kernels
from fi_cupy._core.arrays import ArrayInfo, contiguous_strides
from fi_cupy._core import dtypes as dt
from tolerances import assert_close

try:
    import torch
except ImportError:  # the CuPy tests need no torch
    torch = None
try:
    import jax
    import jax.numpy as jnp
except ImportError:  # nor JAX
    jax = jnp = None

gpu = pytest.mark.gpu
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (interop test)")
needs_jax = pytest.mark.skipif(jax is None, reason="needs JAX (interop test)")


def _cp():
    import cupy
    return cupy


def _rand(shape, dtype="float16", seed=0):
    cp = _cp()
    return cp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def _host(x):
    return _cp().asnumpy(x).astype(np.float64)


def _poisoned(shape, dtype="float16"):
    return _cp().full(shape, np.nan, dtype=dtype)


def _rms_ref(x, w, eps=1e-6):
    return reference.rmsnorm(_host(x), _host(w), eps)


@gpu
def test_rmsnorm_replays_and_notices_each_signature_change():
    norm._SIGS.clear()
    x, w = _rand((3, 256)), _rand((256,), seed=1)
    for _ in range(3):  # recorded once, then replayed
        out = _poisoned((3, 256))
        got = fi_cupy.rmsnorm(x, w, out=out)
        assert got is out
        assert_close(_host(out), _rms_ref(x, w), "float16")
    assert len(norm._SIGS) == 1
    # dtype
    x32, w32 = x.astype("float32"), w.astype("float32")
    assert_close(_host(fi_cupy.rmsnorm(x32, w32)), _rms_ref(x32, w32), "float32")
    # strides: every other row of a larger array
    big = _rand((6, 256), seed=2)
    assert_close(_host(fi_cupy.rmsnorm(big[::2], w)), _rms_ref(big[::2], w), "float16")
    # alignment: rows that start 2 bytes into a buffer (vector width 1 instead of 8)
    base = _rand((3 * 257 + 1,), seed=3)
    odd = base[1:].reshape(3, 257)[:, :256]
    assert odd.data.ptr % 16 != 0
    assert_close(_host(fi_cupy.rmsnorm(odd, w)), _rms_ref(odd, w), "float16")
    # out=None (a new output each call, distinct from the last)
    a, b = fi_cupy.rmsnorm(x, w), fi_cupy.rmsnorm(x, w)
    assert a.data.ptr != b.data.ptr
    assert_close(_host(b), _rms_ref(x, w), "float16")
    # in place (out is input)
    y = x.copy()
    fi_cupy.rmsnorm(y, w, out=y)
    assert_close(_host(y), _rms_ref(x, w), "float16")
    # a scalar: eps
    assert_close(_host(fi_cupy.rmsnorm(x, w, eps=0.5)), _rms_ref(x, w, 0.5), "float16")
    # new inputs of a known signature: the replay reads the new pointers
    x2 = _rand((3, 256), seed=9)
    assert_close(_host(fi_cupy.rmsnorm(x2, w)), _rms_ref(x2, w), "float16")
    # in place shares the signature of (x, w, out=other): the pointer slots follow their arrays, not values
    assert len(norm._SIGS) == 6


@gpu
def test_explicit_stream_takes_the_full_path_on_that_stream():
    cp = _cp()
    norm._SIGS.clear()
    x, w = _rand((2, 128)), _rand((128,), seed=1)
    s = cp.cuda.Stream(non_blocking=True)
    out = fi_cupy.rmsnorm(x, w, stream=s)
    s.synchronize()
    assert_close(_host(out), _rms_ref(x, w), "float16")
    assert len(norm._SIGS) == 0
    with s:  # the current stream of CuPy: the fast path launches there
        out = _poisoned((2, 128))
        fi_cupy.rmsnorm(x, w, out=out)
        fi_cupy.rmsnorm(x, w, out=out)
    s.synchronize()
    assert_close(_host(out), _rms_ref(x, w), "float16")


@gpu
def test_fused_add_rmsnorm_replay_updates_both_in_place():
    norm._SIGS.clear()
    for seed in range(3):
        x, r, w = _rand((4, 512), seed=seed), _rand((4, 512), seed=seed + 10), _rand((512,), seed=7)
        want_r = _host(x) + _host(r)
        assert fi_cupy.fused_add_rmsnorm(x, r, w) is None
        assert_close(_host(r), want_r, "float16")
        assert_close(_host(x), reference.rmsnorm(_host(r), _host(w)), "float16")
    assert len(norm._SIGS) == 1


@gpu
def test_a_failing_call_is_never_recorded():
    norm._SIGS.clear()
    x, w = _rand((2, 128)), _rand((64,), seed=1)
    for _ in range(2):
        with pytest.raises(ValueError, match="weight"):
            fi_cupy.rmsnorm(x, w)
    assert len(norm._SIGS) == 0


@gpu
def test_silu_and_mul_replay():
    activation._SIGS.clear()
    for seed in range(3):
        x = _rand((5, 2 * 96), seed=seed)
        out = _poisoned((5, 96))
        fi_cupy.silu_and_mul(x, out=out)
        assert_close(_host(out), reference.act_and_mul(_host(x), "silu"), "float16")
    assert len(activation._SIGS) == 1


def _paged_decode_case(lens, page=16, hq=8, hkv=2, d=64, seed=0):
    rng = np.random.default_rng(seed)
    pages = [(n + page - 1) // page for n in lens]
    indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    total = int(indptr[-1]) + 2
    indices = rng.permutation(total)[: indptr[-1]].astype(np.int32)
    last = np.array([(n - 1) % page + 1 if n else 0 for n in lens], np.int32)
    cache = _rand((total, 2, page, hkv, d), seed=seed + 1)
    return indptr, indices, last, cache


def _decode_ref(q, cache, indptr, indices, lens, page):
    qh, ch = _host(q), _host(cache)
    outs = []
    for b, n in enumerate(lens):
        rows = np.concatenate([ch[p] for p in indices[indptr[b]:indptr[b + 1]]], axis=1)[:, :n] if n else \
            np.zeros((2, 0) + ch.shape[3:])
        outs.append(reference.decode_attention(qh[b], rows[0], rows[1])[0])
    return np.stack(outs)


@gpu
def test_decode_run_replays_within_a_plan():
    cp = _cp()
    page, hq, hkv, d = 16, 8, 2, 64
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(cp.zeros(32 << 20, cp.uint8))
    lens = [40, 1, 17]
    indptr, indices, last, cache = _paged_decode_case(lens, page, hq, hkv, d, seed=7)
    w.plan(indptr, indices, last, hq, hkv, d, page, q_data_type="float16")
    assert len(w._sigs) == 0
    for seed in range(3):
        q = _rand((3, hq, d), seed=seed)
        out = _poisoned((3, hq, d))
        w.run(q, cache, out=out)
        assert_close(_host(out), _decode_ref(q, cache, indptr, indices, lens, page), "float16")
    assert len(w._sigs) == 1
    o, lse = w.run(q, cache, return_lse=True)  # another signature: lse returned
    assert lse.shape == (3, hq) and len(w._sigs) == 2
    assert_close(_host(o), _decode_ref(q, cache, indptr, indices, lens, page), "float16")


@gpu
def test_decode_recordings_outlive_a_replan_that_launches_alike():
    """A re-plan of a batch of the same size (an equal DecodePlan.run_key: each step of a decode loop)
    keeps run()'s recorded calls, which then replay with the new page table; a plan that launches
    otherwise (another batch size) drops them. The page table is tested against the cache on every
    call, so a recording never runs a plan that indexes past the cache."""
    cp = _cp()
    page, hq, hkv, d, num_pages = 16, 8, 2, 64, 600
    cache = _rand((num_pages, 2, page, hkv, d), seed=3)
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(cp.zeros(32 << 20, cp.uint8))
    full = []  # the calls that took the full path
    run_in_full = w._run
    w._run = lambda *a, **k: full.append(1) or run_in_full(*a, **k)

    def table(lens, seed):
        pages = [(n + page - 1) // page for n in lens]
        indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
        indices = np.random.default_rng(seed).permutation(num_pages)[: indptr[-1]].astype(np.int32)
        return indptr, indices, np.array([(n - 1) % page + 1 if n else 0 for n in lens], np.int32)

    def step(lens, seed):
        indptr, indices, last = table(lens, seed)
        w.plan(indptr, indices, last, hq, hkv, d, page, q_data_type="float16")
        for s in range(2):
            q = _rand((len(lens), hq, d), seed=seed + s)
            out = _poisoned((len(lens), hq, d))
            assert w.run(q, cache, out=out) is out
            assert_close(_host(out), _decode_ref(q, cache, indptr, indices, lens, page), "float16")

    step([3000, 1, 17], 1)
    sigs = w._sigs
    assert len(full) == 1 and len(sigs) == 1
    for lens, seed in (([2500, 33, 0], 2), ([40, 2900, 5], 3)):  # a pair cut over CTAs in each: alike
        step(lens, seed)
        assert w._sigs is sigs and len(full) == 1
    indptr, indices, last = table([3000, 1, 17], 4)
    indices[5] = num_pages + 2  # past this cache: run() must refuse it, recording or not
    w.plan(indptr, indices, last, hq, hkv, d, page, q_data_type="float16")
    assert w._sigs is sigs
    with pytest.raises(ValueError, match="out of range"):
        w.run(_rand((3, hq, d)), cache, out=_poisoned((3, hq, d)))
    step([3000, 1, 17, 9], 5)  # another batch size: recorded anew
    assert w._sigs is not sigs and len(full) == 3


@gpu
def test_paged_prefill_run_replays():
    cp = _cp()
    page, hq, hkv, d = 8, 4, 1, 64
    lens, new = [20, 9], [5, 9]
    indptr, indices, last, cache = _paged_decode_case(lens, page, hq, hkv, d, seed=5)
    qo = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(cp.zeros(32 << 20, cp.uint8))
    w.plan(qo, indptr, indices, last, hq, hkv, d, page, causal=True, q_data_type="float16")
    ch = _host(cache)
    for seed in range(3):
        q = _rand((int(qo[-1]), hq, d), seed=seed)
        out = w.run(q, cache)
        for b, n in enumerate(lens):
            rows = np.concatenate([ch[p] for p in indices[indptr[b]:indptr[b + 1]]], axis=1)[:, :n]
            want = reference.prefill_attention(_host(q)[qo[b]:qo[b + 1]], rows[0], rows[1], causal=True)[0]
            assert_close(_host(out)[qo[b]:qo[b + 1]], want, "float16")
    assert len(w._sigs) == 1


@gpu
def test_cascade_run_replays_within_a_plan_and_forgets_at_the_next():
    """Every level's launches and the merges are one recorded call (the level wrappers' scratch and
    metadata are fixed addresses); a re-plan drops the recording."""
    cp = _cp()
    page, hq, hkv, d = 8, 4, 1, 64
    cache = _rand((12, 2, page, hkv, d), seed=12)
    ch = _host(cache)
    shared, own, own_last = np.array([3, 7]), [np.array([0]), np.array([5, 9]), np.array([], np.int64)], [3, 8, 0]
    w = fi_cupy.MultiLevelCascadeAttentionWrapper(2, cp.zeros(64 << 20, cp.uint8))

    def tokens(pages, last):
        if not len(pages):
            return np.zeros((2, 0, hkv, d))
        return np.concatenate([ch[p] for p in pages], axis=1)[:, : (len(pages) - 1) * page + last]

    for shared_last in (8, 5):
        w.plan([np.array([0, 3]), np.array([0, 1, 2, 3])], [np.array([0, 2]), np.array([0, 1, 3, 3])],
               [shared, np.concatenate(own)], [np.array([shared_last]), np.array(own_last)], hq, hkv, d, page,
               q_data_type="float16")
        assert len(w._sigs) == 0
        for seed in range(3):
            q = _rand((3, hq, d), seed=20 + seed)
            out = _poisoned((3, hq, d))
            assert w.run(q, cache, out=out) is out
            for b in range(3):
                kv = np.concatenate([tokens(shared, shared_last), tokens(own[b], own_last[b])], axis=1)
                assert_close(_host(out)[b], reference.decode_attention(_host(q)[b], kv[0], kv[1])[0], "float16")
        assert len(w._sigs) == 1


@gpu
def test_single_request_attention_replays_per_length_and_stream():
    """single_decode / single_prefill keep their metadata in a per-stream scratch that holds one length's
    at a time: a length recorded before another length's call must not replay the other's metadata, and
    a call on another stream is recorded on its own (its own scratch)."""
    cp = _cp()
    from fi_cupy import decode, prefill
    decode._single_sigs.clear()
    prefill._single_sigs.clear()
    hq, hkv, d = 8, 2, 64

    def check(n, seed, lse=False):
        k, v = _rand((n, hkv, d), seed=n), _rand((n, hkv, d), seed=n + 1)
        q, qp = _rand((hq, d), seed=seed), _rand((7, hq, d), seed=seed + 50)
        got = fi_cupy.single_decode_with_kv_cache(q, k, v, return_lse=lse)
        want = reference.decode_attention(_host(q), _host(k), _host(v))
        if lse:
            assert_close(_host(got[1]), want[1], "float32")
            got = got[0]
        assert_close(_host(got), want[0], "float16")
        got = fi_cupy.single_prefill_with_kv_cache(qp, k, v, causal=True)
        assert_close(_host(got), reference.prefill_attention(_host(qp), _host(k), _host(v), causal=True)[0],
                     "float16")

    for n in (300, 17, 300, 4000, 300):  # A, B, A again after B's metadata, a longer one (more splits)
        for seed in range(3):
            check(n, seed)
        assert len(decode._single_sigs) == 1 and len(prefill._single_sigs) == 1
    check(300, 7, lse=True)  # another signature of the same length: both kept
    assert len(decode._single_sigs) == 2
    s = cp.cuda.Stream(non_blocking=True)
    with s:  # another stream, another scratch: its own recording, then replays there
        for seed in range(3):
            check(300, seed)
        n = len(decode._single_sigs)
        check(300, 9)
        assert len(decode._single_sigs) == n  # replayed on s
    s.synchronize()


@gpu
@needs_torch
def test_torch_caller_replays():
    norm._SIGS.clear()
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    for seed in range(3):
        x = torch.randn((4, 256), generator=torch.Generator().manual_seed(seed)).to("cuda", torch.bfloat16)
        out = torch.full_like(x, float("nan"))
        fi_cupy.rmsnorm(x, w, out=out)
        want = reference.rmsnorm(x.double().cpu().numpy(), w.double().cpu().numpy())
        assert_close(out.double().cpu().numpy(), want, "bfloat16")
    assert len(norm._SIGS) == 1


@gpu
@needs_torch
def test_torch_replays_make_new_outputs_like_their_inputs():
    """Outputs of a replayed torch call are made like an input of their dtype (empty_like / new_empty): new
    contiguous tensors on the input's device, never an input's memory, right values; a non-contiguous input
    of the output's shape does not lend the output its strides."""
    norm._SIGS.clear()
    activation._SIGS.clear()
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    outs = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((4, 512), generator=g).to("cuda", torch.bfloat16)
        for xi, what in ((x[:, 256:].contiguous(), "contiguous"), (x[:, :256], "row-strided")):
            o = fi_cupy.rmsnorm(xi, w)
            assert o.is_contiguous() and o.shape == xi.shape and o.dtype == xi.dtype and o.device == xi.device
            assert o.data_ptr() not in (xi.data_ptr(), w.data_ptr(), x.data_ptr()), what
            want = reference.rmsnorm(xi.double().cpu().numpy(), w.double().cpu().numpy())
            assert_close(o.double().cpu().numpy(), want, "bfloat16", what)
            outs.append(o)
        a = fi_cupy.silu_and_mul(x)  # output (4, 256): new_empty of x's dtype
        assert a.is_contiguous() and a.shape == (4, 256) and a.dtype == x.dtype
        assert_close(a.double().cpu().numpy(), reference.act_and_mul(x.double().cpu().numpy(), "silu"), "bfloat16")
        outs.append(a)
    assert len({o.data_ptr() for o in outs}) == len(outs)  # all alive: each a tensor of its own
    assert len(norm._SIGS) == 2 and len(activation._SIGS) == 1


def _jax_rand(shape, seed, dtype="bfloat16"):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype=dtype)


def _jax_host(x):
    return np.asarray(x.astype(jnp.float32), dtype=np.float64)


@gpu
@needs_jax
def test_jax_caller_replays_and_notices_each_signature_change():
    norm._SIGS.clear()
    w = _jax_rand((256,), 1)
    outs = []
    for seed in range(3):  # recorded once, replayed with new inputs
        x = _jax_rand((4, 256), seed)
        o = fi_cupy.rmsnorm(x, w)
        assert isinstance(o, jax.Array) and o.dtype == x.dtype and o.shape == x.shape
        assert_close(_jax_host(o), reference.rmsnorm(_jax_host(x), _jax_host(w)), "bfloat16")
        outs.append(o)
    assert len(norm._SIGS) == 1
    assert len({o.unsafe_buffer_pointer() for o in outs}) == 3  # a new output each call
    # dtype, shape and a scalar: new signatures
    x16, w16 = _jax_rand((4, 256), 5, "float16"), _jax_rand((256,), 6, "float16")
    assert_close(_jax_host(fi_cupy.rmsnorm(x16, w16)), reference.rmsnorm(_jax_host(x16), _jax_host(w16)), "float16")
    x3 = _jax_rand((3, 256), 7)
    assert_close(_jax_host(fi_cupy.rmsnorm(x3, w)), reference.rmsnorm(_jax_host(x3), _jax_host(w)), "bfloat16")
    x = _jax_rand((4, 256), 8)
    assert_close(_jax_host(fi_cupy.rmsnorm(x, w, eps=0.5)), reference.rmsnorm(_jax_host(x), _jax_host(w), 0.5),
                 "bfloat16")
    assert len(norm._SIGS) == 4
    # a two-output op, replayed: silu_and_mul, then fused_add_rmsnorm (in place: JAX gets new arrays)
    h = _jax_rand((2, 512), 9)
    for _ in range(2):
        assert_close(_jax_host(fi_cupy.silu_and_mul(h)), reference.act_and_mul(_jax_host(h), "silu"), "bfloat16")
    r = _jax_rand((4, 256), 10)
    x_before, r_before = _jax_host(x), _jax_host(r)
    want_y, want_res = reference.fused_add_rmsnorm(x_before, r_before, _jax_host(w), store_dtype=jnp.bfloat16)
    for _ in range(2):
        y, res = fi_cupy.fused_add_rmsnorm(x, r, w)
        assert_close(_jax_host(res), want_res, "bfloat16")
        assert_close(_jax_host(y), want_y, "bfloat16")
    np.testing.assert_array_equal(_jax_host(x), x_before)  # inputs never written
    np.testing.assert_array_equal(_jax_host(r), r_before)


_SPIN = r"""
extern "C" __global__ void spin(long long cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
"""


@gpu
@needs_jax
def test_jax_replay_holds_inputs_and_orders_its_output():
    """Our stream is held back by a spinning kernel while JAX frees the replayed call's input and writes
    new arrays (its allocator reuses the memory at once): the held capsule keeps the input's memory, and
    JAX's own op on the output waits for our kernel."""
    cp = _cp()
    spin = cp.RawKernel(_SPIN, "spin")
    norm._SIGS.clear()
    w = _jax_rand((4096,), 1)
    x0 = _jax_rand((64, 4096), 0)
    fi_cupy.rmsnorm(x0, w).block_until_ready()  # recorded
    for trial in range(3):
        x = _jax_rand((64, 4096), 10 + trial)
        want = reference.rmsnorm(_jax_host(x), _jax_host(w))
        x.block_until_ready()
        spin((1,), (1,), (np.int64(50_000_000),))  # ~25 ms on CuPy's current stream, where JAX callers launch
        o = fi_cupy.rmsnorm(x, w)
        assert len(norm._SIGS) == 1
        del x
        junk = [jnp.full((64, 4096), 1e4, jnp.bfloat16) + i for i in range(8)]
        doubled = o * 2  # JAX's stream waits for ours
        assert_close(_jax_host(doubled) / 2, want, "bfloat16")
        del junk
    cp.cuda.runtime.deviceSynchronize()
    fi_cupy.rmsnorm(x0, w)  # releases the holds whose work is done
    from fi_cupy._core import arrays
    assert len(arrays._pending) <= 1


@gpu
def test_sampling_replay_draws_fresh_random_numbers():
    """A replayed sampling call takes the generator's next offset, as the full path does: the tokens of
    calls 0..5 equal those of explicit (seed, offset) calls with offsets 0..5."""
    from fi_cupy import sampling
    probs = _cp().asarray(np.random.default_rng(0).dirichlet(np.full(64, 0.3), size=32).astype(np.float32))
    g = sampling.Generator(seed=1234)
    got = [_cp().asnumpy(fi_cupy.sampling_from_probs(probs, generator=g)) for _ in range(6)]
    assert len(sampling._SIGS) == 1
    want = [_cp().asnumpy(fi_cupy.sampling_from_probs(probs, seed=1234, offset=o)) for o in range(6)]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert len({a.tobytes() for a in got}) > 1  # the draws differ from call to call


@gpu
def test_sampling_per_row_parameter_arrays_are_not_replayed_stale():
    """top_p given as a device array: its pointer sits inside a struct parameter, so the call is never
    recorded (and its values are checked on the host every call)."""
    from fi_cupy import sampling
    cp = _cp()
    probs = cp.asarray(np.random.default_rng(1).dirichlet(np.full(64, 0.3), size=4).astype(np.float32))
    for top_p in (0.5, 1.0):
        out = fi_cupy.top_p_renorm_probs(probs, cp.full((4,), top_p, cp.float32))
        want = fi_cupy.top_p_renorm_probs(probs, top_p)
        np.testing.assert_allclose(cp.asnumpy(out), cp.asnumpy(want), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="top_p"):
        fi_cupy.top_p_renorm_probs(probs, cp.full((4,), 1.5, cp.float32))
    assert len(sampling._SIGS) == 2  # the two scalar-top_p signatures only


@gpu
def test_append_check_is_repeated_by_every_replay():
    """append_paged_kv_cache(check=True) is recorded with its index check: a replay reads the indices
    back again, so a bad index in a known signature still raises before anything is written."""
    from fi_cupy import page
    cp = _cp()
    page._SIGS.clear()
    ps, hkv, d, num_pages = 4, 2, 64, 6
    cache = cp.zeros((num_pages, 2, ps, hkv, d), cp.float16)
    indptr, indices, last = (cp.asarray(a, cp.int32) for a in ([0, 2, 3], [4, 1, 5], [3, 2]))
    bi, pos = cp.asarray([0, 1], cp.int32), cp.asarray([6, 1], cp.int32)
    for seed in range(3):
        k, v = _rand((2, hkv, d), seed=seed), _rand((2, hkv, d), seed=seed + 10)
        assert fi_cupy.append_paged_kv_cache(k, v, bi, pos, cache, indices, indptr, last) is None
        got = cp.asnumpy(cache)
        np.testing.assert_array_equal(got[1, 0, 2], cp.asnumpy(k[0]))  # request 0, position 6: page 1, slot 2
        np.testing.assert_array_equal(got[5, 1, 1], cp.asnumpy(v[1]))  # request 1, position 1: page 5, slot 1
    assert len(page._SIGS) == 1
    before = cp.asnumpy(cache)
    for bad_pos, bad_ix, match in (([7, 1], [4, 1, 5], "positions"), ([6, 1], [4, 9, 5], "kv_indices")):
        pos[:] = cp.asarray(bad_pos, cp.int32)
        indices[:] = cp.asarray(bad_ix, cp.int32)
        with pytest.raises(ValueError, match=match):
            fi_cupy.append_paged_kv_cache(k, v, bi, pos, cache, indices, indptr, last)
    np.testing.assert_array_equal(cp.asnumpy(cache), before)
    assert len(page._SIGS) == 1


@gpu
def test_mla_append_replays_with_its_check():
    from fi_cupy import mla
    cp = _cp()
    mla._APPEND_SIGS.clear()
    ckv, kpe = cp.zeros((5, 4, 512), cp.float16), cp.zeros((5, 4, 64), cp.float16)
    indptr, indices, last = (cp.asarray(a, cp.int32) for a in ([0, 1, 3], [2, 0, 4], [2, 3]))
    bi, pos = cp.asarray([0, 1], cp.int32), cp.asarray([1, 6], cp.int32)
    for seed in range(3):
        a, b = _rand((2, 512), seed=seed), _rand((2, 64), seed=seed + 5)
        assert fi_cupy.append_paged_mla_kv_cache(a, b, bi, pos, ckv, kpe, indices, indptr, last) is None
        np.testing.assert_array_equal(cp.asnumpy(ckv[2, 1]), cp.asnumpy(a[0]))  # request 0, position 1: page 2
        np.testing.assert_array_equal(cp.asnumpy(kpe[4, 2]), cp.asnumpy(b[1]))  # request 1, position 6: page 4, slot 2
    assert len(mla._APPEND_SIGS) == 1
    pos[1] = 7  # request 1 holds 4 + 3 = 7 tokens
    with pytest.raises(ValueError, match="positions"):
        fi_cupy.append_paged_mla_kv_cache(a, b, bi, pos, ckv, kpe, indices, indptr, last)


@gpu
def test_read_back_of_strided_and_raw_bit_arrays():
    """readback.download (every host read of device arrays): strided views come back as their elements,
    bfloat16 as its bits; checks.host_int_array reads a device array on its framework's stream."""
    from fi_cupy._core import checks, readback
    from fi_cupy._core.arrays import describe
    cp = _cp()
    base = cp.arange(40, dtype=cp.int64).reshape(8, 5)
    view = base[1::3, ::2]  # (3, 3), strides (15, 2) elements
    x16 = cp.asarray(np.array([1.5, -2.0, 0.25], np.float32)).astype(cp.float16)
    got = readback.download([describe(view, "view"), describe(x16, "x16")], 0, cp.cuda.get_current_stream().ptr)
    np.testing.assert_array_equal(got[0], cp.asnumpy(view))
    np.testing.assert_array_equal(got[1], np.array([1.5, -2.0, 0.25], np.float16))
    np.testing.assert_array_equal(checks.host_int_array("ip", base[:, 1]), cp.asnumpy(base[:, 1]))
    assert readback.download([describe(base[:0], "empty")], 0, 0)[0].shape == (0, 5)
    if torch is not None:
        t = torch.tensor([1.0, 0.5, -3.0], dtype=torch.bfloat16, device="cuda")
        bits = readback.download([describe(t, "t")], 0, torch.cuda.current_stream().cuda_stream)[0]
        assert bits.dtype == np.uint16
        np.testing.assert_array_equal((bits.astype(np.uint32) << 16).view(np.float32), [1.0, 0.5, -3.0])
        probs = torch.softmax(torch.randn(3, 64, device="cuda"), -1)
        with pytest.raises(ValueError, match="top_p"):  # per-row top_p in bfloat16, read back as bits
            fi_cupy.top_p_renorm_probs(probs, torch.tensor([0.5, 1.5, 0.9], dtype=torch.bfloat16, device="cuda"))


@gpu
def test_chain_speculative_replay_checks_draft_ids():
    from fi_cupy import sampling
    cp = _cp()
    sampling._SIGS.clear()
    rng = np.random.default_rng(3)
    q = cp.asarray(rng.dirichlet(np.full(32, 0.5), size=(2, 3)).astype(np.float32))
    p = cp.asarray(rng.dirichlet(np.full(32, 0.5), size=(2, 4)).astype(np.float32))
    ids = cp.asarray(rng.integers(0, 32, (2, 3)), cp.int32)
    want = [cp.asnumpy(a) for a in fi_cupy.chain_speculative_sampling(q, ids, p, seed=7, offset=3)]  # recorded
    assert ((want[0] >= -1) & (want[0] < 32)).all()
    for _ in range(2):  # replays: the same draws as the recorded call's
        got = fi_cupy.chain_speculative_sampling(q, ids, p, seed=7, offset=3)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(cp.asnumpy(a), b)
    assert len(sampling._SIGS) == 1
    ids[1, 2] = 32
    with pytest.raises(ValueError, match="draft_token_ids"):
        fi_cupy.chain_speculative_sampling(q, ids, p, seed=7, offset=0)


@gpu
def test_packbits_replays_with_new_data_and_lengths():
    from fi_cupy import quantization
    cp = _cp()
    quantization._SIGS.clear()
    rng = np.random.default_rng(5)
    for n in (13, 4096, 13, 1):
        for order in ("big", "little"):
            for _ in range(2):
                x = rng.random(n) < 0.5
                got = fi_cupy.packbits(cp.asarray(x), bitorder=order)
                np.testing.assert_array_equal(cp.asnumpy(got), np.packbits(x, bitorder=order))
    assert len(quantization._SIGS) == 6


# ---------------------------------------------------------------------------------------------------------
# CPU: the recorder's rules


def _info(name="x", ptr=1 << 20):
    return ArrayInfo(name, ptr, (4,), contiguous_strides((4,)), dt.float16, 0, "cupy")


class _Prepared:
    pass


def test_recorder_maps_pointers_to_their_arrays():
    x, y = object(), object()
    rec = fastpath.Recorder((x, y), fastpath.CUPY)
    xi, yi = _info("x", 4096), _info("y", 8192)
    rec.arg(x, xi)
    rec.arg(y, yi)
    rec.launch(_Prepared(), [kernels.ptr(xi), kernels.ptr(yi, 8), kernels.ptr(None), kernels.i32(3)])
    (_, values, slots, fresh), = rec.steps
    assert slots == ((0, 0, 0), (1, 1, 8)) and fresh == ()
    assert values[2:] == [0, 3] and rec.why == ""


@pytest.mark.parametrize("arg, why", [
    (lambda xi: kernels.ptr(12345), "outside"),                          # a bare address
    (lambda xi: kernels.ptr(_info("z", 999)), "outside"),               # an array not in the signature
    (lambda xi: kernels.struct_arg("Q", kernels.ptr(xi)), "struct"),    # an address inside a struct
])
def test_recorder_refuses_what_it_cannot_replay(arg, why):
    x = object()
    rec = fastpath.Recorder((x,), fastpath.CUPY)
    xi = _info()
    rec.arg(x, xi)
    rec.launch(_Prepared(), [arg(xi)])
    assert why in rec.why


def test_host_checks_are_recorded_as_steps_on_their_arrays(monkeypatch):
    """Call.host_check's check becomes a step that a replay runs with the new arrays' addresses."""
    from fi_cupy._core import readback
    x, y = object(), object()
    rec = fastpath.Recorder((x, y), fastpath.CUPY)
    xi, yi = _info("x", 4096), _info("y", 8192)
    rec.arg(x, xi)
    rec.arg(y, yi)
    seen = []
    check = readback.HostCheck(lambda a, b: seen.append((a, b)), (yi, xi), 0)
    rec.host_check(check, (yi, xi))
    (step, values, slots, fresh), = rec.steps
    assert step is check and slots == ((0, 1, 0), (1, 0, 0)) and rec.why == ""
    monkeypatch.setattr(readback.streams, "is_capturing", lambda s: False)
    monkeypatch.setattr(readback, "download_at", lambda addrs, layouts, dev, s: [addrs, [lay[1] for lay in layouts]])
    check.here([111, 222], 5)
    assert seen == [([111, 222], [np.dtype("float16")] * 2)]
    rec2 = fastpath.Recorder((x,), fastpath.CUPY)
    rec2.host_check(check, (_info("z", 64),))
    assert "host check" in rec2.why


def test_fixed_memory_is_recorded_through_its_info_only():
    """Memory the op owns (Call.fixed) is a constant of the recording when the argument points through
    its ArrayInfo; its bare address is refused (packbits' offsets were passed so: never replayed)."""
    x = object()
    rec = fastpath.Recorder((x,), fastpath.CUPY)
    mi = _info("offsets", 1 << 16)
    rec.fixed.add(id(mi))
    rec.launch(_Prepared(), [kernels.ptr(mi), kernels.ptr(mi, 16)])
    assert rec.why == "" and rec.steps[0][1] == [1 << 16, (1 << 16) + 16] and rec.steps[0][2] == ()
    rec.launch(_Prepared(), [kernels.ptr(mi.ptr)])
    assert "outside" in rec.why


def test_stable_addresses_are_recorded_as_constants():
    x = object()
    rec = fastpath.Recorder((x,), fastpath.CUPY)
    rec.arg(x, _info())
    meta = kernels.ptr(1 << 30, stable=True)
    rec.launch(_Prepared(), [kernels.ptr(meta, 64)])
    (_, values, slots, _), = rec.steps
    assert values == [(1 << 30) + 64] and slots == () and rec.why == ""


def test_random_structs_are_redrawn_at_each_replay():
    x = object()
    rec = fastpath.Recorder((x,), fastpath.CUPY)
    draws = iter(range(10))
    arg = kernels.fresh_arg(lambda: kernels.struct_arg("Q", next(draws)))
    rec.launch(_Prepared(), [arg])
    (_, values, _, fresh), = rec.steps
    assert values == [bytes(8)] and len(fresh) == 1
    assert fresh[0][1]() == (1).to_bytes(8, "little") and rec.why == ""


@needs_torch
def test_torch_output_makers_follow_a_like_input():
    """_maker picks torch.empty_like of a contiguous signature array of the output's shape and dtype, else
    new_empty of one of its dtype (here on the CPU: device -1)."""
    x = torch.zeros((3, 8), dtype=torch.bfloat16)
    strided = torch.zeros((3, 16), dtype=torch.bfloat16)[:, ::2]
    half = torch.zeros((3, 8), dtype=torch.float16)
    bf16 = dt.as_dtype("bfloat16")
    class Sub(torch.Tensor):  # a tensor subclass lends nothing: its empty_like may be a Sub
        pass
    sub = x.as_subclass(Sub)
    cases = (((None, x), (3, 8)), ((strided,), (3, 8)), ((half, x), (3, 4)), ((strided, x), (2, 2)), ((sub, x), (3, 8)),
             ((torch.nn.Parameter(x, requires_grad=True),), (3, 8)))
    for arrs, shape in cases:
        make, address = fastpath._maker("torch", shape, bf16, -1, arrs)
        o = make(arrs, None)
        assert type(o) is torch.Tensor and not o.requires_grad
        assert o.shape == shape and o.dtype == torch.bfloat16 and o.is_contiguous() and o.get_device() == -1
        assert address(o) == o.data_ptr() and all(a is None or a.data_ptr() != o.data_ptr() for a in arrs)


def test_key_of_takes_only_torch_or_cupy_arrays():
    assert fastpath.key_of((np.zeros(3),), ()) is None
    assert fastpath.key_of((None,), ()) is None


def test_capsule_head_reads_pointer_device_and_hashable_strides():
    """What a JAX replay keys on, read from a DLPack capsule (numpy's here: host memory, so device -1)."""
    from fi_cupy._core import arrays
    a = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2]
    ptr, device, strides = arrays.capsule_head(a.__dlpack__(), 2)
    assert (ptr, device, strides) == (a.ctypes.data, -1, (6, 2))
    hash(strides)


def test_capsules_from_the_template_describe_the_buffer():
    """DeviceBuffer's capsules copy a per-shape template and set the data pointer and context: read back
    through the DLPack structs they say what a capsule built field by field says."""
    import ctypes
    from fi_cupy._core import arrays
    bf16 = dt.as_dtype("bfloat16")
    for shape in ((1, 4096), (3,), ()):
        cap = arrays._capsule_of(0x7F0000001000, object(), shape, bf16, 1)
        addr = arrays._capsule_get(cap, b"dltensor")
        mt = arrays._DLManagedTensor.from_address(addr)
        t = mt.dl_tensor
        assert (t.data, t.device.device_type, t.device.device_id, t.ndim) == (0x7F0000001000, arrays.KDL_CUDA, 1,
                                                                               len(shape))
        assert (t.dtype.code, t.dtype.bits, t.dtype.lanes, t.byte_offset) == (bf16.code, 16, 1, 0)
        assert tuple(t.shape[i] for i in range(len(shape))) == shape and not t.strides
        assert mt.manager_ctx == addr and addr in arrays._Owned.live
        mt.deleter(addr)  # what the consumer does: the memory is released
        assert addr not in arrays._Owned.live
        assert ctypes.addressof(mt) == addr


def test_dlpack_deleter_outlives_its_module():
    """A consumer (JAX) may release a DeviceBuffer capsule while the interpreter tears modules down; the
    capsules copy the deleter's address, so the ctypes thunk behind it must survive its module's dict being
    cleared (freed, the exit of a JAX caller holding an output segfaulted)."""
    import subprocess
    import sys
    code = ("import gc, sys, weakref\n"
            "from fi_cupy._core import arrays\n"
            "r = weakref.ref(arrays._dlpack_deleter)\n"
            "for name in [k for k in sys.modules if k.startswith('fi_cupy')]:\n"
            "    sys.modules.pop(name).__dict__.clear()  # what interpreter teardown does to a module\n"
            "del arrays\n"
            "gc.collect()\n"
            "print('alive' if r() is not None else 'freed')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "alive"


class _Fn:
    """A kernels.Function stand-in: a handle, no attributes to set."""
    ptr, name = 0x7F00DEAD0000, "stand_in"

    def allow_smem(self, nbytes):
        pass

    def allow_cluster(self, size):
        pass


def _driver_stand_in(monkeypatch, read_params) -> tuple:
    """A C function standing in for cuLaunchKernelEx, called the way the driver is (no argtypes, c_void_p
    objects). Returns (the list each launch appends to: (grid + block + shared memory, stream, number of
    attributes, the first one's id and value, function handle, read_params(kernelParams), extra), the
    callback, which the caller keeps alive)."""
    import ctypes
    import struct
    seen = []

    @ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    def stand_in(cfg, fn, params, extra):
        head = struct.unpack(kernels._CONFIG_FMT, ctypes.string_at(cfg, kernels._CONFIG_BYTES))
        attr_id, attr_val = struct.unpack("<i4xi", ctypes.string_at(head[8], 12)) if head[9] else (None, None)
        seen.append((head[:7], head[7], head[9], attr_id, attr_val, fn, read_params(params), extra))
        return 0

    raw = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.cast(stand_in, ctypes.c_void_p).value)
    raw.argtypes = None
    monkeypatch.setattr(kernels, "_libcuda", [(None, raw)])
    return seen, stand_in


def test_launch_passes_config_function_and_parameters(monkeypatch):
    """kernels.Prepared.here through a C function standing in for cuLaunchKernelEx, called the way the driver
    is (no argtypes, c_void_p objects): it receives the CUlaunchConfig (grid, block, shared memory, the
    stream of each call, the PDL attribute), the function handle, kernelParams pointing at each argument's
    packed value, and a null `extra`."""
    import ctypes
    import struct

    def read(params):
        p = [ctypes.c_void_p.from_address(params + 8 * i).value for i in range(5)]
        return (ctypes.c_uint64.from_address(p[0]).value, ctypes.c_int64.from_address(p[1]).value,
                ctypes.c_int32.from_address(p[2]).value, ctypes.c_float.from_address(p[3]).value,
                ctypes.string_at(p[4], 12))
    seen, _keep = _driver_stand_in(monkeypatch, read)
    args = [kernels.ptr(1 << 40), np.int64(-7), kernels.i32(3), kernels.f32(0.5), kernels.struct_arg("iii", 1, 2, 3)]
    prep = kernels.Prepared(_Fn(), (5, 2), (128,), kernels.signature_of(args), 0, smem=4096, pdl=True)
    values = [int(args[0]), -7, 3, 0.5, bytes(args[4])]
    prep.here(values, 0x1111)
    prep.here([(1 << 40) + 64] + values[1:], 0x2222)  # a replay: new pointer, new stream
    prep.here(values, 0x2222)
    triple = struct.pack("<3i", 1, 2, 3)
    assert seen == [((5, 2, 1, 128, 1, 1, 4096), 0x1111, 1, kernels._PDL_ATTR, 1, _Fn.ptr,
                     (1 << 40, -7, 3, 0.5, triple), None),
                    ((5, 2, 1, 128, 1, 1, 4096), 0x2222, 1, kernels._PDL_ATTR, 1, _Fn.ptr,
                     ((1 << 40) + 64, -7, 3, 0.5, triple), None),
                    ((5, 2, 1, 128, 1, 1, 4096), 0x2222, 1, kernels._PDL_ATTR, 1, _Fn.ptr,
                     (1 << 40, -7, 3, 0.5, triple), None)]


def test_schedule_launch_passes_its_parts_and_scalars(monkeypatch):
    """decode_schedule.launch_schedule keeps a Prepared per (device, shared memory) and feeds it plain ints:
    the driver stand-in receives one CTA of THREADS threads, the staged shared memory up to STAGED_REQUESTS
    requests (none past them), and the parameters in the kernel's order: each part's address in the
    metadata block, the sizes, the 64-bit quota."""
    import ctypes
    from fi_cupy import decode_schedule as ds
    order = ("kv_lens", "batch", "head_blocks", "num_ctas", "quota", "window_left", "cum", "empty_before",
             "segments", "segment_partial", "cta_indptr", "merge_pairs", "merge_indptr", "merge_cap")
    kinds = [ctypes.c_uint64 if t is kernels.DevPtr else ctypes.c_int64 if t is kernels.i64 else ctypes.c_int32
             for t in ds._SIGNATURE]

    def read(params):
        return tuple(kind.from_address(ctypes.c_void_p.from_address(params + 8 * i).value).value
                     for i, kind in enumerate(kinds))
    seen, _keep = _driver_stand_in(monkeypatch, read)
    monkeypatch.setattr(kernels, "cached_function", lambda device, key, build: _Fn())
    monkeypatch.setattr(kernels, "cuda_runtime", lambda: type("R", (), {"getDevice": staticmethod(lambda: 0)}))
    monkeypatch.setattr(ds, "_launches", {})
    base = 1 << 40
    offsets = {name: 16 * k for k, name in enumerate(ds.DEVICE_PARTS + ("page_indptr", "kv_lens"))}
    for batch in (5, ds.STAGED_REQUESTS, ds.STAGED_REQUESTS + 1, 5):
        scalars = {"batch": batch, "head_blocks": 3, "num_ctas": 528, "quota": (1 << 33) + 5, "window_left": -1,
                   "merge_cap": 77}
        ds.launch_schedule(base, offsets, batch, 3, 528, (1 << 33) + 5, -1, 77, 0x5150, 0)
        want = tuple(scalars[n] if n in scalars else base + 4 * offsets[n] for n in order)
        smem = ds.STAGED_BYTES if batch <= ds.STAGED_REQUESTS else 0
        assert seen.pop() == ((1, 1, 1, ds.THREADS, 1, 1, smem), 0x5150, 0, None, None, _Fn.ptr, want, None)
    assert len(ds._launches) == 2


def test_decode_replan_keeps_recordings_only_when_it_launches_alike(monkeypatch):
    """PlannedWrapper._plan keeps run()'s recorded calls across a decode re-plan exactly when the plans'
    run_key are equal: the same batch size and options on the device schedule, whatever the lengths, page
    indices and largest page; not another batch size or head count, nor a fixed split whose cut pairs
    (its merge grid) change, nor another workspace. The device stands in (no launch, no upload)."""
    from fi_cupy import decode, decode_schedule
    from test_core_cpu import FakeCudaArray, stub_h100_host
    stub_h100_host(monkeypatch)
    monkeypatch.setattr(decode, "upload", lambda *a, **k: None)
    monkeypatch.setattr(decode_schedule, "launch_schedule", lambda *a: None)
    monkeypatch.setattr(decode, "decode_num_ctas", lambda params, kv_dtype, device: 528)
    w = decode.BatchDecodeWithPagedKVCacheWrapper(FakeCudaArray((64 << 20,), None, code=1, bits=8, ptr=1 << 30))

    def plan(lens, seed=0, hq=32, **kw):
        pages = -(-np.array(lens) // 16)
        ip = np.concatenate([[0], np.cumsum(pages)])
        ix = np.random.default_rng(seed).permutation(int(ip[-1]) + 50)[: ip[-1]]
        w.plan(ip, ix, np.array(lens) - (pages - 1) * 16, hq, 8, 128, 16, q_data_type="float16", **kw)
        return w._sigs

    first = plan([3000, 1, 17])
    largest = w._plan.max_page
    assert plan([3000, 1, 17], seed=1) is first and plan([40, 2500, 9], seed=2) is first
    assert w._plan.max_page != largest
    four = plan([3000, 1, 17, 5])
    assert four is not first and plan([3000, 1, 17, 5], seed=4) is four
    assert plan([3000, 1, 17, 5], hq=16) is not four
    split = plan([3000, 1, 17, 5], fixed_split_size=8)  # the host's schedule: its cut pairs size the merges
    assert plan([3000, 1, 17, 5], seed=5, fixed_split_size=8) is split
    assert plan([30, 1, 17, 5], fixed_split_size=8) is not split
    again = plan([30, 1, 17, 5], fixed_split_size=8)
    w.reset_workspace_buffer(FakeCudaArray((64 << 20,), None, code=1, bits=8, ptr=1 << 31))
    assert plan([30, 1, 17, 5], fixed_split_size=8) is not again
