// Fused CUDA kernels for inference on the GPU (issue 13). candle 0.11 has no fused attention on
// CUDA, and its compositions write every intermediate (score matrices, casts, norm statistics) to
// memory. These kernels read their inputs once and write their outputs once. build.rs compiles
// this file to PTX with nvcc when the `cuda` feature is on; `src/cuda_kernels.rs` launches it.
// Parity references: the compositions in `src/nn.rs` and `src/llm.rs`.
//
// Exported symbols: `<kernel>_<dtype>` with dtype f32 / f16 / bf16 (attention: f16 / bf16 and
// head dim 64 / 128 in the name).

#ifdef QALIGN_EMULATE
#include "emulate.h"  // runs these kernels on the CPU, for scripts/check-cuda-kernels.sh
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// ---------------------------------------------------------------------------------------------
// Scalar conversions: every kernel computes in f32 and rounds where the reference rounds.

template <typename T> struct Num;
template <> struct Num<float> {
    static __device__ __forceinline__ float to_f(float v) { return v; }
    static __device__ __forceinline__ float from_f(float v) { return v; }
};
template <> struct Num<__half> {
    static __device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
    static __device__ __forceinline__ __half from_f(float v) { return __float2half_rn(v); }
    // Two values packed as one 32-bit word, `lo` in the low half (the mma operand layout).
    static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
        __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};
template <> struct Num<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __forceinline__ __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
    static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t *>(&h);
    }
};

// `v` rounded to T and back: where the reference stores an intermediate in the activation dtype.
template <typename T> __device__ __forceinline__ float round_to(float v) {
    return Num<T>::to_f(Num<T>::from_f(v));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

// Values per thread a row kernel keeps in registers: rows up to NORM_THREADS · NORM_VALUES wide.
#define NORM_THREADS 256
#define NORM_VALUES 16

// ---------------------------------------------------------------------------------------------
// Residual add + LayerNorm (ViT, abstractor). For each row of `rows × dim`:
//   y'   = round(y + y_bias)            (when y_bias; the Linear's bias add)
//   h    = round(x + y')                (when y; the residual connection)  → sum_out (when given)
//   out  = round((h − mean)·rsqrt(var + eps)·w + b), two-pass variance in f32, w/b in f32.
// One block of NORM_THREADS per row.
template <typename T>
__device__ void add_layer_norm(const T *x, const T *y, const T *y_bias, const float *w,
                               const float *b, T *sum_out, T *out, int dim, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * dim;
    float vals[NORM_VALUES];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_VALUES; ++k) {
        const int i = threadIdx.x + k * NORM_THREADS;
        float v = 0.f;
        if (i < dim) {
            v = Num<T>::to_f(xr[i]);
            if (y != nullptr) {
                float add = Num<T>::to_f(y[row * dim + i]);
                if (y_bias != nullptr) add = round_to<T>(add + Num<T>::to_f(y_bias[i]));
                v = round_to<T>(v + add);
                if (sum_out != nullptr) sum_out[row * dim + i] = Num<T>::from_f(v);
            }
        }
        vals[k] = v;
        sum += v;
    }
    const float mean = block_sum(sum, scratch) / dim;
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_VALUES; ++k) {
        const int i = threadIdx.x + k * NORM_THREADS;
        if (i < dim) {
            const float c = vals[k] - mean;
            sq += c * c;
        }
    }
    const float inv_std = 1.f / sqrtf(block_sum(sq, scratch) / dim + eps);
