"""Experiment: the streamed softmax's variants (float4 a thread, CTAs an SM) at several shapes vs
torch.softmax, % of the copy bandwidth."""
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import copy_bandwidth, time_graph  # noqa: E402

import torch  # noqa: E402

from fi_cupy import sampling  # noqa: E402

bw = copy_bandwidth()
default = sampling.STREAM_VARIANTS
for vocab, batch in [(128256, 128), (128256, 512), (128256, 32), (128256, 1), (151936, 128), (32000, 512),
                     (256000, 128)]:
    x = torch.randn((batch, vocab), device="cuda") * 3
    ideal = 2 * x.numel() * 4 / bw
    ref = torch.softmax(x, -1)
    for variants in (default, default[1:]):
        sampling.STREAM_VARIANTS = variants
        shape = sampling.softmax_stream_shape(vocab, batch, 132, True, True)
        cl, sl, items, per_sm = shape
        fn = sampling._fn(0, "softmax_stream_kernel", 512, items, 3, per_sm)
        k = fn.max_active_clusters(cl, 544, 3 * sl * 4)
        assert torch.allclose(sampling.softmax(x), ref, rtol=1e-4, atol=1e-9)
        t = time_graph(lambda: sampling.softmax(x))
        print(f"vocab {vocab} batch {batch} shape {shape} K {k}: {t * 1e6:.1f} us {ideal / t:.0%} of copy",
              flush=True)
    sampling.STREAM_VARIANTS = default
    t = time_graph(lambda: torch.softmax(x, -1))
    print(f"  torch.softmax {t * 1e6:.1f} us {ideal / t:.0%} of copy", flush=True)
