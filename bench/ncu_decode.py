"""One decode shape, for Nsight Compute: python bench/ncu_decode.py BATCH KV_LEN [KV_DTYPE]  (warm-up, then one
run; KV_DTYPE a torch dtype name, default bfloat16, e.g. float8_e4m3fn)."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_decode  # noqa: E402

import fi_cupy  # noqa: E402

b, l = int(sys.argv[1]), int(sys.argv[2])
kv = sys.argv[3] if len(sys.argv) > 3 else "bfloat16"
caches, qs, outs, indptr, indices, last, _ = bench_decode._case(torch, b, l, kv, "NHD")
w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
w.plan(indptr, indices, last, bench_decode.HQ, bench_decode.HKV, bench_decode.D, bench_decode.PS,
       q_data_type="bfloat16", kv_data_type=kv)
for _ in range(4):  # ncu --launch-skip 3 profiles the fourth
    w.run(qs[0], caches[0], out=outs[0])
torch.cuda.synchronize()
