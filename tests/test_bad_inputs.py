"""The bad-input sweep: every kind of invalid call across the public API raises a TypeError or
ValueError (NotImplementedError for an argument FlashInfer takes and fi_cupy does not) whose message
starts with the argument's name and says what it got or what is allowed, before any kernel launch.

Two tables, every case named:
- CPU_CASES need no GPU: plan-time checks on host index arrays, option checks, and array checks on
  DeviceStub arrays (a CUDA array as DLPack describes it, with no memory behind it), so the ops read
  them under their own argument names exactly as they read torch, CuPy or JAX arrays.
- GPU_CASES use CuPy arrays (tests/gpu_arrays.py; host arrays where device ones are needed). After each
  bad call, a small valid call of the same op must still match the float64 reference and a device
  synchronize must not raise: nothing ran on bad memory. A few cases are about torch callers (a torch
  CPU tensor, a torch float8 tensor whose dtype comes from the array): marked to skip without torch.
During every bad call kernels.launch is a tripwire: a check that is missing fails its case instead of
launching a kernel on bad (or, for stubs, no) memory.
"""
import contextlib
import ctypes
import re
from dataclasses import dataclass
from typing import Callable

import cupy as cp
import numpy as np
import pytest

import fi_cupy
from fi_cupy import reference, sampling
from fi_cupy._core import arrays, kernels
from fi_cupy._core import dtypes as dt
from gpu_arrays import BF16, bits, f64, nan_like, rand, take
from tolerances import assert_close, assert_lse_close

try:
    import torch
except ImportError:  # only the torch-caller cases need it
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (interop test)")


@dataclass(frozen=True)
class Case:
    call: Callable[[], object]   # performs one invalid call
    exc: type
    arg: str                     # the message starts with it
    says: str = ""               # regex the message also contains: what it got or what is allowed
    then: Callable[[], None] | None = None  # GPU: the valid call of the same op that must still work
    torch_caller: bool = False   # GPU: a torch-caller case (interop), skipped without torch


def _tripwire(*args, **kwargs):
    raise AssertionError("a kernel was launched before the bad input was refused")


_LAUNCH = kernels.launch


@contextlib.contextmanager
def setup_may_launch():
    """The valid setup of a bad call (a plan whose schedule kernel runs on the device) launches freely; the
    tripwire guards the bad call alone."""
    armed, kernels.launch = kernels.launch, _LAUNCH
    try:
        yield
    finally:
        kernels.launch = armed


def _raises_naming(case: Case, monkeypatch) -> None:
    monkeypatch.setattr(kernels, "launch", _tripwire)
    with pytest.raises(case.exc) as err:
        case.call()
    monkeypatch.undo()
    msg = str(err.value)
    assert re.match(rf"{re.escape(case.arg)}(?!\w)", msg), f"the message does not start with {case.arg!r}: {msg}"
    assert re.search(case.says, msg), f"the message does not say {case.says!r}: {msg}"


# ---------------------------------------------------------------------------------------------
# CPU part


class DeviceStub:
    """A CUDA array as DLPack describes it: pointer, shape, strides, dtype; no memory behind it."""

    def __init__(self, shape, dtype=dt.bfloat16, strides=None, offset=0):
        n = len(shape)
        self._shape = (ctypes.c_int64 * max(n, 1))(*shape)
        self._strides = (ctypes.c_int64 * max(n, 1))(*(strides or arrays.contiguous_strides(shape)))
        mt = self._managed = arrays._DLManagedTensor()
        mt.dl_tensor.data = 1 << 20
        mt.dl_tensor.byte_offset = offset
        mt.dl_tensor.device = arrays._DLDevice(arrays.KDL_CUDA, 0)
        mt.dl_tensor.ndim = n
        mt.dl_tensor.dtype = arrays._DLDataType(dtype.code, dtype.bits, 1)
        mt.dl_tensor.shape = ctypes.cast(self._shape, ctypes.POINTER(ctypes.c_int64))
        mt.dl_tensor.strides = ctypes.cast(self._strides, ctypes.POINTER(ctypes.c_int64))

    def __dlpack_device__(self):
        return (arrays.KDL_CUDA, 0)

    def __dlpack__(self, stream=None):
        return arrays._capsule_new(ctypes.addressof(self._managed), b"dltensor", None)


