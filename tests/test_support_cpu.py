"""The README's support table is fi_cupy.support.table(): generated from the instantiations CI compiles,
so a kernel path, head dim, dtype or option added or dropped shows here first (CPU)."""
from pathlib import Path

from fi_cupy._core.kernels import SMEM_EVERY_GPU
from fi_cupy import decode, prefill, support

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = '<!-- support table: python -c "from fi_cupy import support; print(support.table())" -->'
END = "<!-- end of support table -->"


def test_readme_table_is_current():
    text = README.read_text()
    assert BEGIN in text and END in text, "the README lost its support-table markers"
    got = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert got == support.table(), ("README.md's support table is stale: replace it with the output of "
                                    "python -c \"from fi_cupy import support; print(support.table())\"")


def test_table_covers_every_kernel_path():
    """Each compiled decode / prefill kernel template has a row; the head dims are the supported ones."""
    rows = support._rows()
    kernels = {kernel for _, kernel, *_ in rows}
    assert {"tensor cores (mma.sync)", "tensor cores, head dim split over warps", "CUDA cores, RoPE on the fly",
            "CUDA cores, GPUs with less shared memory",
            "fa2 (portable, mma.sync)", "fa3 (sm_90a, wgmma)"} == kernels
    for op, kernel, dims, *_ in rows:
        want = (decode.WIDE_HEAD_DIMS if "split" in kernel else
                [d for d in decode.KERNEL_HEAD_DIMS if decode.decode_smem_bytes(d, 8, True) > SMEM_EVERY_GPU]
                if "less shared" in kernel else decode.KERNEL_HEAD_DIMS) \
            if op.startswith("BatchDecode") else [prefill.MLA_DIMS] if op.startswith("BatchMLA") else \
            prefill.SM90_HEAD_DIMS if kernel.startswith("fa3") else \
            prefill.SUPPORTED_HEAD_DIMS + prefill.HEAD_DIM_PAIRS
        assert set(dims) == set(want), (op, kernel)


def test_dims_format():
    assert support._dims(list(range(16, 257, 16)) + [512, (192, 128), (128, 64)]) == \
        "16 to 256, step 16, 512, 128/64, 192/128"
    assert support._dims([64, 128]) == "64, 128" and support._dims([64, 128, 256]) == "64, 128, 256"
