"""Weights onto the GPU in bf16: from a Hugging Face safetensors checkpoint (our own reader of the
format: an 8-byte little-endian header length, a JSON header, raw little-endian tensors), or random.

q/k/v projections are fused into one (rows q | k | v) and gate/up into one (rows gate | up), so a
layer runs four GEMMs."""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import struct

import numpy as np

from .config import ModelConfig

# safetensors dtype -> (numpy dtype of the raw bytes, bytes an element)
SAFETENSORS_DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4)}
MAX_HEADER_BYTES = 100 << 20


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    file: str
    name: str
    dtype: str
    shape: tuple
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> dict:
    """{name: TensorEntry} of one .safetensors file, every entry checked against the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    base, out = 8 + n, {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name!r}: malformed entry {e!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}; supported: {sorted(SAFETENSORS_DTYPES)}")
        want = int(np.prod(shape, dtype=np.int64)) * SAFETENSORS_DTYPES[dtype][1]
        if not 0 <= a <= b or b - a != want or base + b > size:
            raise ValueError(f"{path}: tensor {name!r}: data_offsets {[a, b]} do not hold shape {list(shape)} "
                             f"of {dtype} inside the file")
        out[name] = TensorEntry(path, name, dtype, shape, base + a, b - a)
    return out


def index_folder(folder: str) -> dict:
    """{name: TensorEntry} over every *.safetensors file of a checkpoint folder."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors files")
    entries: dict = {}
    for path in files:
        for name, e in read_header(path).items():
            if name in entries:
                raise ValueError(f"{folder}: tensor {name!r} appears in two files")
            entries[name] = e
    return entries


def read_host(e: TensorEntry) -> np.ndarray:
    """The tensor's raw values as a read-only memory map (bf16 as its uint16 bits)."""
    return np.memmap(e.file, dtype=SAFETENSORS_DTYPES[e.dtype][0], mode="r", offset=e.start, shape=e.shape)


@dataclasses.dataclass
class LayerWeights:
    ln1: object   # (hidden,)
    wqkv: object  # (qkv_rows, hidden)
    bqkv: object  # (qkv_rows,) or None
    wo: object    # (hidden, heads * head_dim)
    ln2: object   # (hidden,)
    wgu: object   # (2 * intermediate, hidden): gate rows, then up rows
    wd: object    # (hidden, intermediate)


@dataclasses.dataclass
class Weights:
    embed: object    # (vocab, hidden)
    layers: list
    norm: object     # (hidden,)
    lm_head: object  # (vocab, hidden); the embedding itself when tied

    def nbytes_read_per_token(self) -> int:
        """Bytes a decode step streams from the weights (the embedding gather aside)."""
        n = self.norm.nbytes + self.lm_head.nbytes
        for lw in self.layers:
            n += sum(x.nbytes for x in (lw.ln1, lw.wqkv, lw.wo, lw.ln2, lw.wgu, lw.wd))
            n += 0 if lw.bqkv is None else lw.bqkv.nbytes
        return n