S = DeviceStub
F16, F32, I32, I64, U8, E4M3 = dt.float16, dt.float32, dt.int32, dt.int64, dt.uint8, dt.float8_e4m3fn
WS = S((1 << 20,), U8)
DECODE_PLAN = dict(indptr=np.array([0, 2, 3]), indices=np.array([4, 1, 0]), last_page_len=np.array([3, 16]),
                   num_qo_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
PAGED_PLAN = dict(qo_indptr=np.array([0, 5, 6]), paged_kv_indptr=np.array([0, 2, 3]),
                  paged_kv_indices=np.array([4, 1, 0]), paged_kv_last_page_len=np.array([3, 16]),
                  num_qo_heads=8, num_kv_heads=2, head_dim_qk=64, page_size=16)
RAGGED_PLAN = dict(qo_indptr=np.array([0, 5, 6]), kv_indptr=np.array([0, 19, 35]), num_qo_heads=8,
                   num_kv_heads=2, head_dim_qk=64)


def decode_plan(**change):
    fi_cupy.BatchDecodeWithPagedKVCacheWrapper(WS).plan(**{**DECODE_PLAN, **change}, stream=0)


def paged_plan(**change):
    fi_cupy.BatchPrefillWithPagedKVCacheWrapper(WS, backend=change.pop("backend", "fa2")).plan(
        **{**PAGED_PLAN, **change}, stream=0)


def ragged_plan(**change):
    fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(WS, backend="fa2").plan(**{**RAGGED_PLAN, **change}, stream=0)


def _or(x, default):
    return default if x is None else x


def single_decode(q=None, k=None, v=None, **kw):
    fi_cupy.single_decode_with_kv_cache(_or(q, S((8, 64))), _or(k, S((10, 2, 64))), _or(v, S((10, 2, 64))),
                                        stream=0, **kw)


def single_prefill(q=None, k=None, v=None, **kw):
    """With `out` given, so that nothing is allocated before the checks that follow it."""
    fi_cupy.single_prefill_with_kv_cache(_or(q, S((5, 8, 64))), _or(k, S((9, 2, 64))), _or(v, S((9, 2, 64))),
                                         out=S((5, 8, 64)), backend="fa2", stream=0, **kw)


def append(**change):
    a = dict(append_key=S((5, 2, 64)), append_value=S((5, 2, 64)), batch_indices=S((5,), I32),
             positions=S((5,), I32), paged_kv_cache=S((10, 2, 16, 2, 64)), kv_indices=S((4,), I32),
             kv_indptr=S((3,), I32), kv_last_page_len=S((2,), I32))
    fi_cupy.append_paged_kv_cache(**{**a, **change}, stream=0)


def rope(fn=fi_cupy.apply_rope_pos_ids, q=None, k=None, positions=(S((6,), I32),), **kw):
    fn(_or(q, S((6, 8, 64))), _or(k, S((6, 2, 64))), *positions, stream=0, **kw)


def cos_sin(query=None, head_size=64, cache=None):
    fi_cupy.apply_rope_with_cos_sin_cache(S((6,), I64), _or(query, S((6, 512))), S((6, 128)), head_size,
                                          _or(cache, S((100, 64), F32)), stream=0)


PROBS = S((4, 100), F32)
SPEC = dict(draft_probs=S((2, 3, 100), F32), draft_token_ids=S((2, 3), I32), target_probs=S((2, 4, 100), F32))


def speculative(**change):
    sampling.chain_speculative_sampling(**{**SPEC, **change}, stream=0)


CPU_CASES = {
    # Decode wrapper: constructor and plan() (host index arrays, heads, head dim, options).
    "decode_ctor_kv_layout_unknown": Case(lambda: fi_cupy.BatchDecodeWithPagedKVCacheWrapper(WS, "NDH"), ValueError,
                                          "kv_layout", "'NDH' is not one of"),
    "decode_ctor_jit_args": Case(lambda: fi_cupy.BatchDecodeWithPagedKVCacheWrapper(WS, jit_args=[1]),
                                 TypeError, "jit_args", "got list of 1 items"),
    "decode_ctor_workspace_on_host": Case(lambda: fi_cupy.BatchDecodeWithPagedKVCacheWrapper(np.empty(64, np.uint8)),
                                          ValueError, "float_workspace_buffer", "CUDA device, got one on CPU"),
    "decode_ctor_workspace_strided": Case(lambda: fi_cupy.BatchDecodeWithPagedKVCacheWrapper(S((1024,), U8, (2,))),
                                          ValueError, "float_workspace_buffer", "contiguous"),
    "decode_ctor_workspace_misaligned": Case(
        lambda: fi_cupy.BatchDecodeWithPagedKVCacheWrapper(S((1024,), U8, offset=1)), ValueError,
        "float_workspace_buffer", "16-byte aligned"),
    "decode_plan_qo_heads_not_a_multiple": Case(lambda: decode_plan(num_qo_heads=6, num_kv_heads=4), ValueError,
                                                "num_qo_heads", r"\(6\) must be a multiple of num_kv_heads \(4\)"),
    "decode_plan_kv_heads_zero": Case(lambda: decode_plan(num_kv_heads=0), ValueError, "num_kv_heads",
                                      "positive integer, got 0"),
    "decode_plan_head_dim_unsupported": Case(lambda: decode_plan(head_dim=72), ValueError, "head_dim",
                                             "72 is not supported; supported head dims: 16, 32"),
    "decode_plan_page_size_zero": Case(lambda: decode_plan(page_size=0), ValueError, "page_size", "got 0"),
    "decode_plan_q_data_type_float32": Case(lambda: decode_plan(q_data_type="float32"), TypeError, "q_data_type",
                                            "float32 is not supported; expected float16 or bfloat16"),
    "decode_plan_kv_data_type_int8": Case(lambda: decode_plan(kv_data_type="int8"), TypeError, "kv_data_type",
                                          "int8 is not supported with q float16"),
    "decode_plan_pos_encoding_unknown": Case(lambda: decode_plan(pos_encoding_mode="XPOS"), ValueError,
                                             "pos_encoding_mode",
                                             "'XPOS' is not one of 'NONE', 'ROPE_LLAMA', 'ALIBI'$"),
    "decode_plan_alibi_with_soft_cap": Case(lambda: decode_plan(pos_encoding_mode="ALIBI", logits_soft_cap=30.0),
                                            NotImplementedError, "logits_soft_cap",
                                            '30.0 with pos_encoding_mode "ALIBI" is not supported'),
    "decode_plan_q_len_alibi_with_soft_cap": Case(  # q_len_per_req > 1: the prefill path refuses it too
        lambda: decode_plan(pos_encoding_mode="ALIBI", logits_soft_cap=30.0, q_len_per_req=2), NotImplementedError,
        "logits_soft_cap", 'with pos_encoding_mode "ALIBI" is not supported'),
    "decode_plan_soft_cap_negative": Case(lambda: decode_plan(logits_soft_cap=-1.0), ValueError, "logits_soft_cap",
                                          "got -1.0"),
    "decode_plan_window_left_float": Case(lambda: decode_plan(window_left=2.5), TypeError, "window_left", "2.5"),
    "decode_plan_indptr_not_from_zero": Case(lambda: decode_plan(indptr=np.array([1, 2, 3])), ValueError, "indptr",
                                             "must start at 0, got 1"),
    "decode_plan_indptr_decreasing": Case(lambda: decode_plan(indptr=np.array([0, 3, 2])), ValueError, "indptr",
                                          r"non-decreasing, but indptr\[1\]=3 > indptr\[2\]=2"),
    "decode_plan_indptr_empty": Case(lambda: decode_plan(indptr=np.array([], np.int32), indices=np.array([]),
                                                         last_page_len=np.array([])), ValueError, "indptr",
                                     "at least one entry"),
    "decode_plan_indptr_float": Case(lambda: decode_plan(indptr=np.array([0.0, 2.0, 3.0])), TypeError, "indptr",
                                     "integer array, got dtype float64"),
    "decode_plan_indptr_2d": Case(lambda: decode_plan(indptr=np.zeros((2, 2), np.int32)), ValueError, "indptr",
                                  r"1-D array, got shape \(2, 2\)"),
    "decode_plan_indptr_beyond_indices": Case(lambda: decode_plan(indices=np.array([4, 1])), ValueError, "indices",
                                              r"has 2 entries but indptr\[-1\] is 3"),
    "decode_plan_page_index_negative": Case(lambda: decode_plan(indices=np.array([4, -1, 0])), ValueError, "indices",
                                            ">= 0, got -1"),
    "decode_plan_last_page_len_zero": Case(lambda: decode_plan(last_page_len=np.array([0, 16])), ValueError,
                                           "last_page_len", r"last_page_len 0; expected 1\.\.16"),
    "decode_plan_last_page_len_over_page_size": Case(lambda: decode_plan(last_page_len=np.array([3, 17])),
                                                     ValueError, "last_page_len", r"17; expected 1\.\.16"),
    "decode_plan_last_page_len_of_another_batch": Case(lambda: decode_plan(last_page_len=np.array([3])), ValueError,
                                                       "last_page_len", "expected 2 entries"),
    # Single decode: array checks on DLPack stubs.
    "single_decode_q_1d": Case(lambda: single_decode(q=S((64,))), ValueError, "q", r"expected 2 dims.*got shape"),
    "single_decode_q_float32": Case(lambda: single_decode(q=S((8, 64), F32)), TypeError, "q",
                                    "float32 is not supported"),
    "single_decode_k_float32": Case(lambda: single_decode(k=S((10, 2, 64), F32), v=S((10, 2, 64), F32)), TypeError,
                                    "k", "dtype float32 is not supported with q bfloat16"),
    "single_decode_v_of_another_length": Case(lambda: single_decode(v=S((9, 2, 64))), ValueError, "v",
                                              "must match k in shape"),
    "single_decode_head_dim_mismatch": Case(lambda: single_decode(k=S((10, 2, 32)), v=S((10, 2, 32))), ValueError,
                                            "k", "head_dim 32 does not match q's head_dim 64"),
    "single_decode_q_misaligned": Case(lambda: single_decode(q=S((8, 64), offset=2)), ValueError, "q",
                                       "16-byte aligned"),
    "single_decode_k_last_dim_strided": Case(lambda: single_decode(k=S((10, 2, 64), strides=(256, 128, 2)),
                                                                   v=S((10, 2, 64), strides=(256, 128, 2))),
                                             ValueError, "k", "last dim must be contiguous"),
    "single_decode_q_negative_strides": Case(lambda: single_decode(q=S((8, 64), strides=(-64, 1), offset=7 * 128)),
                                             ValueError, "q", "negative strides"),
    "single_decode_q_on_host": Case(lambda: single_decode(q=np.zeros((8, 64), np.float16)), ValueError, "q",
                                    "CUDA device, got one on CPU"),
    "single_decode_q_not_an_array": Case(lambda: fi_cupy.single_decode_with_kv_cache([1.0], S((10, 2, 64)),
                                                                                     S((10, 2, 64)), stream=0),
                                         TypeError, "q", "supports DLPack.*got list"),
    "single_decode_kv_layout_unknown": Case(lambda: single_decode(kv_layout="NDH"), ValueError, "kv_layout"),
    "single_decode_q_scale_text": Case(lambda: single_decode(q_scale=[2]), TypeError, "q_scale", "got list"),
    "single_decode_alibi_with_soft_cap": Case(lambda: single_decode(pos_encoding_mode="ALIBI", logits_soft_cap=5.0),
                                              NotImplementedError, "logits_soft_cap",
                                              'with pos_encoding_mode "ALIBI" is not supported'),
    "single_decode_pos_encoding_unknown": Case(lambda: single_decode(pos_encoding_mode="XPOS"), ValueError,
                                               "pos_encoding_mode", "'XPOS' is not one of"),
    # Prefill: plan() parameters and page tables, custom masks, single prefill arrays.
    # head dims: multiples of 16 up to 256, and 512; head_dim_vo equal, or the pairs 192 / 128 and 128 / 64
    "prefill_plan_head_dim_not_a_multiple_of_16": Case(lambda: paged_plan(head_dim_qk=40), ValueError, "head_dim_qk",
                                                       r"\b40\b.*not supported"),
    "prefill_plan_head_dim_272": Case(lambda: paged_plan(head_dim_qk=272), ValueError, "head_dim_qk",
                                      r"\b272\b.*not supported"),
    "ragged_plan_head_dim_384": Case(lambda: ragged_plan(head_dim_qk=384), ValueError, "head_dim_qk",
                                     r"\b384\b.*not supported"),
    "prefill_plan_head_dim_vo_differs": Case(lambda: paged_plan(head_dim_vo=128), NotImplementedError, "head_dim_vo"),
    "ragged_plan_head_dim_vo_96": Case(lambda: ragged_plan(head_dim_qk=128, head_dim_vo=96), NotImplementedError,
                                       "head_dim_vo", r"\b96\b"),
    "prefill_plan_rope_head_dim_80": Case(lambda: paged_plan(head_dim_qk=80, pos_encoding_mode="ROPE_LLAMA"),
                                          NotImplementedError, "pos_encoding_mode", "ROPE_LLAMA"),
    "ragged_plan_rope_head_dim_vo": Case(  # RoPE on the fly: equal head dims only
        lambda: ragged_plan(head_dim_qk=192, head_dim_vo=128, pos_encoding_mode="ROPE_LLAMA"), NotImplementedError,
        "pos_encoding_mode", "ROPE_LLAMA"),
    "prefill_plan_causal_not_bool": Case(lambda: paged_plan(causal="yes"), TypeError, "causal", "'yes'"),
    "prefill_plan_qo_indptr_decreasing": Case(lambda: paged_plan(qo_indptr=np.array([0, 5, 4])), ValueError,
                                              "qo_indptr", "non-decreasing"),
    "prefill_plan_kv_indptr_of_another_batch": Case(lambda: paged_plan(paged_kv_indptr=np.array([0, 3])), ValueError,
                                                    "paged_kv_indptr", r"expected 3 entries \(batch_size \+ 1\)"),
    "prefill_plan_indices_short": Case(lambda: paged_plan(paged_kv_indices=np.array([4])), ValueError,
                                       "paged_kv_indices", r"has 1 entries but paged_kv_indptr\[-1\] is 3"),
    "prefill_plan_last_page_len_over_page_size": Case(
        lambda: paged_plan(paged_kv_last_page_len=np.array([3, 20])), ValueError, "paged_kv_last_page_len",
        r"20; expected 1\.\.16"),
    "prefill_plan_custom_mask_of_another_size": Case(lambda: paged_plan(custom_mask=S((10,), dt.bool_)),
                                                     ValueError, "custom_mask", "expected 111 elements"),
    "prefill_plan_custom_mask_float": Case(lambda: paged_plan(custom_mask=S((111,), F32)), TypeError, "custom_mask",
                                           "float32 is not supported"),
    "prefill_plan_packed_mask_short": Case(lambda: paged_plan(packed_custom_mask=S((10,), U8)), ValueError,
                                           "packed_custom_mask", "expected 14 bytes"),
    # The Hopper kernel takes head_dim 64 / 128 only: "auto" falls back, "fa3" refuses the others (as for RoPE)
    "prefill_plan_fa3_head_dim_256": Case(lambda: paged_plan(head_dim_qk=256, backend="fa3"), ValueError,
                                          "backend", "does not support head_dim 256"),
    "prefill_plan_fa3_head_dim_96": Case(lambda: paged_plan(head_dim_qk=96, backend="fa3"), ValueError,
                                         "backend", "does not support head_dim 96"),
    "prefill_plan_pos_encoding_unknown": Case(lambda: paged_plan(pos_encoding_mode="XPOS"), ValueError,
                                              "pos_encoding_mode",
                                              "'XPOS' is not one of 'NONE', 'ROPE_LLAMA', 'ALIBI'$"),
    "prefill_plan_alibi_with_soft_cap": Case(lambda: paged_plan(pos_encoding_mode="ALIBI", logits_soft_cap=30.0),
                                             NotImplementedError, "logits_soft_cap",
                                             'with pos_encoding_mode "ALIBI" is not supported'),
    "prefill_ctor_backend_unknown": Case(lambda: fi_cupy.BatchPrefillWithPagedKVCacheWrapper(WS, backend="fa4"),
                                         ValueError, "backend", "'fa4' is not one of"),
    "ragged_plan_kv_of_another_16_bit_dtype": Case(lambda: ragged_plan(q_data_type="bfloat16", kv_data_type="float16"),
                                                   TypeError, "kv_data_type", "float16"),
    "ragged_plan_alibi_with_soft_cap": Case(lambda: ragged_plan(pos_encoding_mode="ALIBI", logits_soft_cap=30.0),
                                            NotImplementedError, "logits_soft_cap",
                                            'with pos_encoding_mode "ALIBI" is not supported'),
    "ragged_plan_kv_indptr_not_from_zero": Case(lambda: ragged_plan(kv_indptr=np.array([2, 19, 35])), ValueError,
                                                "kv_indptr", "must start at 0"),
    "single_prefill_q_2d": Case(lambda: single_prefill(q=S((5, 64))), ValueError, "q", "expected 3 dims"),
    "single_prefill_q_misaligned": Case(lambda: single_prefill(q=S((5, 8, 64), offset=2)), ValueError, "q",
                                        "16-byte aligned"),
    "single_prefill_q_last_dim_strided": Case(lambda: single_prefill(q=S((5, 8, 64), strides=(1024, 128, 2))),
                                              ValueError, "q", "last dim must be contiguous"),
    "single_prefill_k_float16": Case(lambda: single_prefill(k=S((9, 2, 64), F16), v=S((9, 2, 64), F16)), TypeError,
                                     "k", "float16"),
    # float8 K/V come as arrays of a float8 dtype (torch); uint8 bytes do not say which (no kv_data_type here)
    "single_prefill_k_uint8": Case(lambda: single_prefill(k=S((9, 2, 64), U8), v=S((9, 2, 64), U8)), TypeError,
                                   "k", "uint8"),
    "single_prefill_custom_mask_of_another_shape": Case(lambda: single_prefill(custom_mask=S((9, 5), dt.bool_)),
                                                        ValueError, "custom_mask", r"expected shape \(5, 9\)"),
    "single_prefill_alibi_with_soft_cap": Case(lambda: single_prefill(pos_encoding_mode="ALIBI", logits_soft_cap=5.0),
                                               NotImplementedError, "logits_soft_cap",
                                               'with pos_encoding_mode "ALIBI" is not supported'),
    "single_prefill_fa3_rope": Case(  # the Hopper kernel applies no RoPE on the fly: refused before any device work
        lambda: fi_cupy.single_prefill_with_kv_cache(S((5, 8, 64)), S((9, 2, 64)), S((9, 2, 64)), out=S((5, 8, 64)),
                                                     pos_encoding_mode="ROPE_LLAMA", backend="fa3", stream=0),
        ValueError, "backend", "'fa3' .* does not support pos_encoding_mode ROPE_LLAMA"),
    "single_prefill_window_left_text": Case(lambda: single_prefill(window_left="5"), TypeError, "window_left"),
    "single_prefill_out_of_another_shape": Case(
        lambda: fi_cupy.single_prefill_with_kv_cache(S((5, 8, 64)), S((9, 2, 64)), S((9, 2, 64)), out=S((5, 8, 32)),
                                                     stream=0), ValueError, "out", r"expected shape \(5, 8, 64\)"),
    # Paged KV append and its index helpers.
    "append_cache_4d": Case(lambda: append(paged_kv_cache=S((10, 16, 2, 64))), ValueError, "paged_kv_cache",
                            "expected shape"),
    "append_key_heads_mismatch": Case(lambda: append(append_key=S((5, 4, 64)), append_value=S((5, 4, 64))),
                                      ValueError, "append_key", r"\(4, 64\) does not match"),
    "append_value_dtype_differs": Case(lambda: append(append_value=S((5, 2, 64), F16)), ValueError, "append_value",
                                       "must match append_key"),
    "append_into_fp8_cache": Case(lambda: append(paged_kv_cache=S((10, 2, 16, 2, 64), E4M3)), TypeError,
                                  "append_key", "quantise"),
    "append_positions_short": Case(lambda: append(positions=S((4,), I32)), ValueError, "positions",
                                   "expected 5 entries"),
    "append_index_dtypes_mixed": Case(lambda: append(positions=S((5,), I64)), TypeError, "positions",
                                      "int64 must match"),
    "append_kv_indptr_empty": Case(lambda: append(kv_indptr=S((0,), I32)), ValueError, "kv_indptr",
                                   "at least one entry"),
    "append_last_page_len_of_another_batch": Case(lambda: append(kv_last_page_len=S((3,), I32)), ValueError,
                                                  "kv_last_page_len", "expected 2 entries"),
    "append_cache_overlapping": Case(lambda: append(paged_kv_cache=S((10, 2, 16, 2, 64),
                                                                     strides=(0, 2048, 128, 64, 1))),
                                     ValueError, "paged_kv_cache", "must not overlap"),
    "append_kv_layout_unknown": Case(lambda: append(kv_layout="HDN"), ValueError, "kv_layout"),
    "get_seq_lens_page_size_zero": Case(lambda: fi_cupy.get_seq_lens(S((3,), I32), S((2,), I32), 0, stream=0),
                                        ValueError, "page_size"),
    "get_seq_lens_last_page_len_of_another_batch": Case(
        lambda: fi_cupy.get_seq_lens(S((3,), I32), S((3,), I32), 16, stream=0), ValueError, "kv_last_page_len",
        "expected 2 entries"),
    "get_seq_lens_float_indptr": Case(lambda: fi_cupy.get_seq_lens(S((3,), F32), S((2,), I32), 16, stream=0),
                                      TypeError, "kv_indptr", "float32 is not supported"),
    "batch_indices_positions_nnz_negative": Case(
        lambda: fi_cupy.get_batch_indices_positions(S((3,), I32), S((2,), I32), -1, stream=0), ValueError, "nnz"),
    "batch_indices_positions_seq_lens_of_another_batch": Case(
        lambda: fi_cupy.get_batch_indices_positions(S((3,), I32), S((4,), I32), 5, stream=0), ValueError,
        "seq_lens", "expected 2 entries"),
    # Attention-state merges.
    "merge_state_lse_bf16": Case(lambda: fi_cupy.merge_state(S((8, 4, 64)), S((8, 4)), S((8, 4, 64)),
                                                              S((8, 4), F32), stream=0),
                                 TypeError, "s_a", "bfloat16 does not match"),
    "merge_state_lse_of_another_shape": Case(lambda: fi_cupy.merge_state(S((8, 4, 64)), S((8, 4), F32),
                                                                         S((8, 4, 64)), S((8, 5), F32), stream=0),
                                             ValueError, "s_b", r"expected shape \(8, 4\)"),
    "merge_state_v_of_another_head_dim": Case(lambda: fi_cupy.merge_state(S((8, 4, 64)), S((8, 4), F32),
                                                                          S((8, 4, 32)), S((8, 4), F32), stream=0),
                                              ValueError, "v_b", "must match v_a"),
    "merge_state_int_values": Case(lambda: fi_cupy.merge_state(S((8, 4, 64), I32), S((8, 4), F32),
                                                               S((8, 4, 64), I32), S((8, 4), F32), stream=0),
                                   TypeError, "v_a", "int32 is not supported"),
    "merge_states_3d": Case(lambda: fi_cupy.merge_states(S((8, 4, 64)), S((8, 4), F32), stream=0), ValueError, "v",
                            "expected 4 dims"),
    "merge_state_in_place_mask_of_another_length": Case(
        lambda: fi_cupy.merge_state_in_place(S((8, 4, 64)), S((8, 4), F32), S((8, 4, 64)), S((8, 4), F32),
                                             mask=S((7,), dt.bool_), stream=0), ValueError, "mask",
        r"expected shape \(8\)"),
    "merge_state_in_place_v_overlapping": Case(
        lambda: fi_cupy.merge_state_in_place(S((8, 4, 64), strides=(0, 64, 1)), S((8, 4), F32), S((8, 4, 64)),
                                             S((8, 4), F32), stream=0), ValueError, "v", "must not overlap"),
    "merge_state_v_not_an_array": Case(lambda: fi_cupy.merge_state(None, None, None, None, stream=0), TypeError,
                                       "v_a", "got NoneType"),
    # Norms and activations.
    "rmsnorm_weight_of_another_size": Case(lambda: fi_cupy.rmsnorm(S((4, 256)), S((255,)), stream=0), ValueError,
                                           "weight", r"expected shape \(256\)"),
    "rmsnorm_int_input": Case(lambda: fi_cupy.rmsnorm(S((4, 256), I32), S((256,)), stream=0), TypeError, "input",
                              "int32 is not supported"),
    "rmsnorm_weight_strided": Case(lambda: fi_cupy.rmsnorm(S((4, 256)), S((256,), strides=(2,)), stream=0),
                                   ValueError, "weight", "last dim must be contiguous"),
    "rmsnorm_out_overlapping": Case(lambda: fi_cupy.rmsnorm(S((4, 256)), S((256,)), out=S((4, 256), strides=(0, 1)),
                                                            stream=0), ValueError, "out", "must not overlap"),
    "rmsnorm_out_dtype": Case(lambda: fi_cupy.rmsnorm(S((4, 256)), S((256,)), out=S((4, 256), F16), stream=0),
                              TypeError, "out", "float16 does not match the expected bfloat16"),
    "rmsnorm_eps_none": Case(lambda: fi_cupy.rmsnorm(S((4, 256)), S((256,)), eps=None, stream=0), TypeError, "eps"),
    "rmsnorm_input_on_host": Case(lambda: fi_cupy.rmsnorm(np.zeros((4, 256), np.float32), S((256,), F32), stream=0),
                                  ValueError, "input", "got one on CPU"),
    "rmsnorm_input_not_an_array": Case(lambda: fi_cupy.rmsnorm(None, S((256,)), stream=0), TypeError, "input"),
    "fused_add_rmsnorm_residual_of_another_shape": Case(
        lambda: fi_cupy.fused_add_rmsnorm(S((4, 256)), S((4, 128)), S((256,)), stream=0), ValueError, "residual",
        "expected shape"),
    "fused_add_rmsnorm_input_overlapping": Case(
        lambda: fi_cupy.fused_add_rmsnorm(S((4, 256), strides=(0, 1)), S((4, 256)), S((256,)), stream=0),
        ValueError, "input", "must not overlap"),
    "layernorm_beta_dtype": Case(lambda: fi_cupy.layernorm(S((4, 256)), S((256,), F32), S((256,)), stream=0),
                                 TypeError, "beta", "bfloat16 does not match"),
    "silu_and_mul_odd_last_dim": Case(lambda: fi_cupy.silu_and_mul(S((4, 255)), stream=0), ValueError, "input",
                                      "must be even"),
    "silu_and_mul_out_of_another_shape": Case(lambda: fi_cupy.silu_and_mul(S((4, 256)), out=S((4, 256)), stream=0),
                                              ValueError, "out", r"expected shape \(4, 128\)"),
    "silu_and_mul_out_overlapping": Case(lambda: fi_cupy.silu_and_mul(S((4, 256)), out=S((4, 128), strides=(64, 1)),
                                                                      stream=0), ValueError, "out", "must not overlap"),
    "gelu_and_mul_fp8": Case(lambda: fi_cupy.gelu_and_mul(S((4, 256), E4M3), stream=0), TypeError, "input"),
    # RoPE.
    "rope_pos_ids_short": Case(lambda: rope(positions=(S((5,), I32),)), ValueError,
                               "pos_ids", r"expected shape \(6\)"),
    "rope_pos_ids_float": Case(lambda: rope(positions=(S((6,), F32),)), TypeError,
                               "pos_ids", "float32 is not supported"),
    "rope_rotary_dim_odd": Case(lambda: rope(rotary_dim=33), ValueError, "rotary_dim", "must be even"),
    "rope_k_of_another_head_dim": Case(lambda: rope(k=S((6, 2, 32))), ValueError, "k", "must have q's"),
    "rope_q_2d": Case(lambda: rope(q=S((6, 64))), ValueError, "q", "expected 3 dims"),
    "rope_offsets_of_another_batch": Case(lambda: rope(fi_cupy.apply_rope, positions=(S((3,), I32), S((3,), I32))),
                                          ValueError, "offsets", r"expected shape \(2\)"),
    "rope_inplace_q_overlapping": Case(lambda: rope(fi_cupy.apply_rope_pos_ids_inplace, S((6, 8, 64),
                                                                                         strides=(0, 64, 1))),
                                       ValueError, "q", "must not overlap"),
    "rope_llama31_equal_factors": Case(lambda: rope(fi_cupy.apply_llama31_rope_pos_ids, low_freq_factor=4,
                                                    high_freq_factor=4), ValueError, "high_freq_factor"),
    "rope_cos_sin_cache_bf16": Case(lambda: cos_sin(cache=S((100, 64))), TypeError, "cos_sin_cache", "float32"),
    "rope_cos_sin_cache_rotary_dim_odd": Case(lambda: cos_sin(cache=S((100, 63), F32)), ValueError, "cos_sin_cache",
                                              "must be even"),
    "rope_query_not_a_multiple_of_head_size": Case(lambda: cos_sin(query=S((6, 500))), ValueError, "query",
                                                   "not a multiple of head_size 64"),
    "rope_head_size_zero": Case(lambda: cos_sin(head_size=0), ValueError, "head_size"),
    # Sampling.
    "top_p_above_one": Case(lambda: sampling.top_p_sampling_from_probs(PROBS, 1.5, stream=0), ValueError, "top_p",
                            r"\(0, 1\], got 1.5"),
    "top_p_zero": Case(lambda: sampling.top_p_renorm_probs(PROBS, 0.0, stream=0), ValueError, "top_p",
                       r"\(0, 1\], got 0.0"),
    "top_p_nan": Case(lambda: sampling.top_p_sampling_from_probs(PROBS, float("nan"), stream=0), ValueError, "top_p"),
    "top_p_array_bool": Case(lambda: sampling.top_p_sampling_from_probs(PROBS, S((4,), dt.bool_), stream=0), TypeError,
                             "top_p", "bool"),
    "top_k_array_of_another_length": Case(lambda: sampling.top_k_sampling_from_probs(PROBS, S((3,), I32), stream=0),
                                          ValueError, "top_k", r"expected shape \(4\)"),
    "top_k_array_fp8": Case(lambda: sampling.top_k_renorm_probs(PROBS, S((4,), E4M3), stream=0), TypeError, "top_k",
                            "float8_e4m3fn"),
    "top_k_float": Case(lambda: sampling.top_k_mask_logits(PROBS, 2.5, stream=0), TypeError, "top_k", "2.5"),
    "min_p_negative": Case(lambda: sampling.min_p_sampling_from_probs(PROBS, -0.1, stream=0), ValueError, "min_p",
                           r"\[0, 1\]"),
    "temperature_zero": Case(lambda: sampling.softmax(PROBS, temperature=0.0, stream=0), ValueError, "temperature"),
    "temperature_array_of_another_length": Case(lambda: sampling.softmax(PROBS, temperature=S((5,), F32), stream=0),
                                                ValueError, "temperature", r"expected shape \(4\)"),
    "filter_apply_order_unknown": Case(lambda: sampling.top_k_top_p_sampling_from_probs(PROBS, 5, 0.9,
                                                                                        filter_apply_order="x",
                                                                                        stream=0),
                                       ValueError, "filter_apply_order"),
    "probs_float64": Case(lambda: sampling.sampling_from_probs(S((4, 100), dt.float64), stream=0), TypeError, "probs"),
    "probs_3d": Case(lambda: sampling.sampling_from_probs(S((4, 2, 50), F32), stream=0), ValueError, "probs",
                     "expected 2 dims"),
    "indices_2d": Case(lambda: sampling.sampling_from_probs(PROBS, indices=S((2, 2), I32), stream=0), ValueError,
                       "indices", "expected 1 dims"),
    "seed_float": Case(lambda: sampling.sampling_from_probs(PROBS, seed=1.5, stream=0), TypeError, "seed", "1.5"),
    "generator_of_another_kind": Case(lambda: sampling.sampling_from_probs(PROBS, generator=object(), stream=0),
                                      TypeError, "generator"),
    "speculative_vocab_mismatch": Case(lambda: speculative(target_probs=S((2, 4, 99), F32)), ValueError,
                                       "target_probs", r"expected shape \(2, 4, 100\)"),
    "speculative_draft_ids_of_another_shape": Case(lambda: speculative(draft_token_ids=S((2, 2), I32)), ValueError,
                                                   "draft_token_ids", r"expected shape \(2, 3\)"),
    "speculative_draft_ids_float32": Case(lambda: speculative(draft_token_ids=S((2, 3), F32)), TypeError,
                                          "draft_token_ids", "float32"),
    # Mask packing.
    "packbits_bitorder_unknown": Case(lambda: fi_cupy.packbits(S((16,), dt.bool_), bitorder="middle", stream=0),
                                      ValueError, "bitorder"),
    "packbits_2d": Case(lambda: fi_cupy.packbits(S((4, 4), dt.bool_), stream=0), ValueError, "x", "expected 1 dims"),
    "packbits_float": Case(lambda: fi_cupy.packbits(S((16,), F32), stream=0), TypeError, "x", "got float32"),
    "segment_packbits_indptr_mismatch": Case(lambda: fi_cupy.segment_packbits(S((16,), dt.bool_), np.array([0, 5, 15]),
                                                                              stream=0),
                                             ValueError, "indptr", "x has 16 elements"),
    "segment_packbits_indptr_decreasing": Case(
        lambda: fi_cupy.segment_packbits(S((16,), dt.bool_), np.array([0, 9, 5, 16]), stream=0), ValueError,
        "indptr", "non-decreasing"),
}



# ---------------------------------------------------------------------------------------------
# GPU part: CuPy arrays (bfloat16 as ml_dtypes arrays: copied through their bits, never computed on).

HQ, HKV, D, PAGE = 8, 2, 64, 4


def _sync():
    cp.cuda.runtime.deviceSynchronize()  # every stream: an error of any earlier launch raises here


def _workspace(nbytes=32 << 20):
    return cp.empty(nbytes, dtype=cp.uint8)


def _cuda(a, dtype="int32"):
    return cp.asarray(np.asarray(a).astype(dtype))


def _expand(x, shape):
    """x broadcast to shape: a view whose elements share memory (stride 0), as torch's expand."""
    return cp.broadcast_to(x, shape)


def _indptr(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def _misaligned(t, elems=1):
    """A copy of t whose data starts `elems` elements past an aligned address."""
    flat = cp.empty(t.size + 64, dtype=t.dtype)
    out = flat[elems: elems + t.size].reshape(t.shape)  # a contiguous 1-D slice: reshape is a view
    bits(out)[...] = bits(t)
    return out


class PagedKV:
    """A small valid paged batch, NHD: shuffled pages with spares, request lengths kv_lens."""

    def __init__(self, kv_lens=(5, 17, 9), dtype="bfloat16", page_size=PAGE):
        self.kv_lens, self.page_size, self.dtype = list(kv_lens), page_size, dtype
        pages = [-(-n // page_size) for n in kv_lens]
        self.indptr = _indptr(pages)
        self.num_pages = int(self.indptr[-1]) + 3
        rng = np.random.default_rng(len(kv_lens))
        self.indices = rng.permutation(self.num_pages)[: self.indptr[-1]].astype(np.int32)
        self.last_page_len = np.array([n - (p - 1) * page_size if p else 0 for n, p in zip(kv_lens, pages)],
                                      np.int32)
        self.cache = rand((self.num_pages, 2, page_size, HKV, D), dtype)  # float8: its bytes (uint8)

    def kv(self, r):
        """(k, v) of request r, float64 (kv_len, HKV, D)."""
        ids = self.indices[self.indptr[r]: self.indptr[r + 1]]
        pages = f64(take(self.cache, ids), self.dtype)
        kv = pages.transpose(1, 0, 2, 3, 4).reshape(2, len(ids) * self.page_size, HKV, D)[:, : self.kv_lens[r]]
        return kv[0], kv[1]


def planned_decode(b=None, workspace=None, **plan):
    b = b or PagedKV()
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_or(workspace, _workspace()))
    with setup_may_launch():
        w.plan(b.indptr, b.indices, b.last_page_len, HQ, HKV, D, b.page_size, q_data_type="bfloat16",
               kv_data_type=b.dtype, **plan)
    return w, b, rand((len(b.kv_lens), HQ, D))


QO_LENS = (3, 1, 4)  # queries of PagedKV's three requests


def planned_prefill(b=None, workspace=None, **plan):
    b = b or PagedKV()
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_or(workspace, _workspace()))
    w.plan(_indptr(QO_LENS), b.indptr, b.indices, b.last_page_len, HQ, HKV, D, b.page_size, causal=True,
           q_data_type="bfloat16", kv_data_type=b.dtype, **plan)
    return w, b, rand((sum(QO_LENS), HQ, D))


def planned_ragged(kv_lens=(5, 17, 9)):
    w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(_workspace())
    w.plan(_indptr(QO_LENS), _indptr(kv_lens), HQ, HKV, D, causal=True, q_data_type="bfloat16")
    n = sum(kv_lens)
    return w, rand((sum(QO_LENS), HQ, D)), rand((n, HKV, D)), rand((n, HKV, D))


# The valid call of each op that must still be right after a refused bad call.

def valid_decode():
    w, b, q = planned_decode(PagedKV((5, 17, 0, 9)))
    out = nan_like(q)
    w.run(q, b.cache, out=out)
    ref = np.stack([reference.decode_attention(f64(q[r]), *b.kv(r))[0] for r in range(4)])
    assert_close(f64(out), ref, "bfloat16")


def valid_single_decode():
    q, k, v = rand((HQ, D)), rand((9, HKV, D)), rand((9, HKV, D))
    o, lse = fi_cupy.single_decode_with_kv_cache(q, k, v, return_lse=True)
    ro, rl = reference.decode_attention(f64(q), f64(k), f64(v))
    assert_close(f64(o), ro, "bfloat16")
    assert_lse_close(f64(lse), rl)


def _prefill_ref(q, kv_of):
    qo = _indptr(QO_LENS)
    return np.concatenate([reference.prefill_attention(f64(q[qo[r]: qo[r + 1]]), *kv_of(r), causal=True)[0]
                           for r in range(len(QO_LENS))])


def valid_prefill_paged():
    w, b, q = planned_prefill()
    out = nan_like(q)
    w.run(q, b.cache, out=out)
    assert_close(f64(out), _prefill_ref(q, b.kv), "bfloat16")


def valid_prefill_ragged():
    w, q, k, v = planned_ragged()
    out = nan_like(q)
    w.run(q, k, v, out=out)
    kv = _indptr((5, 17, 9))
    assert_close(f64(out), _prefill_ref(q, lambda r: (f64(k[kv[r]: kv[r + 1]]), f64(v[kv[r]: kv[r + 1]]))),
                 "bfloat16")


def valid_single_prefill():
    q, k, v = rand((4, HQ, D)), rand((9, HKV, D)), rand((9, HKV, D))
    o = fi_cupy.single_prefill_with_kv_cache(q, k, v, causal=True)
    assert_close(f64(o), reference.prefill_attention(f64(q), f64(k), f64(v), causal=True)[0], "bfloat16")


def valid_merge_state():
    va, vb = rand((7, 4, D), "float16"), rand((7, 4, D), "float16")
    sa, sb = rand((7, 4), "float32"), rand((7, 4), "float32")
    v, s = fi_cupy.merge_state(va, sa, vb, sb)
    rv, rs = reference.merge_state(f64(va), f64(sa), f64(vb), f64(sb))
    assert_close(f64(v), rv, "float16")
    assert_lse_close(f64(s), rs)


def valid_append():
    """Six tokens of one request over pages [2, 0]: token p lands in page [2, 0][p // 4], slot p % 4."""
    cache = cp.zeros((4, 2, PAGE, HKV, D), dtype=cp.uint16).view(BF16)  # +0.0 bits
    key, value = rand((6, HKV, D)), rand((6, HKV, D))
    fi_cupy.append_paged_kv_cache(key, value, _cuda(np.zeros(6)), _cuda(np.arange(6)), cache, _cuda([2, 0]),
                                  _cuda([0, 2]), _cuda([2]))
    c, k, v = cp.asnumpy(bits(cache)), cp.asnumpy(bits(key)), cp.asnumpy(bits(value))
    for p in range(6):
        page, slot = [2, 0][p // PAGE], p % PAGE
        assert np.array_equal(c[page, 0, slot], k[p]) and np.array_equal(c[page, 1, slot], v[p])
    assert not c[[1, 3]].any() and not c[0, :, 2:].any()  # untouched slots keep their zero bits


def valid_index_helpers():
    indptr, last = [0, 2, 2, 5], [3, 0, 1]
    assert fi_cupy.get_seq_lens(_cuda(indptr), _cuda(last), PAGE).tolist() == [7, 0, 9]
    bi, pos = fi_cupy.get_batch_indices_positions(_cuda([0, 2, 2, 3]), _cuda([7, 0, 9]), 3)
    assert bi.tolist() == [0, 0, 2] and pos.tolist() == [5, 6, 8]


def valid_rmsnorm():
    x, w = rand((5, 256)), rand((256,))
    assert_close(f64(fi_cupy.rmsnorm(x, w)), reference.rmsnorm(f64(x), f64(w)), "bfloat16")


def valid_silu_and_mul():
    x = rand((5, 256))
    assert_close(f64(fi_cupy.silu_and_mul(x)), reference.act_and_mul(f64(x), "silu"), "bfloat16")


def valid_rope():
    q, k, pos = rand((6, 4, D)), rand((6, 2, D)), np.arange(6) * 7
    qr, kr = fi_cupy.apply_rope_pos_ids(q, k, _cuda(pos))
    inv = reference.rope_inv_freq(D)
    assert_close(f64(qr), reference.rope(f64(q), pos, inv), "bfloat16")
    assert_close(f64(kr), reference.rope(f64(k), pos, inv), "bfloat16")


def _one_hot(tokens, vocab):
    p = np.zeros((len(tokens), vocab), np.float32)
    p[np.arange(len(tokens)), tokens] = 1.0
    return p


def valid_sampling():
    tokens = [3, 97, 0, 50]
    probs = _cuda(_one_hot(tokens, 100), "float32")
    assert sampling.top_k_top_p_sampling_from_probs(probs, 5, 0.9, seed=1).tolist() == tokens
    assert sampling.sampling_from_probs(probs, check_nan=True, seed=2).tolist() == tokens


def valid_speculative():
    """Drafts equal to the target are all accepted; the bonus token comes from the one-hot last row."""
    ids = np.array([[4, 9, 1], [0, 0, 7]], np.int32)
    bonus = [5, 2]
    draft = np.stack([_one_hot(r, 20) for r in ids])
    target = np.concatenate([draft, _one_hot(bonus, 20)[:, None]], axis=1)
    out, _, _ = sampling.chain_speculative_sampling(_cuda(draft, "float32"), _cuda(ids), _cuda(target, "float32"),
                                                    seed=3)
    assert out.tolist() == [[4, 9, 1, 5], [0, 0, 7, 2]]


def valid_packbits():
    x = np.random.default_rng(1).random(37) < 0.5
    assert fi_cupy.packbits(_cuda(x, "bool")).tolist() == np.packbits(x).tolist()


GPU_CASES: dict = {}


def gpu_case(exc, arg, says="", then=None, torch_caller=False):
    """Register the decorated function (its name is the case id) as a GPU case; torch_caller=True: a case
    about torch callers (interop), skipped without torch."""
    def register(fn):
        GPU_CASES[fn.__name__] = Case(fn, exc, arg, says, then, torch_caller)
        return fn
    return register


# Decode wrapper.

@gpu_case(ValueError, "q", r"expected shape \(3, 8, 64\).*got \(2, 8, 64\)", valid_decode)
def decode_run_q_of_another_batch_size():
    w, b, q = planned_decode()
    w.run(q[:2], b.cache)


@gpu_case(ValueError, "q", r"got \(3, 4, 64\)", valid_decode)
def decode_run_q_of_other_heads():
    w, b, q = planned_decode()
    w.run(q[:, :4], b.cache)


@gpu_case(ValueError, "q", r"got \(\)", valid_decode)
def decode_run_q_0d():
    w, b, q = planned_decode()
    w.run(q[0, 0, 0], b.cache)


@gpu_case(ValueError, "q", r"got \(1536,\)", valid_decode)
def decode_run_q_1d():
    w, b, q = planned_decode()
    w.run(q.reshape(-1), b.cache)


@gpu_case(TypeError, "q", "float16 does not match the planned q_data_type bfloat16", valid_decode)
def decode_run_q_of_another_dtype():
    w, b, q = planned_decode()
    w.run(rand(q.shape, "float16"), b.cache)


@gpu_case(ValueError, "q", "CUDA device, got one on CPU", valid_decode, torch_caller=True)
def decode_run_q_on_host_torch():
    w, b, q = planned_decode()
    w.run(torch.as_tensor(f64(q), dtype=torch.bfloat16), b.cache)


@gpu_case(ValueError, "q", "CUDA device, got one on CPU", valid_decode)
def decode_run_q_numpy():
    w, b, q = planned_decode()
    w.run(f64(q).astype(np.float32), b.cache)


@gpu_case(ValueError, "q", "16-byte aligned", valid_decode)
def decode_run_q_view_offset_by_one_element():
    w, b, q = planned_decode()
    w.run(_misaligned(q), b.cache)


@gpu_case(ValueError, "q", "last dim must be contiguous", valid_decode)
def decode_run_q_last_dim_strided():
    w, b, q = planned_decode()
    w.run(rand((3, HQ, 2 * D))[..., ::2], b.cache)


@gpu_case(ValueError, "q", "negative strides", valid_decode)
def decode_run_q_negative_strides_cupy():
    w, b, _ = planned_decode()
    w.run(cp.zeros((3, HQ, D), cp.float16)[::-1], b.cache)


@gpu_case(ValueError, "indices", r"page index 13 is out of range for a cache of 13 pages", valid_decode)
def decode_run_page_index_beyond_cache():
    b = PagedKV()
    b.indices[0] = b.num_pages
    w, _, q = planned_decode(b)
    w.run(q, b.cache)


@gpu_case(ValueError, "paged_kv_cache", r"\(8, 2, 64\) does not match the plan \(4, 2, 64\)", valid_decode)
def decode_run_page_size_of_another_cache():
    w, b, q = planned_decode()
    w.run(q, rand((b.num_pages, 2, 8, HKV, D)))


@gpu_case(TypeError, "paged_kv_cache", "float16 does not match the planned kv_data_type bfloat16", valid_decode)
def decode_run_cache_of_another_dtype():
    w, b, q = planned_decode()
    w.run(q, rand(b.cache.shape, "float16"))


@gpu_case(ValueError, "paged_kv_cache", "expected shape", valid_decode)
def decode_run_cache_4d():
    w, b, q = planned_decode()
    w.run(q, b.cache[:, 0])


@gpu_case(ValueError, "paged_kv_cache", "same shape, strides and dtype", valid_decode)
def decode_run_kv_pair_of_different_strides():
    w, b, q = planned_decode()
    w.run(q, (b.cache[:, 0], bits(b.cache[:, 1]).copy().view(BF16)))  # a contiguous copy of v


@gpu_case(ValueError, "paged_kv_cache", "got 3 items", valid_decode)
def decode_run_kv_tuple_of_three():
    w, b, q = planned_decode()
    w.run(q, (b.cache[:, 0], b.cache[:, 1], b.cache[:, 1]))


@gpu_case(ValueError, "paged_kv_cache", "16-byte aligned", valid_decode)
def decode_run_cache_view_offset_by_one_element():
    w, b, q = planned_decode()
    w.run(q, _misaligned(b.cache))


@gpu_case(ValueError, "paged_kv_cache", "CUDA device, got one on CPU", valid_decode)
def decode_run_cache_on_host():
    w, b, q = planned_decode()
    w.run(q, cp.asnumpy(b.cache))


@gpu_case(ValueError, "out", r"expected shape \(3, 8, 64\)", valid_decode)
def decode_run_out_of_another_shape():
    w, b, q = planned_decode()
    w.run(q, b.cache, out=rand((3, HQ, D + 16)))


@gpu_case(TypeError, "out", "float32 does not match q's dtype", valid_decode)
def decode_run_out_of_another_dtype():
    w, b, q = planned_decode()
    w.run(q, b.cache, out=rand((3, HQ, D), "float32"))


@gpu_case(ValueError, "out", "must not overlap", valid_decode)
def decode_run_out_expanded():
    w, b, q = planned_decode()
    w.run(q, b.cache, out=_expand(rand((1, HQ, D)), (3, HQ, D)))


@gpu_case(TypeError, "lse", "bfloat16 does not match the lse dtype", valid_decode)
def decode_run_lse_of_another_dtype():
    w, b, q = planned_decode()
    w.run(q, b.cache, lse=rand((3, HQ)), return_lse=True)


@gpu_case(ValueError, "lse", r"expected shape \(3, 8\)", valid_decode)
def decode_run_lse_of_another_shape():
    w, b, q = planned_decode()
    w.run(q, b.cache, lse=rand((3, HQ + 1), "float32"), return_lse=True)


@gpu_case(NotImplementedError, "window_left", "run\\(\\) got 5 but plan\\(\\) used -1", valid_decode)
def decode_run_window_left_of_another_plan():
    w, b, q = planned_decode()
    w.run(q, b.cache, window_left=5)


@gpu_case(TypeError, "k_scale", "got str", valid_decode)
def decode_run_k_scale_text():
    w, b, q = planned_decode()
    w.run(q, b.cache, k_scale="half")


# sinks (attention sinks): float32, (num_qo_heads,), on the device.

@gpu_case(TypeError, "sinks", "float16", valid_decode)
def decode_run_sinks_float16():
    w, b, q = planned_decode()
    w.run(q, b.cache, sinks=rand((HQ,), "float16"))


@gpu_case(ValueError, "sinks", r"expected shape \(8\)", valid_decode)
def decode_run_sinks_one_head_too_many():
    w, b, q = planned_decode()
    w.run(q, b.cache, sinks=rand((HQ + 1,), "float32"))


@gpu_case(TypeError, "sinks", "CUDA device, got one on CPU", valid_decode)
def decode_run_sinks_numpy():
    w, b, q = planned_decode()
    w.run(q, b.cache, sinks=np.zeros(HQ, np.float32))


@gpu_case(ValueError, "sinks", "must be contiguous", valid_decode)
def decode_run_sinks_every_other_element():
    w, b, q = planned_decode()
    w.run(q, b.cache, sinks=rand((2 * HQ,), "float32")[::2])


@gpu_case(ValueError, "float_workspace_buffer", "1024 bytes is too small", valid_decode)
def decode_plan_workspace_too_small():
    planned_decode(workspace=_workspace(1024))


@gpu_case(ValueError, "float_workspace_buffer", "16-byte aligned", valid_decode)
def decode_ctor_workspace_offset_by_one_byte():
    fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace()[1:])


@gpu_case(TypeError, "indptr", "float32 is not supported", valid_decode)
def decode_plan_device_indptr_float():
    b = PagedKV()
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace())
    w.plan(_cuda(b.indptr, "float32"), b.indices, b.last_page_len, HQ, HKV, D, PAGE, q_data_type="bfloat16")


@gpu_case(ValueError, "use_cuda_graph", "batch size must stay 3", valid_decode)
def decode_cuda_graph_plan_of_another_batch_size():
    b = PagedKV()
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_workspace(), use_cuda_graph=True)
    with setup_may_launch():
        w.plan(b.indptr, b.indices, b.last_page_len, HQ, HKV, D, PAGE, q_data_type="bfloat16")
    w.plan(b.indptr[:3], b.indices, b.last_page_len[:2], HQ, HKV, D, PAGE, q_data_type="bfloat16")


