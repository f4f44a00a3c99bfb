// kvlab: decode attention of one query per head over int8 / int4 symmetric K/V codes with per-token scales
// (kvlab/layers/cpu_attend.py builds, loads and documents it; kvlab/cache/quant.py holds the layout).
//
// Plain C++17 with GCC vector extensions of W floats (16 with AVX-512, else 8; intrinsics only to convert codes and
// half scales; no torch headers, no OpenMP): one function, kvlab_quant_attend, called through ctypes with a descriptor
// per segment of positions (Seg: one or two key buffers side by side along channels, the values a buffer of their own
// or one of the key parts). Per (batch row, KV head, block of at most 8 query heads, piece of a segment's positions),
// in tiles of rows that stay in L1: the tile's scores (each code converted once, multiplied by its scale, then FMA'd
// into the accumulators of all the query heads, W / GC positions (plain rows at 5-6 heads, W = 8: 2) x GC heads at once
// in registers, the W-lane sums reduced W at a time (AVX2: two rounds of horizontal adds; else a shuffle tree); summed
// over the key parts), its softmax numerators against the running maximum (a vectorised exp W at a time, the UNDER cut;
// what was summed before rescaled when the maximum grows), then its p.v over the same rows (GC accumulators for each of
// up to 4 W-channel chunks at a time, each probability broadcast once for them: a key part that is also the values is
// read once from memory). The pieces (threads, segments) are merged at the end with the sinks.
// int4 rows are read "planar" (per 2W channels: the W low nibbles = even channels, then the W high = odd channels), the
// query permuted and the output un-permuted to match; groups that do not cover whole W (int8) / 2W (int4) channel
// chunks are dequantized row by row
// into a float tile first. Plain float32 / bfloat16 rows (no scales; kvlab_dense_attend, kvlab/layers/dense_attend.py)
// are read straight, or copied into the zero-padded float tile when their channels are not a multiple of W.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// W floats a vector: 16 with AVX-512, else 8 (AVX2; 16-float vectors split in two by GCC spill on 16 registers)
#if defined(__AVX512F__)
#define KVLAB_W 16
#else
#define KVLAB_W 8
#endif
constexpr int W = KVLAB_W;
typedef float vf __attribute__((vector_size(4 * KVLAB_W)));
typedef int32_t vi __attribute__((vector_size(4 * KVLAB_W)));

namespace {

inline vf ld(const float* p) { vf x; std::memcpy(&x, p, sizeof x); return x; }
inline void st(float* p, vf x) { std::memcpy(p, &x, sizeof x); }

// W codes -> float32: int8, or the low (hi = 0) / high (hi = 1) nibbles of W bytes (GCC's __builtin_convertvector
// scalarizes the sign extension, hence the intrinsics)
inline vf cvt_i8(const int8_t* p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
    vf r; for (int i = 0; i < W; ++i) r[i] = float(p[i]); return r;
#endif
}

// W fp8 codes (float8 e4m3fn / e5m2 bytes) -> float32 through their 256-entry table
inline vf cvt_fp8(const uint8_t* p, const float* lut) {
#if defined(__AVX512F__)
    return (vf)_mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), lut, 4);
#elif defined(__AVX2__)
    return (vf)_mm256_i32gather_ps(lut, _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 4);
#else
    vf r; for (int i = 0; i < W; ++i) r[i] = lut[p[i]]; return r;
#endif
}

inline vf cvt_u8(const uint8_t* p) {
#if defined(__AVX512F__)
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
    vf r; for (int i = 0; i < W; ++i) r[i] = float(p[i]); return r;
#endif
}

inline vf cvt_nibbles(const uint8_t* p, int hi) {
#if defined(__AVX512F__)
    __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    x = _mm_and_si128(_mm_srl_epi16(x, _mm_cvtsi32_si128(4 * hi)), _mm_set1_epi8(15));
    return (vf)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(x));
#elif defined(__AVX2__)
    __m128i x = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    x = _mm_and_si128(_mm_srl_epi16(x, _mm_cvtsi32_si128(4 * hi)), _mm_set1_epi8(15));
    return (vf)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x));
#else
    vf r; for (int i = 0; i < W; ++i) r[i] = float((p[i] >> (4 * hi)) & 15); return r;
#endif
}

inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t s = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 0x3ffu, bits;
    if (e == 0) {
        float f = float(m) * 5.9604644775390625e-8f;  // subnormal (or zero): m * 2^-24
        return s ? -f : f;
    }
    bits = e == 31 ? (s | 0x7f800000u | (m << 13)) : (s | ((e + 112u) << 23) | (m << 13));
    float f; std::memcpy(&f, &bits, 4); return f;
#endif
}

inline float bf16_to_float(uint16_t h) { uint32_t bits = uint32_t(h) << 16; float f; std::memcpy(&f, &bits, 4); return f; }

// scales [count] of dtype kind (0 float32, 1 float16, 2 bfloat16) -> float32
void scales_to_float(const void* src, int kind, long count, float* out) {
    if (kind == 0) { std::memcpy(out, src, count * 4); return; }
    const uint16_t* s = static_cast<const uint16_t*>(src);
    if (kind == 1) for (long i = 0; i < count; ++i) out[i] = half_to_float(s[i]);
    else for (long i = 0; i < count; ++i) out[i] = bf16_to_float(s[i]);
}

// exp of W floats (x <= 0 here; Cephes' expf polynomial, relative error ~1e-7; x below -87 gives garbage: the
// caller keeps only x > -UNDER)
inline vf vexp(vf x) {
    const vf t = x * 1.44269504088896341f;
    const vf n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
    const vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf two_n;
    std::memcpy(&two_n, &e, sizeof two_n);
    return p * two_n;
}

// one shuffle-add level: items of L lanes (L/2 after) from x then y
template <int L> inline vf comb(vf x, vf y) {
    vi lo, hi;
    for (int j = 0; j < W; ++j) {
        int item = j / (L / 2), i = j % (L / 2);
        lo[j] = item * L + i;
        hi[j] = item * L + i + L / 2;
    }
    return __builtin_shuffle(x, y, lo) + __builtin_shuffle(x, y, hi);
}

// a[0..N-1] of items N lanes wide -> a[0..N/2-1] of items N/2 wide, down to one vector
template <int N> struct Reduce {
    static inline void run(vf* a) {
        for (int k = 0; k < N / 2; ++k) a[k] = comb<N>(a[2 * k], a[2 * k + 1]);
        Reduce<N / 2>::run(a);
    }
};
template <> struct Reduce<1> { static inline void run(vf*) {} };

// lane j of the result = the sum of the W lanes of a[j] (a[] is overwritten)
inline vf reduce_lanes(vf* a) {
#if !defined(__AVX512F__) && defined(__AVX2__)
    // 8 vectors: two rounds of horizontal adds, then the 128-bit halves added (9 instructions)
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps((__m256)a[0], (__m256)a[1]), _mm256_hadd_ps((__m256)a[2], (__m256)a[3]));
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps((__m256)a[4], (__m256)a[5]), _mm256_hadd_ps((__m256)a[6], (__m256)a[7]));
    return (vf)_mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
#else
    Reduce<W>::run(a);
    return a[0];
