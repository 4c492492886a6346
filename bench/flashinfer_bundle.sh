#!/usr/bin/env bash
# Build the FlashInfer bundle that bench/flashinfer_setup.sh installs on the
# (offline) GPU machine.  Run HERE, on a machine with PyPI access, from anywhere:
#
#     bash bench/flashinfer_bundle.sh
#
# Writes into <repo>/.whl/ (git-ignored; carry it as ".whl"):
#   flashinfer_python-0.7.2.tar.xz   flashinfer/ + its dist-info (the whole
#                                    unpacked wheel, untrimmed) + fi_cuda_include/
#                                    (cuBLAS/cuRAND headers for the JIT)
#   apache_tvm_ffi-*-cp312-*.whl     the one dependency `import flashinfer` needs
#   flashinfer_bundle.sha256         checksums; flashinfer_setup.sh keys its
#                                    "already installed" stamp on this file
#
# Why no trim: the 62 MiB wheel is per-file deflate; xz over the whole unpacked
# tree (457 MB, very repetitive sources) is ~15 MiB, so the whole package fits
# the 64 MiB carry budget and every JIT module keeps every header it includes.
#
# Not bundled (too big, or not needed by `import flashinfer` nor by the kernels
# we benchmark): nvidia-cutlass-dsl (its cu13 libs are
# 92 MB zipped / 66 MB xz), nvidia-cudnn-frontend, cuda-tile, nccl4py,
# nccl-extensions, cuda-python (meta package only).  They are all imported
# lazily (CuTe-DSL / cuDNN / comm backends), so nothing needs stubbing.
#
# Idempotent: downloads are cached in $FI_BUNDLE_WORK (default /tmp/fi_bundle_work),
# the tarball is rebuilt deterministically (sorted names, fixed mtime/owner), and
# only this script's own files in .whl/ are replaced.

FI_VERSION="${FI_VERSION:-0.7.2}"
TVM_FFI_VERSION="${TVM_FFI_VERSION:-0.1.15.post2}"   # flashinfer 0.7.2 wants >=0.1.11,<0.2
# Header-only extras: FlashInfer's norm/sampling/... sources include
# <cublasLt.h> and <curand_kernel.h>; a pip-assembled CUDA toolkit (like the one
# nvcc comes from on these machines) lacks them.  Only nvidia/cu13/include/*.h
# of these wheels is kept (~2.7 MB), never their libraries.
CUBLAS_VERSION="${CUBLAS_VERSION:-13.0.2.14}"
CURAND_VERSION="${CURAND_VERSION:-10.4.0.35}"

set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="$REPO/.whl"
WORK="${FI_BUNDLE_WORK:-/tmp/fi_bundle_work}"
PY="${PYTHON:-python3}"
mkdir -p "$OUTDIR" "$WORK/dl"

PIP_PLAT=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64)

fetch() {  # fetch NAME==VER: into $WORK/dl unless a matching file is there
    local spec="$1" stem
    stem="$(echo "${spec%%==*}" | tr '-' '_')-${spec##*==}-"
    if ! ls "$WORK/dl/$stem"*.whl >/dev/null 2>&1; then
        echo "downloading $spec" >&2
        "$PY" -m pip download -q "${PIP_PLAT[@]}" -d "$WORK/dl" "$spec" >&2
    fi
    ls "$WORK/dl/$stem"*.whl | head -1
}

FI_WHL="$(fetch "flashinfer-python==$FI_VERSION")"
TVM_WHL="$(fetch "apache-tvm-ffi==$TVM_FFI_VERSION")"
CUBLAS_WHL="$(fetch "nvidia-cublas==$CUBLAS_VERSION")"     # ~420 MB download, cached
CURAND_WHL="$(fetch "nvidia-curand==$CURAND_VERSION")"     # ~77 MB download, cached

# --- unpack flashinfer -----------------------------------------------------
SRC="$WORK/fi-$FI_VERSION"
if [ ! -f "$SRC/.unpacked" ]; then
    rm -rf "$SRC"; mkdir -p "$SRC"
    "$PY" -m zipfile -e "$FI_WHL" "$SRC"
    touch "$SRC/.unpacked"
fi

STAGE="$WORK/stage"
rm -rf "$STAGE"; mkdir -p "$STAGE"
cp -a "$SRC/flashinfer" "$SRC/flashinfer_python-$FI_VERSION.dist-info" "$STAGE/"
# drop the build-only helpers and byte code; nothing imports them at run time
rm -f "$STAGE/flashinfer/data/build_backend.py" "$STAGE/flashinfer/data/build_utils.py"
find "$STAGE" -name __pycache__ -type d -prune -exec rm -rf {} +
# cuBLAS / cuRAND headers -> fi_cuda_include/ (setup adds -isystem for it only
# when $CUDA_HOME/include lacks them)
mkdir -p "$STAGE/fi_cuda_include"
for w in "$CUBLAS_WHL" "$CURAND_WHL"; do
    "$PY" - "$w" "$STAGE/fi_cuda_include" <<'PYX'
import sys, zipfile, os
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith("nvidia/cu13/include/") and n.endswith(".h"):
            with open(os.path.join(sys.argv[2], os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
PYX
done


OUT_TAR="$OUTDIR/flashinfer_python-$FI_VERSION.tar.xz"
TMP_TAR="$WORK/flashinfer_python-$FI_VERSION.tar.xz"
echo "compressing (xz -9, a minute or two) ..."
tar -C "$STAGE" --sort=name --mtime='2020-01-01 00:00Z' --owner=0 --group=0 \
    --numeric-owner -cf - flashinfer "flashinfer_python-$FI_VERSION.dist-info" fi_cuda_include \
    | xz -9e -T0 > "$TMP_TAR"

# --- replace only our own files in .whl/ ------------------------------------
rm -f "$OUTDIR"/flashinfer_python-*.tar.xz "$OUTDIR"/apache_tvm_ffi-*.whl \
      "$OUTDIR"/flashinfer_bundle.sha256
mv "$TMP_TAR" "$OUT_TAR"
cp "$TVM_WHL" "$OUTDIR/"
( cd "$OUTDIR" && sha256sum "$(basename "$OUT_TAR")" "$(basename "$TVM_WHL")" \
    > flashinfer_bundle.sha256 )

echo "bundle in $OUTDIR:"
( cd "$OUTDIR" && ls -l flashinfer_python-*.tar.xz apache_tvm_ffi-*.whl flashinfer_bundle.sha256 )
total=$(cat "$OUT_TAR" "$OUTDIR/$(basename "$TVM_WHL")" "$OUTDIR/flashinfer_bundle.sha256" | wc -c)
echo "flashinfer bundle total: $total bytes ($(( (total + 1048575) / 1048576 )) MiB); whole .whl/: $(du -sh "$OUTDIR" | cut -f1)"