# Single decode.

@gpu_case(ValueError, "out", r"expected shape \(8, 64\)", valid_single_decode)
def single_decode_out_of_another_shape():
    fi_cupy.single_decode_with_kv_cache(rand((HQ, D)), rand((9, HKV, D)), rand((9, HKV, D)), out=rand((HQ, D + 16)))


@gpu_case(TypeError, "k", "float32 is not supported with q bfloat16", valid_single_decode)
def single_decode_kv_float32_tensors():
    fi_cupy.single_decode_with_kv_cache(rand((HQ, D)), rand((9, HKV, D), "float32"), rand((9, HKV, D), "float32"))


@gpu_case(ValueError, "q", "expected 2 dims", valid_single_decode)
def single_decode_q_with_a_batch_axis():
    fi_cupy.single_decode_with_kv_cache(rand((1, HQ, D)), rand((9, HKV, D)), rand((9, HKV, D)))


@gpu_case(ValueError, "num_qo_heads", r"\(6\) must be a multiple of num_kv_heads \(4\)", valid_single_decode)
def single_decode_heads_not_a_multiple():
    fi_cupy.single_decode_with_kv_cache(rand((6, D)), rand((9, 4, D)), rand((9, 4, D)))


# Prefill wrappers and single prefill.

@gpu_case(ValueError, "q", "n >= qo_indptr\\[-1\\] = 8.*got \\(7, 8, 64\\)", valid_prefill_paged)
def prefill_paged_run_q_fewer_rows_than_planned():
    w, b, q = planned_prefill()
    w.run(q[:7], b.cache)