#endif
}

// what cpu_attend.py passes (ctypes mirrors _Src, _Seg): one code buffer, and one segment of positions
struct Src {
    const void* codes;   // [B, H, cap, D or D / 2]: int8 (uint8 with zero points), or int4 two a byte (low nibble =
                         // even channel; stored + 8 without zero points)
    const void* scales;  // [B, H, cap, D / group]; keys per channel (span > 1): [B, H, cap / span, D], one scale a
                         // channel for each group of span slots (KIVI)
    const void* zeros;   // the scales' shape and kind (value = code * scale + zero), or null
    long cap;
    int D, int4, group, kind, span;  // kind of the scales: float32 (0), float16 (1), bfloat16 (2)
    const float* lut;    // fp8 codes (one byte a channel, symmetric): the float32 value of each byte; else null
    int plain;           // 0: codes as above; plain rows of float32 (1) or bfloat16 (2) values [B, H, cap, D], no
                         // scales (scales, zeros, group, kind, span, lut unused)
};
struct Seg {
    const int64_t* index;  // [B, n] the slot of each position (a top-k's rows), or null (slot = position)
    long n;
    Src k[2];  // key parts: their channels side by side in the query (k[0].D channels, then k[1].D)
    int nk;
    Src v;       // the values, when v_from < 0
    int v_from;  // else the values are key part v_from (MLA's c_kv; K = V): each tile read once for both products
};

// a code buffer of one (batch row, KV head, piece of positions)
struct Buf {
    const uint8_t* codes;  // the piece's first row (no index) or the buffer's (an index)
    const char* scales;
    const char* zeros;     // or null: symmetric codes
    const int64_t* index;  // the piece's slots, or null
    long p0;               // the piece's first slot (keys per channel: their scale rows are the buffer's)
    int kind, int4, group, ng, rowbytes, sbytes, D, nch, fast, planar, span, plain;
    const float* lut;      // fp8: the codes' table, or null
};

Buf make_buf(const Src& s, long bh, long p0, const int64_t* index) {
    Buf b;
    b.kind = s.kind;
    b.int4 = s.int4;
    b.lut = s.lut;
    b.group = s.group;
    b.D = s.D;
    b.span = s.span;
    b.plain = s.plain;
    b.ng = s.plain ? 1 : s.span > 1 ? s.D : s.D / s.group;
    b.rowbytes = s.plain ? s.D * (s.plain == 1 ? 4 : 2) : s.int4 ? s.D / 2 : s.D;
    b.sbytes = s.plain ? 0 : b.ng * (s.kind ? 2 : 4);
    b.nch = (s.D + W - 1) / W;
    const int g = s.span > 1 ? 2 * W : s.group;  // per channel: any chunk
    b.fast = s.plain ? s.D % W == 0 : s.int4 ? (s.D % (2 * W) == 0 && g % (2 * W) == 0) : (s.D % W == 0 && g % W == 0);
    b.planar = b.fast && s.int4 && !s.plain;
    const long row0 = bh * s.cap + (index ? 0 : p0);
    // per token: the piece's rows; per channel: the buffer's scale rows, slot / span
    const long srow0 = s.span > 1 ? bh * ((s.cap + s.span - 1) / s.span) : row0;
    b.codes = static_cast<const uint8_t*>(s.codes) + row0 * b.rowbytes;
    b.scales = s.plain ? nullptr : static_cast<const char*>(s.scales) + srow0 * b.sbytes;
    b.zeros = s.zeros ? static_cast<const char*>(s.zeros) + srow0 * b.sbytes : nullptr;
    b.index = index ? index + p0 : nullptr;
    b.p0 = index ? 0 : p0;
    return b;
}

// chunk loaders: loader(l, c) = the W values (scaled) of chunk c of row l of the current tile
struct RowsF32 {  // rows dequantized into a float tile [T, dp]
    const float* rows; int dp;
    vf operator()(int l, int c) const { return ld(rows + long(l) * dp + W * c); }
};
struct PlainF32 {  // plain float32 rows D apart (their channels read: a multiple of W)
    const float* rows; int D;
    vf operator()(int l, int c) const { return ld(rows + long(l) * D + W * c); }
};
// W bfloat16 values -> float32 (the 16 bits shifted into the high half)
inline vf cvt_bf16(const uint16_t* p) {
#if defined(__AVX512F__)
    return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#elif defined(__AVX2__)
    return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
    vf r; for (int i = 0; i < W; ++i) r[i] = bf16_to_float(p[i]); return r;
#endif
}
struct PlainBf16 {  // plain bfloat16 rows D apart (their channels read: a multiple of W)
    const uint16_t* rows; int D;
    vf operator()(int l, int c) const { return cvt_bf16(rows + long(l) * D + W * c); }
};
// plain rows read straight from memory: the bytes read next prefetched while a pass computes, a few lines at each
// of its n steps (its rows or chunk groups), so that reads stay in flight all along the compute (attend_heads says
// which bytes; 1.1-1.5x a call at 16K over prefetching row l + 8 KiB at row l, docs/performance.md). Codes: nothing
// (their loads are a quarter or less of plain rows').
template <class L> constexpr bool plain_rows = std::is_same_v<L, PlainF32> || std::is_same_v<L, PlainBf16> ||
                                               std::is_same_v<L, RowsF32>;  // loaders of float rows (not codes)
struct Ahead {
    const char *at = nullptr, *end = nullptr;
    long per = 0;  // lines a step
    Ahead() = default;
    Ahead(const void* p, long bytes, long n) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(p), start = a & ~uintptr_t(63);
        at = reinterpret_cast<const char*>(start);
        end = static_cast<const char*>(p) + bytes;
        per = (long((a + bytes - start + 63) / 64) + n - 1) / n;
    }
    template <class L> void step(long k = 1) {
        if (!plain_rows<L>) return;
        const char* stop = at + 64 * k * per < end ? at + 64 * k * per : end;
        for (; at < stop; at += 64) __builtin_prefetch(at, 0, 3);
    }
};
// scales (and zeros) of tile row l, chunk c: one float per token and group of channels, or (keys per channel) a
// vector of W, the row's position group's scale row (in the kernel's channel order)
struct TokenScales {
    const float *sc, *zs; int ng; const int* gi;
    float s(int l, int c) const { return sc[l * ng + gi[c]]; }
    float z(int l, int c) const { return zs[l * ng + gi[c]]; }
};
struct ChannelScales {
    const float *sc, *zs; int dp; const int* grow;
    vf s(int l, int c) const { return ld(sc + long(grow[l]) * dp + W * c); }
    vf z(int l, int c) const { return ld(zs + long(grow[l]) * dp + W * c); }
};
template <class S> struct Int8Rows {  // symmetric: int8 codes times their scale
    const uint8_t* codes; int rb; S k;
    vf operator()(int l, int c) const {
        return cvt_i8(reinterpret_cast<const int8_t*>(codes) + long(l) * rb + W * c) * k.s(l, c);
    }
};
template <class S> struct Fp8Rows {  // fp8 codes (through their table) times their scale
    const uint8_t* codes; int rb; S k; const float* lut;
    vf operator()(int l, int c) const { return cvt_fp8(codes + long(l) * rb + W * c, lut) * k.s(l, c); }
};
template <class S> struct UInt8Rows {  // zero points: uint8 codes times their scale plus their zero
    const uint8_t* codes; int rb; S k;
    vf operator()(int l, int c) const { return cvt_u8(codes + long(l) * rb + W * c) * k.s(l, c) + k.z(l, c); }
};
template <class S> struct Int4Rows {  // planar: chunk 2b = the low nibbles of bytes Wb..Wb+W-1 (even channels), 2b+1
                                      // the high ones; the zero -8 scale for symmetric codes (stored + 8)
    const uint8_t* codes; int rb; S k;
    vf operator()(int l, int c) const {
        return cvt_nibbles(codes + long(l) * rb + W / 2 * (c & ~1), c & 1) * k.s(l, c) + k.z(l, c);
    }
};

