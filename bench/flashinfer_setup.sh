# Source this (bash) at the repo root on the offline GPU machine, after carrying
# ".whl" (built here by bench/flashinfer_bundle.sh):
#
#     source bench/flashinfer_setup.sh && python3 bench/bench_decode.py ...
#
# It installs FlashInfer 0.7.2 + apache-tvm-ffi from .whl/ into $FI_SITE
# (default /tmp/site; no network: tar + pip --no-index --no-deps), prepends
# $FI_SITE to PYTHONPATH, points FlashInfer's JIT cache at /tmp, restricts JIT
# to sm_90a, and prints one line saying whether `import flashinfer` works.
# It never exits or fails the calling shell.  Re-sourcing is cheap: the
# install is skipped while $FI_SITE holds the same bundle (sha256 stamp).
#
# After sourcing, `fi_prebuild [build|list] [min|full]` (defined below) JIT-builds
# the modules our benchmarks use in one parallel ninja run (MAX_JOBS jobs);
# `fi_prebuild list full` only prints their names (URIs).
#
# Variables that matter (all overridable before sourcing):
#   FI_SITE                     install dir (default /tmp/site)
#   FLASHINFER_WORKSPACE_BASE   JIT cache base; .so files land in
#                               $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer/0.7.2/90a/cached_ops
#   FLASHINFER_CUDA_ARCH_LIST   "9.0a" -> -gencode=arch=compute_90a,code=sm_90a only
#   MAX_JOBS                    ninja -j for JIT builds (16)
#   FLASHINFER_NVCC_THREADS     nvcc --threads per job (FlashInfer's default 1)
#   TVM_FFI_CACHE_DIR           tvm-ffi's own JIT cache (unused with torch>=2.10)
#   FLASHINFER_EXTRA_LDFLAGS    extended here only if the toolkit lacks
#                               lib64/libcudart.so or lib64/stubs/libcuda.so
#                               (symlinks made in /tmp/fi_ldlib)
#   FLASHINFER_EXTRA_CUDAFLAGS/_CFLAGS  get "-isystem $FI_SITE/fi_cuda_include"
#                               (bundled cuBLAS/cuRAND headers) only if
#                               $CUDA_HOME/include lacks cublasLt.h/curand_kernel.h
#   CUDA_HOME                   exported as the real toolkit root if unset
#                               (nvcc on PATH may be a wrapper script)

