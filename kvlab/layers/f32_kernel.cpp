// A few rows' float32 matrix-vector products on the CPU, the weights read where they lie: kvlab/layers/f32_kernel.py.
// Plain C++17: float32 in and out, float32 FMAs.

#include <cstdint>
#include <vector>

#include "f32.h"

namespace {

using kvlab_f32::row;

// y [NB, rows] (row stride ldy) = x [NB, cols] W^T (+ bias)
template <int NB, int U>
void rows_of(const float* x, const float* w, const float* bias, int rows, int cols, float* y, long ldy) {
    float s[NB];
    for (int r = 0; r < rows; ++r) {
        row<NB, U>(x, w + static_cast<long>(r) * cols, cols, s);
        const float add = bias ? bias[r] : 0.f;
        for (int b = 0; b < NB; ++b) y[b * ldy + r] = s[b] + add;
    }
}

// NB input rows at once, each weight read once for all of them; 4-8 accumulators whatever NB
void chunk(int nb, const float* x, const float* w, const float* bias, int rows, int cols, float* y, long ldy) {
    switch (nb) {
        case 1: rows_of<1, 4>(x, w, bias, rows, cols, y, ldy); break;
        case 2: rows_of<2, 4>(x, w, bias, rows, cols, y, ldy); break;
        case 3: rows_of<3, 2>(x, w, bias, rows, cols, y, ldy); break;
        case 4: rows_of<4, 2>(x, w, bias, rows, cols, y, ldy); break;
        case 5: rows_of<5, 1>(x, w, bias, rows, cols, y, ldy); break;
        case 6: rows_of<6, 1>(x, w, bias, rows, cols, y, ldy); break;
        case 7: rows_of<7, 1>(x, w, bias, rows, cols, y, ldy); break;
        default: rows_of<8, 1>(x, w, bias, rows, cols, y, ldy); break;
    }
}

// y [cols] = sum_r x[r] W[r, :] (W [rows, cols] row-major): each output summed over r in order by FMAs, the weight
// rows read in order, y (a few KiB) kept in L1
void axpy_rows(const float* x, const float* w, int rows, int cols, float* y) {
    for (int c = 0; c < cols; ++c) y[c] = 0.f;
    for (int r = 0; r < rows; ++r) {
        const float a = x[r];
        const float* wr = w + static_cast<long>(r) * cols;
        int c = 0;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256 av = _mm256_set1_ps(a);
        for (; c + 8 <= cols; c += 8)
            _mm256_storeu_ps(y + c, _mm256_fmadd_ps(av, _mm256_loadu_ps(wr + c), _mm256_loadu_ps(y + c)));
#endif
        for (; c < cols; ++c) y[c] = __builtin_fmaf(a, wr[c], y[c]);
    }
}

}  // namespace

extern "C" {

int kvlab_f32_version() { return 2; }

// Per group g of G (heads of MLA's absorbed decode, DeepSeek V4's output groups): W_g = w + g gstride, [rows, cols]
// row-major. trans 0: y[b, g, :rows] = W_g x[b, g, :cols]; trans 1: y[b, g, :cols] = W_g^T x[b, g, :rows]. x's and
// y's element (b, g, i) at b xb + g xg + i and b yb + g yg + i (i contiguous). 0: done, 1: bad arguments.
int kvlab_f32_grouped(const float* x, long xb, long xg, int n, int groups, int trans, const float* w, int rows,
                      int cols, long gstride, float* y, long yb, long yg) {
    if (n < 1 || groups < 1 || rows < 1 || cols < 1 || n > 8) return 1;
    std::vector<float> buf(trans ? 0 : static_cast<size_t>(n) * cols), out(trans ? 0 : static_cast<size_t>(n) * rows);
    for (int g = 0; g < groups; ++g) {
        const float* wg = w + g * gstride;
        if (trans) {
            for (int b = 0; b < n; ++b) axpy_rows(x + b * xb + g * xg, wg, rows, cols, y + b * yb + g * yg);
            continue;
        }
        for (int b = 0; b < n; ++b)
            for (int c = 0; c < cols; ++c) buf[static_cast<size_t>(b) * cols + c] = x[b * xb + g * xg + c];
        chunk(n, buf.data(), wg, nullptr, rows, cols, out.data(), rows);
        for (int b = 0; b < n; ++b)
            for (int r = 0; r < rows; ++r) y[b * yb + g * yg + r] = out[static_cast<size_t>(b) * rows + r];
    }
    return 0;
}

// y [n, rows] = x [n, cols] W [rows, cols]^T + bias [rows] (bias may be null), all float32 row-major contiguous; the
// inputs in chunks of up to 8 (each chunk reads the weights once). 0: done, 1: bad arguments.
int kvlab_f32_linear(const float* x, int n, int cols, const float* w, int rows, const float* bias, float* y) {
    if (n < 1 || cols < 1 || rows < 1) return 1;
    for (int b0 = 0; b0 < n; b0 += 8) {
        const int nb = n - b0 < 8 ? n - b0 : 8;
        chunk(nb, x + static_cast<long>(b0) * cols, w, bias, rows, cols, y + static_cast<long>(b0) * rows, rows);
    }
    return 0;
}

}  // extern "C"