// lanes j < 4: the sum of the W lanes of a[j], the same tree as reduce_lanes (AVX2)
#if !defined(__AVX512F__) && defined(__AVX2__)
inline __m128 reduce_lanes4(const vf* a) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps((__m256)a[0], (__m256)a[1]), _mm256_hadd_ps((__m256)a[2], (__m256)a[3]));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
#endif

// adds the scores of tile rows l..l+P-1 for GC heads: S[(l + p) * GC + g] (q: GC rows dq apart); P GC <= 2 W sums,
// the first W reduced as one vector, the rest (P GC > W) as a second
template <int GC, int P, class L>
inline void score_block(const L& f, int l, int nch, const float* q, int dq, float* S) {
    constexpr int N = P * GC, NA = N > W ? 2 * W : W;
    vf acc[NA];
    for (int i = 0; i < NA; ++i) acc[i] = vf{};
    for (int c = 0; c < nch; ++c) {
        if constexpr (N > W) {  // each q chunk loaded once for the P rows
            vf x[P];
            for (int p = 0; p < P; ++p) x[p] = f(l + p, c);
            for (int g = 0; g < GC; ++g) {
                const vf qv = ld(q + g * dq + W * c);
                for (int p = 0; p < P; ++p) acc[p * GC + g] += qv * x[p];
            }
        } else {  // the q chunks of the GC heads in registers, a row at a time
            vf qv[GC];
            for (int g = 0; g < GC; ++g) qv[g] = ld(q + g * dq + W * c);
            for (int p = 0; p < P; ++p) {
                const vf x = f(l + p, c);
                for (int g = 0; g < GC; ++g) acc[p * GC + g] += qv[g] * x;
            }
        }
    }
    float* s = S + l * GC;
    if (N >= W) {  // the W sums one vector of S (the same additions as one at a time)
        st(s, ld(s) + reduce_lanes(acc));
        if (N > W) {
#if !defined(__AVX512F__) && defined(__AVX2__)
            if (N - W == 4) {
                _mm_storeu_ps(s + W, _mm_add_ps(_mm_loadu_ps(s + W), reduce_lanes4(acc + W)));
                return;
            }
#endif
            float t[W];
            st(t, reduce_lanes(acc + W));
            for (int i = 0; i < N - W; ++i) s[W + i] += t[i];
        }
    } else {
        float t[W];
        st(t, reduce_lanes(acc));
        for (int i = 0; i < N; ++i) s[i] += t[i];
    }
}

// rows a score block: W / GC where that is 2 or more; plain rows at 5-6 heads (AVX2) 2: 2 GC accumulators, the q
// loads shared by both rows (6 heads x 64 channels: 320 instructions a position instead of 358, 1.03x a call at 4K,
// level at 16K where the reads bound it: docs/performance.md); else 1
template <int GC, class L> constexpr int score_rows = W / GC >= 2 ? W / GC : plain_rows<L> && 2 * GC <= 12 ? 2 : 1;

template <int GC, class L>
void score_tile(const L& f, int m, int nch, const float* q, int dq, float* S, Ahead ahead) {
    constexpr int P = score_rows<GC, L>;
    int l = 0;
    for (; l + P <= m; l += P) ahead.step<L>(P), score_block<GC, P>(f, l, nch, q, dq, S);
    for (; l < m; ++l) ahead.step<L>(), score_block<GC, 1>(f, l, nch, q, dq, S);
}

// acc[g, chunk c] += sum over the tile's m rows of p[l, g] * value(l, c): CC chunks at a time (each p[l, g]
// broadcast once for them; CC x GC independent sums in registers, CC + CC GC + 1 <= 16 vector registers)
template <int GC, int CC, class L>
inline void value_chunks(const L& f, int m, int c0, const float* p, float* acc, int dq) {
    vf a[CC][GC];  // the tile's sums, added to acc at the end (two-level: float32 error of a tile plus tiles)
    for (int j = 0; j < CC; ++j)
        for (int g = 0; g < GC; ++g) a[j][g] = vf{};
#pragma GCC unroll 2
    for (int l = 0; l < m; ++l) {
        vf x[CC];
        for (int j = 0; j < CC; ++j) x[j] = f(l, c0 + j);
        const float* pl = p + l * GC;
        for (int g = 0; g < GC; ++g) {
            const float pg = pl[g];
            for (int j = 0; j < CC; ++j) a[j][g] += x[j] * pg;
        }
    }
    for (int j = 0; j < CC; ++j)
        for (int g = 0; g < GC; ++g) st(acc + g * dq + W * (c0 + j), ld(acc + g * dq + W * (c0 + j)) + a[j][g]);
}

template <int GC> constexpr int VC = 15 / (GC + 1) < 1 ? 1 : 15 / (GC + 1) > 4 ? 4 : 15 / (GC + 1);
template <int GC, class L>
void value_tile(const L& f, int m, int nch, const float* p, float* acc, int dq, Ahead ahead) {
    constexpr int CC = VC<GC>;
    int c = 0;
    for (; c + CC <= nch; c += CC) ahead.step<L>(), value_chunks<GC, CC>(f, m, c, p, acc, dq);
    for (; c < nch; ++c) ahead.step<L>(), value_chunks<GC, 1>(f, m, c, p, acc, dq);
}

// where channel d sits in a row as the kernel reads it (int4 fast: planar per 2W channels)
inline int slot_of(int d, bool planar) { return planar ? (d & ~(2 * W - 1)) + (d & 1) * W + (d & (2 * W - 1)) / 2 : d; }

// one buffer's rows of the current tile: their codes (rowbytes apart; gathered here for an index) and float scales
struct Tile {
    std::vector<float> sc, zs;  // scales and zero points [T, ng] (int4 symmetric: -8 scale; int8 symmetric: unused);
                                // per channel: the tile's scale rows [rows, dp] in the kernel's channel order
    std::vector<int> gi, gch, grow;  // scale group of each chunk / channel; per channel: each row's scale row
    std::vector<uint8_t> codes, scales, zeros;  // the gathered rows
    const uint8_t* at;
};

struct Work {
    std::vector<float> S, q, acc, sum, rows;  // acc: p.v of the current block of tiles; sum: of the blocks before
    Tile t[3];  // key parts, then the values when they are not a key part
};

