"""One decode shape, for Nsight Compute: python bench/ncu_decode.py BATCH KV_LEN  (warm-up, then one run)."""
import sys

import numpy as np
import torch

import fi_cupy

b, l = int(sys.argv[1]), int(sys.argv[2])
hq, hkv, d, ps = 32, 8, 128, 16
pages_per = -(-l // ps)
cache = torch.randn((b * pages_per, 2, ps, hkv, d), device="cuda", dtype=torch.bfloat16)
w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"))
w.plan(np.arange(b + 1) * pages_per, np.random.default_rng(0).permutation(b * pages_per),
       np.full(b, l - (pages_per - 1) * ps), hq, hkv, d, ps, q_data_type="bfloat16")
q = torch.randn((b, hq, d), device="cuda", dtype=torch.bfloat16)
out = torch.empty_like(q)
for _ in range(3):
    w.run(q, cache, out=out)
torch.cuda.synchronize()
torch.cuda.nvtx.range_push("measured")
w.run(q, cache, out=out)
torch.cuda.nvtx.range_pop()
torch.cuda.synchronize()
