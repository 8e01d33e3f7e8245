// Per-token float32 layer ops that PyTorch runs as several small ops each (RMSNorm, SiLU-and-mul, rotary,
// KV-cache write): one pass over the data each, so a decode step's time goes to the weights, not to dispatch.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <cmath>
#include <cstring>

#include "vec_math.h"

extern "C" {

// out[t] = x[t] / rms(x[t]) * w (rms with eps), rows of length H; x and out may alias.
void tm_rms_norm(const float* x, int64_t x_stride, const float* w, float eps, int T, int H, float* out) {
#pragma omp parallel for schedule(static) if (T >= 16)
  for (int t = 0; t < T; ++t) {
    const float* xr = x + t * x_stride;
    float* o = out + static_cast<int64_t>(t) * H;
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= H; i += 8) {
      __m256 v = _mm256_loadu_ps(xr + i);
      acc = _mm256_fmadd_ps(v, v, acc);
    }
    float sum = tm::hsum(acc);
    for (; i < H; ++i) sum += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(sum / H + eps);
    const __m256 vinv = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= H; i += 8)
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(xr + i), vinv)));
    for (; i < H; ++i) o[i] = w[i] * (xr[i] * inv);
  }
}

// out[t] = silu(x[t, :I]) * x[t, I:2I]
void tm_silu_and_mul(const float* x, int T, int I, float* out) {
#pragma omp parallel for schedule(static) if (T >= 16)
  for (int t = 0; t < T; ++t) {
    const float* g = x + static_cast<int64_t>(t) * 2 * I;
    const float* u = g + I;
    float* o = out + static_cast<int64_t>(t) * I;
    int i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= I; i += 8) {
      __m256 gv = _mm256_loadu_ps(g + i);
      __m256 s = _mm256_div_ps(gv, _mm256_add_ps(one, tm::exp(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
    }
    for (; i < I; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

// Rotate-half RoPE on q [T, H, D] and k [T, KV, D] in place; token rows are `q_stride` / `k_stride` floats apart.
void tm_rotary(float* q, int64_t q_stride, float* k, int64_t k_stride, const int64_t* positions, const float* cos,
               const float* sin, int T, int H, int KV, int D) {
  const int half = D / 2;
#pragma omp parallel for schedule(static) if (T >= 16)
  for (int t = 0; t < T; ++t) {
    const float* c = cos + positions[t] * D;
    const float* s = sin + positions[t] * D;
    for (int h = 0; h < H + KV; ++h) {
      float* x = h < H ? q + t * q_stride + h * D : k + t * k_stride + (h - H) * D;
      int i = 0;
      for (; i + 8 <= half; i += 8) {  // the products and sums of x*cos + rotate_half(x)*sin, unfused: bit-exact
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
  }
}

// Store k and v rows ([T, width] floats, `stride` apart) into cache slots: cache[slot_mapping[t], :] (row width).
void tm_write_kv(const float* k, const float* v, int64_t stride, const int64_t* slot_mapping, int T, int width,
                 float* k_cache, float* v_cache) {
  for (int t = 0; t < T; ++t) {
    std::memcpy(k_cache + slot_mapping[t] * width, k + t * stride, width * sizeof(float));
    std::memcpy(v_cache + slot_mapping[t] * width, v + t * stride, width * sizeof(float));
  }
}

}  // extern "C"
