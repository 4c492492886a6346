"""Host-side cost of one small-op call (rmsnorm on one token, torch caller): wall time per call, the
cost of each stage of fi_cupy's call path (the per-signature fast path and the full path it replays),
and cProfile's top entries.

    python bench/profile_small_host.py
"""
import sys

import torch

import fi_cupy
from fi_cupy import norm
from fi_cupy._core import fastpath, streams

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import per_call_us, print_profile  # noqa: E402


def per_call(f):
    return per_call_us(f, 2000, warmup=20)


def main():
    x = torch.randn((1, 4096), device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(x)
    fi_cupy.rmsnorm(x, w, out=o)
    torch.cuda.synchronize()
    print(f"rmsnorm(out=): {per_call(lambda: fi_cupy.rmsnorm(x, w, out=o)):.1f} us per call (host-bound loop)")
    print(f"rmsnorm(): {per_call(lambda: fi_cupy.rmsnorm(x, w)):.1f} us per call")
    print(f"gemma_rmsnorm(out=): {per_call(lambda: fi_cupy.gemma_rmsnorm(x, w, out=o)):.1f} us per call")
    print(f"silu_and_mul(out=): {per_call(lambda: fi_cupy.silu_and_mul(x, out=o[:, :2048])):.1f} us per call")
    print(f"torch rms_norm: {per_call(lambda: torch.nn.functional.rms_norm(x, (4096,), w, 1e-6)):.1f} us per call")
    recipe = next(iter(norm._SIGS._recipes.values()))
    stages = {
        "fastpath.key_of (5 arrays)": lambda: fastpath.key_of((x, w, None, None, o), ("rms", 1e-6, None)),
        "torch current stream (raw)": lambda: streams.torch_current(0),
        "torch.empty": lambda: torch.empty((1, 4096), dtype=torch.bfloat16, device="cuda:0"),
        "recipe.replay": lambda: recipe.replay((x, w, None, None, o), [x.data_ptr(), w.data_ptr(), 0, 0,
                                                                       o.data_ptr()]),
        "full path (no replay)": lambda: norm._norm_call("rms", x, w, None, 1e-6, o, None, None),
    }
    for name, f in stages.items():
        print(f"  {name}: {per_call(f):.1f} us")
    launch_variants(recipe, x, w, o)
    print_profile(lambda: fi_cupy.rmsnorm(x, w, out=o), 500, torch.cuda.synchronize)
    cupy_caller()
    jax_caller()


def cupy_caller():
    """The same call from CuPy arrays (the issue's target: 8 us), its stages and profile."""
    import cupy
    x = cupy.random.standard_normal((1, 4096), dtype=cupy.float32).astype(cupy.float16)
    w = cupy.random.standard_normal(4096, dtype=cupy.float32).astype(cupy.float16)
    o = cupy.empty_like(x)
    fi_cupy.rmsnorm(x, w, out=o)
    cupy.cuda.runtime.deviceSynchronize()
    print(f"CuPy caller: rmsnorm(out=) {per_call(lambda: fi_cupy.rmsnorm(x, w, out=o)):.1f} us per call")
    print(f"CuPy caller: silu_and_mul(out=) {per_call(lambda: fi_cupy.silu_and_mul(x, out=o[:, :2048])):.1f} us")
    stages = {
        "fastpath.key_of (5 arrays)": lambda: fastpath.key_of((x, w, None, None, o), ("rms", 1e-6, None)),
        "cupy current stream": lambda: streams.cupy_current(0),
        "cupy.empty": lambda: cupy.empty((1, 4096), dtype=cupy.float16),
        "x.data.ptr": lambda: x.data.ptr,
        "x.device.id": lambda: x.device.id,
    }
    for name, f in stages.items():
        print(f"  {name}: {per_call(f):.1f} us")
    print_profile(lambda: fi_cupy.rmsnorm(x, w, out=o), 500, cupy.cuda.runtime.deviceSynchronize)


def jax_caller():
    """The same call from JAX arrays (no fast path: 184-2290 us a call in bench_host), its stages and profile:
    what a JAX fast path would have to avoid."""
    import os
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax
        import jax.numpy as jnp
    except ImportError as e:
        print(f"JAX caller: not importable ({e})")
        return
    import cupy
    from fi_cupy._core import arrays, dtypes
    x = jax.device_put(jnp.ones((1, 4096), jnp.bfloat16))
    w = jax.device_put(jnp.ones((4096,), jnp.bfloat16))
    fi_cupy.rmsnorm(x, w).block_until_ready()

    @jax.jit
    def jax_rms(x, w):
        xf = x.astype(jnp.float32)
        return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6) * w).astype(x.dtype)

    jax_rms(x, w).block_until_ready()
    sync = cupy.cuda.runtime.deviceSynchronize
    print(f"JAX caller: rmsnorm() {per_call_us(lambda: fi_cupy.rmsnorm(x, w), 500, 10, sync):.1f} us per call")
    print(f"JAX caller: silu_and_mul() {per_call_us(lambda: fi_cupy.silu_and_mul(x), 500, 10, sync):.1f} us")
    print(f"  jax.jit rms norm (JAX's own op): {per_call_us(lambda: jax_rms(x, w), 500, 10, sync):.1f} us")
    print(f"  jnp x + 1 (JAX's cheapest eager op): {per_call_us(lambda: x + 1, 500, 10, sync):.1f} us")
    s = streams.cupy_current(0)
    bf16 = dtypes.as_dtype("bfloat16")
    other_stream = cupy.cuda.Stream(non_blocking=True)  # kept alive while its handle is used
    other = other_stream.ptr
    buf = arrays.DeviceBuffer((1, 4096), bf16, 0, s)
    stages = {
        "fastpath.key_of((x, w)) (2 exports, ordered)": lambda: fastpath.key_of((x, w), ("rms", 1e-6)),
        "arrays.capsule_head": lambda: arrays.capsule_head(x.__dlpack__(stream=s), 2),
        "DeviceBuffer.__dlpack__(stream) (capsule + ordering)": lambda: buf.__dlpack__(stream=other),
        "arrays.to_jax(new DeviceBuffer) (fast import)":
            lambda: arrays.to_jax(arrays.DeviceBuffer((1, 4096), bf16, 0, s)),
        "arrays.hold([x]) (event record + release)": lambda: arrays.hold(0, s, [x]),
        "x.__dlpack__(stream=s)": lambda: x.__dlpack__(stream=s),
        "arrays.describe(x) (DLPack export, ordered on s)": lambda: arrays.describe(x, "x", s, "cupy"),
        "x.is_ready()": lambda: x.is_ready(),
        "x.unsafe_buffer_pointer()": lambda: x.unsafe_buffer_pointer(),
        "x.shape, x.dtype": lambda: (x.shape, x.dtype),
        "x.devices()": lambda: x.devices(),
        "arrays.empty('jax') (DeviceBuffer)": lambda: arrays.empty("jax", (1, 4096), bf16, 0, s),
        "jax.dlpack.from_dlpack(new DeviceBuffer)":
            lambda: jax.dlpack.from_dlpack(arrays.DeviceBuffer((1, 4096), bf16, 0, s)),
        "streams.order_after (event + wait)": lambda: streams.order_after(0, s, other),
        "arrays.keep_alive(x)": lambda: arrays.keep_alive(0, s, [arrays.describe(x, "x", s, "cupy")]),
    }
    for name, f in stages.items():
        try:
            print(f"  {name}: {per_call_us(f, 300, 10, sync):.1f} us")
        except Exception as e:  # noqa: BLE001 - a stage this JAX lacks: say so, time the rest
            print(f"  {name}: failed ({type(e).__name__}: {e})")
    print_profile(lambda: fi_cupy.rmsnorm(x, w), 300, sync)


