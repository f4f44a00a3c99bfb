// kvlab: decode attention of one query per head over int8 / int4 symmetric K/V codes with per-token scales
// (kvlab/layers/cpu_attend.py builds, loads and documents it; kvlab/cache/quant.py holds the layout).
//
// Plain C++17 with GCC vector extensions of W floats (16 with AVX-512, else 8; intrinsics only to convert codes and
// half scales; no torch headers, no OpenMP): one function, kvlab_quant_attend, called through ctypes with the
// tensors' data pointers. Per (batch row, KV head, block of at most 8 query heads, part of the positions): pass 1
// scores every position (each code converted once, multiplied by its scale, then FMA'd into the accumulators of
// all the query heads, W / GC positions x GC heads at once in registers, the W-lane sums reduced W at a time by a
// shuffle tree), pass 2 the softmax (max, a vectorised exp W at a time, denominator, the UNDER cut), pass 3 p.v
// over tiles of positions (a tile of value rows stays in L1 while GC accumulators per W-channel chunk sweep it);
// the parts (threads) merged at the end with the sinks. int4 rows are read "planar" (per 2W channels: the W low
// nibbles = even channels, then the W high = odd channels), the query permuted and the output un-permuted to
// match; groups that do not cover whole W (int8) / 2W (int4) channel chunks are dequantized row by row into a
// float tile first.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
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
inline vf reduce_lanes(vf* a) { Reduce<W>::run(a); return a[0]; }

// a buffer of one (batch row, KV head): codes [cap, rowbytes], scales [cap, ng]
struct Buf {
    const uint8_t* codes;
    const void* scales;
    int kind, int4, group, ng, rowbytes, fast;
};

// chunk loaders: loader(l, c) = the W values (scaled) of chunk c of row l of the current tile
struct RowsF32 {  // rows dequantized into a float tile [T, dp]
    const float* rows; int dp;
    vf operator()(int l, int c) const { return ld(rows + long(l) * dp + W * c); }
};
struct Int8Rows {
    const int8_t* codes; int rb; const float* sc; int ng; const int* gi;
    vf operator()(int l, int c) const {
        return cvt_i8(codes + long(l) * rb + W * c) * sc[l * ng + gi[c]];
    }
};
struct Int4Rows {  // planar: chunk 2b = the low nibbles of bytes Wb..Wb+W-1 (even channels), 2b+1 the high ones
    const uint8_t* codes; int rb; const float* sc; int ng; const int* gi;
    vf operator()(int l, int c) const {
        float s = sc[l * ng + gi[c]];
        return cvt_nibbles(codes + long(l) * rb + W / 2 * (c & ~1), c & 1) * s - 8.0f * s;
    }
};

// scores of positions l..l+P-1 (tile rows) for GC heads: S[(at + p) * GC + g]
template <int GC, int P, class L>
inline void score_block(const L& f, int l, int nch, const float* q, int dq, float* S, long at) {
    vf acc[W];
    for (int i = 0; i < W; ++i) acc[i] = vf{};
    for (int c = 0; c < nch; ++c) {
        vf qv[GC];
        for (int g = 0; g < GC; ++g) qv[g] = ld(q + g * dq + W * c);
        for (int p = 0; p < P; ++p) {
            vf x = f(l + p, c);
            for (int g = 0; g < GC; ++g) acc[p * GC + g] += qv[g] * x;
        }
    }
    float t[W];
    st(t, reduce_lanes(acc));
    for (int i = 0; i < P * GC; ++i) S[at * GC + i] = t[i];
}

template <int GC, class L>
void score_tile(const L& f, int m, int nch, const float* q, int dq, float* S, long at) {
    constexpr int P = W / GC;
    int l = 0;
    for (; l + P <= m; l += P) score_block<GC, P>(f, l, nch, q, dq, S, at + l);
    for (; l < m; ++l) score_block<GC, 1>(f, l, nch, q, dq, S, at + l);
}

// acc[g, chunk c] += sum over the tile's m rows of p[l, g] * value(l, c)
template <int GC, class L>
void value_tile(const L& f, int m, int nch, const float* p, float* acc, int dq) {
    for (int c = 0; c < nch; ++c) {
        vf a[GC];
        for (int g = 0; g < GC; ++g) a[g] = ld(acc + g * dq + W * c);
        for (int l = 0; l < m; ++l) {
            vf x = f(l, c);
            const float* pl = p + l * GC;
            for (int g = 0; g < GC; ++g) a[g] += x * pl[g];
        }
        for (int g = 0; g < GC; ++g) st(acc + g * dq + W * c, a[g]);
    }
}