void prepare_tile(const Buf& b, int T, Tile& t) {
    if (b.plain) {  // no scales; an index gathers the rows
        if (b.index) t.codes.resize(size_t(T) * b.rowbytes);
        return;
    }
    const size_t per = b.span > 1 ? size_t(b.nch) * W : b.ng;
    t.sc.resize(T * per);
    t.zs.resize(T * per);
    t.grow.resize(T);
    t.gi.resize(b.nch);
    t.gch.resize(b.D);
    for (int d = 0; d < b.D; ++d) t.gch[d] = b.span > 1 ? d : d / b.group;
    for (int c = 0; c < b.nch; ++c) t.gi[c] = b.int4 ? (2 * W * (c / 2)) / b.group : (W * c) / b.group;
    if (b.index) {
        t.codes.resize(size_t(T) * b.rowbytes);
        t.scales.resize(size_t(T) * b.sbytes);
        t.zeros.resize(b.zeros ? size_t(T) * b.sbytes : 0);
    }
}

// the scale rows of tile rows 0..m-1 (keys per channel): each position group's row once, as float32 in the kernel's
// channel order (zero pads), t.grow[l] its place
void channel_scales(const Buf& b, long lo, int m, Tile& t) {
    const int dp = b.nch * W;
    long last = -1;
    int rows = 0;
    float tmp[4096];
    for (int l = 0; l < m; ++l) {
        const long gr = (b.index ? b.index[lo + l] : b.p0 + lo + l) / b.span;
        if (gr != last) {
            float* sc = t.sc.data() + long(rows) * dp;
            float* zs = t.zs.data() + long(rows) * dp;
            std::fill(sc, sc + dp, 0.0f);
            std::fill(zs, zs + dp, 0.0f);
            scales_to_float(b.scales + gr * b.sbytes, b.kind, b.D, tmp);
            for (int d = 0; d < b.D; ++d) sc[slot_of(d, b.planar)] = tmp[d];
            if (b.zeros) {
                scales_to_float(b.zeros + gr * b.sbytes, b.kind, b.D, tmp);
                for (int d = 0; d < b.D; ++d) zs[slot_of(d, b.planar)] = tmp[d];
            } else if (b.int4) {
                for (int d = 0; d < dp; ++d) zs[d] = -8.0f * sc[d];
            }
            last = gr;
            ++rows;
        }
        t.grow[l] = rows - 1;
    }
}

// rows lo..lo+m-1 of buffer b into tile t (a copy of the chosen rows for an index; scales and zeros as float32)
void load_tile(const Buf& b, long lo, int m, Tile& t) {
    const long count = long(m) * b.ng;
    const char *sc = b.scales + lo * b.sbytes, *zs = b.zeros ? b.zeros + lo * b.sbytes : nullptr;  // per token
    t.at = b.codes + lo * b.rowbytes;
    if (b.plain) {
        if (b.index) {
            for (int l = 0; l < m; ++l)
                std::memcpy(t.codes.data() + long(l) * b.rowbytes, b.codes + b.index[lo + l] * b.rowbytes, b.rowbytes);
            t.at = t.codes.data();
        }
        return;
    }
    if (b.index) {
        for (int l = 0; l < m; ++l) {
            const long slot = b.index[lo + l];
            std::memcpy(t.codes.data() + long(l) * b.rowbytes, b.codes + slot * b.rowbytes, b.rowbytes);
            if (b.span > 1) continue;
            std::memcpy(t.scales.data() + long(l) * b.sbytes, b.scales + slot * b.sbytes, b.sbytes);
            if (b.zeros) std::memcpy(t.zeros.data() + long(l) * b.sbytes, b.zeros + slot * b.sbytes, b.sbytes);
        }
        t.at = t.codes.data();
        sc = reinterpret_cast<const char*>(t.scales.data());
        zs = b.zeros ? reinterpret_cast<const char*>(t.zeros.data()) : nullptr;
    }
    if (b.span > 1) return channel_scales(b, lo, m, t);
    scales_to_float(sc, b.kind, count, t.sc.data());
    if (zs)
        scales_to_float(zs, b.kind, count, t.zs.data());
    else if (b.int4)
        for (long i = 0; i < count; ++i) t.zs[i] = -8.0f * t.sc[i];
}

// f(loader) with the loader of tile t's rows: straight from the codes, or (groups that do not cover whole chunks)
// dequantized row by row into the float tile `rows` first
template <class F>
void with_rows(const Buf& b, const Tile& t, int m, std::vector<float>& rows, F&& f) {
    auto codes = [&](const auto& k) {  // the loader of b's code type with scales k
        using S = std::decay_t<decltype(k)>;
        if (b.lut)
            f(Fp8Rows<S>{t.at, b.rowbytes, k, b.lut});
        else if (b.int4)
            f(Int4Rows<S>{t.at, b.rowbytes, k});
        else if (b.zeros)
            f(UInt8Rows<S>{t.at, b.rowbytes, k});
        else
            f(Int8Rows<S>{t.at, b.rowbytes, k});
    };
    if (b.plain && b.fast) {
        if (b.plain == 1)
            f(PlainF32{reinterpret_cast<const float*>(t.at), b.rowbytes / 4});
        else
            f(PlainBf16{reinterpret_cast<const uint16_t*>(t.at), b.rowbytes / 2});
    } else if (b.plain) {  // channels not a multiple of W: copied into the zero-padded float tile
        const int dp = b.nch * W;
        rows.resize(size_t(m) * dp);
        for (int l = 0; l < m; ++l) {
            float* r = rows.data() + long(l) * dp;
            if (b.plain == 1) {
                std::memcpy(r, t.at + long(l) * b.rowbytes, size_t(b.D) * 4);
            } else {
                const uint16_t* c = reinterpret_cast<const uint16_t*>(t.at + long(l) * b.rowbytes);
                for (int d = 0; d < b.D; ++d) r[d] = bf16_to_float(c[d]);
            }
            for (int d = b.D; d < dp; ++d) r[d] = 0.0f;
        }
        f(RowsF32{rows.data(), dp});
    } else if (b.fast && b.span > 1) {
        codes(ChannelScales{t.sc.data(), t.zs.data(), b.nch * W, t.grow.data()});
    } else if (b.fast) {
        codes(TokenScales{t.sc.data(), t.zs.data(), b.ng, t.gi.data()});
    } else {
        const int dp = b.nch * W;
        rows.resize(size_t(m) * dp);
        for (int l = 0; l < m; ++l) {
            const uint8_t* c = t.at + long(l) * b.rowbytes;
            float* r = rows.data() + long(l) * dp;
            const long at = b.span > 1 ? long(t.grow[l]) * dp : long(l) * b.ng;  // per channel: gch[d] = d
            const float *s = t.sc.data() + at, *z = t.zs.data() + at;
            if (b.lut)
                for (int d = 0; d < b.D; ++d) r[d] = b.lut[c[d]] * s[t.gch[d]];
            else if (b.int4 && !b.zeros)
                for (int d = 0; d < b.D; ++d)
                    r[d] = (float((d & 1) ? (c[d >> 1] >> 4) : (c[d >> 1] & 15)) - 8.0f) * s[t.gch[d]];
            else if (b.int4)
                for (int d = 0; d < b.D; ++d)
                    r[d] = float((d & 1) ? (c[d >> 1] >> 4) : (c[d >> 1] & 15)) * s[t.gch[d]] + z[t.gch[d]];
            else if (b.zeros)
                for (int d = 0; d < b.D; ++d) r[d] = float(c[d]) * s[t.gch[d]] + z[t.gch[d]];
            else
                for (int d = 0; d < b.D; ++d) r[d] = float(int8_t(c[d])) * s[t.gch[d]];
            for (int d = b.D; d < dp; ++d) r[d] = 0.0f;
        }
        f(RowsF32{rows.data(), dp});
    }
}

