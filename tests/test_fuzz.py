"""Differential fuzz suite (GPU): random *valid* configurations drawn from the whole supported space
of every op family, each compared against fi_cupy.reference with the tolerance rules of tolerances.py.

One pytest item a case, `test_fuzz[<family>-<seed>]`. A case draws everything (configuration and
data) from its seed alone, so one failure reproduces with one command, whatever ran before it (on a
machine with the same frameworks: inputs are CuPy arrays, and the few torch-caller options, a
torch.Generator and float8 arrays where the API reads float8 from the array's dtype, are drawn only
where torch with CUDA is importable, so the suite runs in full with CuPy alone):

    FI_CUPY_FUZZ_REPRO=<family>:<seed> pytest tests/test_fuzz.py

Knobs (environment): FI_CUPY_FUZZ_CASES (default 3000: about two minutes on an H200 with
`-n 8`), FI_CUPY_FUZZ_SEED (the base seed, default 0: case i has seed base * 10**6 + i),
FI_CUPY_FUZZ_FAMILIES (a comma list: only these families). Every case prints its family, seed and
configuration before it launches (pytest shows it for a failing case; `-s` shows all). After each
case the device is synchronised: a sticky CUDA error (illegal address, misaligned access) stops the
whole run, naming the case that caused it, instead of failing every case after it.

The families live in fuzz_attention.py (decode, prefill single / paged / ragged, cascade) and
fuzz_ops.py (page append, norms, activations, RoPE, sampling filters and renorms); each exports
FAMILIES = {name: (weight, draw, check)}: draw(rng) returns a configuration (a dict, every choice in
it, data seeds included) drawn from the numpy Generator rng alone; check(config) builds the inputs from
it, runs fi_cupy and compares against the reference, raising AssertionError.
"""
import os

import cupy
import numpy as np
import pytest

import fuzz_attention
import fuzz_ops

pytestmark = pytest.mark.gpu

FAMILIES = {**fuzz_attention.FAMILIES, **fuzz_ops.FAMILIES}


def _cases() -> list:
    repro = os.environ.get("FI_CUPY_FUZZ_REPRO")
    if repro:
        family, seed = repro.rsplit(":", 1)
        if family not in FAMILIES:
            raise ValueError(f"FI_CUPY_FUZZ_REPRO: unknown family {family!r}; expected one of {sorted(FAMILIES)}")
        return [(family, int(seed))]
    n = int(os.environ.get("FI_CUPY_FUZZ_CASES", "3000"))
    base = int(os.environ.get("FI_CUPY_FUZZ_SEED", "0"))
    only = os.environ.get("FI_CUPY_FUZZ_FAMILIES")
    names = sorted(FAMILIES) if not only else [f.strip() for f in only.split(",") if f.strip()]
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise ValueError(f"FI_CUPY_FUZZ_FAMILIES: unknown {unknown}; expected some of {sorted(FAMILIES)}")
    weights = np.array([FAMILIES[f][0] for f in names], dtype=np.float64)
    # Families by weight, interleaved, from the base seed alone (a case's seed does not depend on
    # which families the run takes: seed = base * 10**6 + i).
    pick = np.random.default_rng(base).choice(len(names), size=n, p=weights / weights.sum())
    return [(names[k], base * 10 ** 6 + i) for i, k in enumerate(pick)]


CASES = _cases()


@pytest.mark.parametrize("family,seed", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_fuzz(family, seed):
    _, draw, check = FAMILIES[family]
    config = draw(np.random.default_rng(seed))
    case = f"FI_CUPY_FUZZ_REPRO={family}:{seed} {config}"
    print(f"fuzz case: {case}", flush=True)  # before the first launch
    try:
        check(config)
    except AssertionError as e:
        raise AssertionError(f"{e}\n  config: {case}") from e
    finally:
        try:
            cupy.cuda.runtime.deviceSynchronize()  # every stream: torch callers' too
        except RuntimeError as e:  # CUDARuntimeError, sticky: every later CUDA call in this process would fail too
            pytest.exit(f"sticky CUDA error after {case}: {e}", returncode=3)
