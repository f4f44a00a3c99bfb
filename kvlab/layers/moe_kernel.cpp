// One token's mixture of experts on the CPU: its k chosen experts (and the shared expert) read where they lie, one
// call: kvlab/layers/moe_kernel.py. Plain C++17: float32 weights, or bf16 weights (and input, output) with float32
// arithmetic throughout.

#include <cmath>
#include <cstdint>
#include <vector>

#include "bf16.h"
#include "f32.h"

namespace {

// y [rows] = W [rows, cols] (row-major) x [cols]: the rows read in order, four accumulators each (kvlab/layers/f32.h:
// one stream for the hardware prefetcher, 1.2-1.35x four rows a pass from memory, docs/performance.md)
void gemv(const float* w, const float* x, float* y, int rows, int cols) {
    for (int i = 0; i < rows; ++i) kvlab_f32::row<1, 4>(x, w + static_cast<long>(i) * cols, cols, y + i);
}

// y [rows] = W [rows, cols] (bf16, row-major) x [cols] (float32): kvlab/layers/bf16.h's rows, read in order
void gemv(const uint16_t* w, const float* x, float* y, int rows, int cols) {
    for (int i = 0; i < rows; ++i) kvlab_bf16::row<1, 4>(x, w + static_cast<long>(i) * cols, cols, y + i);
}

float act(float v, int kind) {
    switch (kind) {
        case 0: return v / (1.f + std::exp(-v));  // silu
        case 1: {  // gelu, tanh approximation
            const float inner = 0.7978845608028654f * (v + 0.044715f * v * v * v);
            return 0.5f * v * (1.f + std::tanh(inner));
        }
        default: return 0.5f * v * (1.f + std::erf(v * 0.7071067811865476f));  // gelu
    }
}

// h [width] = act(min(g, limit)) * clamp(u, -limit, limit) (no clamps without a limit), g = G x, u = U x; y = D h
template <class W>
void expert(const W* g_w, const W* u_w, const W* d_w, const float* x, int hidden, int width, int kind,
            bool clip, float limit, float* g, float* u, float* y) {
    gemv(g_w, x, g, width, hidden);
    gemv(u_w, x, u, width, hidden);
    for (int i = 0; i < width; ++i) {
        float a = g[i], b = u[i];
        if (clip) {
            a = a < limit ? a : limit;
            b = b < -limit ? -limit : (b > limit ? limit : b);
        }
        g[i] = act(a, kind) * b;
    }
    gemv(d_w, g, y, hidden, width);
}

template <class W>
int step(const float* x, int hidden, const long* idx, const float* w, int k, int num, int width, const W* gate,
         const W* up, const W* down, int shared, const W* s_gate, const W* s_up, const W* s_down, int kind, int clip,
         float limit, float alpha, float* out) {
    if (hidden < 1 || k < 0 || num < 1 || width < 1 || shared < 0 || kind < 0 || kind > 2) return 1;
    const int wide = width > shared ? width : shared;
    std::vector<float> g(wide), u(wide), y(hidden), acc(hidden, 0.f);
    const long per = static_cast<long>(width) * hidden;
    for (int j = 0; j < k; ++j) {
        const long e = idx[j];
        if (e < 0 || e >= num) continue;  // a skip expert (ZAYA1)
        expert(gate + e * per, up + e * per, down + e * per, x, hidden, width, kind, clip, limit, g.data(), u.data(),
               y.data());
        const float wj = w[j];
        for (int c = 0; c < hidden; ++c) acc[c] += wj * y[c];
    }
    if (shared)
        expert(s_gate, s_up, s_down, x, hidden, shared, kind, clip, limit, g.data(), u.data(), out);
    else
        for (int c = 0; c < hidden; ++c) out[c] = 0.f;
    for (int c = 0; c < hidden; ++c) out[c] += alpha * acc[c];
    return 0;
}

}  // namespace

