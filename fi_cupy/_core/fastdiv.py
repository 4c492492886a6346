"""Host side of fic::FastDiv (cuda_src/common/math.cuh): n / d as (umulhi(n, mul) + n) >> shift,
exact for every 0 <= n < 2**31 (Granlund & Montgomery, round-up variant)."""
from __future__ import annotations


def fastdiv_params(d: int) -> tuple:
    """(d, mul, shift) for a divisor 1 <= d < 2**31."""
    if not 1 <= d < 2 ** 31:
        raise ValueError(f"divisor must be in [1, 2**31), got {d}")
    shift = (d - 1).bit_length()
    mul = ((1 << 32) * ((1 << shift) - d)) // d + 1
    return d, mul & 0xFFFFFFFF, shift


def fastdiv_quot(n: int, mul: int, shift: int) -> int:
    """What the kernel computes (for tests)."""
    return (((n * mul) >> 32) + n) >> shift
