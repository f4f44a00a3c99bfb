// A few rows' float32 matrix-vector products on the CPU, the weights read where they lie: kvlab/layers/f32_kernel.py.
// Plain C++17: float32 in and out, float32 FMAs.

#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}

// s [NB] = one weight row w [cols] x the NB inputs x [NB, cols], U accumulators per input: the weights read strictly
// in order, row after row (one stream for the hardware prefetcher), each 8 of them once for all NB inputs
template <int NB, int U>
inline void row(const float* x, const float* w, int cols, float* s) {
    const int body = cols - cols % (8 * U), tail = cols - cols % 8;
    __m256 acc[U][NB];
    for (int u = 0; u < U; ++u)
        for (int b = 0; b < NB; ++b) acc[u][b] = _mm256_setzero_ps();
    for (int c = 0; c < body; c += 8 * U)
        for (int u = 0; u < U; ++u) {
            const __m256 v = _mm256_loadu_ps(w + c + 8 * u);
            for (int b = 0; b < NB; ++b)
                acc[u][b] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + static_cast<long>(b) * cols + c + 8 * u), acc[u][b]);
        }
    for (int c = body; c < tail; c += 8) {
        const __m256 v = _mm256_loadu_ps(w + c);
        for (int b = 0; b < NB; ++b)
            acc[0][b] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + static_cast<long>(b) * cols + c), acc[0][b]);
    }
    for (int b = 0; b < NB; ++b) {
        __m256 a = acc[0][b];
        for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[u][b]);
        float t = hsum(a);
        for (int c = tail; c < cols; ++c) t += w[c] * x[static_cast<long>(b) * cols + c];
        s[b] = t;
    }
}
#else
template <int NB, int U>
inline void row(const float* x, const float* w, int cols, float* s) {
    for (int b = 0; b < NB; ++b) {
        const float* xb = x + static_cast<long>(b) * cols;
        float a[8] = {};
        int c = 0;
        for (; c + 8 <= cols; c += 8)
            for (int l = 0; l < 8; ++l) a[l] += w[c + l] * xb[c + l];
        float t = 0.f;
        for (int l = 0; l < 8; ++l) t += a[l];
        for (; c < cols; ++c) t += w[c] * xb[c];
        s[b] = t;
    }
}
#endif

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

}  // namespace

extern "C" {

int kvlab_f32_version() { return 1; }

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
