// bf16 weights read by float32 FMAs on the CPU, shared by kvlab/layers/bf16_kernel.cpp and kvlab/layers/moe_kernel.cpp
// (kvlab/layers/cpp_build.py hashes this header into both kernels' build keys). Plain C++17.
#pragma once

#include <cstdint>
#include <cstring>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace kvlab_bf16 {


inline float widen(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t narrow(float f) {  // round to nearest even; NaN stays a (quiet) NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    return _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
}

// 8 bf16 weights (16 bytes) -> 8 float32: zero-extend each to 32 bits, shift into the high half
inline __m256 load8(const uint16_t* w) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))), 16));
}

constexpr int AHEAD = 4096;  // prefetch this many weights (8 KB) ahead of the row being read

// s [NB] = one weight row w [cols] x the NB inputs xf [NB, cols] (float32), U accumulators per input: the weights are
// read strictly in order (row after row: one stream for the hardware prefetcher, measured faster than several rows
// a pass) with a software prefetch AHEAD weights on
template <int NB, int U>
inline void row(const float* xf, const uint16_t* w, int cols, float* s) {
    const int body = cols - cols % (8 * U), tail = cols - cols % 8;
    __m256 acc[U][NB];
    for (int u = 0; u < U; ++u)
        for (int b = 0; b < NB; ++b) acc[u][b] = _mm256_setzero_ps();
    for (int c = 0; c < body; c += 8 * U) {
        if ((c & 31) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + c + AHEAD), _MM_HINT_T0);
        for (int u = 0; u < U; ++u) {
            const __m256 v = load8(w + c + 8 * u);
            for (int b = 0; b < NB; ++b)
                acc[u][b] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xf + static_cast<long>(b) * cols + c + 8 * u), acc[u][b]);
        }
    }
    for (int c = body; c < tail; c += 8) {
        const __m256 v = load8(w + c);
        for (int b = 0; b < NB; ++b)
            acc[0][b] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xf + static_cast<long>(b) * cols + c), acc[0][b]);
    }
    for (int b = 0; b < NB; ++b) {
        __m256 a = acc[0][b];
        for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[u][b]);
        float t = hsum(a);
        for (int c = tail; c < cols; ++c) t += widen(w[c]) * xf[static_cast<long>(b) * cols + c];
        s[b] = t;
    }
}
#else
template <int NB, int U>
inline void row(const float* xf, const uint16_t* w, int cols, float* s) {
    for (int b = 0; b < NB; ++b) {
        const float* xb = xf + static_cast<long>(b) * cols;
        float a[8] = {};
        int c = 0;
        for (; c + 8 <= cols; c += 8)
            for (int l = 0; l < 8; ++l) a[l] += widen(w[c + l]) * xb[c + l];
        float t = 0.f;
        for (int l = 0; l < 8; ++l) t += a[l];
        for (; c < cols; ++c) t += widen(w[c]) * xb[c];
        s[b] = t;
    }
}
#endif

}  // namespace kvlab_bf16
