// mHC's maps and Sinkhorn-Knopp (DeepSeek V4) as one loop per matrix on the CPU: kvlab/layers/mhc_kernel.py.
// Plain C++17, float32 throughout, built without -ffast-math and with -ffp-contract=off (no FMA contraction), so
// each step is the same float operation as kvlab/layers/mhc.py's torch form: sums in order, true divisions.

#include <cmath>
#include <vector>

namespace {

constexpr int LANES = 32;  // independent partial sums: a dot product the compiler vectorises without reassociating

// sum_i a[i] * b[i] over LANES interleaved partial sums (then added in order), no FMA contraction
float dot(const float* a, const float* b, long len) {
    float acc[LANES] = {};
    long i = 0;
    for (; i + LANES <= len; i += LANES)
        for (int l = 0; l < LANES; ++l) acc[l] += a[i + l] * b[i + l];
    for (int l = 0; i < len; ++i, ++l) acc[l] += a[i] * b[i];
    float s = 0.f;
    for (int l = 0; l < LANES; ++l) s += acc[l];
    return s;
}

// softmax over each row of m [n, n] (max, exp(x - max), sum in order, times 1 / sum as torch's CPU softmax), + eps;
// then iters alternating column / row normalisations (x / (sum + eps)), the first and the last a column one.
void sinkhorn(float* m, int n, int iters, float eps) {
    for (int i = 0; i < n; ++i) {
        float* r = m + i * n;
        float top = r[0];
        for (int j = 1; j < n; ++j) top = r[j] > top ? r[j] : top;
        float total = 0.f;
        for (int j = 0; j < n; ++j) {
            r[j] = std::exp(r[j] - top);
            total += r[j];
        }
        const float inv = 1.f / total;
        for (int j = 0; j < n; ++j) r[j] = r[j] * inv + eps;  // two roundings, as torch's softmax then add
    }
    float col[64];
    for (int it = 0; it < iters; ++it) {
        if (it) {  // rows
            for (int i = 0; i < n; ++i) {
                float* r = m + i * n;
                float s = 0.f;
                for (int j = 0; j < n; ++j) s += r[j];
                s += eps;
                for (int j = 0; j < n; ++j) r[j] = r[j] / s;
            }
        }
        for (int j = 0; j < n; ++j) col[j] = 0.f;  // columns: rows added in order
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) col[j] += m[i * n + j];
        for (int j = 0; j < n; ++j) col[j] += eps;
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) m[i * n + j] = m[i * n + j] / col[j];
    }
}

void maps_row(const float* z, const float* scale, const float* bias, float* o, int n, int iters, float eps) {
    const long width = static_cast<long>(2 + n) * n;
    for (int k = 0; k < n; ++k) {
        const float a = z[k] * scale[0] + bias[k];
        o[k] = 1.f / (1.f + std::exp(-a)) + eps;
    }
    for (int k = n; k < 2 * n; ++k) {
        const float a = z[k] * scale[1] + bias[k];
        o[k] = 2.f * (1.f / (1.f + std::exp(-a)));
    }
    for (long k = 2 * n; k < width; ++k) o[k] = z[k] * scale[2] + bias[k];
    sinkhorn(o + 2 * n, n, iters, eps);
}

}  // namespace

extern "C" {

int kvlab_mhc_version() { return 2; }

// logits, out: count matrices [n, n] contiguous float32 (out may be logits). Returns 0, or 1 for refused arguments.
int kvlab_sinkhorn(const float* logits, float* out, long count, int n, int iters, float eps) {
    if (n < 1 || n > 64 || iters < 1 || count < 0) return 1;
    const long nn = static_cast<long>(n) * n;
    for (long c = 0; c < count; ++c) {
        float* m = out + c * nn;
        if (m != logits + c * nn)
            for (long k = 0; k < nn; ++k) m[k] = logits[c * nn + k];
        sinkhorn(m, n, iters, eps);
    }
    return 0;
}

// One hyper-connection's maps for `rows` tokens. lin [rows, (2 + n) n]: W x (the linear map of the normed streams);
// scale [3], bias [(2 + n) n]. out [rows, (2 + n) n]: pre (n: sigmoid(s0 z + b) + eps), post (n: 2 sigmoid(s1 z + b)),
// M (n x n: Sinkhorn(softmax_rows(s2 z + b) + eps)), each z scaled then biased (two roundings, as torch's mul, add).
int kvlab_mhc_maps(const float* lin, const float* scale, const float* bias, float* out, long rows, int n, int iters,
                   float eps) {
    if (n < 1 || n > 64 || iters < 1 || rows < 0) return 1;
    const long width = static_cast<long>(2 + n) * n;
    for (long t = 0; t < rows; ++t) maps_row(lin + t * width, scale, bias, out + t * width, n, iters, eps);
    return 0;
}

// A hyper-connection's read for `rows` tokens of streams x [rows, n, d]: the maps (as kvlab_mhc_maps) of
// W rms(flatten(x)) with w [(2 + n) n, n d], and the sub-layer's input mix [rows, d] = sum_j pre_j x_j (in order j).
// rms(v) = v * (1 / sqrt(mean(v^2) + norm_eps)); the squares and W's rows summed by dot(). maps [rows, (2 + n) n].
int kvlab_mhc_read(const float* x, const float* w, const float* scale, const float* bias, float* mix, float* maps,
                   long rows, int n, long d, int iters, float eps, float norm_eps) {
    if (n < 1 || n > 64 || iters < 1 || rows < 0 || d < 1) return 1;
    const long len = n * d, width = static_cast<long>(2 + n) * n;
    std::vector<float> flat(len), z(width);
    for (long t = 0; t < rows; ++t) {
        const float* xt = x + t * len;
        const float ms = dot(xt, xt, len) / static_cast<float>(len);
        const float r = 1.f / std::sqrt(ms + norm_eps);
        for (long i = 0; i < len; ++i) flat[i] = xt[i] * r;
        for (long k = 0; k < width; ++k) z[k] = dot(flat.data(), w + k * len, len);
        float* o = maps + t * width;
        maps_row(z.data(), scale, bias, o, n, iters, eps);
        float* m = mix + t * d;
        for (long c = 0; c < d; ++c) m[c] = o[0] * xt[c];
        for (int j = 1; j < n; ++j)
            for (long c = 0; c < d; ++c) m[c] += o[j] * xt[j * d + c];
    }
    return 0;
}

// A hyper-connection's write for `rows` tokens: y [rows, n, d], y_k = post_k out + sum_j M_jk x_j (in order j),
// from maps [rows, (2 + n) n] (post at n.., M row-major at 2n..), the sub-layer's out [rows, d], streams x [rows, n, d].
int kvlab_mhc_write(const float* maps, const float* out, const float* x, float* y, long rows, int n, long d) {
    if (n < 1 || n > 64 || rows < 0 || d < 1) return 1;
    const long len = n * d, width = static_cast<long>(2 + n) * n;
    for (long t = 0; t < rows; ++t) {
        const float* post = maps + t * width + n;
        const float* m = post + n;
        const float* xt = x + t * len;
        const float* ot = out + t * d;
        for (int k = 0; k < n; ++k) {
            float* yk = y + t * len + k * d;
            for (long c = 0; c < d; ++c) yk[c] = m[k] * xt[c];
            for (int j = 1; j < n; ++j)
                for (long c = 0; c < d; ++c) yk[c] += m[j * n + k] * xt[j * d + c];
            for (long c = 0; c < d; ++c) yk[c] = post[k] * ot[c] + yk[c];
        }
    }
    return 0;
}

}  // extern "C"
