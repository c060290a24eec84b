# Source this to build `qalign` with `--features cuda` on a machine without a system CUDA toolkit.
# It puts NVIDIA's CUDA 13.0 PyPI wheels (nvcc, headers, cudart, cuBLAS, cuRAND, NVRTC, CCCL) into
# $QALIGN_CUDA_SDK (default: target-cuda-sdk in the repo, git-ignored) and a link-time stub of libcuda
# (the real one comes with the GPU driver at run time). CUDA 13.0 matches driver 580; PTX from a newer
# nvcc would not load on it. Set CUDA_COMPUTE_CAP for the target GPU (90: H100/H200).
#   source scripts/cuda-env.sh && cargo build --release -p qalign-cli --features cuda
# Needs python3 with pip, gcc/g++ and network access to PyPI the first time.

_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export QALIGN_CUDA_SDK=${QALIGN_CUDA_SDK:-$_repo/target-cuda-sdk}
_cu=$QALIGN_CUDA_SDK/nvidia/cu13
if [ ! -x "$_cu/bin/nvcc" ]; then
    python3 -m pip install -q --no-deps --target "$QALIGN_CUDA_SDK" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 \
        nvidia-nvvm==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 \
        nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-cccl==13.0.85 || return 1
fi
# The libcuda stub declares what cudarc calls, read from cudarc's sources (the locked version,
# fetched first if cargo has not yet); an empty stub would link nothing and fail only at the end
# of a long build, so it is rebuilt when empty and an empty list is an error.
if [ ! -s "$_cu/lib64/stubs/cuda_stub.c" ] || [ ! -e "$_cu/lib64/stubs/libcuda.so" ]; then
    mkdir -p "$_cu/lib64/stubs"
    for _f in "$_cu"/lib/*.so.* "$_cu"/lib/*.a; do ln -sf "$_f" "$_cu/lib64/"; done
    for _l in cudart.so.13 nvrtc.so.13 curand.so.10 cublas.so.13 cublasLt.so.13; do
        ln -sf "lib$_l" "$_cu/lib64/lib${_l%.so.*}.so"
    done
    _v=$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3 }' "$_repo/Cargo.lock")
    _src=${CARGO_HOME:-$HOME/.cargo}/registry/src/*/cudarc-$_v/src/driver/sys/mod.rs
    # shellcheck disable=SC2086
    if ! ls $_src > /dev/null 2>&1; then (cd "$_repo" && cargo fetch --locked -q) || return 1; fi
    # Every driver entry point cudarc declares, as an empty function, under the driver's soname.
    # shellcheck disable=SC2086
    grep -ohE '^pub unsafe fn cu[A-Za-z0-9_]+' $_src | awk '{print $4}' | sort -u \
        | awk '{print "void " $1 "(void) {}"}' > "$_cu/lib64/stubs/cuda_stub.c"
    if [ ! -s "$_cu/lib64/stubs/cuda_stub.c" ]; then
        echo "cuda-env.sh: no driver functions found in cudarc $_v's sources ($_src)" >&2
        return 1
    fi
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$_cu/lib64/stubs/libcuda.so" "$_cu/lib64/stubs/cuda_stub.c" || return 1
fi
export PATH=$_cu/bin:$PATH
export CUDA_ROOT=$_cu CUDA_PATH=$_cu CUDA_HOME=$_cu
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L native=$_cu/lib64 -L native=$_cu/lib64/stubs"
unset _repo _cu _f _l _v _src
