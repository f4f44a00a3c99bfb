// A few rows' bf16 matrix-vector products on the CPU, the weights read where they lie: kvlab/layers/bf16_kernel.py.
// Plain C++17: bf16 in and out, float32 accumulation, the output rounded to nearest even as torch rounds.

#include <cstdint>
#include <vector>

#include "bf16.h"

namespace {

using kvlab_bf16::narrow;
using kvlab_bf16::row;
using kvlab_bf16::widen;

// y [NB, rows] (row stride ldy) = xf [NB, cols] W^T (+ bias), rounded to bf16
template <int NB, int U>
void rows_of(const float* xf, const uint16_t* w, const uint16_t* bias, int rows, int cols, uint16_t* y, long ldy) {
    float s[NB];
    for (int r = 0; r < rows; ++r) {
        row<NB, U>(xf, w + static_cast<long>(r) * cols, cols, s);
        const float add = bias ? widen(bias[r]) : 0.f;
        for (int b = 0; b < NB; ++b) y[b * ldy + r] = narrow(s[b] + add);
    }
}

// NB input rows at once, each weight read once for all of them; about 8 accumulators whatever NB
void chunk(int nb, const float* xf, const uint16_t* w, const uint16_t* bias, int rows, int cols, uint16_t* y, long ldy) {
    switch (nb) {
        case 1: rows_of<1, 4>(xf, w, bias, rows, cols, y, ldy); break;
        case 2: rows_of<2, 4>(xf, w, bias, rows, cols, y, ldy); break;
        case 3: rows_of<3, 2>(xf, w, bias, rows, cols, y, ldy); break;
        case 4: rows_of<4, 2>(xf, w, bias, rows, cols, y, ldy); break;
        case 5: rows_of<5, 1>(xf, w, bias, rows, cols, y, ldy); break;
        case 6: rows_of<6, 1>(xf, w, bias, rows, cols, y, ldy); break;
        case 7: rows_of<7, 1>(xf, w, bias, rows, cols, y, ldy); break;
        default: rows_of<8, 1>(xf, w, bias, rows, cols, y, ldy); break;
    }
}

}  // namespace

extern "C" {

int kvlab_bf16_version() { return 1; }

// y [n, rows] = x [n, cols] W [rows, cols]^T + bias [rows] (bias may be null), all bf16 row-major contiguous, float32
// accumulation; the inputs in chunks of up to 8 (each chunk reads the weights once). 0: done, 1: bad arguments.
int kvlab_bf16_linear(const uint16_t* x, int n, int cols, const uint16_t* w, int rows, const uint16_t* bias,
                      uint16_t* y) {
    if (n < 1 || cols < 1 || rows < 1) return 1;
    thread_local std::vector<float> xf;
    const int step = n < 8 ? n : 8;
    if (xf.size() < static_cast<size_t>(step) * cols) xf.resize(static_cast<size_t>(step) * cols);
    for (int b0 = 0; b0 < n; b0 += step) {
        const int nb = n - b0 < step ? n - b0 : step;
        const uint16_t* xb = x + static_cast<long>(b0) * cols;
        for (long i = 0; i < static_cast<long>(nb) * cols; ++i) xf[i] = widen(xb[i]);
        chunk(nb, xf.data(), w, bias, rows, cols, y + static_cast<long>(b0) * rows, rows);
    }
    return 0;
}

}  // extern "C"