def _eleven(a, b, c, d, e, f, g, h, i, j, k):
    return None


def launch_variants(recipe, x, w, o):
    """The launch alone, several ways, for the recorded rmsnorm kernel: as recorded (kernels.Prepared: ctypes
    cuLaunchKernelEx, with and without the programmatic-dependent-launch attribute), CuPy's Cython
    cuLaunchKernel on the same packed parameters and its Function.__call__, the capture query, and torch's
    cheapest eager op for scale."""
    import numpy as np
    from fi_cupy._core import kernels
    prepared, values, slots, _ = recipe.steps[0]
    ptrs = [x.data_ptr(), w.data_ptr(), 0, 0, o.data_ptr()]
    vals = list(values)
    for i, src, off in slots:
        vals[i] = ptrs[src] + off
    stream = streams.torch_current(0)
    gx, gy, gz, bx, by, bz, smem = prepared.head
    plain = kernels.Prepared(prepared.fn, (gx, gy, gz), (bx, by, bz), prepared.sig, 0, smem, pdl=False)
    print(f"  launch as recorded (kernels.Prepared: ctypes cuLaunchKernelEx, PDL attribute): "
          f"{per_call(lambda: prepared(vals, stream)):.1f} us")
    print(f"  the same without the attribute: {per_call(lambda: plain(vals, stream)):.1f} us")
    buf, params_c, pack, _ = kernels._buffers(prepared.sig)
    params = params_c.value
    pack(buf, 0, *vals)
    fnptr = prepared.fnptr
    # the launch before 2026-12-06 (A/B in one run): argtypes c_void_p, Python ints converted each call
    import ctypes
    old = ctypes.CDLL("libcuda.so.1")["cuLaunchKernelEx"]
    old.argtypes, old.restype = [ctypes.c_void_p] * 4, ctypes.c_int
    prepared.here(vals, stream)
    st = prepared.local.st
    cfg = st[4].value
    print(f"  ctypes cuLaunchKernelEx, int arguments converted (before): "
          f"{per_call(lambda: old(cfg, fnptr, params, None)):.1f} us")
    lib_f = kernels._cuda()[1]
    cfg_c, fn_c = st[4], st[6]
    print(f"  ctypes cuLaunchKernelEx, c_void_p arguments made once (now): "
          f"{per_call(lambda: lib_f(cfg_c, fn_c, params_c, None)):.1f} us")
    py_f = ctypes.PyDLL("libcuda.so.1")["cuLaunchKernelEx"]
    py_f.restype = ctypes.c_int
    print(f"  the same through PyDLL (GIL held): {per_call(lambda: py_f(cfg_c, fn_c, params_c, None)):.1f} us")
    print(f"  parameter packing alone (Struct.pack_into): {per_call(lambda: pack(buf, 0, *vals)):.1f} us")
    from cupy.cuda import driver, runtime
    print(f"  launch: CuPy driver.launchKernel (Cython cuLaunchKernel, packed once): "
          f"{per_call(lambda: driver.launchKernel(fnptr, gx, gy, gz, bx, by, bz, smem, stream, params, 0)):.1f} us")
    print(f"  runtime.streamIsCapturing: {per_call(lambda: runtime.streamIsCapturing(stream)):.1f} us")
    print(f"  a Python call of 11 ints (the loop's floor): "
          f"{per_call(lambda: _eleven(fnptr, gx, gy, gz, bx, by, bz, smem, stream, params, 0)):.1f} us")
    if not any(isinstance(v, bytes) for v in vals):
        typed = tuple(np.uint64(v) if t is kernels.DevPtr else t(v) for t, v in zip(prepared.sig, vals))
        with streams.as_cupy(stream):
            print(f"  launch: CuPy Function.__call__: "
                  f"{per_call(lambda: prepared.fn.fn((gx, gy, gz), (bx, by, bz), typed, shared_mem=smem)):.1f} us")
    print(f"  torch x.add_(0) (the cheapest eager op): {per_call(lambda: x.add_(0)):.1f} us")


if __name__ == "__main__":
    main()
