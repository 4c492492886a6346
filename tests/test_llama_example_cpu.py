"""examples/fi_llama on the CPU (issue 7): config.json parsing, the safetensors reader, the KV page
allocator, the continuous-batching scheduler and the step inputs it feeds the model."""
import json
import struct

import numpy as np
import pytest

from fi_llama import checkpoint, config
from fi_llama.batch import decode_inputs, padded, prefill_inputs
from fi_llama.pages import OutOfPagesError, PageAllocator, pages_for
from fi_llama.scheduler import Request, Scheduler

LLAMA31 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192},
           "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}


# -- config ----------------------------------------------------------------------------------------

def test_config_llama31_old_and_new_rope_fields():
    c = config.from_dict(LLAMA31)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.qkv_rows) == (32, 32, 8, 128, 6144)
    assert c.rope == config.RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
    assert c.eos_token_ids == (128001, 128008, 128009) and not c.attention_bias and not c.tie_word_embeddings
    assert c == config.preset("8b")
    assert abs(c.num_parameters() - 8.03e9) < 0.01e9  # Llama 3.1 8B
    # transformers >= 5 writes rope_parameters with the theta inside.
    new = {k: v for k, v in LLAMA31.items() if k not in ("rope_scaling", "rope_theta")}
    new["rope_parameters"] = dict(LLAMA31["rope_scaling"], rope_theta=500000.0)
    assert config.from_dict(new).rope == c.rope


def test_config_llama2_qwen2_and_defaults():
    llama2 = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "eos_token_id": 2}
    c = config.from_dict(llama2)
    assert c.num_kv_heads == 32 and c.head_dim == 128 and c.rope == config.RopeConfig(10000.0)
    assert c.eos_token_ids == (2,)
    qwen = dict(llama2, architectures=["Qwen2ForCausalLM"], model_type="qwen2", num_key_value_heads=4,
                hidden_size=2048, num_attention_heads=16, tie_word_embeddings=True, rope_theta=1e6,
                sliding_window=32768, use_sliding_window=False)
    q = config.from_dict(qwen)
    assert q.attention_bias and q.tie_word_embeddings and q.rope.theta == 1e6 and q.head_dim == 128
    lin = config.from_dict(dict(llama2, rope_scaling={"type": "linear", "factor": 2.0}))
    assert (lin.rope.kind, lin.rope.factor) == ("linear", 2.0)


@pytest.mark.parametrize("change, msg", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_key_value_heads": 5}, "multiple"),
    ({"head_dim": 96}, "head_dim 96"),
    ({"vocab_size": None}, "vocab_size"),
])
def test_config_rejects_what_the_model_cannot_run(change, msg):
    d = dict(LLAMA31, **change)
    if change.get("vocab_size", 0) is None:
        del d["vocab_size"]
    with pytest.raises(ValueError, match=msg):
        config.from_dict(d)


def test_config_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        config.from_folder(str(tmp_path))
    with pytest.raises(ValueError, match="unknown size"):
        config.preset("70x")


# -- safetensors -----------------------------------------------------------------------------------

