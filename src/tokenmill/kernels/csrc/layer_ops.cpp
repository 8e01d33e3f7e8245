// Per-token float32 layer ops that PyTorch runs as several small ops each (RMSNorm, gated activations, rotary): one
// pass over the data each, so a decode step's time goes to the weights, not to dispatch. (The KV-cache write is
// in paged_attention.cpp, next to the reads of the cache format it writes.)
#include <omp.h>
#include <stdint.h>

#include "row_ops.h"

extern "C" {

// out[t] = x[t] / rms(x[t]) * w (rms with eps), rows of length H; x and out may alias.
void tm_rms_norm(const float* x, int64_t x_stride, const float* w, float eps, int T, int H, float* out) {
#pragma omp parallel for schedule(static) if (T >= 16)
  for (int t = 0; t < T; ++t) tm::rms_norm_row(x + t * x_stride, w, eps, H, out + static_cast<int64_t>(t) * H);
}

// out[t] = act(x[t, :I]) * x[t, I:2I], act SiLU or (gelu != 0) tanh-approximated GELU
void tm_act_and_mul(const float* x, int T, int I, int gelu, float* out) {
#pragma omp parallel for schedule(static) if (T >= 16)
  for (int t = 0; t < T; ++t) {
    const float* g = x + static_cast<int64_t>(t) * 2 * I;
    tm::act_and_mul_row(g, g + I, I, gelu, out + static_cast<int64_t>(t) * I);
  }
}

// Rotate-half RoPE on q [T, H, D] and k [T, KV, D] in place; token rows are `q_stride` / `k_stride` floats apart.
void tm_rotary(float* q, int64_t q_stride, float* k, int64_t k_stride, const int64_t* positions, const float* cos,
               const float* sin, int T, int H, int KV, int D) {
#pragma omp parallel for schedule(static) if (T >= 16)
  for (int t = 0; t < T; ++t) {
    const float* c = cos + positions[t] * D;
    const float* s = sin + positions[t] * D;
    for (int h = 0; h < H + KV; ++h)
      tm::rotate_half_row(h < H ? q + t * q_stride + h * D : k + t * k_stride + (h - H) * D, c, s, D);
  }
}

}  // extern "C"
