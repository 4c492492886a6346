"""The messages a newcomer meets first (issue 27), each checked on a machine without a GPU: no CuPy (the
install command from a checkout and from an index), no GPU (one CudaEnvironmentError saying why, from
every public op and wrapper, in place of CuPy's cudaErrorInsufficientDriver), host arrays (a TypeError
naming the argument and saying how to move it), the skip reasons pytest prints, and the LICENSE.

No GPU is simulated where one is visible: CuPy's device queries raise as they do without a driver, and
kernels.launch is a tripwire, so the stand-in arrays (StubArray: DLPack metadata, no memory) never
reach a kernel."""
import ctypes
import hashlib
import importlib.metadata
import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import cupy  # a dependency of fi_cupy: the "no CuPy" cases run in subprocesses
from cupy_backends.cuda.api.runtime import CUDARuntimeError

import fi_cupy
from conftest import GPU_SKIP_REASON
from fi_cupy._core import arrays, kernels, streams
from fi_cupy._core import dtypes as dt

try:
    import torch
except ImportError:  # only the torch-tensor cases need it
    torch = None
try:
    import jax
except ImportError:  # only the JAX-array case needs it
    jax = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch (interop test)")
needs_jax = pytest.mark.skipif(jax is None, reason="needs JAX (interop test)")

REPO = Path(__file__).resolve().parents[1]
MOVE_IT = "move it to the GPU first: cupy.asarray(x), torch.as_tensor(x, device='cuda') or jax.device_put(x)"
INSUFFICIENT_DRIVER, NO_DEVICE = 35, 100


class StubArray:
    """An array as DLPack describes it (pointer, shape, dtype, device), with no memory behind it."""

    def __init__(self, shape=(4, 64), dtype=dt.float16, device_type=arrays.KDL_CUDA):
        n = len(shape)
        self.device_type = device_type
        self._shape = (ctypes.c_int64 * max(n, 1))(*shape)
        mt = self._managed = arrays._DLManagedTensor()
        mt.dl_tensor.data = 1 << 20
        mt.dl_tensor.device = arrays._DLDevice(device_type, 0)
        mt.dl_tensor.ndim = n
        mt.dl_tensor.dtype = arrays._DLDataType(dtype.code, dtype.bits, 1)
        mt.dl_tensor.shape = ctypes.cast(self._shape, ctypes.POINTER(ctypes.c_int64))

    def __dlpack_device__(self):
        return (self.device_type, 0)

    def __dlpack__(self, stream=None):
        return arrays._capsule_new(ctypes.addressof(self._managed), b"dltensor", None)


def _tripwire(*args, **kwargs):
    raise AssertionError("a kernel was launched on a stand-in array")


@pytest.fixture
def no_gpu(monkeypatch):
    """CuPy as it is without a GPU: the device queries raise (the reason given by set(status, driver)),
    and no earlier call's "a GPU was seen" is remembered."""
    rt = cupy.cuda.runtime
    state = {"status": INSUFFICIENT_DRIVER, "driver": 0, "count": None}

    def count():
        if state["count"] is not None:
            return state["count"]
        raise CUDARuntimeError(state["status"])

    def props(device):
        raise CUDARuntimeError(state["status"])

    monkeypatch.setattr(rt, "getDeviceCount", count)
    monkeypatch.setattr(rt, "getDeviceProperties", props)
    monkeypatch.setattr(rt, "driverGetVersion", lambda: state["driver"])
    monkeypatch.setattr(rt, "runtimeGetVersion", lambda: 13000)
    monkeypatch.setattr(streams, "_gpu_seen", [])
    monkeypatch.setattr(kernels, "_props", {})
    monkeypatch.setattr(kernels, "launch", _tripwire)

    def set_(status=INSUFFICIENT_DRIVER, driver=0, count=None):
        state.update(status=status, driver=driver, count=count)
    return set_