// n positions of one piece for GC heads (q [GC, Dq], natural channel order), in tiles of T rows, each read once for
// its scores (key parts K[0..nk-1], summed) and right after, while in L1, for its values (V; the tile of key part
// vsrc when vsrc < nk), the softmax online (flash-decoding within the piece). Out: raw[g] the largest logit (-inf:
// none visible), den[g] the sum of exp(logit - raw) (0 if none), out[g, Dv] the unnormalised p.v (natural order).
// key parts K[0..nk-1] (channels side by side) for GC query heads: the query q [GC, Dq] laid out in w.q as the parts'
// rows are read (each part padded to whole W chunks, int4 planar; part i at off[i]; dqt wide), their tiles prepared
// for tiles of T rows of code bytes (plus `more` bytes a row read alongside) that fit L1
template <int GC>
struct KeyParts {
    const Buf* K;
    int nk, off[2], dqt = 0, T;
    KeyParts(const float* q, int Dq, const Buf* k, int n, int more, Work& w) : K(k), nk(n) {
        int bytes = more;
        for (int i = 0; i < nk; ++i) {
            off[i] = dqt;
            dqt += K[i].nch * W;
            bytes += K[i].rowbytes;
        }
        T = 16384 / bytes;
        T = T < 16 ? 16 : T > 128 ? 128 : T / 8 * 8;
        w.S.resize(size_t(T) * GC);
        w.q.assign(size_t(GC) * dqt, 0.0f);
        for (int i = 0, at = 0; i < nk; at += K[i].D, ++i)
            for (int g = 0; g < GC; ++g)
                for (int d = 0; d < K[i].D; ++d) w.q[g * dqt + off[i] + slot_of(d, K[i].planar)] = q[g * Dq + at + d];
        for (int i = 0; i < nk; ++i) prepare_tile(K[i], T, w.t[i]);
    }
    // rows lo..lo+m-1: their tiles loaded, S[l * GC + g] = q_g . k_l summed over the parts (ahead prefetched along)
    void score(long lo, int m, float* S, Work& w, Ahead ahead = Ahead()) const {
        for (int i = 0; i < nk; ++i) load_tile(K[i], lo, m, w.t[i]);
        std::fill(S, S + m * GC, 0.0f);
        for (int i = 0; i < nk; ++i)
            with_rows(K[i], w.t[i], m, w.rows, [&](const auto& f) {
                score_tile<GC>(f, m, K[i].nch, w.q.data() + off[i], dqt, S, i ? Ahead() : ahead);
            });
    }
};

// the raw scores q_g . k of n positions for GC heads: out[g * stride + l]
template <int GC>
void score_heads(const float* q, int Dq, const Buf* K, int nk, long n, float* out, long stride, Work& w) {
    const KeyParts<GC> kp(q, Dq, K, nk, 0, w);
    float* S = w.S.data();
    for (long lo = 0; lo < n; lo += kp.T) {
        const int m = int(n - lo < kp.T ? n - lo : kp.T);
        kp.score(lo, m, S, w);
        for (int l = 0; l < m; ++l)
            for (int g = 0; g < GC; ++g) out[g * stride + lo + l] = S[l * GC + g];
    }
}

template <int GC>
void attend_heads(const float* q, int Dq, const Buf* K, int nk, const Buf& V, int vsrc, long n, const float* mask,
                  float scale, float under, float* raw, float* den, float* out, Work& w) {
    const KeyParts<GC> kp(q, Dq, K, nk, vsrc == nk ? V.rowbytes : 0, w);
    const int T = kp.T, dvp = V.nch * W;
    w.acc.assign(size_t(GC) * dvp, 0.0f);
    w.sum.assign(size_t(GC) * dvp, 0.0f);
    if (vsrc == nk) prepare_tile(V, T, w.t[nk]);
    // the sums in three levels (within a tile, a block of BLOCK tiles, the blocks): float32 rounding over a long piece
    // grows with the longest chain of additions, not the position count
    constexpr int BLOCK = 32;
    float mx[GC], dn[GC], dsum[GC];
    for (int g = 0; g < GC; ++g) mx[g] = -INFINITY, dn[g] = 0.0f, dsum[g] = 0.0f;
    auto flush = [&]() {
        for (size_t i = 0; i < w.acc.size(); ++i) w.sum[i] += w.acc[i], w.acc[i] = 0.0f;
        for (int g = 0; g < GC; ++g) dsum[g] += dn[g], dn[g] = 0.0f;
    };
    float* S = w.S.data();
    for (long lo = 0, tile = 0; lo < n; lo += T, ++tile) {
        if (tile && tile % BLOCK == 0) flush();
        const int m = int(n - lo < T ? n - lo : T);
        // what the next reads are, prefetched while this tile computes (plain rows in place: codes are a quarter or
        // less of the bytes and gathered rows are copied): the score pass fetches the tile's values (their own
        // buffer), the value pass the next tile's keys (K = V: half the next tile's keys each)
        Ahead sa, va;
        const long mn = n - lo - m < T ? n - lo - m : T;  // the next tile's rows
        const bool kpf = nk == 1 && K[0].plain && !K[0].index && mn > 0;
        const int groups = V.nch / VC<GC> + V.nch % VC<GC>;  // the value pass's steps
        if (vsrc == nk && V.plain && !V.index) {
            sa = Ahead(V.codes + lo * V.rowbytes, long(m) * V.rowbytes, m);
            if (kpf) va = Ahead(K[0].codes + (lo + m) * K[0].rowbytes, mn * K[0].rowbytes, groups);
        } else if (kpf) {
            const long half = mn / 2;
            sa = Ahead(K[0].codes + (lo + m) * K[0].rowbytes, half * K[0].rowbytes, m);
            va = Ahead(K[0].codes + (lo + m + half) * K[0].rowbytes, (mn - half) * K[0].rowbytes, groups);
        }
        kp.score(lo, m, S, w, sa);  // scores, summed over the key parts
        if (vsrc == nk) load_tile(V, lo, m, w.t[nk]);
        // logits, the running maximum (what was summed so far rescaled when it grows)
        float tm[GC];
        for (int g = 0; g < GC; ++g) tm[g] = -INFINITY;
        long i = 0;
        if (!mask) {  // W at a time (lane j of vector k: head (W k + j) mod GC, as the numerators below), no mask: + 0
            vf mv[GC];
            for (int k = 0; k < GC; ++k) mv[k] = vf{} - INFINITY;
            for (int k = 0; i + W <= long(m) * GC; i += W, k = k + 1 == GC ? 0 : k + 1) {
                const vf s = ld(S + i) * scale + vf{};
                st(S + i, s);
                mv[k] = s > mv[k] ? s : mv[k];
            }
            for (int k = 0; k < GC; ++k)
                for (int j = 0; j < W; ++j) {
                    float& t = tm[(W * k + j) % GC];
                    t = mv[k][j] > t ? mv[k][j] : t;
                }
        }
        for (; i < long(m) * GC; ++i) {
            const int g = int(i % GC);
            const float s = S[i] * scale + (mask ? mask[lo + i / GC] : 0.0f);
            S[i] = s;
            tm[g] = s > tm[g] ? s : tm[g];
        }
        for (int g = 0; g < GC; ++g) {
            if (!(tm[g] > mx[g])) continue;
            if (mx[g] != -INFINITY) {
                const float c = std::exp(mx[g] - tm[g]);
                dn[g] *= c;
                dsum[g] *= c;
                for (int d = 0; d < dvp; ++d) w.acc[g * dvp + d] *= c, w.sum[g * dvp + d] *= c;
            }
            mx[g] = tm[g];
        }
        // numerators in place, W at a time: the heads' maxima repeat every GC vectors (lane j of vector k is head
        // (W k + j) mod GC); below exp(-under) of the maximum: 0
        {
            vf mv[GC], dv[GC];
            for (int k = 0; k < GC; ++k) {
                for (int j = 0; j < W; ++j) {
                    const float x = mx[(W * k + j) % GC];
                    mv[k][j] = x == -INFINITY ? 0.0f : x;
                }
                dv[k] = vf{};
            }
            const long total = long(m) * GC;
            long i = 0;
            for (int k = 0; i + W <= total; i += W, k = k + 1 == GC ? 0 : k + 1) {
                vf x = ld(S + i) - mv[k];
                vf p = x > -under ? vexp(x) : vf{};
                st(S + i, p);
                dv[k] += p;
            }
            for (int k = 0; k < GC; ++k)
                for (int j = 0; j < W; ++j) dn[(W * k + j) % GC] += dv[k][j];
            for (; i < total; ++i) {
                const int g = int(i % GC);
                const float x = S[i] - (mx[g] == -INFINITY ? 0.0f : mx[g]);
                const float p = x > -under ? std::exp(x) : 0.0f;
                S[i] = p;
                dn[g] += p;
            }
        }
        // p.v over the same rows
        with_rows(V, w.t[vsrc], m, w.rows,
                  [&](const auto& f) { value_tile<GC>(f, m, V.nch, S, w.acc.data(), dvp, va); });
    }
    flush();
    for (int g = 0; g < GC; ++g) {
        raw[g] = mx[g];
        den[g] = dsum[g];
        for (int d = 0; d < V.D; ++d) out[g * V.D + d] = w.sum[g * dvp + slot_of(d, V.planar)];
    }
}