#pragma unroll
    for (int k = 0; k < NORM_VALUES; ++k) {
        const int i = threadIdx.x + k * NORM_THREADS;
        if (i < dim) out[row * dim + i] = Num<T>::from_f((vals[k] - mean) * inv_std * w[i] + b[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// Multiway RMSNorm (LLaMA with modality-adaptive norms). Row r uses weight row
// `modality[r]` of `weights` (`[2, dim]`, text then visual), or row `uniform_row` when `modality`
// is null:  out = round(round(x·rsqrt(mean(x²) + eps)) · w)  (transformers 4.36 LlamaRMSNorm: cast
// back to the activation dtype, then multiply by the weight in that dtype).
template <typename T>
__device__ void multiway_rms_norm(const T *x, const T *weights, const uint32_t *modality,
                                  int uniform_row, T *out, int dim, float eps) {
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const T *xr = x + row * dim;
    const T *wr = weights + (size_t)(modality != nullptr ? modality[row] : uniform_row) * dim;
    float vals[NORM_VALUES];
    float sq = 0.f;
#pragma unroll
    for (int k = 0; k < NORM_VALUES; ++k) {
        const int i = threadIdx.x + k * NORM_THREADS;
        const float v = i < dim ? Num<T>::to_f(xr[i]) : 0.f;
        vals[k] = v;
        sq += v * v;
    }
    const float inv_rms = 1.f / sqrtf(block_sum(sq, scratch) / dim + eps);
#pragma unroll
    for (int k = 0; k < NORM_VALUES; ++k) {
        const int i = threadIdx.x + k * NORM_THREADS;
        if (i < dim)
            out[row * dim + i] = Num<T>::from_f(round_to<T>(vals[k] * inv_rms) * Num<T>::to_f(wr[i]));
    }
}

// ---------------------------------------------------------------------------------------------
// Elementwise epilogues over `n` contiguous values (grid-stride).

// QuickGELU after the Linear's bias: z = round(y + bias[i mod cols]); out = z·sigmoid(1.702·z).
template <typename T>
__device__ void bias_quick_gelu(const T *y, const T *bias, T *out, size_t n, int cols) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)blockDim.x * gridDim.x) {
        float z = Num<T>::to_f(y[i]);
        if (bias != nullptr) z = round_to<T>(z + Num<T>::to_f(bias[i % cols]));
        out[i] = Num<T>::from_f(z / (1.f + __expf(-1.702f * z)));
    }
}

// The gated activation of the LLaMA MLP: out = round(round(silu(gate))·up).
template <typename T> __device__ void silu_mul(const T *gate, const T *up, T *out, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)blockDim.x * gridDim.x) {
        const float g = Num<T>::to_f(gate[i]);
        out[i] = Num<T>::from_f(round_to<T>(g / (1.f + __expf(-g))) * Num<T>::to_f(up[i]));
    }
}

// ---------------------------------------------------------------------------------------------
// Flash-attention forward (FlashAttention-2's loop on mma.sync m16n8k16 tensor-core tiles).
//
// q `[B, Tq, H, D]`, k/v `[B, Tk, H / kv_group, D]`, each with its own batch/token/head strides in
// elements (the last dim contiguous), so q/k/v are read in place from a fused projection; the
// output is written contiguous as `[B, Tq, H·D]`. Scores and the online softmax are f32; the
// probabilities are rounded to T for the P·V product (as the reference rounds them before its
// matmul). Key jj of sample b is visible to query i when
//   jj < prefix + lengths[b]   (lengths: real tokens after the shared prefix; null = all keys)
//   and, when causal, jj ≤ prefix + i.
// A query row that sees no key gets zeros.
//
// Block: 4 warps × 16 query rows; keys in tiles of 64 staged in shared memory.

#define FA_WARPS 4
#define FA_ROWS (FA_WARPS * 16)
#define FA_KEYS 64

struct AttnArgs {
    int batch, heads, tq, tk, kv_group, prefix, causal;
    long long q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh;
    float scale_log2;  // softmax scale · log2(e)
};

template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0,
                                          uint32_t b1);
#ifdef QALIGN_EMULATE
template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0,
                                          uint32_t b1) {
    emu::mma_16816<T>(c, a, b0, b1);
}
#else
template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], uint32_t b0,
                                                  uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4],
                                                         uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

__device__ __forceinline__ uint32_t load_pair(const void *p) {
    return *reinterpret_cast<const uint32_t *>(p);
}
__device__ __forceinline__ uint32_t pack_bits(uint16_t lo, uint16_t hi) {
    return (uint32_t)lo | ((uint32_t)hi << 16);
}

