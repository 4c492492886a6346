"""Custom attention variants without a GPU: every example of examples/attention_variants.py compiles with
NVRTC for sm_80 and sm_90a into the tile plan() picks (widths 64, 128 and 256), without spills at 64 and
128; a variant with an error names the user's own lines; FlashInfer's jit_args and module makers are
read as FlashInfer defines them; the generated parameter struct's layout; the options a variant owns
are refused."""
import ctypes

import numpy as np
import pytest

import fi_cupy
from fi_cupy import decode, prefill
from fi_cupy._core import compile as cc
from fi_cupy._core import dtypes as dt
from fi_cupy.variant import AttentionVariant, from_jit_args
from attention_variants import DOC_MASK, EXAMPLES, KEY_SCALE, SIGMOID, TEMPERATURE


def _program(variant, d, kv_dtype=dt.bfloat16, rows=1000):
    params = prefill.make_params(8, 2, d, None, True, "NONE", -1, None, None, None, None, "bfloat16", kv_dtype,
                                 True, 16, variant=variant)
    tile, flags = prefill.plan_tile(params, np.array([rows // 4]), False, "auto")
    return prefill.prefill_program(d, tile, params.q_dtype, kv_dtype, True, False, flags, d, variant), tile


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_compile(name, arch):
    for d in (64, 128, 256):
        prog, tile = _program(EXAMPLES[name], d)
        assert not tile.sm90  # variants run on the portable kernel
        got = prog.compile(arch)
        usage = cc.resource_usage(got.log)
        main = got.lowered[prog.kernels[0].name_expr]
        assert main in usage, f"no ptxas report for {main}"
        if d <= 128:
            assert usage[main]["spill_stores"] == 0, f"{name} d{d} {arch}: {usage[main]}"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_compile_decode(name, arch):
    """Every example in the tensor-core decode kernel at groups 1, 4 and 8 and head dims 64 / 128 / 256, no
    spills; fp8 KV and head_dim 512 are not that kernel's (decode runs those variants on the prefill kernel)."""
    for d, group in ((64, 1), (128, 4), (128, 8), (256, 8)):
        params = decode.make_params(2 * group, 2, d, 16, "NONE", -1, None, "bfloat16", None, None, None, None,
                                    EXAMPLES[name])
        assert decode.takes_variant(params, params.kv_dtype)
        prog, _ = decode.decode_variant(params, params.kv_dtype)
        got = prog.compile(arch)
        main = got.lowered[prog.kernels[0].name_expr]
        usage = cc.resource_usage(got.log)[main]
        assert usage["spill_stores"] == 0, f"{name} d{d} group {group} {arch}: {usage}"
    fp8 = decode.make_params(8, 2, 128, 16, "NONE", -1, None, "bfloat16", "float8_e4m3fn", None, None, None,
                             EXAMPLES[name])
    wide = decode.make_params(8, 2, 512, 16, "NONE", -1, None, "bfloat16", None, None, None, None, EXAMPLES[name])
    assert not decode.takes_variant(fp8, fp8.kv_dtype) and not decode.takes_variant(wide, wide.kv_dtype)


def test_decode_split_rule():
    """A decode plan cuts KV ranges (merged by their lse) only for softmax variants without an
    OutputTransform; the options a variant owns are refused at plan."""
    gate = AttentionVariant("G", "struct G : AttentionVariantBase {\n REGISTER_OUTPUT_TRANSFORM(params, output, "
                                 "batch_idx, qo_idx, qo_head_idx, m, d, scale, { return output; })\n};")
    assert decode.variant_split(EXAMPLES["softmax"], None) is None and decode.variant_split(DOC_MASK, 64) == 64
    assert decode.variant_split(SIGMOID, None) == 0 and decode.variant_split(gate, None) == 0
    with pytest.raises(NotImplementedError, match="logits_soft_cap"):
        decode.make_params(8, 2, 128, 16, "NONE", -1, 30.0, "bfloat16", None, None, None, None, SIGMOID)
    with pytest.raises(NotImplementedError, match="pos_encoding_mode"):
        decode.make_params(8, 2, 128, 16, "ALIBI", -1, None, "bfloat16", None, None, None, None, SIGMOID)


def test_example_compiles_with_fp8_kv():
    prog, _ = _program(SIGMOID, 128, dt.float8_e4m3fn)
    assert prog.compile("sm_90a").lowered


def test_compile_error_names_the_users_lines():
    broken = AttentionVariant("Broken", "struct Broken : AttentionVariantBase {\n"
                                        "  template <typename Params>\n"
                                        "  __device__ Broken(const Params& params, uint32_t b, uint8_t* s) {\n"
                                        "    sm_scale_log2 = params.no_such_field;\n"
                                        "  }\n"
                                        "};\n")
    prog, _ = _program(broken, 128)
    with pytest.raises(fi_cupy.KernelCompileError) as e:
        prog.compile("sm_90a")
    msg = str(e.value)
    assert "variant Broken(4): error" in msg, msg[-2000:]
    assert ">    4 |     sm_scale_log2 = params.no_such_field;" in msg


def test_params_layout():
    lay = DOC_MASK._layout()
    assert [f for f, _ in lay._fields_] == ["fic_qo_indptr", "fic_kv_lens", "num_qo_heads", "num_kv_heads", "doc_ids",
                                            "doc_stride", "sm_scale"]
    assert (lay.doc_ids.offset, lay.doc_stride.offset, lay.sm_scale.offset, ctypes.sizeof(lay)) == (24, 32, 40, 48)
    assert "static_assert(sizeof(fic::" in DOC_MASK._sources()[2][1]  # the compile checks the size
    # scalars widest first in the struct (no padding between fields), whatever order run() takes them in
    mixed = AttentionVariant("M", "struct M {};", scalars=[("a", "float"), ("b", "double"), ("c", "bool")])
    assert [f for f, _ in mixed._layout()._fields_][4:] == ["b", "a", "c"]


def test_flashinfer_jit_args():
    args = ("uri", "float16", "float16", "float16", "int32", 128, 128, ["mask"], ["uint8_t"], ["sm_scale"],
            ["double"], SIGMOID.name, SIGMOID.decl)
    v = from_jit_args(args, "test")
    assert (v.name, v.tensors, v.scalars, v.uri) == (SIGMOID.name, (("mask", "uint8_t"),), (("sm_scale", "double"),),
                                                     "uri")
    assert not v.use_softmax and DOC_MASK.use_softmax
    assert from_jit_args(SIGMOID, "test") is SIGMOID
    mod = fi_cupy.jit.gen_customize_batch_prefill_module("fa2", *args[:12], args[12])
    assert from_jit_args(mod, "test") == v
    with pytest.raises(NotImplementedError, match="use_logits_soft_cap"):
        from_jit_args(args + (0, False, True), "test")
    with pytest.raises(TypeError, match="jit_args"):
        from_jit_args(args[:5], "test")
    with pytest.raises(NotImplementedError, match="backend"):
        fi_cupy.jit.gen_customize_single_prefill_module("cudnn", *args[:5], *args[6:])
    assert fi_cupy.jit.gen_customize_single_prefill_module("fa2", *args[:5], *args[6:]).backend == "fa2"
    with pytest.raises(TypeError, match="C type"):
        AttentionVariant("X", "struct X {};", tensors=[("t", "float4")])
    with pytest.raises(ValueError, match="struct Y"):
        AttentionVariant("Y", "struct X {};")


def test_options_a_variant_owns_are_refused():
    for kw in (dict(logits_soft_cap=30.0), dict(sm_scale=0.1), dict(pos_encoding_mode="ALIBI")):
        opts = {**dict(logits_soft_cap=None, sm_scale=None, pos_encoding_mode="NONE"), **kw}
        with pytest.raises(NotImplementedError, match=next(iter(kw))):
            prefill.make_params(4, 4, 64, None, False, opts["pos_encoding_mode"], -1, opts["logits_soft_cap"],
                                opts["sm_scale"], None, None, "float16", None, False, variant=SIGMOID)
    params = prefill.make_params(4, 4, 64, None, False, "NONE", -1, None, None, None, None, "float16", None, False,
                                 variant=KEY_SCALE)
    assert prefill.sm90_unsupported(params) is None  # a Key transform runs on the Hopper kernel too


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_compile_for_the_hopper_kernel(name):
    """Every example also runs on the Hopper kernel (sm_90a, head dims 64 / 128); the logits-only ones
    without spills (a per-key mask that loads from memory spills some)."""
    for d in (64, 128):
        prog = prefill.prefill_program(d, prefill.SM90_TILE, dt.bfloat16, dt.bfloat16, True, False, 0, d,
                                       EXAMPLES[name])
        got = prog.compile("sm_90a")
        usage = cc.resource_usage(got.log)[got.lowered[prog.kernels[0].name_expr]]
        if name != "doc_mask":
            assert usage["spill_stores"] == 0, f"{name} d{d}: {usage}"


def test_cache_lists_compiled_variants(tmp_path, monkeypatch):
    monkeypatch.setenv("FI_CUPY_CACHE_DIR", str(tmp_path))
    prog, _ = _program(SIGMOID, 64)
    prog.compile("sm_80")
    assert cc.cached_variants() == {(SIGMOID.name, "sm_80"): 1}


def test_get_batch_jit_module_caches_by_name():
    args = ("uri", "float16", "float16", "float16", "int32", 128, 128, [], [], ["logits_scale", "sigmoid_bias"],
            ["double", "double"], SIGMOID.name, SIGMOID.decl)
    a = fi_cupy.get_batch_prefill_jit_module("test_sigmoid_batch", args)
    assert a.variant == from_jit_args(args, "test") and a.kind == "batch_prefill"
    assert fi_cupy.get_batch_prefill_jit_module("test_sigmoid_batch", DOC_MASK) is a  # first module kept per name
    d = fi_cupy.get_batch_decode_jit_module("test_sigmoid_batch", SIGMOID)
    assert d.kind == "batch_decode" and from_jit_args(d, "test") is SIGMOID
    with pytest.raises(TypeError, match="module_name"):
        fi_cupy.get_batch_decode_jit_module("", SIGMOID)
