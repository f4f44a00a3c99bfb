// One decode step's small per-row float32 operations on the CPU, each as one call: RMSNorm rows and rotate-half RoPE
// rows (kvlab/layers/rows_kernel.py). Plain C++17.

#include <cmath>

extern "C" {

int kvlab_rows_version() { return 1; }

// y [rows, dim] = x / sqrt(mean(x^2) + eps) * w (w [dim], or 1 + w with offset; no w: 1), float32 sums. 0: done.
int kvlab_rms_norm(const float* x, long rows, int dim, const float* w, int offset, float eps, float* y) {
    if (rows < 1 || dim < 1) return 1;
    for (long r = 0; r < rows; ++r) {
        const float* xr = x + r * dim;
        float* yr = y + r * dim;
        float acc[8] = {};
        int c = 0;
        for (; c + 8 <= dim; c += 8)
            for (int l = 0; l < 8; ++l) acc[l] += xr[c + l] * xr[c + l];
        float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (; c < dim; ++c) s += xr[c] * xr[c];
        const float inv = 1.f / std::sqrt(s / static_cast<float>(dim) + eps);
        if (!w)
            for (c = 0; c < dim; ++c) yr[c] = xr[c] * inv;
        else if (offset)
            for (c = 0; c < dim; ++c) yr[c] = xr[c] * inv * (1.f + w[c]);
        else
            for (c = 0; c < dim; ++c) yr[c] = xr[c] * inv * w[c];
    }
    return 0;
}

// Rotate-half RoPE of x [B, T, H, dim] (tokens_first) or [B, H, T, dim] into y (same layout): the first rot channels'
// pairs (i, i + rot/2) rotated by token (b, t)'s cos / sin [B, T, rot] (their first rot/2 entries, the tables being
// cat(freqs, freqs)), the other channels copied. 0: done.
int kvlab_rope(const float* x, int batch, int tokens, int heads, int dim, int tokens_first, const float* cos,
               const float* sin, int rot, float* y) {
    if (batch < 1 || tokens < 1 || heads < 1 || dim < 1 || rot < 2 || rot > dim || rot % 2) return 1;
    const int half = rot / 2;
    for (int b = 0; b < batch; ++b)
        for (int t = 0; t < tokens; ++t) {
            const float* c = cos + (static_cast<long>(b) * tokens + t) * rot;
            const float* s = sin + (static_cast<long>(b) * tokens + t) * rot;
            for (int h = 0; h < heads; ++h) {
                const long row = tokens_first ? (static_cast<long>(b) * tokens + t) * heads + h
                                              : (static_cast<long>(b) * heads + h) * tokens + t;
                const float* xr = x + row * dim;
                float* yr = y + row * dim;
                for (int i = 0; i < half; ++i) {
                    const float x1 = xr[i], x2 = xr[i + half];
                    yr[i] = x1 * c[i] - x2 * s[i];
                    yr[i + half] = x2 * c[i] + x1 * s[i];
                }
                for (int i = rot; i < dim; ++i) yr[i] = xr[i];
            }
        }
    return 0;
}

}  // extern "C"
