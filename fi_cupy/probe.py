"""Hopper probe: one wgmma instruction compiled through the NVRTC path (sm_90a) and run."""
from __future__ import annotations

import numpy as np

from ._core import kernels
from ._core.kernels import KernelSpec, Program, ptr, u32

PROGRAM = Program("probe.cu", (KernelSpec("fic::wgmma_probe_kernel", ()),))


def wgmma_matmul(a_bf16_bits: np.ndarray, b_bf16_bits: np.ndarray, device: int = 0,
                 lbo: int = 128, sbo: int = 256) -> np.ndarray:
    """D = A (64x16) @ B^T where B is (8x16); inputs are bf16 bit patterns (uint16). Needs sm_90a."""
    import cupy
    if kernels.device_arch(device) != "sm_90a":
        raise RuntimeError(f"wgmma needs an sm_90a device; this one compiles for {kernels.device_arch(device)}")
    with cupy.cuda.Device(device):
        a = cupy.asarray(a_bf16_bits.astype(np.uint16))
        b = cupy.asarray(b_bf16_bits.astype(np.uint16))
        d = cupy.full((64, 8), np.nan, dtype=np.float32)
        fn = kernels.functions(PROGRAM, device)[PROGRAM.kernels[0]]
        s = cupy.cuda.get_current_stream().ptr
        kernels.launch(fn, (1,), (128,), [ptr(a.data.ptr), ptr(b.data.ptr), ptr(d.data.ptr), u32(lbo), u32(sbo)],
                       s, device)
        return cupy.asnumpy(d)