template <typename T, int D>
__device__ void flash_attention(const T *__restrict__ q, const T *__restrict__ k,
                                const T *__restrict__ v, const uint32_t *__restrict__ lengths,
                                T *__restrict__ out, AttnArgs a) {
    // Rows padded by 8 values: the fragment reads below then hit 32 distinct banks.
    constexpr int LD = D + 8;
    __shared__ __align__(16) uint16_t ks[FA_KEYS * LD];
    __shared__ __align__(16) uint16_t vs[FA_KEYS * LD];

    const int b = blockIdx.z, h = blockIdx.y, kvh = h / a.kv_group;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;  // mma group (row) and thread-in-group (column pair)
    const int row0 = blockIdx.x * FA_ROWS + warp * 16 + g, row1 = row0 + 8;

    // Keys this block may need, and the last visible key + 1 for each of this thread's rows.
    int kv_end = a.tk;
    if (lengths != nullptr) kv_end = min(kv_end, a.prefix + (int)lengths[b]);
    const int block_last = min(a.tq, (int)(blockIdx.x + 1) * FA_ROWS) - 1;
    if (a.causal) kv_end = min(kv_end, a.prefix + block_last + 1);
    const int limit0 = a.causal ? min(kv_end, a.prefix + row0 + 1) : kv_end;
    const int limit1 = a.causal ? min(kv_end, a.prefix + row1 + 1) : kv_end;

    // This warp's 16 query rows as mma A fragments, held for the whole loop.
    uint32_t qa[D / 16][4];
    {
        const T *q0 = q + b * a.q_sb + (long long)row0 * a.q_st + h * a.q_sh;
        const T *q1 = q + b * a.q_sb + (long long)row1 * a.q_st + h * a.q_sh;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int c = kk * 16 + 2 * t;
            qa[kk][0] = row0 < a.tq ? load_pair(q0 + c) : 0u;
            qa[kk][1] = row1 < a.tq ? load_pair(q1 + c) : 0u;
            qa[kk][2] = row0 < a.tq ? load_pair(q0 + c + 8) : 0u;
            qa[kk][3] = row1 < a.tq ? load_pair(q1 + c + 8) : 0u;
        }
    }

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    const T *kb = k + b * a.k_sb + kvh * a.k_sh;
    const T *vb = v + b * a.v_sb + kvh * a.v_sh;
    for (int n0 = 0; n0 < kv_end; n0 += FA_KEYS) {
        __syncthreads();  // the previous tile is no longer read
        for (int idx = threadIdx.x; idx < FA_KEYS * (D / 2); idx += FA_WARPS * 32) {
            const int r = idx / (D / 2), c = 2 * (idx % (D / 2)), key = n0 + r;
            uint32_t kw = 0u, vw = 0u;  // keys past kv_end are zeros (never NaN in P·V)
            if (key < kv_end) {
                kw = load_pair(kb + (long long)key * a.k_st + c);
                vw = load_pair(vb + (long long)key * a.v_st + c);
            }
            *reinterpret_cast<uint32_t *>(&ks[r * LD + c]) = kw;
            *reinterpret_cast<uint32_t *>(&vs[r * LD + c]) = vw;
        }
        __syncthreads();

        // S = Q·Kᵀ for 16 rows × 64 keys: 8 tiles of 8 keys. B[k][n] = K[key n][dim k].
        float s[FA_KEYS / 8][4];
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
            const uint16_t *krow = &ks[(j * 8 + g) * LD + 2 * t];
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                mma_16816<T>(s[j], qa[kk], load_pair(krow + kk * 16), load_pair(krow + kk * 16 + 8));
        }

        // Scale, mask, and the online softmax update (rows row0 and row1; 4 lanes share a row).
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = n0 + j * 8 + 2 * t + (e & 1);
                const bool visible = key < (e < 2 ? limit0 : limit1);
                s[j][e] = visible ? s[j][e] * a.scale_log2 : -INFINITY;
            }
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
#pragma unroll
        for (int offset = 1; offset < 4; offset <<= 1) {
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, offset));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, offset));
        }
        const float new0 = fmaxf(m0, mx0), new1 = fmaxf(m1, mx1);
        // While a row has seen no visible key its maximum is −∞: subtract 0 instead (exp2(−∞) = 0).
        const float base0 = new0 == -INFINITY ? 0.f : new0;
        const float base1 = new1 == -INFINITY ? 0.f : new1;
        const float alpha0 = exp2f(m0 - base0), alpha1 = exp2f(m1 - base1);
        m0 = new0;
        m1 = new1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int j = 0; j < FA_KEYS / 8; ++j) {
            s[j][0] = exp2f(s[j][0] - base0);
            s[j][1] = exp2f(s[j][1] - base0);
            s[j][2] = exp2f(s[j][2] - base1);
            s[j][3] = exp2f(s[j][3] - base1);
            sum0 += s[j][0] + s[j][1];
            sum1 += s[j][2] + s[j][3];
        }
        l0 = l0 * alpha0 + sum0;  // per-thread partial sums; the quad's are added at the end
        l1 = l1 * alpha1 + sum1;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= alpha0;
            o[n][1] *= alpha0;
            o[n][2] *= alpha1;
            o[n][3] *= alpha1;
        }

        // O += P·V. Two adjacent S tiles (C layout) form one A fragment of 16 keys;
        // B[k][n] = V[key k][dim n], gathered from the staged tile.