def _write(path, tensors: dict, header_patch=None):
    """A safetensors file written by the format's definition (not by the reader under test)."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = arr.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    if header_patch:
        header_patch(header)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_safetensors_header_and_values(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5)).astype(np.float32)
    b16 = (rng.standard_normal((4, 2)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    h = rng.standard_normal(7).astype(np.float16)
    _write(tmp_path / "m.safetensors", {"a": ("F32", a), "b": ("BF16", b16), "h": ("F16", h)})
    e = checkpoint.read_header(str(tmp_path / "m.safetensors"))
    assert sorted(e) == ["a", "b", "h"] and e["a"].shape == (3, 5) and e["b"].dtype == "BF16"
    np.testing.assert_array_equal(checkpoint.read_host(e["a"]), a)
    np.testing.assert_array_equal(checkpoint.read_host(e["b"]), b16)
    np.testing.assert_array_equal(checkpoint.read_host(e["h"]), h)


@pytest.mark.parametrize("patch, msg", [
    (lambda h: h["a"].update(data_offsets=[0, 8]), "data_offsets"),
    (lambda h: h["a"].update(dtype="I64"), "dtype I64"),
    (lambda h: h["a"].pop("shape"), "malformed"),
    (lambda h: h["a"].update(data_offsets=[0, 10 ** 6], shape=[250000]), "data_offsets"),
])
def test_safetensors_bad_headers(tmp_path, patch, msg):
    _write(tmp_path / "m.safetensors", {"a": ("F32", np.ones(4, np.float32))}, patch)
    with pytest.raises(ValueError, match=msg):
        checkpoint.read_header(str(tmp_path / "m.safetensors"))


def test_safetensors_truncated_and_garbage(tmp_path):
    p = tmp_path / "t.safetensors"
    p.write_bytes(b"\x05\x00")
    with pytest.raises(ValueError, match="not a safetensors"):
        checkpoint.read_header(str(p))
    p.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(ValueError, match="does not fit"):
        checkpoint.read_header(str(p))
    p.write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(ValueError, match="not valid JSON"):
        checkpoint.read_header(str(p))


def _tiny_cfg(**kw):
    base = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=64)
    return config.ModelConfig(**dict(base, **kw))


def _checkpoint_tensors(cfg, skip=(), bias=False):
    """Every Hugging Face tensor of cfg, F32 zeros of the right shapes."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    t = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        t["lm_head.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        t.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                  p + "self_attn.q_proj.weight": (cfg.num_heads * d, h), p + "self_attn.k_proj.weight":
                  (cfg.num_kv_heads * d, h), p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
                  p + "self_attn.o_proj.weight": (h, cfg.num_heads * d), p + "mlp.gate_proj.weight": (i, h),
                  p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)})
        if bias:
            t.update({p + f"self_attn.{x}_proj.bias": (cfg.num_heads * d if x == "q" else cfg.num_kv_heads * d,)
                      for x in "qkv"})
    return {k: ("F32", np.zeros(s, np.float32)) for k, s in t.items() if k not in skip}


def test_index_folder_and_checks_over_shards(tmp_path):
    cfg = _tiny_cfg(attention_bias=True)
    tensors = _checkpoint_tensors(cfg, bias=True)
    names = sorted(tensors)
    _write(tmp_path / "model-00001-of-00002.safetensors", {k: tensors[k] for k in names[::2]})
    _write(tmp_path / "model-00002-of-00002.safetensors", {k: tensors[k] for k in names[1::2]})
    entries = checkpoint.index_folder(str(tmp_path))
    assert sorted(entries) == names
    checkpoint.check_entries(cfg, entries)
    lay = checkpoint.layout(cfg)  # fused rows: q | k | v, gate | up
    assert [r for _, r in lay["1.wqkv"]] == [0, 256, 384] and [r for _, r in lay["0.wgu"]] == [0, 24]
    assert checkpoint.target_shapes(cfg)["0.wqkv"] == (cfg.qkv_rows, 16)


