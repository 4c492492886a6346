"""The package under test is the installed one (CI installs a wheel) and finds its kernel sources."""
import os

import pytest

import fi_cupy
from fi_cupy._core import compile as cc


def test_kernel_sources_found():
    src = cc.cuda_src_dir()
    assert (src / "decode.cu").is_file() and (src / "common" / "types.cuh").is_file()


@pytest.mark.skipif(not os.environ.get("FI_CUPY_EXPECT_INSTALLED"), reason="only when CI installed a wheel")
def test_installed_copy_is_used():
    pkg = os.path.dirname(fi_cupy.__file__)
    assert "site-packages" in pkg, f"tests imported the source tree at {pkg}, not the installed wheel"
    assert str(cc.cuda_src_dir()).startswith(pkg), "cuda_src/ must ship inside the wheel"