typedef void (*HeadsFn)(const float*, int, const Buf*, int, const Buf&, int, long, const float*, float, float, float*,
                        float*, float*, Work&);
const HeadsFn HEADS[9] = {nullptr, attend_heads<1>, attend_heads<2>, attend_heads<3>, attend_heads<4>,
                          attend_heads<5>, attend_heads<6>, attend_heads<7>, attend_heads<8>};
typedef void (*ScoreFn)(const float*, int, const Buf*, int, long, float*, long, Work&);
const ScoreFn SCORES[9] = {nullptr, score_heads<1>, score_heads<2>, score_heads<3>, score_heads<4>, score_heads<5>,
                           score_heads<6>, score_heads<7>, score_heads<8>};

bool src_ok(const Src& s) {
    if (s.plain) return s.codes && s.cap >= 0 && s.D >= 1 && s.D <= 4096 && s.plain > 0 && s.plain <= 2;
    return s.codes && s.scales && s.cap >= 0 && s.D >= 1 && s.D <= 4096 && s.group >= 1 && s.D % s.group == 0 &&
           !(s.int4 && s.D % 2) && s.kind >= 0 && s.kind <= 2 && s.span >= 1 && !(s.lut && (s.int4 || s.zeros));
}

// the segment's sources: its key parts, then its values' own buffer (if any)
int sources(const Seg& s, const Src** out) {
    int k = 0;
    for (; k < s.nk; ++k) out[k] = &s.k[k];
    if (s.v_from < 0) out[k++] = &s.v;
    return k;
}

// the segments' descriptors checked: their positions in all (-1: arguments refused), the key and value channels
long check(int B, int H, int G, const Seg* segs, int nseg, int* Dq, int* Dv, int vdim = 0) {
    if (B < 1 || H < 1 || G < 1 || nseg < 1 || nseg > 16) return -1;
    *Dq = *Dv = -1;
    long total = 0;
    for (int i = 0; i < nseg; ++i) {
        const Seg& s = segs[i];
        if (s.nk < 1 || s.nk > 2 || s.v_from < -1 || s.v_from >= s.nk || s.n < 0) return -1;
        const Src* src[3];
        const int ns = sources(s, src);
        int dq = 0;
        for (int k = 0; k < s.nk; ++k) dq += s.k[k].D;
        if (vdim && (s.v_from < 0 || !s.k[s.v_from].plain || vdim > s.k[s.v_from].D)) return -1;
        const int dv = s.v_from < 0 ? s.v.D : vdim ? vdim : s.k[s.v_from].D;
        if (*Dq >= 0 && (dq != *Dq || dv != *Dv)) return -1;
        *Dq = dq, *Dv = dv;
        for (int k = 0; k < ns; ++k) {
            if (!src_ok(*src[k])) return -1;
            if (!s.index && s.n > src[k]->cap) return -1;
            if (s.index)
                for (long j = 0; j < long(B) * s.n; ++j)
                    if (s.index[j] < 0 || s.index[j] >= src[k]->cap) return -1;
        }
        total += s.n;
    }
    return total;
}

// the scores of the gc query heads q [gc, Dq] of row b, kv head bh = b * H + h, against the key parts of segments
// segs[0..nseg-1], their positions one after the other: out [gc, stride] (kvlab_quant_scores, kvlab_quant_index_scores)
void score_segments(const float* q, int Dq, const Seg* segs, int nseg, int b, long bh, int gc, float* out, long stride,
                    Work& w) {
    for (long i = 0, at = 0; i < nseg; at += segs[i].n, ++i) {
        const Seg& s = segs[i];
        Buf K[2];
        for (int k = 0; k < s.nk; ++k) K[k] = make_buf(s.k[k], bh, 0, s.index ? s.index + b * s.n : nullptr);
        SCORES[gc](q, Dq, K, s.nk, s.n, out + at, stride, w);
    }
}

