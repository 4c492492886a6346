"""Small helpers shared by the GPU tests of the element-wise families (torch callers)."""
import numpy as np

DTYPES = ("float16", "bfloat16", "float32")
_seed = [0]


def torch_dtype(name):
    import torch
    return getattr(torch, name)


def rand(shape, dtype="bfloat16", scale=1.0, generator=True):
    """Fresh random normal values (never zeros), a new seed per call."""
    import torch
    _seed[0] += 1
    g = torch.Generator(device="cuda").manual_seed(7000 + _seed[0])
    return (torch.randn(shape, generator=g, device="cuda") * scale).to(torch_dtype(dtype))


def nan_like(x):
    import torch
    return torch.full_like(x, float("nan"))


def f64(x) -> np.ndarray:
    return x.double().cpu().numpy()
