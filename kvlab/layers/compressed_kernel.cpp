// One decode step of a DeepSeek V4 CSA / HCA / SWA layer's attention on a plain float32 cache, every key visible:
// kvlab/layers/compressed_kernel.py. Plain C++17, float32 throughout, no -ffast-math (exp of -inf is 0).

#include <algorithm>
#include <cmath>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX2__) && defined(__FMA__)
float dot(const float* a, const float* b, int len) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int i = 0;
    for (; i + 16 <= len; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= len; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(_mm256_add_ps(s0, s1)), _mm256_extractf128_ps(_mm256_add_ps(s0, s1), 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    float s = _mm_cvtss_f32(_mm_add_ss(lo, _mm_movehdup_ps(lo)));
    for (; i < len; ++i) s += a[i] * b[i];
    return s;
}

// o [len] += p v [len]
void axpy(float p, const float* v, float* o, int len) {
    const __m256 pv = _mm256_set1_ps(p);
    int i = 0;
    for (; i + 8 <= len; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
    for (; i < len; ++i) o[i] += p * v[i];
}
#else
float dot(const float* a, const float* b, int len) {
    float acc[16] = {};
    int i = 0;
    for (; i + 16 <= len; i += 16)
        for (int l = 0; l < 16; ++l) acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i < len; ++i, ++l) acc[l] += a[i] * b[i];
    float s = 0.f;
    for (int l = 0; l < 16; ++l) s += acc[l];
    return s;
}

void axpy(float p, const float* v, float* o, int len) {
    for (int i = 0; i < len; ++i) o[i] += p * v[i];
}
#endif

// x [d] *= 1 / sqrt(mean(x^2) + eps) (F.rms_norm without a weight)
void rms(float* x, int d, float eps) {
    float ss = 0.f;
    for (int i = 0; i < d; ++i) ss += x[i] * x[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (int i = 0; i < d; ++i) x[i] *= r;
}

// the trailing 2 R channels of x [d] as R complex numbers (interleaved pairs) times cos + i sign sin
void rotate(float* x, int d, const float* c, const float* s, int r, float sign) {
    float* t = x + d - 2 * r;
    for (int j = 0; j < r; ++j) {
        const float a = t[2 * j], b = t[2 * j + 1], sn = sign * s[j];
        t[2 * j] = a * c[j] - b * sn;
        t[2 * j + 1] = a * sn + b * c[j];
    }
}

}  // namespace

extern "C" {

int kvlab_compressed_version() { return 1; }

// Per row b (B rows, all at one position, no padding), H query heads of width D on one K = V head:
//   q_h = rope(rms(q_h)); CSA: idx = the topk best entries by sum_h w_h relu(rope(iq_h) . ikey_w / sqrt(dI)),
//   w = iw / sqrt(HI) (ties: the earlier entry; in entry order), HCA: every entry (n_index = 0), SWA: none (n = 0);
//   o_h = softmax(q_h . [ring | entries] * scale, sink_h) [ring | entries]; out_h = inverse-rope(o_h).
// q [B, H, D], iq [B, HI, dI], iw [B, HI], out [B, H, D] contiguous; the ring's L rows, the n entries and the n
// indexer keys of row b start at ring + b ring_stride, ent + b ent_stride, ikeys + b ik_stride (rows contiguous).
// cos / sin [R]: the rotation of the trailing 2 R channels (of D and of dI). sinks [H] or null. 0: done, 1: refused.
int kvlab_compressed_step(const float* q, const float* ring, long ring_stride, int L, const float* ent,
                          long ent_stride, int n, const float* ikeys, long ik_stride, const float* iq,
                          const float* iw, int hi, int di, int topk, const float* cosv, const float* sinv, int r,
                          const float* sinks, int B, int H, int D, float eps, float scale, float* out) {
    if (B < 1 || H < 1 || D < 1 || L < 0 || n < 0 || r < 0 || 2 * r > D || (hi > 0 && (di < 2 * r || topk < 1)))
        return 1;
    const bool indexed = hi > 0 && n > 0;
    const int k = indexed ? std::min(topk, n) : n;
    std::vector<float> qn(static_cast<size_t>(H) * D), logits(static_cast<size_t>(L + k)), iqn(indexed ? hi * di : 0),
        isc(indexed ? n : 0);
    std::vector<int> order(indexed ? n : 0), chosen(k);
    const float iscale = indexed ? 1.f / std::sqrt(static_cast<float>(di)) : 0.f;
    const float wscale = indexed ? 1.f / std::sqrt(static_cast<float>(hi)) : 0.f;
    for (int b = 0; b < B; ++b) {
        const float* kr = ring + b * ring_stride;
        const float* ke = ent + b * ent_stride;
        for (int h = 0; h < H; ++h) {
            float* x = qn.data() + h * D;
            std::copy(q + (static_cast<long>(b) * H + h) * D, q + (static_cast<long>(b) * H + h + 1) * D, x);
            rms(x, D, eps);
            rotate(x, D, cosv, sinv, r, 1.f);
        }
        if (indexed) {
            const float* kk = ikeys + b * ik_stride;
            for (int h = 0; h < hi; ++h) {
                float* x = iqn.data() + h * di;
                std::copy(iq + (static_cast<long>(b) * hi + h) * di, iq + (static_cast<long>(b) * hi + h + 1) * di, x);
                rotate(x, di, cosv, sinv, r, 1.f);
            }
            for (int w = 0; w < n; ++w) {
                float s = 0.f;
                for (int h = 0; h < hi; ++h) {
                    const float v = dot(iqn.data() + h * di, kk + static_cast<long>(w) * di, di) * iscale;
                    s += (v > 0.f ? v : 0.f) * (iw[b * hi + h] * wscale);
                }
                isc[w] = s;
            }
            for (int w = 0; w < n; ++w) order[w] = w;
            if (k < n) {  // the k best by (score descending, entry ascending), then in entry order
                auto better = [&](int a, int c) { return isc[a] > isc[c] || (isc[a] == isc[c] && a < c); };
                std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), better);
                std::sort(order.begin(), order.begin() + k);
            }
            std::copy(order.begin(), order.begin() + k, chosen.begin());
        } else {
            for (int w = 0; w < k; ++w) chosen[w] = w;
        }
        for (int h = 0; h < H; ++h) {
            const float* x = qn.data() + h * D;
            float top = sinks ? sinks[h] : -INFINITY;
            for (int j = 0; j < L; ++j) {
                logits[j] = dot(x, kr + static_cast<long>(j) * D, D) * scale;
                top = std::max(top, logits[j]);
            }
            for (int j = 0; j < k; ++j) {
                logits[L + j] = dot(x, ke + static_cast<long>(chosen[j]) * D, D) * scale;
                top = std::max(top, logits[L + j]);
            }
            float total = 0.f;
            for (int j = 0; j < L + k; ++j) {
                logits[j] = std::exp(logits[j] - top);
                total += logits[j];
            }
            if (sinks) total += std::exp(sinks[h] - top);
            const float inv = 1.f / total;
            float* o = out + (static_cast<long>(b) * H + h) * D;
            std::fill(o, o + D, 0.f);
            for (int j = 0; j < L + k; ++j) {
                const float p = logits[j] * inv;
                const float* v = j < L ? kr + static_cast<long>(j) * D : ke + static_cast<long>(chosen[j - L]) * D;
                axpy(p, v, o, D);
            }
            rotate(o, D, cosv, sinv, r, -1.f);
        }
    }
    return 0;
}

}  // extern "C"