@gpu_case(ValueError, "paged_kv_indices", "page index 13 is out of range for a cache of 13 pages",
          valid_prefill_paged)
def prefill_paged_run_page_index_beyond_cache():
    b = PagedKV()
    b.indices[-1] = b.num_pages
    w, _, q = planned_prefill(b)
    w.run(q, b.cache)


@gpu_case(ValueError, "paged_kv_cache", "does not match the plan", valid_prefill_paged)
def prefill_paged_run_page_size_of_another_cache():
    w, b, q = planned_prefill()
    w.run(q, rand((b.num_pages, 2, 8, HKV, D)))


@gpu_case(ValueError, "paged_kv_cache", "16-byte aligned", valid_prefill_paged)
def prefill_paged_run_fp8_cache_8_bytes_past_alignment():
    """The portable kernel copies 16 fp8 values at a time: an 8-byte aligned cache is not enough. The
    cache is float8 bytes (uint8), planned as float8_e4m3fn."""
    b = PagedKV(dtype="float8_e4m3fn")
    w, _, q = planned_prefill(b)
    raw = cp.empty(b.cache.size + 32, dtype=cp.uint8)
    shifted = raw[8: 8 + b.cache.size].reshape(b.cache.shape)
    shifted[...] = b.cache
    w.run(q, shifted)