// where channel d sits in a row as the kernel reads it (int4 fast: planar per 32 channels)
inline int slot_of(int d, bool planar) { return planar ? (d & ~(2 * W - 1)) + (d & 1) * W + (d & (2 * W - 1)) / 2 : d; }

struct Work {
    std::vector<float> S, sc, rows, q, acc;
    std::vector<int> gi, gch;
};

// dequantize rows lo..lo+m-1 of buffer b into w.rows [m, dq] (natural channel order; pads stay zero)
void dequant_rows(const Buf& b, long lo, int m, int D, int dq, const float* sc, Work& w) {
    for (int l = 0; l < m; ++l) {
        const uint8_t* c = b.codes + (lo + l) * b.rowbytes;
        float* r = w.rows.data() + long(l) * dq;
        const float* s = sc + l * b.ng;
        if (b.int4)
            for (int d = 0; d < D; ++d) r[d] = (float((d & 1) ? (c[d >> 1] >> 4) : (c[d >> 1] & 15)) - 8.0f) * s[w.gch[d]];
        else
            for (int d = 0; d < D; ++d) r[d] = float(int8_t(c[d])) * s[w.gch[d]];
    }
}

// positions 0..n-1 of K, V (a part of the buffer) for GC heads: raw[g] the largest logit (sinks included; -inf if
// none), den[g] the sum of exp(logit - max) (max 0 where raw is -inf; the sinks not added), acc[g, slot] the
// unnormalised p.v in the value rows' channel order (planar for int4 read straight)
// a pass over buffer b in tiles of vt rows: its scale-group index per channel (gch) and per chunk (gi), the tile's
// scales (sc) and, for groups that do not cover whole chunks, a float tile (rows)
void prepare_tiles(const Buf& b, int vt, int nch, int D, int dq, Work& w) {
    w.sc.resize(size_t(vt) * b.ng);
    w.gi.resize(nch);
    w.gch.resize(D);
    for (int d = 0; d < D; ++d) w.gch[d] = d / b.group;
    for (int c = 0; c < nch; ++c) w.gi[c] = b.int4 ? (2 * W * (c / 2)) / b.group : (W * c) / b.group;
    if (!b.fast) w.rows.assign(size_t(vt) * dq, 0.0f);
}

// the scales of rows lo..lo+m-1 of buffer b as float32 into w.sc
void tile_scales(const Buf& b, long lo, int m, Work& w) {
    scales_to_float(static_cast<const char*>(b.scales) + lo * b.ng * (b.kind ? 2 : 4), b.kind, long(m) * b.ng,
                    w.sc.data());
}

