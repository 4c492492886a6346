"""What the attention kernels support, as a table generated from the instantiations CI compiles
(decode.all_programs, prefill.all_programs, prefill.sm90_programs): the README's support table is this
output (tests/test_support_cpu.py checks it), so the table cannot drift from the kernels.

    python -c "from fi_cupy import support; print(support.table())"
"""
from __future__ import annotations

from . import decode, prefill

_ORDER = ("float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


def _dtype(cpp: str) -> str:
    for dt_ in (decode.dt.float16, decode.dt.bfloat16, decode.dt.float8_e4m3fn, decode.dt.float8_e5m2):
        if dt_.cpp == cpp:
            return dt_.name
    raise ValueError(f"unknown kernel dtype {cpp}")


def _dims(ds) -> str:
    """Head dims: runs of 4 or more at one step as "a to b, step s"; (qk, vo) pairs as "qk/vo", last."""
    nums = sorted(d for d in ds if isinstance(d, int))
    parts, i = [], 0
    while i < len(nums):
        j = i + 1
        while j + 1 < len(nums) and nums[j + 1] - nums[j] == nums[i + 1] - nums[i]:
            j += 1
        if j - i >= 3:
            parts.append(f"{nums[i]} to {nums[j]}, step {nums[i + 1] - nums[i]}")
            i = j + 1
        else:
            parts.append(str(nums[i]))
            i += 1
    return ", ".join(parts + [f"{a}/{b}" for a, b in sorted(d for d in ds if not isinstance(d, int))])


def _prefill_dims(d: int, dv: int, rope: bool) -> list:
    """The head dims a portable-kernel instantiation of widths (d, dv) runs: every supported head dim of
    that width (RoPE: the width itself), or its (head_dim_qk, head_dim_vo) pair."""
    if (d, dv) in prefill.HEAD_DIM_PAIRS:
        return [(d, dv)]
    return [h for h in prefill.SUPPORTED_HEAD_DIMS if prefill.widths(h)[:2] == (d, dv) and (h == d or not rope)]


def _rows() -> list:
    """(op, kernel, head dims, q dtypes, KV dtypes, position encodings, variants) sets per kernel path."""
    rows: dict = {}

    def add(op, kernel, d, q, kv, pos, variants=()):
        r = rows.setdefault((op, kernel), (set(), set(), set(), set(), set()))
        r[0].add(d), r[1].add(q), r[2].add(kv), r[3].add(pos), r[4].update(variants)

    dec = "BatchDecodeWithPagedKVCacheWrapper, single_decode_with_kv_cache"
    for p in decode.all_programs():
        k = p.kernels[0]
        if k.kernel.endswith("batch_decode_tc_kernel"):
            d, _, q, kv, alibi = k.targs
            add(dec, "tensor cores (mma.sync)", d, _dtype(q), _dtype(kv), "ALIBI" if alibi == "true" else "NONE")
        elif k.kernel.endswith("batch_decode_wide_kernel"):  # the warps split the head dim
            d, _, q, kv, alibi = k.targs
            add(dec, "tensor cores, head dim split over warps", d, _dtype(q), _dtype(kv),
                "ALIBI" if alibi == "true" else "NONE")
        else:
            d, _, q, kv, rope, alibi = k.targs
            pos = "ROPE_LLAMA" if rope == "true" else "ALIBI" if alibi == "true" else "NONE"
            # RoPE on the fly, and where the GPU cannot give the tensor-core kernel its shared memory
            # (decode.decode_variant): rows of their own
            path = "CUDA cores, RoPE on the fly" if rope == "true" else "CUDA cores, GPUs with less shared memory"
            add(dec, path, d, _dtype(q), _dtype(kv), pos)
    names = {True: "BatchPrefillWithPagedKVCacheWrapper", False: "BatchPrefillWithRaggedKVCacheWrapper, "
             "single_prefill_with_kv_cache"}
    for p in prefill.all_programs():
        d, dv, _, _, q, kv, paged, rope, flags = p.kernels[0].targs
        pos = "ROPE_LLAMA" if rope == "true" else "ALIBI" if flags & prefill.ALIBI else "NONE"
        if (d, dv) == (prefill.MLA_DIMS[0], 256):  # MLA: Q/K [ckv 512 | kpe 64], V/O ckv
            add("BatchMLAPagedAttentionWrapper", "fa2 (portable, mma.sync)", prefill.MLA_DIMS, _dtype(q), _dtype(kv),
                pos)
        for h in _prefill_dims(d, dv, rope == "true"):
            add(names[paged == "true"], "fa2 (portable, mma.sync)", h, _dtype(q), _dtype(kv), pos, _variants(flags))
    for p in prefill.sm90_programs():
        if p.filename == "mla_sm90.cu":
            q = p.kernels[0].targs[0]
            add("BatchMLAPagedAttentionWrapper", "fa3 (sm_90a, wgmma)", prefill.MLA_DIMS, _dtype(q), _dtype(q), "NONE")
            continue
        d, q, paged, flags = p.kernels[0].targs
        add(names[paged == "true"], "fa3 (sm_90a, wgmma)", d, _dtype(q), _dtype(q),
            "ALIBI" if flags & prefill.ALIBI else "NONE", _variants(flags))
    return [(op, kernel) + v for (op, kernel), v in rows.items()]


def _variants(flags: int) -> tuple:
    return tuple(n for f, n in ((prefill.SOFT_CAP, "logits_soft_cap"), (prefill.CUSTOM_MASK, "custom_mask"))
                 if flags & f)


def table() -> str:
    """The support table in markdown: a row per (op, kernel path), each column the values some compiled
    instantiation of that path takes. Runtime options (sm_scale, window_left, decode's logits_soft_cap,
    sinks, return_lse, page size, GQA group) are not template arguments and are not in it."""
    order = lambda xs: ", ".join(sorted(xs, key=_ORDER.index))  # noqa: E731
    lines = ["| op | kernel | head_dim | q / output | KV | pos_encoding_mode | variants |",
             "|---|---|---|---|---|---|---|"]
    for op, kernel, ds, qs, kvs, pos, var in _rows():
        lines.append(f"| {op} | {kernel} | {_dims(ds)} | {order(qs)} | {order(kvs)} | "
                     f"{', '.join(sorted(pos, key=('NONE', 'ROPE_LLAMA', 'ALIBI').index))} | "
                     f"{', '.join(sorted(var)) or '-'} |")
    return "\n".join(lines)