@gpu_case(ValueError, "out", "must not overlap", valid_prefill_paged)
def prefill_paged_run_out_expanded():
    w, b, q = planned_prefill()
    w.run(q, b.cache, out=_expand(rand((1, HQ, D)), q.shape))


@gpu_case(TypeError, "paged_kv_cache", "float16 does not match the planned kv_data_type", valid_prefill_paged)
def prefill_paged_run_cache_of_another_dtype():
    w, b, q = planned_prefill()
    w.run(q, rand(b.cache.shape, "float16"))


@gpu_case(TypeError, "sinks", "float16", valid_prefill_paged)
def prefill_paged_run_sinks_float16():
    w, b, q = planned_prefill()
    w.run(q, b.cache, sinks=rand((HQ,), "float16"))


@gpu_case(ValueError, "sinks", r"expected shape \(8\)", valid_prefill_paged)
def prefill_paged_run_sinks_one_head_too_many():
    w, b, q = planned_prefill()
    w.run(q, b.cache, sinks=rand((HQ + 1,), "float32"))


@gpu_case(TypeError, "sinks", "CUDA device, got one on CPU", valid_prefill_paged)
def prefill_paged_run_sinks_numpy():
    w, b, q = planned_prefill()
    w.run(q, b.cache, sinks=np.zeros(HQ, np.float32))


