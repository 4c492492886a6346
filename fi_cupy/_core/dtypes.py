"""The element types fi_cupy knows, by DLPack code, with their names in each framework and in CUDA C++.

Dtypes are read from the DLPack (code, bits) pair, never from a framework's dtype object, so bfloat16
and float8 work even where CuPy itself cannot represent them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)  # one instance per dtype: identity compares and hashes fast
class DType:
    name: str        # canonical name, as torch / ml_dtypes spell it
    code: int        # DLPack type code
    bits: int
    cpp: str         # C++ type in cuda_src (namespace fic)

    @property
    def itemsize(self) -> int:
        return self.bits // 8

    def __str__(self) -> str:
        return self.name


float16 = DType("float16", 2, 16, "fic::half_t")
bfloat16 = DType("bfloat16", 4, 16, "fic::bf16_t")
float32 = DType("float32", 2, 32, "float")
float64 = DType("float64", 2, 64, "double")
float8_e4m3fn = DType("float8_e4m3fn", 10, 8, "fic::e4m3_t")
float8_e5m2 = DType("float8_e5m2", 12, 8, "fic::e5m2_t")
int32 = DType("int32", 0, 32, "int")
int64 = DType("int64", 0, 64, "long long")
int8 = DType("int8", 0, 8, "signed char")
int16 = DType("int16", 0, 16, "short")
uint8 = DType("uint8", 1, 8, "unsigned char")
uint16 = DType("uint16", 1, 16, "unsigned short")
uint32 = DType("uint32", 1, 32, "unsigned int")
uint64 = DType("uint64", 1, 64, "unsigned long long")
bool_ = DType("bool", 6, 8, "bool")

ALL = (float16, bfloat16, float32, float64, float8_e4m3fn, float8_e5m2, int32, int64, int8, int16, uint8, uint16,
       uint32, uint64, bool_)
_BY_CODE = {(d.code, d.bits): d for d in ALL}
_BY_CODE[(8, 8)] = float8_e4m3fn  # kDLFloat8_e4m3 as some producers label e4m3fn
_BY_NAME = {d.name: d for d in ALL}
_ALIASES = {
    "half": float16, "fp16": float16, "f16": float16, "bf16": bfloat16, "float": float32,
    "fp32": float32, "f32": float32, "double": float64, "fp8_e4m3": float8_e4m3fn,
    "e4m3": float8_e4m3fn, "float8_e4m3": float8_e4m3fn, "fp8_e5m2": float8_e5m2, "e5m2": float8_e5m2,
    "int": int32, "long": int64, "byte": uint8,
}


def from_dlpack_code(code: int, bits: int, lanes: int = 1) -> DType:
    d = _BY_CODE.get((code, bits))
    if d is None or lanes != 1:
        raise TypeError(f"unsupported DLPack dtype (code={code}, bits={bits}, lanes={lanes}); "
                        f"supported: {', '.join(x.name for x in ALL)}")
    return d


def as_dtype(x, arg: str = "dtype") -> DType:
    """Any framework's dtype (torch.dtype, numpy/cupy/JAX dtype or type) or a string -> DType."""
    if isinstance(x, DType):
        return x
    if isinstance(x, str):
        s = x
    elif type(x).__module__.startswith("torch"):
        s = str(x)
    else:
        try:
            s = np.dtype(x).name
        except TypeError:
            s = str(x)
    s = s.lower().removeprefix("torch.").removeprefix("jnp.").removeprefix("numpy.")
    d = _BY_NAME.get(s) or _ALIASES.get(s)
    if d is None:
        raise TypeError(f"{arg}: unknown dtype {x!r}; expected one of {', '.join(_BY_NAME)}")
    return d
