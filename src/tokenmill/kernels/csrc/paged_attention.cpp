// Decode attention over the paged KV cache: one query token per sequence, read straight from the sequence's
// blocks (no gather into a padded copy, no mask). One task per (sequence, KV head): the query heads that share
// a KV head read each key and value once. Two passes: scores for the whole context, then softmax and the
// weighted sum of values. float32; head_dim a multiple of 8.
#include "paged_attention.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vec_math.h"

namespace tm {

void decode_attention_task(const float* q_heads, const PagedKV& kv, int b, int kvh, int G, float scale,
                           float* out_heads) {
  const int D = kv.D, KV = kv.KV, bs = kv.block_size;
  const int len = static_cast<int>(kv.seq_lens[b]);
  const int start = kv.window > 0 ? std::max(0, len - kv.window) : 0;
  const int n = len - start;
  thread_local std::vector<float> scores;
  if (scores.size() < static_cast<size_t>(G) * n) scores.resize(static_cast<size_t>(G) * n);
  const int64_t* table = kv.block_tables + static_cast<int64_t>(b) * kv.max_blocks;
  const float* qh = q_heads;
  for (int t = start; t < len; ++t) {
    const float* kr = kv.k_cache + ((table[t / bs] * bs + t % bs) * KV + kvh) * D;
    for (int g = 0; g < G; ++g) {
      __m256 acc = _mm256_setzero_ps();
      for (int i = 0; i < D; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qh + g * D + i), _mm256_loadu_ps(kr + i), acc);
      scores[static_cast<size_t>(g) * n + (t - start)] = hsum(acc) * scale;
    }
  }
  for (int g = 0; g < G; ++g) {  // softmax in place
    float* s = scores.data() + static_cast<size_t>(g) * n;
    float m = -INFINITY;
    for (int i = 0; i < n; ++i) m = std::max(m, s[i]);
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
      __m256 e = tm::exp(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
      _mm256_storeu_ps(s + i, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    float sum = hsum(vsum);
    for (; i < n; ++i) {
      s[i] = std::exp(s[i] - m);
      sum += s[i];
    }
    const float inv = 1.0f / sum;
    for (i = 0; i < n; ++i) s[i] *= inv;
  }
  // out = p @ V, 64 output dims at a time held in 8 registers across the whole context
  for (int g = 0; g < G; ++g) {
    const float* p = scores.data() + static_cast<size_t>(g) * n;
    float* o = out_heads + g * D;
    for (int d0 = 0; d0 < D; d0 += 64) {
      const int width = std::min(64, D - d0) / 8;
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int t = start; t < len; ++t) {
        const float* vr = kv.v_cache + ((table[t / bs] * bs + t % bs) * KV + kvh) * D + d0;
        const __m256 pt = _mm256_set1_ps(p[t - start]);
        for (int j = 0; j < width; ++j) acc[j] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vr + 8 * j), acc[j]);
      }
      for (int j = 0; j < width; ++j) _mm256_storeu_ps(o + d0 + 8 * j, acc[j]);
    }
  }
}

}  // namespace tm

extern "C" {

// q: [B, H, D] rows `q_stride` floats apart per token; caches: [blocks, block_size, KV, D];
// block_tables: [B, max_blocks] int64; seq_lens: [B] int64 tokens to attend (incl. the new one);
// window > 0 limits attention to the last `window` tokens. out: [B, H, D] contiguous.
void tm_paged_decode_attention(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                               const int64_t* block_tables, int max_blocks, const int64_t* seq_lens, int B, int H,
                               int KV, int D, int block_size, float scale, int window, float* out) {
  const tm::PagedKV kv{k_cache, v_cache, block_tables, max_blocks, seq_lens, KV, D, block_size, window};
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
  for (int b = 0; b < B; ++b)
    for (int kvh = 0; kvh < KV; ++kvh)
      tm::decode_attention_task(q + b * q_stride + kvh * (H / KV) * D, kv, b, kvh, H / KV, scale,
                                out + (static_cast<int64_t>(b) * H + kvh * (H / KV)) * D);
}

}  // extern "C"
