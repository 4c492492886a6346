"""The model's shape and options, read from a Hugging Face config.json (Llama 2/3/3.1, Qwen2) or
taken from a named preset for random weights."""
from __future__ import annotations

import dataclasses
import json
import os

SUPPORTED_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
ATTENTION_HEAD_DIMS = (64, 128, 256)  # what fi_cupy's prefill kernels are built for


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """kind: "default" (theta only), "linear" (frequencies / factor) or "llama3" (Llama 3.1's per-band
    rescaling with low/high frequency factors around original_max_position_embeddings)."""
    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    bos_token_id: int | None = None
    eos_token_ids: tuple = ()
    max_position_embeddings: int = 8192

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"config: {f} must be a positive integer, got {getattr(self, f)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"config: num_attention_heads ({self.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim not in ATTENTION_HEAD_DIMS:
            raise ValueError(f"config: head_dim {self.head_dim} is not supported (fi_cupy's prefill kernels take "
                             f"{ATTENTION_HEAD_DIMS})")

    @property
    def qkv_rows(self) -> int:
        """Output features of the fused q/k/v projection."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        layer = self.qkv_rows * h + self.num_heads * d * h + 3 * h * i + 2 * h
        if self.attention_bias:
            layer += self.qkv_rows
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    def kv_bytes_per_token(self, itemsize: int = 2) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def _rope_from(d: dict) -> RopeConfig:
    # transformers >= 5 writes rope_parameters (theta inside); older configs rope_theta + rope_scaling.
    params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta)
    if kind == "linear":
        return RopeConfig(theta, "linear", float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(theta, "llama3", float(params["factor"]), float(params.get("low_freq_factor", 1.0)),
                          float(params.get("high_freq_factor", 4.0)),
                          int(params.get("original_max_position_embeddings", 8192)))
    raise ValueError(f"config: rope scaling {kind!r} is not supported (default, linear and llama3 are)")


def _ids(x) -> tuple:
    if x is None:
        return ()
    return tuple(int(i) for i in (x if isinstance(x, (list, tuple)) else [x]))


def from_dict(d: dict) -> ModelConfig:
    """A ModelConfig from the fields of a Hugging Face config.json."""
    archs = d.get("architectures") or []
    if archs and not any(a in SUPPORTED_ARCHS for a in archs):
        raise ValueError(f"config: architectures {archs} are not supported (expected one of {SUPPORTED_ARCHS})")
    try:
        heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        cfg = dict(vocab_size=int(d["vocab_size"]), hidden_size=hidden,
                   intermediate_size=int(d["intermediate_size"]), num_layers=int(d["num_hidden_layers"]),
                   num_heads=heads)
    except KeyError as e:
        raise ValueError(f"config: missing field {e.args[0]!r}") from None
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config: hidden_act {d['hidden_act']!r} is not supported (silu is)")
    if d.get("mlp_bias"):
        raise ValueError("config: mlp_bias is not supported")
    if d.get("sliding_window") and d.get("use_sliding_window"):
        raise ValueError("config: sliding-window attention is not supported by this example")
    head_dim = d.get("head_dim") or hidden // heads
    model_type = d.get("model_type", "llama")
    return ModelConfig(
        **cfg, num_kv_heads=int(d.get("num_key_value_heads") or heads), head_dim=int(head_dim),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope=_rope_from(d),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", model_type == "qwen2")),
        bos_token_id=d.get("bos_token_id"), eos_token_ids=_ids(d.get("eos_token_id")),
        max_position_embeddings=int(d.get("max_position_embeddings", 8192)))


def from_folder(folder: str) -> ModelConfig:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face checkpoint folder)")
    with open(path) as f:
        return from_dict(json.load(f))


_LLAMA31_ROPE = RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
PRESETS = {
    # A small model for trying the pipeline end to end in seconds.
    "tiny": ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=8,
                        num_kv_heads=2, head_dim=128, rms_norm_eps=1e-5, rope=_LLAMA31_ROPE, eos_token_ids=(2,),
                        bos_token_id=1),
    # Llama 3.2 1B and Llama 3.1 8B shapes.
    "1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                      num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
                      rope=RopeConfig(500000.0, "llama3", 32.0, 1.0, 4.0, 8192), tie_word_embeddings=True,
                      bos_token_id=128000, eos_token_ids=(128001, 128008, 128009), max_position_embeddings=131072),
    "8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope=_LLAMA31_ROPE, bos_token_id=128000,
                      eos_token_ids=(128001, 128008, 128009), max_position_embeddings=131072),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"--random: unknown size {name!r}; choose one of {sorted(PRESETS)}") from None
