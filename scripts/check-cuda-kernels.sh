#!/usr/bin/env bash
# Checks qalign's fused CUDA kernels (crates/qalign-model/kernels/fused.cu) on a machine without a
# GPU: compiles them to PTX for compute capability 8.0 and 9.0, assembles them for sm_90 and
# reports registers, spills and shared memory per kernel, then runs them on the CPU through
# kernels/emulate.h against direct formulas (the `cuda_kernels_emulated` test). nvcc comes from
# scripts/cuda-env.sh.
#   scripts/check-cuda-kernels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=/dev/null
source scripts/cuda-env.sh
src=crates/qalign-model/kernels/fused.cu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for cap in 80 90; do
    nvcc --ptx -O3 -std=c++17 -arch=compute_$cap "$src" -o "$tmp/fused-$cap.ptx"
    echo "PTX for compute_$cap: $(wc -c < "$tmp/fused-$cap.ptx") bytes"
done
nvcc -cubin -O3 -std=c++17 -arch=sm_90 --resource-usage "$src" -o "$tmp/fused.cubin" 2>&1 |
    awk '/Compiling entry function/ { gsub(/\x27/, "", $7); name = $7 }
         /spill stores/ { spill = $5 " B spill stores" }
         /Used [0-9]+ registers/ { printf "%-28s %s, %s\n", name, $0, spill }' |
    sed 's/ptxas info    : //'
# The CPU test needs none of cuda-env.sh's link flags (they would rebuild everything).
QALIGN_CUDA_INCLUDE=$CUDA_ROOT/include env -u RUSTFLAGS cargo test -p qalign-model --locked --test cuda_kernels_emulated -- --nocapture
