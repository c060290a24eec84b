// Runs the kernels of fused.cu on the CPU (emulate.h) and checks them against direct
// double-precision formulas with the same rounding points. Built and run by
// scripts/check-cuda-kernels.sh; exits non-zero on the first mismatch.
#define QALIGN_EMULATE
#include "fused.cu"

#include <cstdio>
#include <cstdlib>
#include <random>

template <typename T> T to_t(float v) {
    if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
    else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
    else return v;
}
template <typename T> float to_f(T v) {
    if constexpr (std::is_same_v<T, __half>) return __half2float(v);
    else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
    else return v;
}
template <typename T> float rnd(double v) { return to_f(to_t<T>(float(v))); }

static int failures = 0;
static void check(const char *what, double err, double bound) {
    const bool ok = err <= bound;
    std::printf("%-58s max |err| %.3g (bound %.3g) %s\n", what, err, bound, ok ? "ok" : "FAIL");
    failures += !ok;
}

template <typename T> std::vector<T> randoms(size_t n, std::mt19937 &rng, float spread) {
    std::normal_distribution<float> dist(0.f, spread);
    std::vector<T> v(n);
    for (auto &x : v) x = to_t<T>(dist(rng));
    return v;
}

// Attention: q [B, Tq, H, D] and k/v [B, Tk, H/g, D] with the given element strides.
template <typename T, int D>
void attention_case(const char *name, int B, int H, int kvh, int tq, int prefix, bool causal,
                    std::vector<uint32_t> lengths, bool fused_qkv, void (*kernel)(const T *, const T *, const T *, const uint32_t *, T *, AttnArgs),
                    double bound) {
    std::mt19937 rng(7);
    const int tk = causal ? prefix + tq : tq + prefix;
    // Layouts: a fused [B, T, 3, H, D] projection (q/k/v read in place), or split heads
    // [B, H, T, D] (the LLM's, seen as transposed views).
    std::vector<T> qbuf, kbuf, vbuf;
    long long qs[3], ks[3], vs[3];
    size_t qoff = 0, koff = 0, voff = 0;
    if (fused_qkv) {
        qbuf = randoms<T>((size_t)B * tq * 3 * H * D, rng, 1.5f);
        kbuf = qbuf;
        vbuf = qbuf;
        const long long st = 3LL * H * D;
        for (auto *s : {qs, ks, vs}) { s[0] = tq * st; s[1] = st; s[2] = D; }
        koff = (size_t)H * D;
        voff = 2 * (size_t)H * D;
    } else {
        qbuf = randoms<T>((size_t)B * H * tq * D, rng, 1.5f);
        kbuf = randoms<T>((size_t)B * kvh * tk * D, rng, 1.5f);
        vbuf = randoms<T>((size_t)B * kvh * tk * D, rng, 1.0f);
        qs[0] = (long long)H * tq * D; qs[1] = D; qs[2] = (long long)tq * D;
        ks[0] = vs[0] = (long long)kvh * tk * D; ks[1] = vs[1] = D; ks[2] = vs[2] = (long long)tk * D;
    }
    const double scale = 1.0 / std::sqrt((double)D);
    AttnArgs args{B, H, tq, tk, H / kvh, prefix, causal ? 1 : 0,
                  qs[0], qs[1], qs[2], ks[0], ks[1], ks[2], vs[0], vs[1], vs[2],
                  float(scale * 1.4426950408889634)};
    std::vector<T> out((size_t)B * tq * H * D);
    const T *q = qbuf.data() + qoff, *k = kbuf.data() + koff, *v = vbuf.data() + voff;
    const uint32_t *len = lengths.empty() ? nullptr : lengths.data();
    emu::launch({unsigned((tq + FA_ROWS - 1) / FA_ROWS), unsigned(H), unsigned(B)}, FA_WARPS * 32,
                [&] { kernel(q, k, v, len, out.data(), args); });
    double err = 0;
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int i = 0; i < tq; ++i) {
                const int kh = h / (H / kvh);
                std::vector<double> p(tk, 0.0);
                double mx = -INFINITY;
                for (int j = 0; j < tk; ++j) {
                    bool visible = true;
                    if (!lengths.empty()) visible = j < prefix + (int)lengths[b];
                    if (causal) visible = visible && j <= prefix + i;
                    if (!visible) { p[j] = -INFINITY; continue; }
                    double s = 0;
                    for (int d = 0; d < D; ++d)
                        s += (double)to_f(q[b * qs[0] + i * qs[1] + h * qs[2] + d]) *
                             to_f(k[b * ks[0] + j * ks[1] + kh * ks[2] + d]);
                    p[j] = s * scale;
                    mx = std::max(mx, p[j]);
                }
                double sum = 0;
                for (auto &x : p) { x = std::isinf(x) ? 0.0 : std::exp(x - mx); sum += x; }
                for (int d = 0; d < D; ++d) {
                    double o = 0;
                    for (int j = 0; j < tk; ++j)
                        if (p[j] > 0) o += p[j] / sum * to_f(v[b * vs[0] + j * vs[1] + kh * vs[2] + d]);
                    const double got = to_f(out[((size_t)(b * tq + i) * H + h) * D + d]);
                    err = std::max(err, std::fabs(got - o));
                }
            }
    check(name, err, bound);
}

