// float32 weight rows read by float32 FMAs on the CPU, shared by kvlab/layers/f32_kernel.cpp and
// kvlab/layers/moe_kernel.cpp (kvlab/layers/cpp_build.py hashes this header into both kernels' build keys). Plain C++17.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace kvlab_f32 {

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum8(__m256 v) {
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
        float t = hsum8(a);
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

}  // namespace kvlab_f32
