// kvlab: int8 / int4 quantization of float32 rows with one scale (and zero point) per token and group of channels,
// written straight into a quantized buffer's codes and scales at their slots (kvlab/cache/quant_kernel.py builds,
// loads and documents it; kvlab/cache/quant.py ``quantize`` is the same arithmetic in torch, operation for operation).
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

uint32_t bits_of(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }
float of_bits(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }

// float32 -> float16 bits, round to nearest even (as torch's .to(float16))
uint16_t to_half(float f) {
#if defined(__F16C__)
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    const uint32_t b = bits_of(f), sign = (b >> 16) & 0x8000u, a = b & 0x7fffffffu;
    if (a >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));  // inf, nan
    if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
    if (a < 0x38800000u) {  // below 2^-14: a subnormal half, m * 2^-24 rounded to nearest even
        const float h = of_bits(a) * 16777216.0f;  // exact (a power of two times a float)
        return uint16_t(sign | uint32_t(std::nearbyint(h)));
    }
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits to nearest even
    return uint16_t(sign | ((r - 0x38000000u) >> 13));
#endif
}

float from_half(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t s = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 0x3ffu;
    if (e == 0) { const float f = float(m) * 5.9604644775390625e-8f; return s ? -f : f; }
    return of_bits(e == 31 ? (s | 0x7f800000u | (m << 13)) : (s | ((e + 112u) << 23) | (m << 13)));
#endif
}

// float32 -> bfloat16 bits, round to nearest even (as torch's .to(bfloat16))
uint16_t to_bf16(float f) {
    const uint32_t b = bits_of(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return uint16_t((b >> 16) | 0x40u);  // nan stays nan
    return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// store v in dtype kind (0 float32, 1 float16, 2 bfloat16) at p[i]; returns the value stored, as float32
float put(void* p, long i, int kind, float v) {
    if (kind == 0) { static_cast<float*>(p)[i] = v; return v; }
    if (kind == 1) { const uint16_t h = to_half(v); static_cast<uint16_t*>(p)[i] = h; return from_half(h); }
    const uint16_t h = to_bf16(v);
    static_cast<uint16_t*>(p)[i] = h;
    return of_bits(uint32_t(h) << 16);
}

// |y| <= the format's largest finite value -> its fp8 code (sign bit 0x80), round to nearest even: lut [top + 1] the
// increasing values of the positive codes 0..top (midpoints of neighbours are exact in float32: fp8 has <= 4
// significant bits)
unsigned char fp8_code(float y, const float* lut, int top) {
    const float a = std::fabs(y);
    int lo = 0, hi = top;  // the largest i with lut[i] <= a
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (lut[mid] <= a) lo = mid; else hi = mid - 1;
    }
    int c = lo;
    if (c < top) {
        const float m = 0.5f * (lut[c] + lut[c + 1]);
        if (a > m || (a == m && (c & 1))) ++c;
    }
    return (unsigned char)(c | (std::signbit(y) ? 0x80 : 0));
}

}  // namespace

extern "C" {

int kvlab_quantize_version(void) { return 2; }

// x [A, m, D] float32 -> codes [A, cap, D] (int8; uint8 with zero points; fp8 bytes when lut) or [A, cap, D / 2]
// (int4 two a byte, low nibble = even channel; symmetric codes stored + 8), scales and zeros [A, cap, D / group] of
// dtype kind (zeros null: symmetric): x[a, i] goes to slot s0 + i (ring: mod cap) of row a. fp8 (lut not null, bits
// 8, symmetric): value = code x scale, the scale the group's absolute maximum over lut[lut_top] (the largest finite
// value; lut [lut_top + 1] the values of the positive codes), each value times 1 / scale clamped to it and rounded to
// the nearest code (even on ties), as torch's cast.
// Returns 0, or -1 for arguments it does not take.
int kvlab_quantize_rows(const float* x, long A, long m, int D, int group, int bits, int kind, void* codes, void* scales,
                        void* zeros, long cap, long s0, int ring, const float* lut, int lut_top) {
    if (A < 0 || m < 0 || D < 1 || group < 1 || D % group || (bits != 4 && bits != 8) || (bits == 4 && D % 2) ||
        kind < 0 || kind > 2 || cap < 1 || s0 < 0 || (!ring && s0 + m > cap) ||
        (lut && (bits != 8 || zeros || lut_top < 1 || lut_top > 127)))
        return -1;
    const int ng = D / group, rowbytes = bits == 4 ? D / 2 : D;
    const float top = bits == 4 ? 15.0f : 255.0f, qmax = bits == 4 ? 7.0f : 127.0f;
    unsigned char* c8 = static_cast<unsigned char*>(codes);
    unsigned char q[4096];
    if (D > 4096) return -1;
    for (long a = 0; a < A; ++a)
        for (long i = 0; i < m; ++i) {
            const float* r = x + (a * m + i) * D;
            const long row = a * cap + (ring ? (s0 + i) % cap : s0 + i);
            for (int g = 0; g < ng; ++g) {
                const float* v = r + g * group;
                unsigned char* o = q + g * group;
                if (zeros) {  // value = code x scale + zero: the group's minimum and range over 2^bits - 1 steps
                    float lo = v[0], hi = v[0];
                    for (int d = 1; d < group; ++d) { lo = v[d] < lo ? v[d] : lo; hi = v[d] > hi ? v[d] : hi; }
                    const float s = put(scales, row * ng + g, kind, (hi - lo) / top);
                    const float z = put(zeros, row * ng + g, kind, lo);
                    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
                    for (int d = 0; d < group; ++d) {
                        float c = std::nearbyint((v[d] - z) * inv);
                        c = c < 0.0f ? 0.0f : c > top ? top : c;
                        o[d] = (unsigned char)(int(c));
                    }
                } else if (lut) {  // fp8: value = code x scale, the group's absolute maximum over the largest value
                    float amax = 0.0f;
                    for (int d = 0; d < group; ++d) { const float y = std::fabs(v[d]); amax = y > amax ? y : amax; }
                    const float fmax = lut[lut_top];
                    const float s = put(scales, row * ng + g, kind, amax / fmax);
                    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
                    for (int d = 0; d < group; ++d) {
                        float y = v[d] * inv;
                        y = y < -fmax ? -fmax : y > fmax ? fmax : y;
                        o[d] = fp8_code(y, lut, lut_top);
                    }
                } else {  // value = code x scale: the group's absolute maximum over qmax
                    float amax = 0.0f;
                    for (int d = 0; d < group; ++d) { const float y = std::fabs(v[d]); amax = y > amax ? y : amax; }
                    const float s = put(scales, row * ng + g, kind, amax / qmax);
                    const float inv = s > 0.0f ? 1.0f / s : 0.0f;
                    for (int d = 0; d < group; ++d) {
                        float c = std::nearbyint(v[d] * inv);
                        c = c < -qmax - 1.0f ? -qmax - 1.0f : c > qmax ? qmax : c;
                        o[d] = (unsigned char)(int(c) + (bits == 4 ? 8 : 0));  // int8: two's complement byte
                    }
                }
            }
            unsigned char* dst = c8 + row * rowbytes;
            if (bits == 8)
                std::memcpy(dst, q, D);
            else
                for (int j = 0; j < D / 2; ++j) dst[j] = (unsigned char)(q[2 * j] | (q[2 * j + 1] << 4));
        }
    return 0;
}

}  // extern "C"