template <typename T>
void layer_norm_case(const char *name, int rows, int dim, bool residual, double bound,
                     void (*kernel)(const T *, const T *, const T *, const float *, const float *, T *, T *, int, float)) {
    std::mt19937 rng(11);
    auto x = randoms<T>((size_t)rows * dim, rng, 2.f), y = randoms<T>((size_t)rows * dim, rng, 1.f);
    auto bias = randoms<T>(dim, rng, 0.5f);
    std::vector<float> w(dim), b(dim);
    for (int i = 0; i < dim; ++i) { w[i] = 0.5f + (i % 7) * 0.25f; b[i] = (i % 5) * 0.1f - 0.2f; }
    std::vector<T> sum((size_t)rows * dim), out((size_t)rows * dim);
    const float eps = 1e-5f;
    emu::launch({unsigned(rows), 1, 1}, NORM_THREADS, [&] {
        kernel(x.data(), residual ? y.data() : nullptr, residual ? bias.data() : nullptr, w.data(),
               b.data(), residual ? sum.data() : nullptr, out.data(), dim, eps);
    });
    double err = 0, sum_err = 0;
    for (int r = 0; r < rows; ++r) {
        std::vector<double> h(dim);
        double mean = 0, var = 0;
        for (int i = 0; i < dim; ++i) {
            double v = to_f(x[r * dim + i]);
            if (residual) v = rnd<T>(v + rnd<T>((double)to_f(y[r * dim + i]) + to_f(bias[i])));
            h[i] = v;
            mean += v;
            if (residual) sum_err = std::max(sum_err, std::fabs(to_f(sum[r * dim + i]) - v));
        }
        mean /= dim;
        for (double v : h) var += (v - mean) * (v - mean);
        const double inv = 1.0 / std::sqrt(var / dim + eps);
        for (int i = 0; i < dim; ++i)
            err = std::max(err, std::fabs(to_f(out[r * dim + i]) - ((h[i] - mean) * inv * w[i] + b[i])));
    }
    check(name, err, bound);
    if (residual) check("  its residual sum (bit for bit)", sum_err, 0.0);
}

template <typename T>
void rms_case(const char *name, int rows, int dim, bool per_row, double bound,
              void (*kernel)(const T *, const T *, const uint32_t *, int, T *, int, float)) {
    std::mt19937 rng(13);
    auto x = randoms<T>((size_t)rows * dim, rng, 3.f), weights = randoms<T>(2 * (size_t)dim, rng, 1.f);
    std::vector<uint32_t> modality(rows);
    for (int r = 0; r < rows; ++r) modality[r] = (r * 7 / 3) % 2;
    std::vector<T> out((size_t)rows * dim);
    const float eps = 1e-6f;
    emu::launch({unsigned(rows), 1, 1}, NORM_THREADS, [&] {
        kernel(x.data(), weights.data(), per_row ? modality.data() : nullptr, 1, out.data(), dim, eps);
    });
    double err = 0;
    for (int r = 0; r < rows; ++r) {
        double sq = 0;
        for (int i = 0; i < dim; ++i) sq += (double)to_f(x[r * dim + i]) * to_f(x[r * dim + i]);
        const double inv = 1.0 / std::sqrt(sq / dim + eps);
        const int wr = per_row ? modality[r] : 1;
        for (int i = 0; i < dim; ++i) {
            const double want = rnd<T>(rnd<T>(to_f(x[r * dim + i]) * inv) * (double)to_f(weights[wr * dim + i]));
            err = std::max(err, std::fabs(to_f(out[r * dim + i]) - want) / std::max(1.0, std::fabs(want)));
        }
    }
    check(name, err, bound);
}

