// One decode step's rows in float32 on the CPU, one call each (kvlab/layers/rows_kernel.py): rotate-half RoPE, MLA's
// interleaved-pair RoPE into strided rows, RMS norm in torch's summation order. Plain C++17 (built with
// -ffp-contract=off: no FMAs, each product and sum rounded as torch's operators round them).

#include <cmath>

namespace {

constexpr int LANES = 8;  // torch's Vectorized<float> on AVX2 (the only capability the Python side calls this on)

// sum_c x[c]^2 in the order of torch's CPU sum of a contiguous row (aten/src/ATen/native/cpu/SumKernel.cpp,
// vectorized_inner_sum -> row_sum -> multi_row_sum: LANES-wide vectors, 4 of them interleaved, summed in chunks of
// 2^level_power vectors cascaded over 4 levels; the leftover vectors into the first, the four added in order, the
// scalar tail first, then the lanes in order); each lane emulated by a float (no FMA, no reassociation)
float sum_squares(const float* x, long n) {
    const long vecs = n / LANES, ilp = vecs / 4;
    int lg = 0;
    while ((1L << lg) < ilp) ++lg;
    const long power = lg / 4 > 4 ? lg / 4 : 4, step = 1L << power, mask = step - 1;
    float acc[4][4][LANES] = {};
    auto add_vec = [&](float* a, long v) {
        const float* p = x + v * LANES;
        for (int l = 0; l < LANES; ++l) a[l] += p[l] * p[l];
    };
    long i = 0;
    for (; i + step <= ilp;) {
        for (long j = 0; j < step; ++j, ++i)
            for (int k = 0; k < 4; ++k) add_vec(acc[0][k], 4 * i + k);
        for (int j = 1; j < 4; ++j) {
            for (int k = 0; k < 4; ++k)
                for (int l = 0; l < LANES; ++l) {
                    acc[j][k][l] += acc[j - 1][k][l];
                    acc[j - 1][k][l] = 0.f;
                }
            if ((i & (mask << (j * power))) != 0) break;
        }
    }
    for (; i < ilp; ++i)
        for (int k = 0; k < 4; ++k) add_vec(acc[0][k], 4 * i + k);
    for (int j = 1; j < 4; ++j)
        for (int k = 0; k < 4; ++k)
            for (int l = 0; l < LANES; ++l) acc[0][k][l] += acc[j][k][l];
    for (long v = ilp * 4; v < vecs; ++v) add_vec(acc[0][0], v);
    for (int k = 1; k < 4; ++k)
        for (int l = 0; l < LANES; ++l) acc[0][0][l] += acc[0][k][l];
    float total = 0.f;
    for (long c = vecs * LANES; c < n; ++c) total += x[c] * x[c];
    for (int l = 0; l < LANES; ++l) total += acc[0][0][l];
    return total;
}

}  // namespace

extern "C" {

int kvlab_rows_version() { return 3; }

// y [rows, dim] = RMS norm of each row of x [rows, dim] (contiguous) as torch's CPU rms_norm computes it in float32:
// x * (1 / sqrt(sum x^2 / dim + eps)), times w [dim] (null: none; offset: 1 + w, Gemma's). dim >= LANES (below,
// torch sums in another order). 0: done.
int kvlab_rms_norm(const float* x, long rows, long dim, const float* w, int offset, float eps, float* y) {
    if (rows < 1 || dim < LANES) return 1;
    for (long r = 0; r < rows; ++r) {
        const float* xr = x + r * dim;
        float* yr = y + r * dim;
        const float mean = sum_squares(xr, dim) / static_cast<float>(dim);
        const float inv = 1.f / std::sqrt(mean + eps);
        if (!w) {
            for (long c = 0; c < dim; ++c) yr[c] = xr[c] * inv;
        } else if (offset) {
            for (long c = 0; c < dim; ++c) yr[c] = xr[c] * inv * (1.f + w[c]);
        } else {
            for (long c = 0; c < dim; ++c) yr[c] = xr[c] * inv * w[c];
        }
    }
    return 0;
}

// RoPE of rows x [batch, per, rot] (row (b, p) at x + b xb + p xp) into y (at y + b yb + p yp) by batch row b's
// tables cos / sin (at + b cb; their first rot/2 entries): pairs (2i, 2i + 1) written back as [evens', odds']
// (layout 1: DeepSeek V3's interleaved rotary, transformers' apply_rotary_pos_emb_interleave) or pairs (i, i + rot/2)
// (layout 0: rotate-half). 0: done.
int kvlab_rope_pairs(const float* x, long xb, long xp, int batch, int per, int rot, const float* cos, const float* sin,
                     long cb, int layout, float* y, long yb, long yp) {
    if (batch < 1 || per < 1 || rot < 2 || rot % 2 || layout < 0 || layout > 1) return 1;
    const int half = rot / 2;
    for (int b = 0; b < batch; ++b) {
        const float* c = cos + b * cb;
        const float* s = sin + b * cb;
        for (int p = 0; p < per; ++p) {
            const float* xr = x + b * xb + p * xp;
            float* yr = y + b * yb + p * yp;
            for (int i = 0; i < half; ++i) {
                const float x1 = layout ? xr[2 * i] : xr[i], x2 = layout ? xr[2 * i + 1] : xr[i + half];
                yr[i] = x1 * c[i] - x2 * s[i];
                yr[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
    }
    return 0;
}

// Rotate-half RoPE of x [B, T, H, dim] (tokens_first) or [B, H, T, dim] into y (same layout): the first rot channels'
// pairs (i, i + rot/2) rotated by token (b, t)'s cos / sin [B, T, rot] (their first rot/2 entries, the tables being
// cat(freqs, freqs)), the other channels copied. 0: done.
int kvlab_rope(const float* x, int batch, int tokens, int heads, int dim, int tokens_first, const float* cos,
               const float* sin, int rot, float* y) {
    if (batch < 1 || tokens < 1 || heads < 1 || dim < 1 || rot < 2 || rot > dim || rot % 2) return 1;
    const int half = rot / 2;
    for (int b = 0; b < batch; ++b)
        for (int t = 0; t < tokens; ++t) {
            const float* c = cos + (static_cast<long>(b) * tokens + t) * rot;
            const float* s = sin + (static_cast<long>(b) * tokens + t) * rot;
            for (int h = 0; h < heads; ++h) {
                const long row = tokens_first ? (static_cast<long>(b) * tokens + t) * heads + h
                                              : (static_cast<long>(b) * heads + h) * tokens + t;
                const float* xr = x + row * dim;
                float* yr = y + row * dim;
                for (int i = 0; i < half; ++i) {
                    const float x1 = xr[i], x2 = xr[i + half];
                    yr[i] = x1 * c[i] - x2 * s[i];
                    yr[i + half] = x2 * c[i] + x1 * s[i];
                }
                for (int i = rot; i < dim; ++i) yr[i] = xr[i];
            }
        }
    return 0;
}

}  // extern "C"