def test_checks_name_missing_and_misshapen_tensors(tmp_path):
    cfg = _tiny_cfg(tie_word_embeddings=True)
    t = _checkpoint_tensors(cfg, skip=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(ValueError, match="up_proj.weight' is missing"):
        checkpoint.check_entries(cfg, {k: checkpoint.TensorEntry("f", k, "F32", v[1].shape, 0, 0)
                                       for k, v in t.items()})
    t = _checkpoint_tensors(cfg)
    t["model.layers.0.self_attn.k_proj.weight"] = ("F32", np.zeros((64, 16), np.float32))
    _write(tmp_path / "m.safetensors", t)
    with pytest.raises(ValueError, match=r"k_proj.weight' has shape \[64, 16\], the config implies \[128, 16\]"):
        checkpoint.check_entries(cfg, checkpoint.index_folder(str(tmp_path)))
    _write(tmp_path / "n.safetensors", {"model.norm.weight": ("F32", np.zeros(16, np.float32))})
    with pytest.raises(ValueError, match="two files"):
        checkpoint.index_folder(str(tmp_path))


# -- pages and scheduling --------------------------------------------------------------------------

def test_page_allocator_allocate_free_reuse_exhaust():
    a = PageAllocator(6)  # page 0 reserved
    assert a.capacity == 5 and a.allocate(2) == [1, 2] and a.allocate(0) == []
    b = a.allocate(3)
    assert b == [3, 4, 5] and a.num_free == 0 and a.peak_used == 5
    with pytest.raises(OutOfPagesError, match="1 page"):
        a.allocate(1)
    a.free([2, 4])
    assert sorted(a.allocate(2)) == [2, 4]  # freed pages come back
    with pytest.raises(ValueError, match="not allocated"):
        a.free([0])
    a.free([1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="not allocated"):
        a.free([3])
    assert a.num_used == 0 and pages_for(17, 16) == 2 and pages_for(16, 16) == 1
    with pytest.raises(ValueError):
        PageAllocator(1)


def _sched(pages=20, page=4, max_batch=3, budget=100, eos=(99,)):
    return Scheduler(PageAllocator(pages), page, max_batch, budget, eos)


def test_scheduler_admits_by_batch_budget_and_worst_case_pages():
    s = _sched(max_batch=2)
    rs = [Request(i, list(range(5)), 4) for i in range(3)]
    for r in rs:
        s.add(r)
    st = s.schedule()
    assert st.prefill == rs[:2] and st.decode == []  # max_batch 2
    assert [len(r.pages) for r in rs[:2]] == [2, 2]
    s.commit(st, [7, 8])
    st = s.schedule()
    assert st.prefill == [] and st.decode == rs[:2]  # full batch: the third waits
    assert all(r.kv_len == 5 and len(r.pages) == 2 for r in rs[:2])  # room for the 6th token
    s = _sched(budget=8)
    for r in (Request(0, [1] * 5, 2), Request(1, [1] * 5, 2)):
        s.add(r)
    assert len(s.schedule().prefill) == 1  # the prefill-token budget
    s = _sched(pages=9, page=4)  # 8 usable pages; each request may reach 5 + 12 - 1 = 16 tokens = 4 pages
    for i in range(3):
        s.add(Request(i, [1] * 5, 12))
    st = s.schedule()
    assert len(st.prefill) == 2 and s.allocator.num_used == 4  # worst case reserved, pages taken as needed


def test_scheduler_finishes_at_eos_or_length_and_reuses_pages():
    s = _sched(pages=7, page=4, max_batch=4)  # 6 usable pages: worst cases of 3 pages each, two at a time
    a, b, c = Request(0, [1] * 6, 5), Request(1, [2] * 3, 2), Request(2, [3] * 9, 2)
    for r in (a, b, c):
        s.add(r)
    st = s.schedule()
    assert st.prefill == [a, b]  # c waits for pages
    assert s.commit(st, [5, 6]) == []
    st = s.schedule()
    assert st.prefill == [] and st.decode == [a, b]
    done = s.commit(st, [99, 6])  # a hits EOS, b its length
    assert done == [a, b] and a.finish_reason == "eos" and b.finish_reason == "length"
    assert a.output == [5, 99] and a.pages == [] and s.allocator.num_used == 0
    st = s.schedule()
    assert st.prefill == [c] and sorted(c.pages) == [1, 2, 3]  # freed pages reused
    s.commit(st, [4])
    assert s.commit(s.schedule(), [4]) == [c] and not s.has_work
    with pytest.raises(ValueError, match="2 tokens for 0"):
        s.commit(s.schedule(), [1, 2])


def test_scheduler_rejects_requests_it_can_never_run():
    s = _sched(pages=5, page=4, budget=10)
    with pytest.raises(ValueError, match="empty prompt"):
        s.add(Request(0, [], 3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.add(Request(0, [1], 0))
    with pytest.raises(ValueError, match="needs 5 KV pages"):
        s.add(Request(0, [1] * 10, 8))
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        s.add(Request(0, [1] * 11, 1))


def test_step_inputs_page_tables_and_padding():
    a, b = Request(0, [5, 6, 7, 8, 9], 4, pages=[3, 7]), Request(1, [1, 2], 4, pages=[4])
    p = prefill_inputs([a, b], 4)
    np.testing.assert_array_equal(p.tokens, [5, 6, 7, 8, 9, 1, 2])
    np.testing.assert_array_equal(p.positions, [0, 1, 2, 3, 4, 0, 1])
    np.testing.assert_array_equal(p.batch_indices, [0, 0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(p.qo_indptr, [0, 5, 7])
    np.testing.assert_array_equal(p.kv_indptr, [0, 2, 3])
    np.testing.assert_array_equal(p.kv_indices, [3, 7, 4])
    np.testing.assert_array_equal(p.kv_last, [1, 2])
    a.output, b.output = [11, 12], [13]  # kv: a holds 6 tokens, b 2
    d = decode_inputs([a, b], 4)
    np.testing.assert_array_equal(d.tokens, [12, 13])
    np.testing.assert_array_equal(d.positions, [6, 2])
    np.testing.assert_array_equal(d.kv_last, [3, 3])
    q = padded(d, 4)
    np.testing.assert_array_equal(q.kv_indptr, [0, 2, 3, 4, 5])
    np.testing.assert_array_equal(q.kv_indices, [3, 7, 4, 0, 0])  # padding lives in reserved page 0
    np.testing.assert_array_equal(q.kv_last, [3, 3, 1, 1])
    np.testing.assert_array_equal(q.batch_indices, [0, 1, 2, 3])
    assert padded(d, 2) is d
    with pytest.raises(ValueError, match="exceed"):
        padded(d, 1)
    with pytest.raises(ValueError, match="fewer pages"):
        decode_inputs([Request(0, [1] * 4, 3, output=[1], pages=[2])], 4)


# -- RoPE table ------------------------------------------------------------------------------------

def test_rope_table_frequencies_match_the_reference():
    from fi_cupy import reference
    from fi_llama.rope import cos_sin_cache, inv_freq
    r = config.RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(inv_freq(r, 128), reference.llama31_inv_freq(128, 500000.0, 8.0, 1.0, 4.0, 8192),
                               rtol=1e-6)
    np.testing.assert_allclose(inv_freq(config.RopeConfig(1e4), 64), reference.rope_inv_freq(64, 1e4), rtol=1e-6)
    np.testing.assert_allclose(inv_freq(config.RopeConfig(1e4, "linear", 4.0), 64),
                               reference.rope_inv_freq(64, 1e4, 4.0), rtol=1e-6)
    t = cos_sin_cache(r, 128, 300)
    assert t.shape == (300, 128) and t.dtype == np.float32
    ang = 299 * inv_freq(r, 128).astype(np.float64)
    np.testing.assert_allclose(t[299, :64], np.cos(ang), atol=1e-4)
    np.testing.assert_allclose(t[299, 64:], np.sin(ang), atol=1e-4)
    np.testing.assert_array_equal(t[0], np.r_[np.ones(64), np.zeros(64)])


def test_decode_inputs_ahead_are_the_step_after():
    a = Request(0, [5, 6, 7], 8, output=[11, 12], pages=[3, 7])  # 4 tokens cached
    now, nxt = decode_inputs([a], 4), decode_inputs([a], 4, ahead=True)
    np.testing.assert_array_equal(now.positions, [4])
    np.testing.assert_array_equal(now.tokens, [12])
    np.testing.assert_array_equal(nxt.positions, [5])
    np.testing.assert_array_equal(nxt.kv_last, [2])
    np.testing.assert_array_equal(nxt.kv_indices, [3, 7])