template <typename T>
void elementwise_case(const char *name, double bound, void (*gelu)(const T *, const T *, T *, size_t, int),
                      void (*silu)(const T *, const T *, T *, size_t)) {
    std::mt19937 rng(17);
    const int rows = 37, cols = 100;
    const size_t n = (size_t)rows * cols;
    auto y = randoms<T>(n, rng, 4.f), up = randoms<T>(n, rng, 2.f), bias = randoms<T>(cols, rng, 1.f);
    std::vector<T> out(n), out2(n);
    // Two blocks for 3700 values: the grid-stride loop covers the rest.
    emu::launch({2, 1, 1}, 256, [&] { gelu(y.data(), bias.data(), out.data(), n, cols); });
    emu::launch({2, 1, 1}, 256, [&] { silu(y.data(), up.data(), out2.data(), n); });
    double gerr = 0, serr = 0;
    for (size_t i = 0; i < n; ++i) {
        const double z = rnd<T>((double)to_f(y[i]) + to_f(bias[i % cols]));
        const double g = z / (1 + std::exp(-1.702 * z));
        gerr = std::max(gerr, std::fabs(to_f(out[i]) - g) / std::max(1.0, std::fabs(g)));
        const double a = to_f(y[i]);
        const double s = rnd<T>(rnd<T>(a / (1 + std::exp(-a))) * (double)to_f(up[i]));
        serr = std::max(serr, std::fabs(to_f(out2[i]) - s) / std::max(1.0, std::fabs(s)));
    }
    check(name, gerr, bound);
    check("  silu(gate)·up", serr, bound);
}

int main() {
    // ViT / abstractor: q/k/v read in place from one fused projection, no mask; rows not a
    // multiple of the 64-row block nor keys of the 64-key tile.
    attention_case<__half, 64>("attention f16 d64, fused qkv, 2x77 tokens, 3 heads", 2, 3, 3, 77, 0, false, {}, true,
                               flash_attention_d64_f16, 2e-3);
    attention_case<__nv_bfloat16, 64>("attention bf16 d64, fused qkv, 1x130 tokens, 2 heads", 1, 2, 2, 130, 0, false, {},
                                      true, flash_attention_d64_bf16, 1.6e-2);
    // LLM: split heads, a shared prefix, causal, right padding, grouped K/V heads.
    attention_case<__half, 128>("attention f16 d128, causal, prefix 5, lengths 70/33/1, GQA 4:2", 3, 4, 2, 70, 5,
                                true, {70, 33, 1}, false, flash_attention_d128_f16, 2e-3);
    attention_case<__nv_bfloat16, 128>("attention bf16 d128, causal, no prefix, lengths 9/64", 2, 2, 2, 64, 0, true,
                                       {9, 64}, false, flash_attention_d128_bf16, 1.6e-2);
    layer_norm_case<float>("layer norm f32, 3x1024 (ViT width)", 3, 1024, false, 2e-5, add_layer_norm_f32);
    layer_norm_case<__half>("residual + bias + layer norm f16, 4x1024", 4, 1024, true, 1.5e-2, add_layer_norm_f16);
    layer_norm_case<__nv_bfloat16>("residual + bias + layer norm bf16, 5x100", 5, 100, true, 6e-2, add_layer_norm_bf16);
    rms_case<__half>("multiway rms norm f16, 6x4096, per-row weights", 6, 4096, true, 1e-3, multiway_rms_norm_f16);
    rms_case<__nv_bfloat16>("rms norm bf16, 3x333, one weight row", 3, 333, false, 8e-3, multiway_rms_norm_bf16);
    rms_case<float>("multiway rms norm f32, 2x64", 2, 64, true, 1e-6, multiway_rms_norm_f32);
    elementwise_case<__half>("bias + quick gelu f16, 37x100", 1e-3, bias_quick_gelu_f16, silu_mul_f16);
    elementwise_case<__nv_bfloat16>("bias + quick gelu bf16, 37x100", 8e-3, bias_quick_gelu_bf16, silu_mul_bf16);
    elementwise_case<float>("bias + quick gelu f32, 37x100", 1e-6, bias_quick_gelu_f32, silu_mul_f32);
    if (failures) std::printf("%d check(s) failed\n", failures);
    return failures ? 1 : 0;
}