// kvlab_quant_attend; vdim > 0 (kvlab_dense_attend): the values are the first vdim channels of key part v_from (plain
// rows; MLA's c_kv of its whole latent rows), the rest of those rows not read for them
// q [B, H, G, Dq] float32 (Dq: the channels of a segment's key parts together), out [B, H, G, Dv] float32 (Dv: its
// values' channels): attention over the positions of segments segs[0..nseg-1] one after the other (each its own
// buffers; Dq and Dv the same in all). mask: additive float32 over those positions, row b at mask + b *
// mask_bstride (0: one row for all), or null. sinks [H, G] float32 or null. stats [B, H, G, 2] or null: each head's
// largest logit (sinks included; -inf if none) and softmax denominator (relative to it, sinks included; 0 if none).
// threads > 1: a segment's positions split into up to that many pieces of at least min_part (flash-decoding: each
// piece's max, denominator and p.v, merged after). Returns 0, or -1 for arguments it does not take.
int attend(const float* q, float* out, int B, int H, int G, const Seg* segs, int nseg, const float* mask,
           long mask_bstride, const float* sinks, float scale, float under, int threads, int min_part, float* stats,
           int vdim) {
    int Dq, Dv;
    const long total = check(B, H, G, segs, nseg, &Dq, &Dv, vdim);
    if (total < 1 || threads < 1 || min_part < 1) return -1;
    struct Piece { int s; long p0, p1, at; };  // at: the segment's first position in the mask
    std::vector<Piece> pieces;
    for (int i = 0, at = 0; i < nseg; at += int(segs[i].n), ++i) {
        const long n = segs[i].n;
        if (!n) continue;
        long parts = n / min_part < threads ? n / min_part : threads;
        parts = parts < 1 ? 1 : parts > 64 ? 64 : parts;
        for (long t = 0; t < parts; ++t) pieces.push_back({i, n * t / parts, n * (t + 1) / parts, at});
    }
    const int np = int(pieces.size()), nth = threads < np ? threads : np;
    struct Job { long bh; int b, h, g0, gc; };
    std::vector<Job> jobs;
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int g0 = 0; g0 < G; g0 += 8) jobs.push_back({long(b) * H + h, b, h, g0, G - g0 < 8 ? G - g0 : 8});
    const long per = 16 + 8L * Dv;  // raw[8], den[8], out[8, Dv] of one job and piece
    std::vector<float> res(jobs.size() * np * per);
    auto work = [&](int t) {
        thread_local Work w;
        for (int i = t; i < np; i += nth) {
            const Piece& pc = pieces[i];
            const Seg& s = segs[pc.s];
            for (size_t j = 0; j < jobs.size(); ++j) {
                const Job& x = jobs[j];
                const int64_t* idx = s.index ? s.index + x.b * s.n : nullptr;
                Buf K[2], V;
                for (int k = 0; k < s.nk; ++k) K[k] = make_buf(s.k[k], x.bh, pc.p0, idx);
                V = s.v_from < 0 ? make_buf(s.v, x.bh, pc.p0, idx) : K[s.v_from];
                if (vdim) {  // the values: the first vdim channels of the key part's plain rows
                    V.D = vdim;
                    V.nch = (vdim + W - 1) / W;
                    V.fast = vdim % W == 0;
                }
                const float* mrow = mask ? mask + x.b * mask_bstride + pc.at + pc.p0 : nullptr;
                float* r = res.data() + (j * np + i) * per;
                HEADS[x.gc](q + (x.bh * G + x.g0) * long(Dq), Dq, K, s.nk, V, s.v_from < 0 ? s.nk : s.v_from,
                            pc.p1 - pc.p0, mrow, scale, under, r, r + 8, r + 16, w);
            }
        }
    };
    std::vector<std::thread> pool;
    try {
        for (int t = 1; t < nth; ++t) pool.emplace_back(work, t);
    } catch (...) {  // no thread: the parts not started run here
    }
    work(0);
    for (int t = int(pool.size()) + 1; t < nth; ++t) work(t);
    for (auto& th : pool) th.join();
    std::vector<float> f(np);
    for (size_t j = 0; j < jobs.size(); ++j) {  // merge the pieces: rescaled to the largest maximum
        const Job& x = jobs[j];
        for (int g = 0; g < x.gc; ++g) {
            const float sink = sinks ? sinks[x.h * G + x.g0 + g] : -INFINITY;
            float m = sink;
            for (int t = 0; t < np; ++t) {
                const float r = res[(j * np + t) * per + g];
                m = r > m ? r : m;
            }
            const float safe = m == -INFINITY ? 0.0f : m;
            float den = sinks ? std::exp(sink - safe) : 0.0f;
            for (int t = 0; t < np; ++t) {
                const float* r = res.data() + (j * np + t) * per;
                f[t] = r[g] == -INFINITY ? 0.0f : std::exp(r[g] - safe);
                den += r[8 + g] * f[t];
            }
            if (stats) {  // what a caller merging more positions needs: the maximum (-inf: none) and denominator
                stats[(x.bh * G + x.g0 + g) * 2] = m;
                stats[(x.bh * G + x.g0 + g) * 2 + 1] = den;
            }
            float* o = out + (x.bh * G + x.g0 + g) * long(Dv);
            for (int d = 0; d < Dv; ++d) {
                float a = 0.0f;
                for (int t = 0; t < np; ++t) a += res[(j * np + t) * per + 16 + g * Dv + d] * f[t];
                o[d] = a / den;
            }
        }
    }
    return 0;
}

}  // namespace

extern "C" {

int kvlab_quant_attend_version(void) { return 11; }

int kvlab_quant_attend(const float* q, float* out, int B, int H, int G, const Seg* segs, int nseg, const float* mask,
                       long mask_bstride, const float* sinks, float scale, float under, int threads, int min_part,
                       float* stats) {
    return attend(q, out, B, H, G, segs, nseg, mask, mask_bstride, sinks, scale, under, threads, min_part, stats, 0);
}

// kvlab_quant_attend over one segment of plain rows (kvlab/layers/dense_attend.py): keys k [B, H, cap_k, Dk] and values
// v [B, H, cap_v, Dv] of float32 (plain 1) or bfloat16 (plain 2), their first n positions; v == k with the same
// rows (cap_v == cap_k, Dv <= Dk): K = V, each tile read once for both products, the values the rows' first Dv
// channels (all of them: Dv == Dk). The other arguments and the result as kvlab_quant_attend.
int kvlab_dense_attend(const float* q, float* out, int B, int H, int G, const void* k, const void* v, long cap_k,
                       long cap_v, long n, int Dk, int Dv, int plain, const float* mask, long mask_bstride,
                       const float* sinks, float scale, float under, int threads, int min_part) {
    Seg s{};
    s.index = nullptr;
    s.n = n;
    s.nk = 1;
    s.k[0] = Src{k, nullptr, nullptr, cap_k, Dk, 0, Dk, 0, 1, nullptr, plain};
    int vdim = 0;
    if (v == k && cap_v == cap_k && Dv <= Dk) {
        s.v_from = 0;
        vdim = Dv < Dk ? Dv : 0;
    } else {
        s.v = Src{v, nullptr, nullptr, cap_v, Dv, 0, Dv, 0, 1, nullptr, plain};
        s.v_from = -1;
    }
    return attend(q, out, B, H, G, &s, 1, mask, mask_bstride, sinks, scale, under, threads, min_part, nullptr, vdim);
}

// the raw scores q . k (no scale, mask or softmax; an indexer's, kvlab/layers/blocked.py ``scores``): q [B, H, G, Dq]
// float32 against the key parts of segments segs[0..nseg-1] -> out [B, H, G, sum n] float32, the segments' positions
// one after the other. One thread. Returns 0, or -1 for arguments it does not take.
int kvlab_quant_scores(const float* q, float* out, int B, int H, int G, const Seg* segs, int nseg) {
    int Dq, Dv;
    const long total = check(B, H, G, segs, nseg, &Dq, &Dv);
    if (total < 1) return -1;
    static thread_local Work w;
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int g0 = 0; g0 < G; g0 += 8) {
                const long bh = long(b) * H + h;
                const int gc = G - g0 < 8 ? G - g0 : 8;
                score_segments(q + (bh * G + g0) * long(Dq), Dq, segs, nseg, b, bh, gc, out + (bh * G + g0) * total,
                               total, w);
            }
    return 0;
}