#pragma unroll
        for (int kk = 0; kk < FA_KEYS / 16; ++kk) {
            const uint32_t pa[4] = {
                Num<T>::pack2(s[2 * kk][0], s[2 * kk][1]),
                Num<T>::pack2(s[2 * kk][2], s[2 * kk][3]),
                Num<T>::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                Num<T>::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
            const uint16_t *v0 = &vs[(kk * 16 + 2 * t) * LD + g];
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const uint16_t *vn = v0 + n * 8;
                const uint32_t b0 = pack_bits(vn[0], vn[LD]);
                const uint32_t b1 = pack_bits(vn[8 * LD], vn[9 * LD]);
                mma_16816<T>(o[n], pa, b0, b1);
            }
        }
    }

#pragma unroll
    for (int offset = 1; offset < 4; offset <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, offset);
        l1 += __shfl_xor_sync(0xffffffffu, l1, offset);
    }
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    const long long width = (long long)a.heads * D;
    T *out0 = out + ((long long)b * a.tq + row0) * width + h * D + 2 * t;
    T *out1 = out + ((long long)b * a.tq + row1) * width + h * D + 2 * t;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        if (row0 < a.tq)
            *reinterpret_cast<uint32_t *>(out0 + n * 8) = Num<T>::pack2(o[n][0] * inv0, o[n][1] * inv0);
        if (row1 < a.tq)
            *reinterpret_cast<uint32_t *>(out1 + n * 8) = Num<T>::pack2(o[n][2] * inv1, o[n][3] * inv1);
    }
}

// ---------------------------------------------------------------------------------------------
// Exported entry points.

#define NORM_ENTRIES(NAME, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                   \
        add_layer_norm_##NAME(const T *x, const T *y, const T *y_bias, const float *w,          \
                              const float *b, T *sum_out, T *out, int dim, float eps) {          \
        add_layer_norm<T>(x, y, y_bias, w, b, sum_out, out, dim, eps);                            \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS)                                   \
        multiway_rms_norm_##NAME(const T *x, const T *weights, const uint32_t *modality,        \
                                 int uniform_row, T *out, int dim, float eps) {                  \
        multiway_rms_norm<T>(x, weights, modality, uniform_row, out, dim, eps);                   \
    }                                                                                            \
    extern "C" __global__ void bias_quick_gelu_##NAME(const T *y, const T *bias, T *out,          \
                                                      size_t n, int cols) {                      \
        bias_quick_gelu<T>(y, bias, out, n, cols);                                               \
    }                                                                                            \
    extern "C" __global__ void silu_mul_##NAME(const T *gate, const T *up, T *out, size_t n) {  \
        silu_mul<T>(gate, up, out, n);                                                           \
    }

NORM_ENTRIES(f32, float)
NORM_ENTRIES(f16, __half)
NORM_ENTRIES(bf16, __nv_bfloat16)

#define ATTENTION_ENTRY(NAME, T, D)                                                              \
    extern "C" __global__ void __launch_bounds__(FA_WARPS * 32)                                  \
        flash_attention_d##D##_##NAME(const T *q, const T *k, const T *v,                        \
                                      const uint32_t *lengths, T *out, AttnArgs args) {          \
        flash_attention<T, D>(q, k, v, lengths, out, args);                                      \
    }

ATTENTION_ENTRY(f16, __half, 64)
ATTENTION_ENTRY(f16, __half, 128)
ATTENTION_ENTRY(bf16, __nv_bfloat16, 64)
ATTENTION_ENTRY(bf16, __nv_bfloat16, 128)
