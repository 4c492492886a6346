"""FlashInfer's public signatures (CPU): every parameter that FlashInfer 0.7.2 documents for the names
fi_cupy exports (plus fast_decode_plan and CUDAGraphBatchDecodeWithPagedKVCacheWrapper) binds to
fi_cupy's signature by name, with FlashInfer's default and, where FlashInfer takes it positionally,
at the same position; no signature swallows unknown keywords; and every argument we accept but cannot
honour raises NotImplementedError naming it.

tests/data/flashinfer_api.json is ../shared/flashinfer_api.json, the transcription of FlashInfer 0.7.2's
signatures that issue 20 names as the specification (parameters FlashInfer hides behind *args /
**kwargs are taken from its docstrings and marked doc_only: name only, no position, no default).
"""
import ast
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest

import fi_cupy
from fi_cupy import decode
from test_bad_inputs import DECODE_PLAN, PAGED_PLAN, RAGGED_PLAN, WS, S, _tripwire

SPEC = json.loads((Path(__file__).parent / "data" / "flashinfer_api.json").read_text())
API = SPEC["api"]
EXTRA = ("fast_decode_plan", "CUDAGraphBatchDecodeWithPagedKVCacheWrapper")
SCOPE = sorted(n for n in API if n in fi_cupy.__all__ or n in EXTRA)
# FlashInfer's legacy positional order after page_size in BatchDecodeWithPagedKVCacheWrapper.plan
# (its *deprecated_positional_args; _BATCH_DECODE_PLAN_LEGACY_POS_ARGS in flashinfer/decode.py).
DECODE_PLAN_LEGACY = ("pos_encoding_mode", "window_left", "logits_soft_cap", "q_data_type", "kv_data_type",
                      "o_data_type", "data_type", "sm_scale", "rope_scale", "rope_theta", "non_blocking",
                      "block_tables", "seq_lens", "fixed_split_size", "disable_split_kv", "q_len_per_req")


def _entries():
    """(name, method or None, FlashInfer's parameter list or an alias dict, our callable)."""
    for name in SCOPE:
        e, ours = API[name], getattr(fi_cupy, name, None)
        if e.get("class"):
            for m, params in e["methods"].items():
                yield name, m, params, ours
        else:
            yield name, None, e["params"], ours


ENTRIES = list(_entries())
IDS = [f"{n}.{m}" if m else n for n, m, _, _ in ENTRIES]