// an indexer's weighted scores (DeepSeek V4's CSA, kvlab/layers/compressed.py): out [B, sum n] float32, out[b, l] =
// sum over heads h and g (in that order) of w[b, h * G + g] * relu(scale * q[b, h, g] . k[b, h, l]), the keys those
// of segments segs[0..nseg-1] one after the other (as kvlab_quant_scores; w [B, H * G] float32). topk [B, k] int64 or
// null: each row's k best positions in index order, ties going to the earlier position (kvlab/layers/core.py
// ``stable_topk``; nan counts as the largest, as in torch's descending sort), 0 < k < sum n. One thread. Returns 0,
// or -1 for arguments it does not take.
int kvlab_quant_index_scores(const float* q, float* out, int B, int H, int G, const Seg* segs, int nseg,
                             const float* w, float scale, int k, int64_t* topk) {
    int Dq, Dv;
    const long total = check(B, H, G, segs, nseg, &Dq, &Dv);
    if (total < 1 || !w || (topk && (k < 1 || k >= total))) return -1;
    static thread_local std::vector<int64_t> order;
    static thread_local Work wk;
    static thread_local std::vector<float> raw;
    raw.resize(size_t(8) * total);
    for (int b = 0; b < B; ++b) {
        float* o = out + long(b) * total;
        for (long l = 0; l < total; ++l) o[l] = 0.0f;
        for (int h = 0; h < H; ++h)
            for (int g0 = 0; g0 < G; g0 += 8) {
                const long bh = long(b) * H + h;
                const int gc = G - g0 < 8 ? G - g0 : 8;
                score_segments(q + (bh * G + g0) * long(Dq), Dq, segs, nseg, b, bh, gc, raw.data(), total, wk);
                for (int g = 0; g < gc; ++g) {
                    const float wg = w[long(b) * H * G + h * G + g0 + g];
                    const float* r = raw.data() + long(g) * total;
                    for (long l = 0; l < total; ++l) {
                        const float x = r[l] * scale;
                        o[l] += (x > 0.0f ? x : 0.0f) * wg;
                    }
                }
            }
        if (topk) {  // the k best (larger first, then the earlier position), put back in index order
            order.resize(total);
            for (long l = 0; l < total; ++l) order[l] = l;
            auto better = [o](int64_t a, int64_t c) {
                const bool na = std::isnan(o[a]), nc = std::isnan(o[c]);
                if (na != nc) return na;
                if (!na && o[a] != o[c]) return o[a] > o[c];
                return a < c;
            };
            std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), better);
            std::sort(order.begin(), order.begin() + k);
            std::memcpy(topk + long(b) * k, order.data(), sizeof(int64_t) * k);
        }
    }
    return 0;
}

// One eager decode step of DeepSeek V4's CSA / HCA / SWA attention over K = V buffers of codes or plain float32 rows,
// every key visible (kvlab/layers/compressed.py ``_step_bound``, kvlab/layers/compressed_kernel.py): per row b, the H
// query heads q [B, H, D] normed without a weight (eps) and their trailing 2 r channels rotated (interleaved pairs
// times cos + i sin, cos / sin [r]); CSA (hi > 0): the indexer query iq [B, hi, di] rotated
// the same way, its weighted scores over the keys of segment iseg (w = iw [B, hi] times wscale, as
// kvlab_quant_index_scores with scale 1 / sqrt(di)) and the topk best (index order, ties to the earlier) written to
// idx [B, topk] and read by the last segment of segs through them (topk < its n; otherwise all of them, no index);
// then kvlab_quant_attend over segs (the window ring, then the entries) with sinks, and each output head rotated back
// (cos - i sin). out [B, H, D] float32. Returns 0, or -1 for arguments it does not take.
int kvlab_quant_v4_step(const float* q, int B, int H, int D, float eps, const float* cosv, const float* sinv, int r,
                        Seg* segs, int nseg, const float* iq, int hi, int di, const float* iw, float wscale,
                        const Seg* iseg, int topk, int64_t* idx, const float* sinks, float scale, float under,
                        int threads, int min_part, float* out) {
    if (B < 1 || H < 1 || D < 1 || r < 0 || 2 * r > D || nseg < 1 || nseg > 16 || (hi > 0 && (di < 2 * r || !iq ||
        !iw || !iseg || !idx || topk < 1)))
        return -1;
    static thread_local std::vector<float> qn, iqn, wv, isc;
    qn.assign(q, q + long(B) * H * D);
    auto rotate = [&](float* x, int d, float sign) {  // the trailing 2 r channels, interleaved pairs
        float* t = x + d - 2 * r;
        for (int j = 0; j < r; ++j) {
            const float a = t[2 * j], b = t[2 * j + 1], sn = sign * sinv[j];
            t[2 * j] = a * cosv[j] - b * sn;
            t[2 * j + 1] = a * sn + b * cosv[j];
        }
    };
    for (long h = 0; h < long(B) * H; ++h) {
        float* x = qn.data() + h * D;
        float ss = 0.0f;
        for (int i = 0; i < D; ++i) ss += x[i] * x[i];
        const float inv = 1.0f / std::sqrt(ss / float(D) + eps);
        for (int i = 0; i < D; ++i) x[i] *= inv;
        if (r) rotate(x, D, 1.0f);
    }
    Seg& last = segs[nseg - 1];
    last.index = nullptr;
    if (hi > 0 && last.n > topk) {
        iqn.assign(iq, iq + long(B) * hi * di);
        if (r)
            for (long h = 0; h < long(B) * hi; ++h) rotate(iqn.data() + h * di, di, 1.0f);
        wv.resize(size_t(B) * hi);
        for (long j = 0; j < long(B) * hi; ++j) wv[j] = iw[j] * wscale;
        isc.resize(size_t(B) * iseg->n);
        if (kvlab_quant_index_scores(iqn.data(), isc.data(), B, 1, hi, iseg, 1, wv.data(), 1.0f / std::sqrt(float(di)),
                                     topk, idx))
            return -1;
        last.index = idx;
        last.n = topk;
    }
    if (kvlab_quant_attend(qn.data(), out, B, 1, H, segs, nseg, nullptr, 0, sinks, scale, under, threads, min_part,
                           nullptr))
        return -1;
    if (r)
        for (long h = 0; h < long(B) * H; ++h) rotate(out + h * D, D, -1.0f);
    return 0;
}

}  // extern "C"