_fi_setup() {
    local repo whl site tarball tvm_whl py msg d="" lib="" ldextra=""
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)"
    [ -n "$repo" ] || repo="$(pwd)"
    whl="$repo/.whl"
    site="${FI_SITE:-/tmp/site}"
    py="${PYTHON:-python3}"
    tarball="$(ls "$whl"/flashinfer_python-*.tar.xz 2>/dev/null | head -1)"
    tvm_whl="$(ls "$whl"/apache_tvm_ffi-*.whl 2>/dev/null | head -1)"

    # ---- install -----------------------------------------------------------
    if [ -z "$tarball" ] || [ -z "$tvm_whl" ]; then
        echo "flashinfer_setup: no bundle in $whl (carry \".whl\"; build it with bench/flashinfer_bundle.sh)" >&2
    elif [ -f "$site/.flashinfer_bundle.sha256" ] && [ -f "$whl/flashinfer_bundle.sha256" ] \
         && cmp -s "$site/.flashinfer_bundle.sha256" "$whl/flashinfer_bundle.sha256"; then
        :   # same bundle already installed
    else
        mkdir -p "$site"
        if [ -f "$whl/flashinfer_bundle.sha256" ] && command -v sha256sum >/dev/null 2>&1; then
            (cd "$whl" && sha256sum -c --quiet flashinfer_bundle.sha256) \
                || echo "flashinfer_setup: WARNING checksum mismatch in $whl" >&2
        fi
        rm -rf "$site/flashinfer" "$site"/flashinfer_python-*.dist-info "$site/fi_cuda_include"
        if command -v xz >/dev/null 2>&1; then
            tar -xJf "$tarball" -C "$site"
        else
            "$py" -c 'import sys,tarfile; tarfile.open(sys.argv[1],"r:xz").extractall(sys.argv[2])' \
                "$tarball" "$site"
        fi
        if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target "$site" "$tvm_whl" >/dev/null 2>&1; then
            # no pip: a wheel without .data/ is a zip of site-packages files
            rm -rf "$site/tvm_ffi" "$site"/apache_tvm_ffi-*.dist-info
            "$py" -m zipfile -e "$tvm_whl" "$site"
        fi
        if [ -d "$site/flashinfer" ] && [ -d "$site/tvm_ffi" ]; then
            cp -f "$whl/flashinfer_bundle.sha256" "$site/.flashinfer_bundle.sha256" 2>/dev/null
        fi
    fi

    # Prebuilt modules (bench/flashinfer_aot.sh packs them from a device run's JIT cache): FlashInfer loads
    # flashinfer/data/aot/<name>/<name>.so as an AOT artifact, skipping its JIT build (~3 min for "host").
    if [ -f "$whl/flashinfer_aot_sm90a.tgz" ] && [ -d "$site/flashinfer" ] && [ ! -d "$site/flashinfer/data/aot" ]; then
        mkdir -p /tmp/fi_aot_x "$site/flashinfer/data/aot" && tar -xzf "$whl/flashinfer_aot_sm90a.tgz" -C /tmp/fi_aot_x \
            && for f in $(find /tmp/fi_aot_x -name '*.so'); do
                   d="$(basename "$f" .so)"; mkdir -p "$site/flashinfer/data/aot/$d" && mv "$f" "$site/flashinfer/data/aot/$d/"
               done
        d=""
    fi

    case ":${PYTHONPATH:-}:" in
        *":$site:"*) ;;
        *) export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" ;;
    esac

    # ---- FlashInfer / tvm-ffi environment -----------------------------------
    export FLASHINFER_WORKSPACE_BASE="${FLASHINFER_WORKSPACE_BASE:-/tmp/fi_ws}"
    export FLASHINFER_CUDA_ARCH_LIST="${FLASHINFER_CUDA_ARCH_LIST:-9.0a}"
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
    export MAX_JOBS="${MAX_JOBS:-16}"
    export TVM_FFI_CACHE_DIR="${TVM_FFI_CACHE_DIR:-/tmp/tvm-ffi-cache}"
    mkdir -p "$FLASHINFER_WORKSPACE_BASE" "$TVM_FFI_CACHE_DIR" 2>/dev/null

    # ---- CUDA toolkit for JIT (FlashInfer links -L$cuda_home/lib64{,/stubs} -lcudart -lcuda)
    # (nvcc on PATH may be a wrapper script, e.g. /usr/local/bin/nvcc doing
    # `exec /usr/local/cuda-13.0/bin/nvcc`; FlashInfer would then guess
    # CUDA_HOME=/usr/local, so find the real toolkit root and export it.)
    if [ -z "${CUDA_HOME:-}" ] && [ -z "${CUDA_PATH:-}" ] && command -v nvcc >/dev/null 2>&1; then
        lib="$(readlink -f "$(command -v nvcc)")"
        for d in "$(dirname "$(dirname "$lib")")" \
                 "$(sed -n 's#.*exec  *\(/[^ ]*\)/bin/nvcc.*#\1#p' "$lib" 2>/dev/null | head -1)" \
                 /usr/local/cuda; do
            if [ -n "$d" ] && [ -x "$d/bin/nvcc" ] && [ -f "$d/include/cuda_runtime.h" ]; then
                export CUDA_HOME="$(readlink -f "$d")"; break
            fi
        done
    fi
    d="${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}}"
    if [ ! -e "$d/lib64/libcudart.so" ] || [ ! -e "$d/lib64/stubs/libcuda.so" ]; then
        mkdir -p /tmp/fi_ldlib 2>/dev/null
        if [ ! -e "$d/lib64/libcudart.so" ]; then
            lib="$(ls "$d"/lib64/libcudart.so* "$d"/lib/libcudart.so* \
                      "$d"/targets/x86_64-linux/lib/libcudart.so* 2>/dev/null | head -1)"
            [ -n "$lib" ] && ln -sf "$lib" /tmp/fi_ldlib/libcudart.so && ldextra="-L/tmp/fi_ldlib"
        fi
        if [ ! -e "$d/lib64/stubs/libcuda.so" ] && [ ! -e "$d/lib64/libcuda.so" ]; then
            lib="$(ls "$d"/lib/stubs/libcuda.so "$d"/targets/x86_64-linux/lib/stubs/libcuda.so \
                      /usr/local/cuda/lib64/stubs/libcuda.so /usr/local/nvidia/lib64/libcuda.so* \
                      /usr/lib/x86_64-linux-gnu/libcuda.so* 2>/dev/null | head -1)"
            [ -z "$lib" ] && lib="$(ldconfig -p 2>/dev/null | awk '/libcuda\.so/ {print $NF; exit}')"
            [ -n "$lib" ] && ln -sf "$lib" /tmp/fi_ldlib/libcuda.so && ldextra="-L/tmp/fi_ldlib"
        fi
        case " ${FLASHINFER_EXTRA_LDFLAGS:-} " in
            *" $ldextra "*) ;;
            *) [ -n "$ldextra" ] && export FLASHINFER_EXTRA_LDFLAGS="${FLASHINFER_EXTRA_LDFLAGS:+$FLASHINFER_EXTRA_LDFLAGS }$ldextra" ;;
        esac
    fi
    # cuBLAS/cuRAND headers (<cublasLt.h>, <curand_kernel.h>) that FlashInfer's
    # sources include but a pip-assembled toolkit lacks: use the bundled copies.
    if [ -d "$site/fi_cuda_include" ] && { [ ! -f "$d/include/cublasLt.h" ] || [ ! -f "$d/include/curand_kernel.h" ]; }; then
        case " ${FLASHINFER_EXTRA_CUDAFLAGS:-} " in
            *"$site/fi_cuda_include"*) ;;
            *) export FLASHINFER_EXTRA_CUDAFLAGS="${FLASHINFER_EXTRA_CUDAFLAGS:+$FLASHINFER_EXTRA_CUDAFLAGS }-isystem $site/fi_cuda_include"
               export FLASHINFER_EXTRA_CFLAGS="${FLASHINFER_EXTRA_CFLAGS:+$FLASHINFER_EXTRA_CFLAGS }-isystem $site/fi_cuda_include" ;;
        esac
    fi
    command -v ninja >/dev/null 2>&1 || echo "flashinfer_setup: WARNING no ninja on PATH (FlashInfer JIT needs it)" >&2

    # ---- one line: does it import? -------------------------------------------
    msg="$("$py" -c 'import flashinfer, tvm_ffi; print("flashinfer", flashinfer.__version__, "imports OK from", flashinfer.__file__.rsplit("/",2)[0], "| tvm_ffi", tvm_ffi.__version__)' 2>/tmp/fi_import.err | tail -1)"
    if [ -n "$msg" ]; then
        echo "flashinfer_setup: $msg | JIT cache $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer, arch $FLASHINFER_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS, CUDA_HOME=${CUDA_HOME:-unset}"
    else
        echo "flashinfer_setup: import flashinfer FAILED: $(tail -1 /tmp/fi_import.err 2>/dev/null) (full log /tmp/fi_import.err)"
    fi
    return 0
}

