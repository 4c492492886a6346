"""Registers, spills and SASS instruction counts of the prefill kernel with each custom-variant example, on this
machine's NVRTC, no GPU needed: what to look at before spending device time on a hook A/B (bench/NOTES.md,
2026-12-08: the slope load after WARPGROUP.DEPBAR was found this way).

    python bench/sass_counts.py [--arch sm_90a] [--tile sm90|fa2] [--dtype float16] [--show LDG,DEPBAR] [names...]

names: examples of examples/attention_variants.py, or "default" (no variant); all of them when none is given.
--show prints the lines of the kernel's SASS whose opcode starts with one of the given prefixes, in order (where a
load sits against the waits). nvdisasm: $NVDISASM, else on PATH, else the pip wheel nvidia-cuda-nvdisasm.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from attention_variants import EXAMPLES  # noqa: E402

from fi_cupy import prefill  # noqa: E402
from fi_cupy._core import compile as cc, dtypes as dt  # noqa: E402

OPS = ("HGMMA", "HMMA", "MUFU", "FFMA", "FMUL", "FADD", "FSEL", "I2F", "I2FP", "IMAD", "IADD3", "ISETP", "LDG", "LDS",
       "STS", "LDSM", "BRA")
_LINE = re.compile(r"/\*([0-9a-f]+)\*/\s+((?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)[^;]*);")


def nvdisasm() -> str:
    found = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if not found:
        wheels = glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "nvidia", "cu*", "bin", "nvdisasm"))
        found = wheels[0] if wheels else None
    if not found:
        raise SystemExit("nvdisasm not found: set NVDISASM, or pip install nvidia-cuda-nvdisasm")
    return found


def sass_of(name: str, arch: str, hopper: bool, dtype) -> tuple:
    """(resource usage, [(offset, instruction, opcode)]) of the main kernel with example `name`, paged, at head
    dim 128: the Hopper kernel, or the portable kernel's tile for a long request (pick_tile)."""
    variant = None if name == "default" else EXAMPLES[name]
    tile = prefill.SM90_TILE if hopper else prefill.pick_tile(128, 1 << 20, variant=variant is not None)
    prog = prefill.prefill_program(128, tile, dtype, dtype, True, False, 0, 128, variant)
    got = prog.compile(arch)
    usage = cc.resource_usage(got.log)[got.lowered[prog.kernels[0].name_expr]]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(got.binary)
        f.flush()
        text = subprocess.run([nvdisasm(), "-c", f.name], capture_output=True, text=True, check=True).stdout
    return usage, [(m.group(1), m.group(2).strip(), m.group(3)) for m in _LINE.finditer(text)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=["default", *EXAMPLES])
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--tile", choices=("sm90", "fa2"), default="sm90", help="the Hopper kernel or the portable one")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--show", default="", help="comma-separated opcode prefixes to list in order")
    args = ap.parse_args()
    show = tuple(p for p in args.show.split(",") if p)
    for name in args.names:
        usage, lines = sass_of(name, args.arch, args.tile == "sm90", dt.as_dtype(args.dtype))
        ops = collections.Counter(op.split(".")[0] for _, _, op in lines)
        print(f"{name}: {usage['registers']} registers, {usage['spill_stores']} B spilled, {len(lines)} instructions; "
              + ", ".join(f"{k} {ops[k]}" for k in OPS if ops[k]))
        for off, ins, op in lines:
            if show and op.startswith(show):
                print(f"    {off}  {ins}")


if __name__ == "__main__":
    main()
