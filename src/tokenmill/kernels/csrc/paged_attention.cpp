// Decode attention over the paged KV cache: one query token per sequence, read straight from the sequence's
// blocks (no gather into a padded copy, no mask). One task per (sequence, KV head): the query heads that share
// a KV head read each key and value once. Two passes: scores for the whole context, then softmax and the
// weighted sum of values. The cache holds float32 or float16 (converted to float32 as it is read); head_dim a
// multiple of 8.
#include "paged_attention.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "vec_math.h"

namespace tm {

constexpr int kMaxHeadsPerPass = 16;  // query heads whose partial scores are held per pass over the keys

// Lane j = the sum of v[j]'s lanes.
inline __m256 hsum8(const __m256* v) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// 8 cache values from p as float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Calls f(t, row) for the keys t in [start, len) with row = t's offset into `cache` ([blocks, block_size, KV, D])
// for KV head kvh: block by block, so the table lookup and the division happen once per block, and the next
// block's rows are prefetched (blocks lie anywhere in memory: the hardware prefetcher cannot guess the jump).
template <typename T, typename F>
inline void for_each_key(const PagedKV& kv, const T* cache, const int64_t* table, int start, int len, int kvh, F f) {
  const int bs = kv.block_size;
  const int64_t row_stride = static_cast<int64_t>(kv.KV) * kv.D;
  for (int t = start; t < len;) {
    const int blk = t / bs, stop = std::min(len, (blk + 1) * bs);
    if (stop < len) {
      const char* next = reinterpret_cast<const char*>(cache + table[blk + 1] * bs * row_stride + static_cast<int64_t>(kvh) * kv.D);
      for (int r = 0; r < bs; ++r)
        for (size_t i = 0; i < kv.D * sizeof(T); i += 64) _mm_prefetch(next + r * row_stride * sizeof(T) + i, _MM_HINT_T0);
    }
    int64_t row = (table[blk] * bs + t % bs) * row_stride + static_cast<int64_t>(kvh) * kv.D;
    for (; t < stop; ++t, row += row_stride) f(t, row);
  }
}

// out[0 .. 8 * W) = sum over keys t of p[t] * V_t[d0 .. d0 + 8 * W).
template <typename T, int W>
inline void weighted_values(const PagedKV& kv, const int64_t* table, int start, int len, int kvh, const float* p,
                            int d0, float* out) {
  const T* values = static_cast<const T*>(kv.v_cache);
  __m256 acc[W];
  for (int j = 0; j < W; ++j) acc[j] = _mm256_setzero_ps();
  for_each_key(kv, values, table, start, len, kvh, [&](int t, int64_t row) {
    const T* vr = values + row + d0;
    const __m256 pt = _mm256_broadcast_ss(p + t);
    for (int j = 0; j < W; ++j) acc[j] = _mm256_fmadd_ps(pt, load8(vr + 8 * j), acc[j]);
  });
  for (int j = 0; j < W; ++j) _mm256_storeu_ps(out + 8 * j, acc[j]);
}

template <typename T>
void attention_task(const float* q_heads, const PagedKV& kv, int b, int kvh, int G, float scale, float* out_heads) {
  const int D = kv.D;
  const T* keys = static_cast<const T*>(kv.k_cache);
  const int len = static_cast<int>(kv.seq_lens[b]);
  const int start = kv.window > 0 ? std::max(0, len - kv.window) : 0;
  const int n = len - start;
  thread_local std::vector<float> scores;
  if (scores.size() < static_cast<size_t>(G) * n) scores.resize(static_cast<size_t>(G) * n);
  float* sc = scores.data();
  const int64_t* table = kv.block_tables + static_cast<int64_t>(b) * kv.max_blocks;
  // scores: two accumulators per head halve the dependent multiply-add chain; the 8-lane partial sums of 8
  // keys are reduced together (one vector of 8 scores from 9 shuffles and adds, not 8 horizontal sums)
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int g0 = 0; g0 < G; g0 += kMaxHeadsPerPass) {
    const int heads = std::min(kMaxHeadsPerPass, G - g0);
    __m256 part[kMaxHeadsPerPass * 8];
    int pending = 0;
    for_each_key(kv, keys, table, start, len, kvh, [&](int t, int64_t row) {
      const T* kr = keys + row;
      if (g0 == 0)  // the value row (same offset in the V cache) starts moving to L2 for the pass after softmax
        for (size_t i = 0; i < D * sizeof(T); i += 64)
          _mm_prefetch(reinterpret_cast<const char*>(static_cast<const T*>(kv.v_cache) + row) + i, _MM_HINT_T1);
      for (int g = 0; g < heads; ++g) {
        const float* qg = q_heads + (g0 + g) * D;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int i = 0;
        for (; i + 16 <= D; i += 16) {
          a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), load8(kr + i), a0);
          a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i + 8), load8(kr + i + 8), a1);
        }
        if (i < D) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), load8(kr + i), a0);
        part[g * 8 + pending] = _mm256_add_ps(a0, a1);
      }
      if (++pending == 8) {
        for (int g = 0; g < heads; ++g)
          _mm256_storeu_ps(sc + static_cast<size_t>(g0 + g) * n + (t - 7 - start), _mm256_mul_ps(hsum8(part + g * 8), vscale));
        pending = 0;
      }
    });
    for (int j = 0; j < pending; ++j)
      for (int g = 0; g < heads; ++g) sc[static_cast<size_t>(g0 + g) * n + (n - pending + j)] = hsum(part[g * 8 + j]) * scale;
  }
  for (int g = 0; g < G; ++g) {  // softmax in place
    float* s = sc + static_cast<size_t>(g) * n;
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
  // out = p @ V: 64 output dims at a time held in registers (a compile-time width, or the accumulators spill),
  // each value row read from cache once per head
  for (int g = 0; g < G; ++g) {
    const float* p = sc + static_cast<size_t>(g) * n - start;
    int d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) weighted_values<T, 8>(kv, table, start, len, kvh, p, d0, out_heads + g * D + d0);
    for (; d0 < D; d0 += 8) weighted_values<T, 1>(kv, table, start, len, kvh, p, d0, out_heads + g * D + d0);
  }
}