def _default(text):
    """FlashInfer's default as a Python value, or a marker when it is not a literal (torch.bfloat16)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return inspect.Parameter.empty


def _our_params(ours, method):
    fn = ours if method is None else getattr(ours, method)
    if method == "__init__" or method is None:
        fn = ours.__init__ if isinstance(ours, type) else ours
    return inspect.signature(fn).parameters


def test_scope_is_what_the_issue_names():
    assert set(EXTRA) <= set(SCOPE)
    assert len(SCOPE) >= 40, SCOPE


@pytest.mark.parametrize("name,method,params,ours", ENTRIES, ids=IDS)
def test_every_flashinfer_parameter_binds_by_name(name, method, params, ours):
    assert ours is not None, f"fi_cupy does not export {name}"
    if isinstance(params, dict):  # an alias: the same function under FlashInfer's other name
        assert getattr(ours, method) is getattr(ours, params["alias_of"])
        return
    if not params:  # a property or a method without arguments
        assert hasattr(ours, method), f"{name} has no {method}"
        return
    sig = _our_params(ours, method)
    assert not any(p.kind is p.VAR_KEYWORD for p in sig.values()), f"{name}.{method} swallows unknown keywords"
    names = [p["name"] for p in params if not p["name"].startswith("*")]
    missing = [n for n in names if n not in sig]
    assert not missing, f"{name}.{method or ''} lacks FlashInfer's {missing}"
    for p in params:
        if p["name"].startswith("*") or p.get("doc_only") or p.get("default") is None:
            continue
        want = _default(p["default"])
        if want is not inspect.Parameter.empty:
            got = sig[p["name"]].default
            assert got == want and type(got) is type(want), \
                f"{name}.{method or ''}({p['name']}): default {got!r}, FlashInfer's is {want!r}"


@pytest.mark.parametrize("name,method,params,ours", ENTRIES, ids=IDS)
def test_positional_order_matches(name, method, params, ours):
    """FlashInfer's positional parameters (those before its *args or keyword-only ones) come in the same
    order in ours, so a positional call binds each value to the same name."""
    if isinstance(params, dict) or not params:
        return
    sig = [p for p in _our_params(ours, method).values() if p.name != "self"]  # fast_decode_plan's wrapper too
    positional = []
    for p in params:
        if p["name"].startswith("*") or p.get("kwonly") or p.get("doc_only"):
            break
        positional.append(p["name"])
    if (name, method) == ("BatchDecodeWithPagedKVCacheWrapper", "plan"):
        positional += DECODE_PLAN_LEGACY
    ours_pos = [p.name for p in sig if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert ours_pos[:len(positional)] == positional


def test_accepted_of_all():
    """The figure the closing note gives: FlashInfer parameters (and method names) fi_cupy accepts."""
    total = accepted = 0
    for name, method, params, ours in ENTRIES:
        if isinstance(params, dict) or not params:
            total += 1
            accepted += hasattr(ours, method)
            continue
        sig = _our_params(ours, method)
        for p in params:
            if not p["name"].startswith("*"):
                total += 1
                accepted += p["name"] in sig
    print(f"accepted {accepted} of {total} FlashInfer parameters over {len(SCOPE)} names")
    assert accepted == total


def test_misspelt_keyword_is_a_type_error_naming_it():
    w = decode.BatchDecodeWithPagedKVCacheWrapper(WS)
    calls = [lambda: w.plan(**DECODE_PLAN, windw_left=3),
             lambda: fi_cupy.BatchPrefillWithPagedKVCacheWrapper(WS, backend="fa2").plan(**PAGED_PLAN, casual=True),
             lambda: fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(WS, backend="fa2").plan(**RAGGED_PLAN, casual=1),
             lambda: fi_cupy.BatchPrefillWithPagedKVCacheWrapper(WS, qo_indptr_buff=None),
             lambda: fi_cupy.rmsnorm(S((2, 64)), S((64,)), epsilon=1e-5),
             lambda: fi_cupy.top_k_sampling_from_probs(S((2, 64)), 3, determinstic=True)]
    for call in calls:
        with pytest.raises(TypeError, match=r"unexpected keyword argument '(windw_left|casual|qo_indptr_buff|epsilon"
                                            r"|determinstic)'"):
            call()


def _decode_run(**kw):
    decode.BatchDecodeWithPagedKVCacheWrapper(WS).run(S((2, 8, 64)), S((4, 2, 16, 2, 64)), **kw)


def _paged_run(**kw):
    fi_cupy.BatchPrefillWithPagedKVCacheWrapper(WS, backend="fa2").run(S((6, 8, 64)), S((4, 2, 16, 2, 64)), **kw)


def _ragged_run(**kw):
    fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(WS, backend="fa2").run(S((6, 8, 64)), S((35, 2, 64)),
                                                                       S((35, 2, 64)), **kw)


def _decode_plan(**kw):
    decode.BatchDecodeWithPagedKVCacheWrapper(WS).plan(**{**DECODE_PLAN, **kw}, stream=0)


def _paged_plan(**kw):
    fi_cupy.BatchPrefillWithPagedKVCacheWrapper(WS, backend="fa2").plan(**{**PAGED_PLAN, **kw}, stream=0)


def _ragged_plan(**kw):
    fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(WS, backend="fa2").plan(**{**RAGGED_PLAN, **kw}, stream=0)


def _single_prefill(**kw):
    fi_cupy.single_prefill_with_kv_cache(S((5, 8, 64)), S((9, 2, 64)), S((9, 2, 64)), stream=0, **kw)


# FlashInfer's jit_args tuple of a variant compiled with use_logits_soft_cap=True (the variant owns the logits).
JIT_SOFT_CAP = ("uri", "float16", "float16", "float16", "int32", 64, 64, [], [], [], [], "V",
                "struct V : AttentionVariantBase {};", 0, False, True)

# Every NotImplementedError path for a FlashInfer argument: (call, the argument it names).
NOT_IMPLEMENTED = {
    "decode_backend_trtllm": (lambda: decode.BatchDecodeWithPagedKVCacheWrapper(WS, backend="trtllm-gen"), "backend"),
    "decode_jit_args": (lambda: decode.BatchDecodeWithPagedKVCacheWrapper(WS, jit_args=JIT_SOFT_CAP), "jit_args"),
    "decode_plan_o_data_type": (lambda: _decode_plan(o_data_type="float32"), "o_data_type"),
    "decode_plan_window_right": (lambda: _decode_plan(window_right=5), "window_right"),
    "decode_run_skip_softmax": (lambda: _decode_run(skip_softmax_threshold_scale_factor=0.5),
                                "skip_softmax_threshold_scale_factor"),
    "decode_run_kv_cache_sf": (lambda: _decode_run(kv_cache_sf=S((4,))), "kv_cache_sf"),
    "prefill_backend_cudnn": (lambda: fi_cupy.BatchPrefillWithPagedKVCacheWrapper(WS, backend="cudnn"), "backend"),
    "prefill_jit_kwargs": (lambda: fi_cupy.BatchPrefillWithPagedKVCacheWrapper(WS, jit_kwargs={"a": 1}), "jit_kwargs"),
    "prefill_variant_owns_mask": (lambda: fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(WS, variant_owns_mask=True),
                                  "variant_owns_mask"),
    "prefill_jit_args": (lambda: fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(WS, jit_args=JIT_SOFT_CAP), "jit_args"),
    "paged_plan_head_dim_vo": (lambda: _paged_plan(head_dim_vo=128), "head_dim_vo"),
    "paged_plan_o_data_type": (lambda: _paged_plan(o_data_type="bfloat16"), "o_data_type"),
    "paged_plan_block_tables_and_indptr": (lambda: _paged_plan(block_tables=np.zeros((2, 2), np.int32),
                                                               seq_lens=np.array([35, 16])), "block_tables"),
    "paged_plan_max_item_len_alone": (lambda: _paged_plan(max_item_len_ptr=np.array([3, 3])), "max_item_len_ptr"),
    "ragged_plan_v_indptr": (lambda: _ragged_plan(v_indptr=np.array([0, 20, 35])), "v_indptr"),
    "ragged_plan_o_indptr": (lambda: _ragged_plan(o_indptr=np.array([0, 4, 6])), "o_indptr"),
    "paged_run_lse_base": (lambda: _paged_run(lse_base="e"), "lse_base"),
    "paged_run_lse_layout": (lambda: _paged_run(lse_layout="HN"), "lse_layout"),
    "paged_run_kv_cache_sf": (lambda: _paged_run(kv_cache_sf=S((4,))), "kv_cache_sf"),
    "paged_run_skip_softmax": (lambda: _paged_run(skip_softmax_threshold_scale_factor=1.0),
                               "skip_softmax_threshold_scale_factor"),
    "paged_run_fp16_softmax": (lambda: _paged_run(use_fp16_softmax=True), "use_fp16_softmax"),
    "paged_run_spcompress": (lambda: _paged_run(uses_spcompress=True), "uses_spcompress"),
    "ragged_run_o_scale": (lambda: _ragged_run(o_scale=0.5), "o_scale"),
    "ragged_run_lse_base": (lambda: _ragged_run(lse_base="e"), "lse_base"),
    "single_prefill_scale_q": (lambda: _single_prefill(scale_q=S((8,))), "scale_q"),
    "single_prefill_scale_k": (lambda: _single_prefill(scale_k=S((2,))), "scale_k"),
    "single_prefill_scale_v": (lambda: _single_prefill(scale_v=S((2,))), "scale_v"),
    "single_prefill_kv_cache_sf": (lambda: _single_prefill(kv_cache_sf=S((2,))), "kv_cache_sf"),
    "single_prefill_o_dtype": (lambda: _single_prefill(o_dtype="float32"), "o_dtype"),
}


@pytest.mark.parametrize("case", sorted(NOT_IMPLEMENTED))
def test_not_implemented_names_the_argument(case, monkeypatch):
    call, arg = NOT_IMPLEMENTED[case]
    monkeypatch.setattr(fi_cupy._core.kernels, "launch", _tripwire)
    with pytest.raises(NotImplementedError) as err:
        call()
    assert re.match(rf"{re.escape(arg)}(?!\w)", str(err.value)), str(err.value)


def test_neutral_values_of_unsupported_arguments_are_accepted():
    """FlashInfer's defaults (and values that ask for nothing) pass the checks: the calls below fail
    later, on the CPU, at the first device work or for having no plan, not on these arguments."""
    with pytest.raises(RuntimeError, match="before plan"):
        _paged_run(lse_base="log2", lse_layout="NH", use_fp16_softmax=False, uses_spcompress=None, sinks=None)
    with pytest.raises(RuntimeError, match="before plan"):
        _ragged_run(o_scale=1.0, kv_cache_sf=None)
    with pytest.raises(RuntimeError, match="before plan"):
        _decode_run(sinks=None, kv_cache_sf=None, skip_softmax_threshold_scale_factor=None)
