"""Tolerances by dtype, in one place: |out - ref| <= atol + rtol * |ref| element-wise, against a
float64 reference. They cover the rounding of the output to its dtype (fp16 ~ 2^-11, bf16 ~ 2^-8)
plus float32 accumulation; fp8 KV is compared with the reference on the same dequantised values."""
OUT_TOL = {"float16": (2e-3, 2e-3), "bfloat16": (1.6e-2, 1.6e-2), "float32": (1e-5, 1e-5)}
LSE_TOL = (2e-3, 1e-3)  # lse is computed and returned in float32


def assert_close(out, ref, dtype_name, what="out"):
    import numpy as np
    atol, rtol = OUT_TOL[dtype_name]
    out = np.asarray(out, dtype=np.float64)
    assert not np.isnan(out).any(), f"{what}: NaN in output (unwritten or invalid elements)"
    err = np.abs(out - ref)
    bad = err > atol + rtol * np.abs(ref)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.size} elements off; max abs err "
                           f"{err.max():.3g} (atol {atol}, rtol {rtol})")


def assert_lse_close(lse, ref, what="lse"):
    import numpy as np
    lse = np.asarray(lse, dtype=np.float64)
    assert not np.isnan(lse).any(), f"{what}: NaN"
    inf = np.isinf(ref)
    assert np.array_equal(np.isinf(lse), inf) and np.all(lse[inf] == ref[inf]), f"{what}: -inf mismatch"
    atol, rtol = LSE_TOL
    err = np.abs(lse[~inf] - ref[~inf])
    assert np.all(err <= atol + rtol * np.abs(ref[~inf])), f"{what}: max abs err {err.max():.3g}"