def layout(cfg: ModelConfig) -> dict:
    """{target: [(hf name, first row), ...]}: where each Hugging Face tensor lands. Targets are
    'embed', 'norm', 'lm_head' and '<layer>.<field>'."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {"embed": [("model.embed_tokens.weight", 0)], "norm": [("model.norm.weight", 0)]}
    out["lm_head"] = [("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight", 0)]
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out[f"{i}.ln1"] = [(p + "input_layernorm.weight", 0)]
        out[f"{i}.ln2"] = [(p + "post_attention_layernorm.weight", 0)]
        out[f"{i}.wqkv"] = [(p + "self_attn.q_proj.weight", 0), (p + "self_attn.k_proj.weight", q),
                            (p + "self_attn.v_proj.weight", q + kv)]
        if cfg.attention_bias:
            out[f"{i}.bqkv"] = [(p + "self_attn.q_proj.bias", 0), (p + "self_attn.k_proj.bias", q),
                                (p + "self_attn.v_proj.bias", q + kv)]
        out[f"{i}.wo"] = [(p + "self_attn.o_proj.weight", 0)]
        out[f"{i}.wgu"] = [(p + "mlp.gate_proj.weight", 0), (p + "mlp.up_proj.weight", cfg.intermediate_size)]
        out[f"{i}.wd"] = [(p + "mlp.down_proj.weight", 0)]
    return out


def target_shapes(cfg: ModelConfig) -> dict:
    h, d, v, i = cfg.hidden_size, cfg.head_dim, cfg.vocab_size, cfg.intermediate_size
    out = {"embed": (v, h), "norm": (h,), "lm_head": (v, h)}
    for n in range(cfg.num_layers):
        out.update({f"{n}.ln1": (h,), f"{n}.ln2": (h,), f"{n}.wqkv": (cfg.qkv_rows, h),
                    f"{n}.wo": (h, cfg.num_heads * d), f"{n}.wgu": (2 * i, h), f"{n}.wd": (h, i)})
        if cfg.attention_bias:
            out[f"{n}.bqkv"] = (cfg.qkv_rows,)
    return out


def check_entries(cfg: ModelConfig, entries: dict) -> None:
    """Every tensor the model needs is present with the shape the config implies."""
    shapes = target_shapes(cfg)
    for target, parts in layout(cfg).items():
        full = shapes[target]
        for k, (name, row) in enumerate(parts):
            e = entries.get(name)
            if e is None:
                raise ValueError(f"checkpoint: tensor {name!r} is missing")
            end = parts[k + 1][1] if k + 1 < len(parts) else full[0]
            want = (end - row,) + full[1:]
            if e.shape != want:
                raise ValueError(f"checkpoint: tensor {name!r} has shape {list(e.shape)}, the config implies "
                                 f"{list(want)}")


def _assemble(cfg: ModelConfig, tensors: dict) -> Weights:
    layers = [LayerWeights(tensors[f"{i}.ln1"], tensors[f"{i}.wqkv"], tensors.get(f"{i}.bqkv"),
                           tensors[f"{i}.wo"], tensors[f"{i}.ln2"], tensors[f"{i}.wgu"], tensors[f"{i}.wd"])
              for i in range(cfg.num_layers)]
    return Weights(tensors["embed"], layers, tensors["norm"], tensors["lm_head"])


def _bar(total: int, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def load(folder: str, cfg: ModelConfig, progress: bool = True) -> Weights:
    """Read a checkpoint folder onto the current GPU as bf16, fusing q/k/v and gate/up."""
    import cupy as cp
    from ml_dtypes import bfloat16
    entries = index_folder(folder)
    check_entries(cfg, entries)
    plan = layout(cfg)
    if cfg.tie_word_embeddings:
        plan.pop("lm_head")
    total = sum(entries[n].nbytes for parts in plan.values() for n, _ in parts)
    tensors = {}
    bar = _bar(total, "loading weights") if progress else None
    for target, shape in target_shapes(cfg).items():
        if target not in plan:
            continue
        dst = cp.empty(shape, dtype=bfloat16)
        for name, row in plan[target]:
            e = entries[name]
            host = read_host(e)
            rows = slice(row, row + e.shape[0])
            if e.dtype == "BF16":  # bits straight in
                dst.view(cp.uint16)[rows].set(np.ascontiguousarray(host))
            else:
                dst[rows] = cp.asarray(np.ascontiguousarray(host)).astype(bfloat16)
            if bar is not None:
                bar.update(e.nbytes)
        tensors[target] = dst
    if bar is not None:
        bar.close()
    if cfg.tie_word_embeddings:
        tensors["lm_head"] = tensors["embed"]
    return _assemble(cfg, tensors)


def random(cfg: ModelConfig, seed: int = 0, std: float = 0.02, progress: bool = True) -> Weights:
    """Random bf16 weights of the config's shapes (normal(0, std) matrices, unit norm weights), made on
    the GPU: for benchmarks and trying the pipeline without a checkpoint."""
    import cupy as cp
    from ml_dtypes import bfloat16
    rng = cp.random.default_rng(seed)
    shapes = target_shapes(cfg)
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head")
    bar = _bar(sum(2 * int(np.prod(s)) for s in shapes.values()), "random weights") if progress else None
    tensors = {}
    for target, shape in shapes.items():
        if len(shape) == 1 and not target.endswith("bqkv"):
            tensors[target] = cp.ones(shape, dtype=cp.float32).astype(bfloat16)
        else:
            x = cp.empty(shape, dtype=bfloat16)
            flat = x.reshape(-1)
            step = 1 << 26  # generate in fp32 chunks of 256 MiB
            for a in range(0, flat.size, step):
                flat[a:a + step] = (rng.standard_normal(min(step, flat.size - a), dtype=cp.float32) * std
                                    ).astype(bfloat16)
            tensors[target] = x
        if bar is not None:
            bar.update(2 * int(np.prod(shape)))
    if bar is not None:
        bar.close()
    if cfg.tie_word_embeddings:
        tensors["lm_head"] = tensors["embed"]
    return _assemble(cfg, tensors)
