// One decode step's rotate-half RoPE rows in float32 on the CPU as one call (kvlab/layers/rows_kernel.py). Plain C++17
// (built with -ffp-contract=off: no FMAs, each product and sum rounded as torch's operators round them).

extern "C" {

int kvlab_rows_version() { return 2; }

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