void decode_attention_task(const float* q_heads, const PagedKV& kv, int b, int kvh, int G, float scale,
                           float* out_heads) {
  if (kv.f16)
    attention_task<uint16_t>(q_heads, kv, b, kvh, G, scale, out_heads);
  else
    attention_task<float>(q_heads, kv, b, kvh, G, scale, out_heads);
}

void write_kv_row(const float* k, const float* v, int64_t slot, int width, void* k_cache, void* v_cache, int f16) {
  const float* rows[2] = {k, v};
  void* caches[2] = {k_cache, v_cache};
  for (int c = 0; c < 2; ++c) {
    if (!f16) {
      std::memcpy(static_cast<float*>(caches[c]) + slot * width, rows[c], width * sizeof(float));
      continue;
    }
    uint16_t* o = static_cast<uint16_t*>(caches[c]) + slot * width;
    for (int i = 0; i < width; i += 8)  // width: a multiple of 8 (head_dim is)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm256_cvtps_ph(_mm256_loadu_ps(rows[c] + i), _MM_FROUND_TO_NEAREST_INT));
  }
}

}  // namespace tm

extern "C" {

// q: [B, H, D] rows `q_stride` floats apart per token; caches: [blocks, block_size, KV, D];
// block_tables: [B, max_blocks] int64; seq_lens: [B] int64 tokens to attend (incl. the new one);
// window > 0 limits attention to the last `window` tokens; f16: the caches hold float16. out: [B, H, D] contiguous.
void tm_paged_decode_attention(const float* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                               const int64_t* block_tables, int max_blocks, const int64_t* seq_lens, int B, int H,
                               int KV, int D, int block_size, float scale, int window, int f16, float* out) {
  const tm::PagedKV kv{k_cache, v_cache, block_tables, max_blocks, seq_lens, KV, D, block_size, window, f16};
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
  for (int b = 0; b < B; ++b)
    for (int kvh = 0; kvh < KV; ++kvh)
      tm::decode_attention_task(q + b * q_stride + kvh * (H / KV) * D, kv, b, kvh, H / KV, scale,
                                out + (static_cast<int64_t>(b) * H + kvh * (H / KV)) * D);
}

// Store k and v rows ([T, width] floats, `stride` apart) into cache slots: cache[slot_mapping[t], :] (row width),
// as float32 or float16 (f16).
void tm_write_kv(const float* k, const float* v, int64_t stride, const int64_t* slot_mapping, int T, int width,
                 void* k_cache, void* v_cache, int f16) {
  for (int t = 0; t < T; ++t) tm::write_kv_row(k + t * stride, v + t * stride, slot_mapping[t], width, k_cache, v_cache, f16);
}

}  // extern "C"
