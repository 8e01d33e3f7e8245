// Quantized matrix products (see quant_linear.cpp), as building blocks that work inside a caller's OpenMP
// parallel region (orphaned `omp for`: the team splits the work; called outside a region, one thread does it).
#pragma once
#include <stdint.h>

namespace tm {

constexpr int QK = 32;  // activation / weight block length

// A packed weight W [N, K] (tokenmill/quant/weights.py): int4 w = scale * q + min, or int8 w = scale * q.
// Row layout: row n's bytes, then row n+1's. Tiled layout: rows interleaved 8 at a time (see quant_linear.cpp),
// one scale (and min) per 32-block.
struct QMatrix {
  const void* q;
  const void* scale;
  const void* min;  // int4 only
  int bits;
  int f16;    // scales (and mins) are float16, else float32
  int group;  // elements per scale: a multiple of 32, or 16 (int8 only: GGUF Q6_K); 32 when tiled
  int N, K;
  int tiled;
};

// Activation rows quantized to int8 per 32 values: row m at q + m * K, its block scales at d + m * K / 32, and
// s = d * sum(q) per block (what the weight mins multiply). u = q + 128 as unsigned bytes (VNNI builds only):
// vpdpbusd multiplies unsigned by signed bytes, so against int8 weights the activations go in offset by 128.
struct QActivations {
  int8_t* q;
  float* d;
  float* s;
  uint8_t* u;

  // The rows from m0 on (of length K).
  QActivations from(int m0, int K) const {
    const int64_t first = static_cast<int64_t>(m0) * K;
    return QActivations{q + first, d + first / QK, s + first / QK, u + first};
  }
};

// Quantize M rows of x (`x_stride` floats apart) of length K into a.
void quantize_rows(const float* x, int64_t x_stride, int M, int K, const QActivations& a);

// out[m * ldo + n] (+)= (x_m . W_n) + bias[n] for m < M, n < N; bias may be null.
void qmatmul(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
             bool accumulate);

}  // namespace tm