@gpu_case(ValueError, "backend", "'fa3' .* does not support pos_encoding_mode ROPE_LLAMA", valid_prefill_paged)
def prefill_paged_plan_fa3_rope():
    """A GPU case: the Hopper kernel applies no RoPE on the fly (ALiBi it takes)."""
    b = PagedKV()
    w = fi_cupy.BatchPrefillWithPagedKVCacheWrapper(_workspace(), backend="fa3")
    w.plan(_indptr(QO_LENS), b.indptr, b.indices, b.last_page_len, HQ, HKV, D, b.page_size, causal=True,
           pos_encoding_mode="ROPE_LLAMA", q_data_type="bfloat16")


@gpu_case(ValueError, "backend", "'fa3' .* does not support pos_encoding_mode ROPE_LLAMA", valid_prefill_ragged)
def prefill_ragged_plan_fa3_rope():
    w = fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(_workspace(), backend="fa3")
    w.plan(_indptr(QO_LENS), _indptr((5, 17, 9)), HQ, HKV, D, causal=True, pos_encoding_mode="ROPE_LLAMA",
           q_data_type="bfloat16")


@gpu_case(ValueError, "float_workspace_buffer", "too small", valid_prefill_paged)
def prefill_paged_plan_workspace_too_small():
    planned_prefill(workspace=_workspace(64))  # the plan's metadata alone is larger


