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
    ds = sorted(ds)
    if len(ds) > 3 and all(b - a == ds[1] - ds[0] for a, b in zip(ds, ds[1:])):
        return f"{ds[0]} to {ds[-1]}, step {ds[1] - ds[0]}"
    return ", ".join(map(str, ds))


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
            d, _, q, alibi = k.targs
            add(dec, "tensor cores (mma.sync)", d, _dtype(q), _dtype(q), "ALIBI" if alibi == "true" else "NONE")
        else:
            d, _, q, kv, rope, alibi = k.targs
            pos = "ROPE_LLAMA" if rope == "true" else "ALIBI" if alibi == "true" else "NONE"
            # 16-bit KV takes this kernel only for RoPE on the fly (else tensor cores): two rows, not one
            add(dec, "CUDA cores, fp8 KV" if kv != q else "CUDA cores, RoPE on the fly", d, _dtype(q), _dtype(kv), pos)
    names = {True: "BatchPrefillWithPagedKVCacheWrapper", False: "BatchPrefillWithRaggedKVCacheWrapper, "
             "single_prefill_with_kv_cache"}
    for p in prefill.all_programs():
        d, _, _, q, kv, paged, rope, flags = p.kernels[0].targs
        pos = "ROPE_LLAMA" if rope == "true" else "ALIBI" if flags & prefill.ALIBI else "NONE"
        add(names[paged == "true"], "fa2 (portable, mma.sync)", d, _dtype(q), _dtype(kv), pos, _variants(flags))
    for p in prefill.sm90_programs():
        d, q, paged, flags = p.kernels[0].targs
        add(names[paged == "true"], "fa3 (sm_90a, wgmma)", d, _dtype(q), _dtype(q), "NONE", _variants(flags))
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