template <int GC>
void attend_heads(const float* q, const Buf& K, const Buf& V, int n, int D, const float* mask, const float* sinks,
                  float scale, float under, float* raw, float* den, float* acc, Work& w) {
    const int dq = (D + W - 1) / W * W, nch = dq / W;
    const bool kplanar = K.fast && K.int4;
    const int tile = 64;
    w.S.resize(size_t(n) * GC);
    w.q.assign(size_t(GC) * dq, 0.0f);
    for (int g = 0; g < GC; ++g)
        for (int d = 0; d < D; ++d) w.q[g * dq + slot_of(d, kplanar)] = q[g * D + d];
    // pass 1: scores
    {
        const Buf& b = K;
        int vt = tile;
        prepare_tiles(b, vt, nch, D, dq, w);
        for (long lo = 0; lo < n; lo += vt) {
            int m = int(n - lo < vt ? n - lo : vt);
            tile_scales(b, lo, m, w);
            if (!b.fast) {
                dequant_rows(b, lo, m, D, dq, w.sc.data(), w);
                score_tile<GC>(RowsF32{w.rows.data(), dq}, m, nch, w.q.data(), dq, w.S.data(), lo);
            } else if (b.int4) {
                score_tile<GC>(Int4Rows{b.codes + lo * b.rowbytes, b.rowbytes, w.sc.data(), b.ng, w.gi.data()}, m, nch,
                               w.q.data(), dq, w.S.data(), lo);
            } else {
                score_tile<GC>(Int8Rows{reinterpret_cast<const int8_t*>(b.codes) + lo * b.rowbytes, b.rowbytes,
                                        w.sc.data(), b.ng, w.gi.data()}, m, nch, w.q.data(), dq, w.S.data(), lo);
            }
        }
    }
    // pass 2: softmax numerators in place, the denominator
    float mx[GC];
    for (int g = 0; g < GC; ++g) mx[g] = -INFINITY;
    float* S = w.S.data();
    for (long l = 0; l < n; ++l) {
        float add = mask ? mask[l] : 0.0f;
        for (int g = 0; g < GC; ++g) {
            float s = S[l * GC + g] * scale + add;
            S[l * GC + g] = s;
            mx[g] = s > mx[g] ? s : mx[g];
        }
    }
    for (int g = 0; g < GC; ++g) {
        if (sinks && sinks[g] > mx[g]) mx[g] = sinks[g];
        raw[g] = mx[g];
        if (mx[g] == -INFINITY) mx[g] = 0.0f;
        den[g] = 0.0f;
    }
    {  // W at a time: the heads' maxima repeat every GC vectors (lane j of vector i is head (W i + j) mod GC)
        vf mv[GC], dv[GC];
        for (int k = 0; k < GC; ++k) {
            for (int j = 0; j < W; ++j) mv[k][j] = mx[(W * k + j) % GC];
            dv[k] = vf{};
        }
        const long total = long(n) * GC;
        long i = 0;
        for (int k = 0; i + W <= total; i += W, k = k + 1 == GC ? 0 : k + 1) {
            vf x = ld(S + i) - mv[k];
            vf p = x > -under ? vexp(x) : vf{};
            st(S + i, p);
            dv[k] += p;
        }
        for (int k = 0; k < GC; ++k)
            for (int j = 0; j < W; ++j) den[(W * k + j) % GC] += dv[k][j];
        for (; i < total; ++i) {
            int g = int(i % GC);
            float x = S[i] - mx[g];
            float p = x > -under ? std::exp(x) : 0.0f;
            S[i] = p;
            den[g] += p;
        }
    }
    // pass 3: p.v
    w.acc.assign(size_t(GC) * dq, 0.0f);
    {
        const Buf& b = V;
        int vt = b.rowbytes >= 1024 ? 16 : 16384 / b.rowbytes < tile ? tile : 16384 / b.rowbytes;
        prepare_tiles(b, vt, nch, D, dq, w);
        for (long lo = 0; lo < n; lo += vt) {
            int m = int(n - lo < vt ? n - lo : vt);
            tile_scales(b, lo, m, w);
            const float* p = S + lo * GC;
            if (!b.fast) {
                dequant_rows(b, lo, m, D, dq, w.sc.data(), w);
                value_tile<GC>(RowsF32{w.rows.data(), dq}, m, nch, p, w.acc.data(), dq);
            } else if (b.int4) {
                value_tile<GC>(Int4Rows{b.codes + lo * b.rowbytes, b.rowbytes, w.sc.data(), b.ng, w.gi.data()}, m, nch,
                               p, w.acc.data(), dq);
            } else {
                value_tile<GC>(Int8Rows{reinterpret_cast<const int8_t*>(b.codes) + lo * b.rowbytes, b.rowbytes,
                                        w.sc.data(), b.ng, w.gi.data()}, m, nch, p, w.acc.data(), dq);
            }
        }
    }
    std::memcpy(acc, w.acc.data(), sizeof(float) * GC * dq);
}

typedef void (*HeadsFn)(const float*, const Buf&, const Buf&, int, int, const float*, const float*, float, float,
                        float*, float*, float*, Work&);
const HeadsFn HEADS[9] = {nullptr, attend_heads<1>, attend_heads<2>, attend_heads<3>, attend_heads<4>,
                          attend_heads<5>, attend_heads<6>, attend_heads<7>, attend_heads<8>};

Buf make_buf(const void* codes, const void* scales, int kind, int int4, int group, int D) {
    Buf b;
    b.codes = static_cast<const uint8_t*>(codes);
    b.scales = scales;
    b.kind = kind;
    b.int4 = int4;
    b.group = group;
    b.ng = D / group;
    b.rowbytes = int4 ? D / 2 : D;
    b.fast = int4 ? (D % (2 * W) == 0 && group % (2 * W) == 0) : (D % W == 0 && group % W == 0);
    return b;
}

}  // namespace

