// Per-token float32 row operations, shared by the single-op kernels (layer_ops.cpp) and the fused decode step
// (decode_step.cpp). Each works on one token's row; callers choose how to spread rows over threads.
#pragma once
#include <immintrin.h>
#include <stdint.h>

#include <cmath>
#include <cstring>

#include "vec_math.h"

namespace tm {

// o = x / rms(x) * w over H values (rms with eps); x and o may alias.
inline void rms_norm_row(const float* x, const float* w, float eps, int H, float* o) {
  __m256 acc = _mm256_setzero_ps();
  int i = 0;
  for (; i + 8 <= H; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float sum = hsum(acc);
  for (; i < H; ++i) sum += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(sum / H + eps);
  const __m256 vinv = _mm256_set1_ps(inv);
  for (i = 0; i + 8 <= H; i += 8)
    _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv)));
  for (; i < H; ++i) o[i] = w[i] * (x[i] * inv);
}

// o = silu(g) * u over I values.
inline void silu_and_mul_row(const float* g, const float* u, int I, float* o) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int i = 0;
  for (; i + 8 <= I; i += 8) {
    __m256 gv = _mm256_loadu_ps(g + i);
    __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, tm::exp(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// o = gelu_tanh(g) * u over I values: PyTorch's gelu(approximate="tanh"), 0.5 g (1 + tanh(y)) with
// y = sqrt(2/pi) (g + 0.044715 g^3), computed as g / (1 + exp(-2y)) (the same value; no cancellation in 1 + tanh).
inline void gelu_tanh_and_mul_row(const float* g, const float* u, int I, float* o) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 k0 = _mm256_set1_ps(-2.0f * 0.7978845608028654f), k1 = _mm256_set1_ps(0.044715f);
  int i = 0;
  for (; i + 8 <= I; i += 8) {
    __m256 gv = _mm256_loadu_ps(g + i);
    __m256 minus_2y = _mm256_mul_ps(k0, _mm256_fmadd_ps(_mm256_mul_ps(k1, gv), _mm256_mul_ps(gv, gv), gv));
    __m256 gelu = _mm256_div_ps(gv, _mm256_add_ps(one, tm::exp(minus_2y)));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(gelu, _mm256_loadu_ps(u + i)));
  }
  for (; i < I; ++i) {
    const float minus_2y = -2.0f * 0.7978845608028654f * (g[i] + 0.044715f * g[i] * g[i] * g[i]);
    o[i] = g[i] / (1.0f + std::exp(minus_2y)) * u[i];
  }
}

// o = act(g) * u over I values: SiLU (SwiGLU) or, with gelu, tanh-approximated GELU (GeGLU).
inline void act_and_mul_row(const float* g, const float* u, int I, bool gelu, float* o) {
  if (gelu)
    gelu_tanh_and_mul_row(g, u, I, o);
  else
    silu_and_mul_row(g, u, I, o);
}

// Rotate-half RoPE of one head row x[D] in place with this position's cos/sin rows. The products and sums of
// x*cos + rotate_half(x)*sin are unfused, so the result is bit-exact with the PyTorch formula.
inline void rotate_half_row(float* x, const float* c, const float* s, int D) {
  const int half = D / 2;
  int i = 0;
  for (; i + 8 <= half; i += 8) {
    __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + half + i);
    __m256 o1 = _mm256_sub_ps(_mm256_mul_ps(x1, _mm256_loadu_ps(c + i)), _mm256_mul_ps(x2, _mm256_loadu_ps(s + i)));
    __m256 o2 = _mm256_add_ps(_mm256_mul_ps(x2, _mm256_loadu_ps(c + half + i)),
                              _mm256_mul_ps(x1, _mm256_loadu_ps(s + half + i)));
    _mm256_storeu_ps(x + i, o1);
    _mm256_storeu_ps(x + half + i, o2);
  }
  for (; i < half; ++i) {
    const float x1 = x[i], x2 = x[half + i];
    x[i] = x1 * c[i] - x2 * s[i];
    x[half + i] = x2 * c[half + i] + x1 * s[half + i];
  }
}

}  // namespace tm