# fi_prebuild [build|list] [min|full]: JIT-build (or only list) the modules
# our benchmarks use, all in ONE parallel ninja run (MAX_JOBS jobs), so later
# calls load them from $FLASHINFER_WORKSPACE_BASE/.cache/flashinfer/... .
#   min  (default): norm, silu_and_mul, sampling, cascade, page, and for bf16
#        head_dim 128: batch decode (bf16 and e4m3 KV; CUDA-core and
#        tensor-core = fa2 prefill module), fa2/fa3 batch + single prefill,
#        MLA fa2/fa3 (ckv 512, kpe 64)                         -> 16 modules
#   full: also fp16, head_dim 256/512 decode, 256 and 192/128 prefill -> 67
#   host: min + rope, quantization, gelu / gelu_tanh, single decode: what
#         bench/bench_host.py calls
#   plan: only what bench_host.py --only plan calls (bf16 head_dim 128 batch
#         decode, fa2 and fa3 batch prefill)                    -> 4 modules
# FI_PREBUILD_EXTRA: a python list expression of extra JitSpecs, evaluated
# with the generators below in scope.  A call whose module is not prebuilt
# still JIT-builds it on first use.
fi_prebuild() {
    "${PYTHON:-python3}" - "${1:-build}" "${2:-min}" <<'PY'
import os, sys, time, torch
from flashinfer.jit.norm import gen_norm_module
from flashinfer.jit.activation import gen_act_and_mul_module
from flashinfer.jit.sampling import gen_sampling_module
from flashinfer.jit.cascade import gen_cascade_module
from flashinfer.jit.page import gen_page_module
from flashinfer.jit.attention.modules import (
    gen_batch_decode_module, gen_single_prefill_module, gen_batch_prefill_module,
    gen_batch_mla_module, _gen_batch_prefill_primary_module,
    _gen_batch_prefill_independent_paged_module,
)
from flashinfer.jit.core import build_jit_specs

mode, which = sys.argv[1], sys.argv[2]
bf16, f16, e4m3, i32 = torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.int32
full = which == "full"
specs = [] if which == "plan" else [gen_norm_module(), gen_act_and_mul_module("silu"), gen_sampling_module(),
                                    gen_cascade_module(), gen_page_module()]

def fa2_batch_prefill(*a):
    # what get_batch_prefill_module("fa2", ...) builds: the primary module and
    # the paged-only independent-stride module (loaded lazily at first paged run)
    return [_gen_batch_prefill_primary_module("fa2", *a),
            _gen_batch_prefill_independent_paged_module("fa2", *a)]

if which == "plan":
    a = (bf16, bf16, bf16, i32, 128, 128, 0, False, False, False)
    specs += [gen_batch_decode_module(bf16, bf16, bf16, i32, 128, 128, 0, False, False)]
    specs += fa2_batch_prefill(*a) + [gen_batch_prefill_module("fa3", *a)]
for dt in () if which == "plan" else ((bf16, f16) if full else (bf16,)):
    for kv in (dt, e4m3):
        for d in ((128, 256, 512) if full else (128,)):
            # BatchDecodeWithPagedKVCacheWrapper, use_tensor_cores=False
            specs.append(gen_batch_decode_module(dt, kv, dt, i32, d, d, 0, False, False))
            # use_tensor_cores=True (backend auto -> fa2 for 16-bit q)
            specs += fa2_batch_prefill(dt, kv, dt, i32, d, d, 0, False, False, False)
    for dqk, dvo in (((128, 128), (256, 256), (192, 128)) if full else ((128, 128),)):
        a = (dt, dt, dt, i32, dqk, dvo, 0, False, False, False)
        specs.append(gen_single_prefill_module("fa2", dt, dt, dt, dqk, dvo, 0, False, False, False))
        specs.append(gen_single_prefill_module("fa3", dt, dt, dt, dqk, dvo, 0, False, False, False))
        specs += fa2_batch_prefill(*a)
        specs.append(gen_batch_prefill_module("fa3", *a))
    for be in ("fa2", "fa3"):
        specs.append(gen_batch_mla_module(be, dt, dt, dt, i32, 512, 64, False))
if which == "host":  # the rest of what bench/bench_host.py calls
    from flashinfer.jit.rope import gen_rope_module
    from flashinfer.jit.quantization import gen_quantization_module
    from flashinfer.jit.attention.modules import gen_single_decode_module
    specs += [gen_rope_module(), gen_quantization_module(), gen_act_and_mul_module("gelu"),
              gen_act_and_mul_module("gelu_tanh"),
              gen_single_decode_module(bf16, bf16, bf16, 128, 128, 0, False, False)]
specs += eval(os.environ.get("FI_PREBUILD_EXTRA", "[]"))
seen, uniq = set(), []
for s in specs:
    if s.name not in seen:
        seen.add(s.name); uniq.append(s)
if mode == "list":
    for s in uniq:
        print(s.name)
    sys.exit(0)
t = time.time()
build_jit_specs(uniq, verbose=os.environ.get("FLASHINFER_JIT_VERBOSE") == "1")
print(f"fi_prebuild: {len(uniq)} modules ({which}) built or already cached in {time.time()-t:.1f}s", flush=True)
PY
}

# "|| true": even under a caller's `set -e`, nothing here stops its shell
_fi_setup || true
unset -f _fi_setup