@gpu_case(ValueError, "custom_mask", "expected 68 elements", valid_prefill_paged)
def prefill_paged_plan_custom_mask_of_another_size():
    planned_prefill(custom_mask=_cuda(np.ones(100), "bool"))


@gpu_case(TypeError, "custom_mask", "float32 is not supported", valid_prefill_paged)
def prefill_paged_plan_custom_mask_float():
    planned_prefill(custom_mask=_cuda(np.ones(68), "float32"))


@gpu_case(ValueError, "k", r"has 30 rows but kv_indptr\[-1\] is 31", valid_prefill_ragged)
def prefill_ragged_run_k_shorter_than_planned():
    w, q, k, v = planned_ragged()
    w.run(q, k[:30], v[:30])


@gpu_case(ValueError, "v", "must match k in shape, dtype and strides", valid_prefill_ragged)
def prefill_ragged_run_v_of_other_strides():
    w, q, k, _ = planned_ragged()
    w.run(q, k, rand((31, HKV, 2 * D))[..., :D])


@gpu_case(TypeError, "k", "float16 does not match the planned kv_data_type bfloat16", valid_prefill_ragged)
def prefill_ragged_run_k_of_another_dtype():
    w, q, k, v = planned_ragged()
    w.run(q, rand(k.shape, "float16"), rand(v.shape, "float16"))


@gpu_case(ValueError, "q", "16-byte aligned", valid_single_prefill)
def single_prefill_q_view_offset_by_one_element():
    fi_cupy.single_prefill_with_kv_cache(_misaligned(rand((4, HQ, D))), rand((9, HKV, D)), rand((9, HKV, D)))


@gpu_case(ValueError, "q", "last dim must be contiguous", valid_single_prefill)
def single_prefill_q_every_other_element():
    fi_cupy.single_prefill_with_kv_cache(rand((4, HQ, 2 * D))[..., ::2], rand((9, HKV, D)), rand((9, HKV, D)))


@gpu_case(ValueError, "custom_mask", r"expected shape \(4, 9\)", valid_single_prefill)
def single_prefill_custom_mask_transposed():
    fi_cupy.single_prefill_with_kv_cache(rand((4, HQ, D)), rand((9, HKV, D)), rand((9, HKV, D)),
                                         custom_mask=_cuda(np.ones((9, 4)), "bool"))


@gpu_case(TypeError, "custom_mask", "float32 is not supported", valid_single_prefill)
def single_prefill_custom_mask_float():
    fi_cupy.single_prefill_with_kv_cache(rand((4, HQ, D)), rand((9, HKV, D)), rand((9, HKV, D)),
                                         custom_mask=_cuda(np.ones((4, 9)), "float32"))


@gpu_case(ValueError, "v", "dtype", valid_single_prefill, torch_caller=True)
def single_prefill_fp8_kv_of_two_kinds():
    """float8 K/V take their kind from the arrays' dtype (torch has them, CuPy has not): k and v must agree."""
    k = torch.randn((9, HKV, D), device="cuda").to(torch.float8_e4m3fn)
    fi_cupy.single_prefill_with_kv_cache(rand((4, HQ, D)), k, k.to(torch.float8_e5m2))


@gpu_case(ValueError, "backend", "does not support head_dim 256", valid_single_prefill)
def single_prefill_fa3_head_dim_256():
    fi_cupy.single_prefill_with_kv_cache(rand((4, HQ, 256)), rand((9, HKV, 256)), rand((9, HKV, 256)), backend="fa3")


@gpu_case(TypeError, "out", "float16 does not match q's dtype", valid_single_prefill)
def single_prefill_out_of_another_dtype():
    fi_cupy.single_prefill_with_kv_cache(rand((4, HQ, D)), rand((9, HKV, D)), rand((9, HKV, D)),
                                         out=rand((4, HQ, D), "float16"))


# Cascade merges.

@gpu_case(ValueError, "s_a", "CUDA device, got one on CPU", valid_merge_state)
def merge_state_lse_on_host():
    fi_cupy.merge_state(rand((7, 4, D)), cp.asnumpy(rand((7, 4), "float32")), rand((7, 4, D)),
                        rand((7, 4), "float32"))


@gpu_case(ValueError, "v", "must not overlap", valid_merge_state)
def merge_state_in_place_v_expanded():
    fi_cupy.merge_state_in_place(_expand(rand((1, 4, D)), (7, 4, D)), rand((7, 4), "float32"), rand((7, 4, D)),
                                 rand((7, 4), "float32"))


# Paged KV append (index arrays checked on the host with check=True) and its helpers.

def _append(key_rows=1, **change):
    """Append into request 0 or 1 of a two-request table (lengths 5 and 3, page size 4)."""
    a = dict(append_key=rand((key_rows, HKV, D)), append_value=rand((key_rows, HKV, D)),
             batch_indices=_cuda([1] * key_rows), positions=_cuda([0] * key_rows),
             paged_kv_cache=rand((6, 2, PAGE, HKV, D)), kv_indices=_cuda([4, 1, 2]), kv_indptr=_cuda([0, 2, 3]),
             kv_last_page_len=_cuda([1, 3]))
    fi_cupy.append_paged_kv_cache(**{**a, **change})