extern "C" {

int kvlab_quant_attend_version(void) { return 3; }

// q [B, H, G, D] float32; out [B, H, G, D] float32; codes [B, H, cap, D or D/2] (int8 / packed int4, stored + 8),
// scales [B, H, cap, D / group] (kind 0 float32, 1 float16, 2 bfloat16); the first n slots attended.
// mask: additive float32, row b at mask + b * mask_bstride (0: one row for all), n values; or null.
// sinks [H, G] float32 or null. stats [B, H, G, 2] or null: each head's largest logit (sinks included; -inf if
// none) and softmax denominator (relative to that maximum, 0 where it is -inf; sinks included). threads > 1: the positions split into up to that many parts of at least min_part
// (flash-decoding: each part's max, denominator and p.v, merged after). Returns 0, or -1 for arguments it does
// not take.
int kvlab_quant_attend(const float* q, float* out, int B, int H, int G, int D, int n,
                       const void* kc, const void* ks, long k_cap, int k_int4, int k_group, int k_kind,
                       const void* vc, const void* vs, long v_cap, int v_int4, int v_group, int v_kind,
                       const float* mask, long mask_bstride, const float* sinks, float scale, float under,
                       int threads, int min_part, float* stats) {
    if (B < 1 || H < 1 || G < 1 || D < 1 || n < 1 || k_group < 1 || v_group < 1 || D % k_group || D % v_group ||
        ((k_int4 || v_int4) && D % 2) || n > k_cap || n > v_cap || threads < 1 || min_part < 1)
        return -1;
    const long krow = k_int4 ? D / 2 : D, vrow = v_int4 ? D / 2 : D;
    const int kng = D / k_group, vng = D / v_group;
    const long kb = k_kind ? 2 : 4, vb = v_kind ? 2 : 4;
    const int dq = (D + W - 1) / W * W;
    int parts = n / min_part < threads ? n / min_part : threads;
    parts = parts < 1 ? 1 : parts > 64 ? 64 : parts;
    struct Job { long bh; int b, h, g0, gc; };
    std::vector<Job> jobs;
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int g0 = 0; g0 < G; g0 += 8) jobs.push_back({long(b) * H + h, b, h, g0, G - g0 < 8 ? G - g0 : 8});
    const long per = 16 + 8L * dq;  // raw[8], den[8], acc[8, dq] of one job and part
    std::vector<float> res(jobs.size() * parts * per);
    auto work = [&](int t) {
        thread_local Work w;
        const long p0 = long(n) * t / parts, p1 = long(n) * (t + 1) / parts;
        for (size_t j = 0; j < jobs.size(); ++j) {
            const Job& x = jobs[j];
            Buf K = make_buf(static_cast<const uint8_t*>(kc) + (x.bh * k_cap + p0) * krow,
                             static_cast<const char*>(ks) + (x.bh * k_cap + p0) * kng * kb, k_kind, k_int4, k_group, D);
            Buf V = make_buf(static_cast<const uint8_t*>(vc) + (x.bh * v_cap + p0) * vrow,
                             static_cast<const char*>(vs) + (x.bh * v_cap + p0) * vng * vb, v_kind, v_int4, v_group, D);
            const float* mrow = mask ? mask + x.b * mask_bstride + p0 : nullptr;
            float* r = res.data() + (j * parts + t) * per;
            HEADS[x.gc](q + (x.bh * G + x.g0) * long(D), K, V, int(p1 - p0), D, mrow,
                        sinks ? sinks + x.h * G + x.g0 : nullptr, scale, under, r, r + 8, r + 16, w);
        }
    };
    std::vector<std::thread> pool;
    try {
        for (int t = 1; t < parts; ++t) pool.emplace_back(work, t);
    } catch (...) {  // no thread: the parts not started run here
    }
    work(0);
    for (int t = int(pool.size()) + 1; t < parts; ++t) work(t);
    for (auto& th : pool) th.join();
    for (size_t j = 0; j < jobs.size(); ++j) {  // merge the parts: rescale to the largest maximum
        const Job& x = jobs[j];
        const bool vplanar = v_int4 && D % (2 * W) == 0 && v_group % (2 * W) == 0;
        for (int g = 0; g < x.gc; ++g) {
            float m = -INFINITY;
            for (int t = 0; t < parts; ++t) {
                float r = res[(j * parts + t) * per + g];
                m = r > m ? r : m;
            }
            const float safe = m == -INFINITY ? 0.0f : m;
            float den = sinks ? std::exp(sinks[x.h * G + x.g0 + g] - safe) : 0.0f, f[64];
            for (int t = 0; t < parts; ++t) {
                const float* r = res.data() + (j * parts + t) * per;
                f[t] = r[g] == -INFINITY ? 0.0f : parts == 1 ? 1.0f : std::exp(r[g] - safe);
                den += r[8 + g] * f[t];
            }
            if (stats) {  // what a caller merging more positions needs: the maximum (-inf: none) and denominator
                stats[(x.bh * G + x.g0 + g) * 2] = m;
                stats[(x.bh * G + x.g0 + g) * 2 + 1] = den;
            }
            float* o = out + ((x.bh * G + x.g0 + g) * long(D));
            for (int d = 0; d < D; ++d) {
                const int sl = slot_of(d, vplanar);
                float a = 0.0f;
                for (int t = 0; t < parts; ++t) a += res[(j * parts + t) * per + 16 + g * dq + sl] * f[t];
                o[d] = a / den;
            }
        }
    }
    return 0;
}

}  // extern "C"
