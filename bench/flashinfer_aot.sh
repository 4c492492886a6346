#!/usr/bin/env bash
# Pack FlashInfer's JIT-built modules from a device run into $OUT (16 MiB parts), so that later runs skip the
# ~3 min build: here, `cat parts > .whl/flashinfer_aot_sm90a.tgz`; flashinfer_setup.sh installs them as AOT
# artifacts. Run on the device after `fi_prebuild build host`. Built for sm_90a with that machine's toolkit.
OUT=${OUT:-/tmp/fi_cupy_out}
cd "${FLASHINFER_WORKSPACE_BASE:-/tmp/fi_ws}/.cache/flashinfer" || exit 1
tar czf /tmp/fi_aot.tgz $(find . -name '*.so') && split -b 15M /tmp/fi_aot.tgz "$OUT/fi_aot.tgz.part"