@gpu_case(ValueError, "positions", r"position 3, outside \[0, 3\)", valid_append)
def append_position_beyond_the_request():
    _append(positions=_cuda([3]))


@gpu_case(ValueError, "kv_indices", "page index 6 is out of range for a cache of 6 pages", valid_append)
def append_page_index_beyond_cache():
    _append(kv_indices=_cuda([4, 6, 2]))


@gpu_case(ValueError, "batch_indices", r"\[0, batch_size=2\)", valid_append)
def append_batch_index_beyond_batch():
    _append(batch_indices=_cuda([2]))


@gpu_case(ValueError, "kv_last_page_len", r"\[1, page_size=4\]", valid_append)
def append_last_page_len_over_page_size():
    _append(kv_last_page_len=_cuda([5, 3]))


@gpu_case(ValueError, "paged_kv_cache", "must not overlap", valid_append)
def append_cache_expanded():
    _append(paged_kv_cache=_expand(rand((1, 2, PAGE, HKV, D)), (6, 2, PAGE, HKV, D)))


@gpu_case(ValueError, "kv_indptr", "CUDA device, got one on CPU", valid_index_helpers)
def get_seq_lens_indptr_numpy():
    fi_cupy.get_seq_lens(np.array([0, 2, 3], np.int32), _cuda([1, 3]), PAGE)


@gpu_case(ValueError, "seq_lens", "expected 2 entries", valid_index_helpers)
def batch_indices_positions_seq_lens_too_long():
    fi_cupy.get_batch_indices_positions(_cuda([0, 1, 3]), _cuda([4, 4, 4]), 3)


# Norms and activations.

@gpu_case(ValueError, "input", "CUDA device, got one on CPU", valid_rmsnorm, torch_caller=True)
def rmsnorm_input_on_host_torch():
    fi_cupy.rmsnorm(torch.as_tensor(f64(rand((5, 256))), dtype=torch.bfloat16), rand((256,)))


@gpu_case(ValueError, "weight", "last dim must be contiguous", valid_rmsnorm)
def rmsnorm_weight_every_other_element():
    fi_cupy.rmsnorm(rand((5, 256)), rand((512,))[::2])


@gpu_case(ValueError, "out", "must not overlap", valid_rmsnorm)
def rmsnorm_out_expanded():
    fi_cupy.rmsnorm(rand((5, 256)), rand((256,)), out=_expand(rand((1, 256)), (5, 256)))


@gpu_case(ValueError, "residual", "must not overlap", valid_rmsnorm)
def fused_add_rmsnorm_residual_expanded():
    fi_cupy.fused_add_rmsnorm(rand((5, 256)), _expand(rand((1, 256)), (5, 256)), rand((256,)))


@gpu_case(ValueError, "out", "must not overlap", valid_silu_and_mul)
def silu_and_mul_out_expanded():
    fi_cupy.silu_and_mul(rand((5, 256)), out=_expand(rand((1, 128)), (5, 128)))


@gpu_case(ValueError, "input", "CUDA device, got one on CPU", valid_silu_and_mul)
def silu_and_mul_input_numpy():
    fi_cupy.silu_and_mul(np.zeros((5, 256), np.float32))


# RoPE.

@gpu_case(ValueError, "q", "must not overlap", valid_rope)
def rope_inplace_q_expanded():
    fi_cupy.apply_rope_pos_ids_inplace(_expand(rand((1, 4, D)), (6, 4, D)), rand((6, 2, D)), _cuda(np.arange(6)))


@gpu_case(ValueError, "pos_ids", "CUDA device, got one on CPU", valid_rope)
def rope_pos_ids_on_host():
    fi_cupy.apply_rope_pos_ids(rand((6, 4, D)), rand((6, 2, D)), np.arange(6, dtype=np.int32))


@gpu_case(ValueError, "q", "interleave=True needs pointers and strides aligned", valid_rope)
def rope_interleave_q_offset_by_one_element():
    fi_cupy.apply_rope_pos_ids(_misaligned(rand((6, 4, D))), rand((6, 2, D)), _cuda(np.arange(6)), interleave=True)


# Sampling.

def _probs(batch=4, vocab=100):
    return _cuda(_one_hot(np.arange(batch) * 7, vocab), "float32")


@gpu_case(ValueError, "probs", "contains NaN", valid_sampling)
def sampling_nan_probs_with_check_nan():
    p = _probs()
    p[2, 5] = float("nan")
    sampling.top_p_sampling_from_probs(p, 0.9, check_nan=True)


@gpu_case(ValueError, "logits", "contains NaN", valid_sampling)
def sampling_from_logits_nan_with_check_nan():
    x = _probs()
    x[0, 0] = float("nan")
    sampling.sampling_from_logits(x, check_nan=True)


@gpu_case(ValueError, "indices", r"\[0, 4\).*got 0\.\.4", valid_sampling)
def sampling_indices_beyond_rows():
    sampling.sampling_from_probs(_probs(), indices=_cuda([0, 4, 1]))


@gpu_case(ValueError, "top_p", r"\(0, 1\]", valid_sampling)
def sampling_top_p_array_entry_above_one():
    sampling.top_p_sampling_from_probs(_probs(), _cuda([0.5, 1.5, 0.9, 1.0], "float32"))


@gpu_case(ValueError, "top_k", r"expected shape \(4\)", valid_sampling)
def sampling_top_k_array_of_another_length():
    sampling.top_k_sampling_from_probs(_probs(), _cuda([5, 5, 5]))


@gpu_case(ValueError, "seed", r"expected length 1 or batch_size \(4\), got 3", valid_sampling)
def sampling_seed_array_of_another_length():
    sampling.sampling_from_probs(_probs(), seed=_cuda([1, 2, 3], "int64"))


@gpu_case(ValueError, "probs", "CUDA device, got one on CPU", valid_sampling)
def sampling_probs_on_host():
    sampling.top_k_renorm_probs(cp.asnumpy(_probs()), 5)


@gpu_case(ValueError, "draft_token_ids", r"\[0, 20\), got 0\.\.20", valid_speculative)
def speculative_draft_id_beyond_vocab():
    draft = _cuda(np.full((2, 3, 20), 0.05), "float32")
    sampling.chain_speculative_sampling(draft, _cuda([[1, 2, 20], [0, 0, 0]]), _cuda(np.full((2, 4, 20), 0.05),
                                                                                     "float32"))


@gpu_case(ValueError, "target_probs", r"expected shape \(2, 4, 20\)", valid_speculative)
def speculative_target_of_another_vocab():
    sampling.chain_speculative_sampling(_cuda(np.full((2, 3, 20), 0.05), "float32"), _cuda(np.zeros((2, 3))),
                                        _cuda(np.full((2, 4, 21), 0.05), "float32"))


@gpu_case(TypeError, "maybe_output_accepted_token_num", "int64 is not supported", valid_speculative)
def speculative_counter_int64():
    sampling.chain_speculative_sampling(_cuda(np.full((2, 3, 20), 0.05), "float32"), _cuda(np.zeros((2, 3))),
                                        _cuda(np.full((2, 4, 20), 0.05), "float32"), _cuda([0, 0], "int64"))


# Mask packing.

@gpu_case(ValueError, "x", "CUDA device, got one on CPU", valid_packbits, torch_caller=True)
def packbits_on_host_torch():
    fi_cupy.packbits(torch.ones(16, dtype=torch.bool))


@gpu_case(ValueError, "indptr", "x has 16 elements", valid_packbits)
def segment_packbits_indptr_past_x():
    fi_cupy.segment_packbits(_cuda(np.ones(16), "bool"), _cuda([0, 5, 17]))


@pytest.mark.gpu
@pytest.mark.parametrize("name", [pytest.param(n, marks=needs_torch) if c.torch_caller else n
                                  for n, c in GPU_CASES.items()])
def test_gpu_bad_input(name, monkeypatch):
    case = GPU_CASES[name]
    _raises_naming(case, monkeypatch)
    case.then()  # the same op on valid input: nothing ran on bad memory
    _sync()


@pytest.mark.gpu
def test_rope_position_beyond_cos_sin_cache_gives_nan_rows_only():
    """Not refused (positions are device data: a check would sync every call), but safe: the kernel
    never reads outside the cache and writes NaN rows for those tokens; the others are right."""
    inv = reference.rope_inv_freq(D)
    ang = np.arange(16, dtype=np.float32)[:, None] * inv[None, :]
    cs = np.concatenate([np.cos(ang), np.sin(ang)], axis=1)
    cache = _cuda(cs, "float32")
    q, k, pos = rand((4, 2, D), "float32"), rand((4, 1, D), "float32"), np.array([0, 16, 5, 1 << 20])
    qo, ko = fi_cupy.apply_rope_with_cos_sin_cache(_cuda(pos, "int64"), q, k, D, cache)
    qo, ko = f64(qo), f64(ko)
    assert np.isnan(qo[[1, 3]]).all() and np.isnan(ko[[1, 3]]).all()
    ok = [0, 2]
    assert_close(qo[ok], reference.rope(f64(q)[ok], pos[ok], cos_sin=cs), "float32")
    valid_rope()
    _sync()


@pytest.mark.parametrize("name", list(CPU_CASES))
def test_cpu_bad_input(name, monkeypatch):
    _raises_naming(CPU_CASES[name], monkeypatch)


def test_sweep_covers_at_least_60_kinds():
    assert len(CPU_CASES) + len(GPU_CASES) >= 60 and not set(CPU_CASES) & set(GPU_CASES)