def _env():
    # the subprocess imports the fi_cupy this process tests (installed or the source tree)
    path = os.pathsep.join(filter(None, [str(Path(fi_cupy.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


# ---------------------------------------------------------------------------------------------
# No CuPy


def _import_without_cupy(how: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(how) + "\nimport fi_cupy\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)


def _assert_install_hint(r) -> str:
    assert r.returncode != 0
    msg = r.stderr[r.stderr.rindex("ImportError: "):]
    for needle in ("nvidia-smi", "13.x -> cuda13, 12.x -> cuda12",
                   "from a source checkout (the folder with pyproject.toml): pip install '.[cuda13]'  (or '.[cuda12]')",
                   "from a package index, once fi_cupy is published there:   pip install 'fi_cupy[cuda13]'  "
                   "(or 'fi_cupy[cuda12]')"):
        assert needle in msg, msg
    return msg


def test_no_cupy_gives_the_install_commands():
    r = _import_without_cupy("import sys; sys.modules['cupy'] = None  # import cupy raises ImportError")
    assert _assert_install_hint(r).startswith("ImportError: fi_cupy needs CuPy. Install it with the extra for "
                                              "your CUDA driver")


def test_broken_cupy_says_so_with_the_install_commands():
    r = _import_without_cupy("""
        import sys
        class Broken:  # CuPy present but its CUDA libraries missing
            def find_spec(self, name, path=None, target=None):
                if name == "cupy":
                    raise ImportError("libcudart.so.13: cannot open shared object file", name="cupy_backends")
        sys.meta_path.insert(0, Broken())
        """)
    msg = _assert_install_hint(r)
    assert msg.startswith("ImportError: CuPy could not be imported (libcudart.so.13: cannot open shared object "
                          "file). Install it"), msg


# ---------------------------------------------------------------------------------------------
# No GPU


@pytest.mark.parametrize("status, driver, count, visible, why", [
    (INSUFFICIENT_DRIVER, 0, None, None, "CuPy's CUDA 13.0 runtime found no NVIDIA driver"),
    (INSUFFICIENT_DRIVER, 12040, None, None,
     "the NVIDIA driver supports CUDA 12.4, older than CuPy's CUDA 13.0 runtime; install fi_cupy's cuda12 extra "
     "to match it"),
    (NO_DEVICE, 13000, None, "", "the NVIDIA driver found no CUDA device (CUDA_VISIBLE_DEVICES='')"),
    (None, 13000, 0, None, "device count 0"),
])
def test_no_gpu_says_why(no_gpu, monkeypatch, status, driver, count, visible, why):
    no_gpu(status, driver, count)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert streams.gpu_count() == (0, why)
    with pytest.raises(fi_cupy.CudaEnvironmentError) as err:
        fi_cupy.rmsnorm(StubArray(), StubArray((64,)))
    assert isinstance(err.value, RuntimeError)
    assert str(err.value) == (f"no CUDA GPU visible ({why}); fi_cupy runs its kernels on an NVIDIA GPU (compute "
                              "capability 8.0 or newer) that `nvidia-smi` lists")
    assert "cudaError" not in str(err.value)  # CuPy's words, which suggest a driver upgrade


@pytest.mark.skipif(GPU_SKIP_REASON is None, reason="a GPU is visible: the tests above simulate its absence")
def test_no_gpu_on_this_machine():
    """The real thing, no simulation: this machine has no GPU (or no driver)."""
    n, why = streams.gpu_count()
    assert n == 0 and why and "cudaError" not in why
    with pytest.raises(fi_cupy.CudaEnvironmentError, match=re.escape(f"no CUDA GPU visible ({why}); fi_cupy runs")):
        fi_cupy.silu_and_mul(StubArray((4, 128)))


I32 = dt.int32
# Arguments that are not (float16) arrays, by name: what the op checks before its first CUDA call.
_NOT_ARRAYS = {"head_size": 64, "nnz": 4, "page_size": 16, "top_k": 5, "top_p": 0.5, "min_p": 0.1,
               "jit_module": fi_cupy.AttentionVariant("V", "struct V : AttentionVariantBase {};")}
_INT_ARRAYS = ("indptr", "offsets", "pos_ids", "positions", "batch_indices", "kv_indices", "kv_indptr",
               "kv_last_page_len", "append_indptr", "seq_lens", "draft_token_ids")


_HOST_ARGS = {("segment_packbits", "indptr"): np.array([0, 3, 5])}  # host index arrays, as plan() takes


NO_DEVICE = ("fast_decode_plan", "get_batch_prefill_jit_module", "get_batch_decode_jit_module")  # no array of their own


def _public_functions():
    return [n for n in fi_cupy.__all__ if inspect.isfunction(getattr(fi_cupy, n)) and n not in NO_DEVICE]


def _stub_args(name):
    args = []
    for p in inspect.signature(getattr(fi_cupy, name)).parameters.values():
        if p.default is not inspect.Parameter.empty or p.kind != p.POSITIONAL_OR_KEYWORD:
            continue
        args.append(_HOST_ARGS[name, p.name] if (name, p.name) in _HOST_ARGS else
                    _NOT_ARRAYS[p.name] if p.name in _NOT_ARRAYS else
                    StubArray((5,), I32) if p.name in _INT_ARRAYS else StubArray())
    return args


NO_GPU_LINE = r"^no CUDA GPU visible \(CuPy's CUDA 13.0 runtime found no NVIDIA driver\); fi_cupy runs its kernels"


@pytest.mark.parametrize("name", _public_functions())
def test_every_op_without_gpu_says_so(no_gpu, name):
    with pytest.raises(fi_cupy.CudaEnvironmentError, match=NO_GPU_LINE):
        getattr(fi_cupy, name)(*_stub_args(name))


@pytest.mark.skipif(GPU_SKIP_REASON is None, reason="with a GPU, the host copy would read the stand-in's address")
def test_segment_packbits_with_a_device_indptr_without_gpu(no_gpu):
    with pytest.raises(fi_cupy.CudaEnvironmentError, match=NO_GPU_LINE):
        fi_cupy.segment_packbits(StubArray((5,), dt.bool_), StubArray((3,), I32))


WS = StubArray((1 << 20,), dt.uint8)
DECODE_PLAN = dict(indptr=np.array([0, 2, 3]), indices=np.array([4, 1, 0]), last_page_len=np.array([3, 16]),
                   num_qo_heads=8, num_kv_heads=2, head_dim=64, page_size=16)
WRAPPERS = {
    "decode": lambda: fi_cupy.BatchDecodeWithPagedKVCacheWrapper(WS).plan(**DECODE_PLAN),
    "decode_tensor_cores": lambda: fi_cupy.BatchDecodeWithPagedKVCacheWrapper(
        WS, use_tensor_cores=True).plan(**DECODE_PLAN),
    "fast_decode_plan": lambda: fi_cupy.fast_decode_plan(fi_cupy.BatchDecodeWithPagedKVCacheWrapper(WS), **DECODE_PLAN),
    "cuda_graph_decode": lambda: fi_cupy.CUDAGraphBatchDecodeWithPagedKVCacheWrapper(
        WS, StubArray((3,), I32), StubArray((3,), I32), StubArray((2,), I32)).plan(**DECODE_PLAN),
    "prefill_paged": lambda: fi_cupy.BatchPrefillWithPagedKVCacheWrapper(WS).plan(
        np.array([0, 5, 6]), np.array([0, 2, 3]), np.array([4, 1, 0]), np.array([3, 16]), 8, 2, 64, 16),
    "prefill_ragged": lambda: fi_cupy.BatchPrefillWithRaggedKVCacheWrapper(WS).plan(
        np.array([0, 5, 6]), np.array([0, 19, 35]), 8, 2, 64),
    "cascade": lambda: fi_cupy.MultiLevelCascadeAttentionWrapper(2, WS).plan(
        [np.array([0, 6]), np.array([0, 5, 6])], [np.array([0, 1]), np.array([0, 2, 3])],
        [np.array([7]), np.array([4, 1, 0])], [np.array([16]), np.array([3, 16])], 8, 2, 64, 16),
}


@pytest.mark.parametrize("plan", WRAPPERS.values(), ids=WRAPPERS.keys())
def test_every_wrapper_without_gpu_says_so(no_gpu, plan):
    """plan() with host index arrays (which it takes legitimately) on a wrapper whose workspace is a
    CUDA array, as a GPU-less machine would have one: the first CUDA call says there is no GPU."""
    with pytest.raises(fi_cupy.CudaEnvironmentError, match=NO_GPU_LINE):
        plan()


def test_a_gpu_once_seen_is_not_queried_again(no_gpu, monkeypatch):
    no_gpu(count=2)
    streams.require_gpu()
    assert streams._gpu_seen == [2]
    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", _tripwire)
    streams.require_gpu()  # the hot path: one list check


# ---------------------------------------------------------------------------------------------
# Host arrays


def _host(shape=(4, 64), dtype=np.float16):
    return np.zeros(shape, dtype)


HOST_CASES = {
    # the first array of an op: refused before the stream is resolved (a CUDA call)
    "rmsnorm_input": ("input", "numpy", lambda: fi_cupy.rmsnorm(_host(), StubArray((64,)))),
    "merge_state_v_a": ("v_a", "numpy", lambda: fi_cupy.merge_state(_host(), StubArray(), StubArray(), StubArray())),
    "single_decode_q": ("q", "numpy", lambda: fi_cupy.single_decode_with_kv_cache(
        _host((8, 64)), StubArray((10, 2, 64)), StubArray((10, 2, 64)))),
    "sampling_probs": ("probs", "numpy", lambda: fi_cupy.sampling_from_probs(_host(dtype=np.float32))),
    "decode_workspace": ("float_workspace_buffer", "numpy",
                         lambda: fi_cupy.BatchDecodeWithPagedKVCacheWrapper(_host((1 << 20,), np.uint8))),
    # a later array, described on the call's stream (explicit here: no GPU to resolve the current one)
    "rmsnorm_weight": ("weight", "numpy", lambda: fi_cupy.rmsnorm(StubArray(), _host((64,)), stream=0)),
    "merge_state_s_b": ("s_b", "numpy", lambda: fi_cupy.merge_state(
        StubArray((4, 8, 64)), StubArray((4, 8), dt.float32), StubArray((4, 8, 64)),
        _host((4, 8), np.float32), stream=0)),
    "append_paged_kv_cache": ("paged_kv_cache", "numpy", lambda: fi_cupy.append_paged_kv_cache(
        StubArray((5, 2, 64)), StubArray((5, 2, 64)), StubArray((5,), I32), StubArray((5,), I32),
        _host((10, 2, 16, 2, 64)), StubArray((4,), I32), StubArray((3,), I32), StubArray((2,), I32), stream=0)),
    # any DLPack producer's host memory
    "cpu_dlpack": ("input", "", lambda: fi_cupy.silu_and_mul(StubArray(device_type=arrays.KDL_CPU))),
    "pinned_dlpack": ("input", "", lambda: fi_cupy.silu_and_mul(StubArray(device_type=arrays.KDL_CUDA_HOST))),
}


@pytest.mark.parametrize("name, framework, call", HOST_CASES.values(), ids=HOST_CASES.keys())
def test_host_array_is_refused_naming_it(no_gpu, name, framework, call):
    with pytest.raises(TypeError) as err:
        call()
    msg = str(err.value)
    kind = {"numpy": "a host numpy array", "": "a host array"}[framework]
    where = "CUDA host (pinned)" if "pinned" in msg else "CPU"
    assert msg == f"{name}: expected an array on a CUDA device, got one on {where} ({kind}); {MOVE_IT}"
    assert isinstance(err.value, ValueError)  # what this case raised before: callers catching it still do


def test_host_q_into_decode_run(no_gpu, monkeypatch):
    """run() resolves its stream before describing q: with an explicit one, q is the first array read.
    (The plan is a stand-in: planning needs a GPU; tests/test_decode.py has the GPU version.)"""
    w = fi_cupy.BatchDecodeWithPagedKVCacheWrapper(WS)
    monkeypatch.setattr(w, "_plan", SimpleNamespace(params=SimpleNamespace(window_left=-1, variant=None), max_page=-1))
    with pytest.raises(TypeError, match=re.escape(f"q: expected an array on a CUDA device, got one on CPU (a host "
                                                  f"numpy array); {MOVE_IT}")):
        w.run(_host((2, 8, 64)), StubArray((10, 2, 16, 2, 64)), stream=0)


@needs_torch
def test_host_torch_tensor_is_refused_naming_it(no_gpu):
    want = f"expected an array on a CUDA device, got one on CPU (a torch CPU tensor); {MOVE_IT}"
    with pytest.raises(TypeError, match=re.escape(f"input: {want}")):  # first array
        fi_cupy.gelu_and_mul(torch.zeros(4, 128, dtype=torch.float16))
    with pytest.raises(TypeError, match=re.escape(f"weight: {want}")):  # a later one
        fi_cupy.rmsnorm(StubArray(), torch.ones(64, dtype=torch.float16), stream=0)
    with pytest.raises(ValueError, match="input: expected an array on a CUDA device, got one on META$"):
        fi_cupy.gelu_and_mul(torch.zeros(4, 128, device="meta"))  # not host memory: no advice to move it


@needs_jax
def test_host_jax_array_is_refused_naming_it(no_gpu):
    x = jax.device_put(np.zeros((4, 64), np.float16), jax.devices("cpu")[0])
    with pytest.raises(TypeError, match=re.escape(f"input: expected an array on a CUDA device, got one on CPU (a "
                                                  f"JAX CPU array); {MOVE_IT}")):
        fi_cupy.rmsnorm(x, StubArray((64,)))


def test_plan_index_arrays_stay_host_arrays():
    """plan() index arrays are host arrays by design (checks.host_int_array): not refused."""
    from fi_cupy._core import checks
    assert checks.host_int_array("indptr", np.array([0, 2, 3], np.int32)).tolist() == [0, 2, 3]


@needs_torch
def test_plan_index_arrays_stay_host_arrays_torch():
    """The same for a torch CPU tensor (the torch caller's host index arrays)."""
    from fi_cupy._core import checks
    assert checks.host_int_array("indptr", torch.tensor([0, 2, 3])).tolist() == [0, 2, 3]


# ---------------------------------------------------------------------------------------------
# pytest's summary and the LICENSE


def test_pytest_lists_skip_reasons(tmp_path):
    """pyproject's addopts: `pytest tests` prints each skip with its reason, as .ci/run's -rs did."""
    (tmp_path / "test_one_skip.py").write_text("import pytest\n\n\ndef test_x():\n"
                                               "    pytest.skip('needs something this machine lacks')\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir",
                        str(tmp_path), "-p", "no:cacheprovider", "-q", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"SKIPPED \[1\] .*test_one_skip.py:\d+: needs something this machine lacks", r.stdout), r.stdout


# sha256 of https://www.apache.org/licenses/LICENSE-2.0.txt (202 lines, 11358 bytes)
APACHE_2_0_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_is_apache_2_0_with_our_copyright():
    text = (REPO / "LICENSE").read_text()
    first, rest = text.split("\n", 1)
    assert first == "Copyright 2026 the fi_cupy authors"
    assert hashlib.sha256(rest.encode()).hexdigest() == APACHE_2_0_SHA256  # the full text, unchanged
    assert re.search(r'^license = "Apache-2.0"$', (REPO / "pyproject.toml").read_text(), re.M)
    if os.environ.get("FI_CUPY_EXPECT_INSTALLED"):  # .ci/run: the wheel carries it
        files = importlib.metadata.distribution("fi_cupy").files or []
        got = [f for f in files if f.name == "LICENSE"]
        assert got and got[0].read_text() == text, files
