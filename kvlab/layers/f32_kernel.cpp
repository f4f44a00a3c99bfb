// A few rows' float32 matrix-vector products on the CPU, the weights read where they lie: kvlab/layers/f32_kernel.py.
// Plain C++17: float32 in and out, float32 FMAs.

#include <cstdint>

#include "f32.h"

namespace {

using kvlab_f32::row;

// y [NB, rows] (row stride ldy) = x [NB, cols] W^T (+ bias)
template <int NB, int U>
void rows_of(const float* x, const float* w, const float* bias, int rows, int cols, float* y, long ldy) {
    float s[NB];
    for (int r = 0; r < rows; ++r) {
        row<NB, U>(x, w + static_cast<long>(r) * cols, cols, s);
        const float add = bias ? bias[r] : 0.f;
        for (int b = 0; b < NB; ++b) y[b * ldy + r] = s[b] + add;
    }
}

// NB input rows at once, each weight read once for all of them; 4-8 accumulators whatever NB
void chunk(int nb, const float* x, const float* w, const float* bias, int rows, int cols, float* y, long ldy) {
    switch (nb) {
        case 1: rows_of<1, 4>(x, w, bias, rows, cols, y, ldy); break;
        case 2: rows_of<2, 4>(x, w, bias, rows, cols, y, ldy); break;
        case 3: rows_of<3, 2>(x, w, bias, rows, cols, y, ldy); break;
        case 4: rows_of<4, 2>(x, w, bias, rows, cols, y, ldy); break;
        case 5: rows_of<5, 1>(x, w, bias, rows, cols, y, ldy); break;
        case 6: rows_of<6, 1>(x, w, bias, rows, cols, y, ldy); break;
        case 7: rows_of<7, 1>(x, w, bias, rows, cols, y, ldy); break;
        default: rows_of<8, 1>(x, w, bias, rows, cols, y, ldy); break;
    }
}

}  // namespace

extern "C" {

int kvlab_f32_version() { return 1; }

// y [n, rows] = x [n, cols] W [rows, cols]^T + bias [rows] (bias may be null), all float32 row-major contiguous; the
// inputs in chunks of up to 8 (each chunk reads the weights once). 0: done, 1: bad arguments.
int kvlab_f32_linear(const float* x, int n, int cols, const float* w, int rows, const float* bias, float* y) {
    if (n < 1 || cols < 1 || rows < 1) return 1;
    for (int b0 = 0; b0 < n; b0 += 8) {
        const int nb = n - b0 < 8 ? n - b0 : 8;
        chunk(nb, x + static_cast<long>(b0) * cols, w, bias, rows, cols, y + static_cast<long>(b0) * rows, rows);
    }
    return 0;
}

}  // extern "C"
