// A CPU stand-in for the CUDA features `fused.cu` uses, so its kernels can be run and checked on a
// machine without a GPU (`scripts/check-cuda-kernels.sh`). Each block runs as blockDim.x host
// threads with real barriers: `__syncthreads` waits for the block, `__shfl_xor_sync` and the
// mma.sync tile product exchange values within a warp of 32 threads. `mma.sync.m16n8k16` is
// computed from the fragment layout of the PTX ISA ("Matrix Fragments for mma.m16n8k16 with
// floating point type"). Blocks run one after another, so `__shared__` arrays can be statics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __restrict__
#define __restrict__
#undef __launch_bounds__
#define __launch_bounds__(n)
#undef __shared__
#define __shared__ static
#undef __align__
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

struct EmuDim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;

namespace emu {
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float shuffle_slots[32][32];
inline uint32_t mma_a[32][32][4], mma_b[32][32][2];

inline void warp_sync() { warp_barriers[threadIdx.x / 32]->arrive_and_wait(); }

template <typename T> float bits_to_float(uint16_t bits) {
    T v;
    std::memcpy(&v, &bits, 2);
    if constexpr (std::is_same_v<T, __half>) return __half2float(v);
    else return __bfloat162float(v);
}

// D = A·B + C for one 16×8×16 tile; each lane holds the fragments the ISA assigns it.
template <typename T> void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    for (int i = 0; i < 4; ++i) mma_a[w][lane][i] = a[i];
    mma_b[w][lane][0] = b0;
    mma_b[w][lane][1] = b1;
    warp_sync();
    auto a_at = [&](int row, int k) {  // A[row][k]
        const int src = (row % 8) * 4 + (k % 8) / 2, reg = (row >= 8) + 2 * (k >= 8);
        return bits_to_float<T>(uint16_t(mma_a[w][src][reg] >> (16 * (k & 1))));
    };
    auto b_at = [&](int k, int col) {  // B[k][col]
        const int src = col * 4 + (k % 8) / 2, reg = k >= 8;
        return bits_to_float<T>(uint16_t(mma_b[w][src][reg] >> (16 * (k & 1))));
    };
    float d[4];
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float sum = c[i];
        for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, col);
        d[i] = sum;
    }
    warp_sync();  // every lane has read the fragments before they are overwritten
    for (int i = 0; i < 4; ++i) c[i] = d[i];
}

// Runs `kernel()` over the grid, one block at a time, blockDim.x threads per block.
template <typename F> void launch(EmuDim3 grid, unsigned threads, F kernel) {
    gridDim = grid;
    blockDim = EmuDim3{threads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                block_barrier = std::make_unique<std::barrier<>>(threads);
                warp_barriers.clear();
                for (unsigned w = 0; w < (threads + 31) / 32; ++w)
                    warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
                std::vector<std::thread> pool;
                for (unsigned i = 0; i < threads; ++i)
                    pool.emplace_back([=] {
                        threadIdx = EmuDim3{i, 0, 0};
                        blockIdx = EmuDim3{x, y, z};
                        kernel();
                    });
                for (auto &th : pool) th.join();
            }
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int offset) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32;
    emu::shuffle_slots[w][lane] = v;
    emu::warp_sync();
    const float other = emu::shuffle_slots[w][lane ^ offset];
    emu::warp_sync();
    return other;
}

inline float __expf(float x) { return std::exp(x); }