extern "C" {

int kvlab_moe_version() { return 5; }

// out [H] = shared(x) + alpha sum_j w_j expert_{idx_j}(x) for one token x [H]: experts gate / up [E, I, H], down
// [E, H, I] (an index >= E, a skip expert, adds nothing), the shared expert's gate / up [S, H], down [H, S] (S = 0:
// none, 0 instead of its output). act: 0 silu, 1 gelu (tanh), 2 gelu. clip: the SwiGLU limit applies. 0: done.
int kvlab_moe_step(const float* x, int hidden, const long* idx, const float* w, int k, int num, int width,
                   const float* gate, const float* up, const float* down, int shared, const float* s_gate,
                   const float* s_up, const float* s_down, int kind, int clip, float limit, float alpha, float* out) {
    return step(x, hidden, idx, w, k, num, width, gate, up, down, shared, s_gate, s_up, s_down, kind, clip, limit, alpha,
                out);
}

// kvlab_moe_step with its routing computed here first, float32 (kvlab/layers/moe.py MoE.choose): logits = R x (router
// [num, hidden]); scores softmax (scoring 0), sigmoid (1) or sqrt(softplus) (2: DeepSeek V4; softplus the logit itself
// above 20, as torch's); the k best of scores + bias (bias [num] or null), ties to the lower index, in descending
// order; with n_group > 1 only among the topk_group best of n_group equal groups of experts, a group scored by the sum
// of its two best (DeepSeek V3's group limit: the others' choices -inf); with table (long [vocab, k]) and token
// (long [1]) non-null, the experts table[token] instead of a choice (DeepSeek V4's hash routing). The chosen experts'
// scores as weights, divided by their sum (+ 1e-20 but for softmax) with norm_topk. 0: done, 1: bad arguments.
int kvlab_moe_route_step(const float* x, int hidden, const float* router, const float* bias, int scoring, int k,
                         int norm_topk, int n_group, int topk_group, const long* table, const long* token, int num,
                         int width, const float* gate, const float* up, const float* down, int shared,
                         const float* s_gate, const float* s_up, const float* s_down, int kind, int clip, float limit,
                         float alpha, float* out) {
    if (hidden < 1 || num < 1 || k < 1 || k > num || scoring < 0 || scoring > 2) return 1;
    if (n_group > 1 && (num % n_group || topk_group < 1 || topk_group > n_group)) return 1;
    std::vector<float> score(num), choice(num), w(k);
    std::vector<long> idx(k);
    gemv(router, x, score.data(), num, hidden);
    if (scoring == 0) {
        float m = score[0];
        for (int e = 1; e < num; ++e) m = score[e] > m ? score[e] : m;
        float z = 0.f;
        for (int e = 0; e < num; ++e) z += (score[e] = std::exp(score[e] - m));
        for (int e = 0; e < num; ++e) score[e] /= z;
    } else if (scoring == 1) {
        for (int e = 0; e < num; ++e) score[e] = 1.f / (1.f + std::exp(-score[e]));
    } else {
        for (int e = 0; e < num; ++e) score[e] = std::sqrt(score[e] > 20.f ? score[e] : std::log1p(std::exp(score[e])));
    }
    if (table && token) {
        for (int j = 0; j < k; ++j) {
            idx[j] = table[token[0] * k + j];
            if (idx[j] < 0 || idx[j] >= num) return 1;
        }
    } else {
        for (int e = 0; e < num; ++e) choice[e] = bias ? score[e] + bias[e] : score[e];
        if (n_group > 1 && topk_group < n_group) {
            const int size = num / n_group;
            std::vector<float> best(n_group);
            std::vector<char> keep(n_group, 0);
            for (int g = 0; g < n_group; ++g) {  // the sum of the group's two best (its best alone in a group of one)
                const float* c = choice.data() + g * size;
                int a = 0;
                for (int e = 1; e < size; ++e) a = c[e] > c[a] ? e : a;
                int b = -1;
                for (int e = 0; e < size; ++e) b = e != a && (b < 0 || c[e] > c[b]) ? e : b;
                best[g] = b < 0 ? c[a] : c[a] + c[b];
            }
            for (int j = 0; j < topk_group; ++j) {
                int top = -1;
                for (int g = 0; g < n_group; ++g) top = !keep[g] && (top < 0 || best[g] > best[top]) ? g : top;
                keep[top] = 1;
            }
            for (int e = 0; e < num; ++e)
                if (!keep[e / size]) choice[e] = -INFINITY;
        }
        for (int j = 0; j < k; ++j) {
            int best = -1;
            for (int e = 0; e < num; ++e) {
                bool taken = false;
                for (int i = 0; i < j; ++i) taken = taken || idx[i] == e;
                if (!taken && (best < 0 || choice[e] > choice[best])) best = e;
            }
            idx[j] = best;
        }
    }
    float sum = 0.f;
    for (int j = 0; j < k; ++j) sum += (w[j] = score[idx[j]]);
    if (norm_topk) {
        const float d = sum + (scoring == 0 ? 0.f : 1e-20f);
        for (int j = 0; j < k; ++j) w[j] /= d;
    }
    return step(x, hidden, idx.data(), w.data(), k, num, width, gate, up, down, shared, s_gate, s_up, s_down, kind, clip,
                limit, alpha, out);
}

// kvlab_moe_step with x, every weight and out in bf16 (the routing weights w float32): float32 arithmetic, out rounded
// to bf16 (nearest even)
int kvlab_moe_step_bf16(const uint16_t* x, int hidden, const long* idx, const float* w, int k, int num, int width,
                        const uint16_t* gate, const uint16_t* up, const uint16_t* down, int shared,
                        const uint16_t* s_gate, const uint16_t* s_up, const uint16_t* s_down, int kind, int clip,
                        float limit, float alpha, uint16_t* out) {
    if (hidden < 1) return 1;
    std::vector<float> xf(hidden), y(hidden);
    for (int c = 0; c < hidden; ++c) xf[c] = kvlab_bf16::widen(x[c]);
    const int rc = step(xf.data(), hidden, idx, w, k, num, width, gate, up, down, shared, s_gate, s_up, s_down, kind,
                        clip, limit, alpha, y.data());
    if (rc) return rc;
    for (int c = 0; c < hidden; ++c) out[c] = kvlab_bf16::narrow(y[c]);
    return 0;
}

}  // extern "C"
