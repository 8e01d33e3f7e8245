// Decode attention over the paged KV cache: query rows read straight from their sequence's blocks (no gather into
// a padded copy, no mask). One task per (run of rows, KV head): the query heads that share a KV head, in every row
// of the run (one decode token, or a verify or prefill chunk's tokens), read each key and value once, converted
// to float32 once for all of them. Per pass of up to kQueriesPerPass queries: scores over the keys up to the
// pass's last row, softmax, then the weighted sum of values. With a sliding window the rows go one at a time.
// The cache holds float32, float16, int8 codes (each key's scale applied once to its score, each value's folded
// into its probability) or rotated int4 codes (dequantized in registers, 8 at a time, once for all the pass's
// queries: cheaper there than a scale per group and query); no dequantized copy; head_dim a multiple of 8 (int4:
// a power of two, at least 32). Each query's arithmetic is the same whichever
// queries share its task, so a verify row gives exactly the logits a plain decode row would (greedy speculative
// decoding must reproduce plain decoding token for token).
#include "paged_attention.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "static_count.h"
#include "vec_math.h"

namespace tm {

// Lane j = the sum of v[j]'s lanes.
inline __m256 hsum8(const __m256* v) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// How each cache type is read: 8 elements from element offset e (a multiple of 8; rows of D elements) as
// float32, where element e lies (for prefetching) and how many bytes a row takes. Int8 and turboquant leave their
// per-row scale to the caller (kRowScale, row_scale). `codes`: turboquant's (RowCodes), else null.
template <int Bits>
struct FixedWidth {  // Bits per element, no per-row scale
  static constexpr bool kRowScale = false;
  static const char* address(const void* data, const RowCodes*, int64_t e) {
    return static_cast<const char*>(data) + e * Bits / 8;
  }
  static int row_bytes(const RowCodes*, int D) { return D * Bits / 8; }
  static float row_scale(const void*, const RowCodes*, int64_t, int) { return 1.0f; }
};
struct F32Cache : FixedWidth<32> {
  static __m256 load8(const void* data, const void*, const RowCodes*, int64_t e) { return _mm256_loadu_ps(static_cast<const float*>(data) + e); }
};
struct F16Cache : FixedWidth<16> {
  static __m256 load8(const void* data, const void*, const RowCodes*, int64_t e) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(data) + e)));
  }
};
struct I8Cache : FixedWidth<8> {
  static constexpr bool kRowScale = true;
  static float row_scale(const void* scales, const RowCodes*, int64_t row, int D) { return static_cast<const float*>(scales)[row / D]; }
  static __m256 load8(const void* data, const void*, const RowCodes*, int64_t e) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(data) + e))));
  }
};
// Group g of 32 elements: 16 bytes, byte j = element j (low nibble) | element 16 + j (high nibble), and a float16
// scale at index g.
struct I4Cache : FixedWidth<4> {
  static __m256 load8(const void* data, const void* scales, const RowCodes*, int64_t e) {
    const uint8_t* p = static_cast<const uint8_t*>(data) + (e >> 5) * 16 + (e & 15);
    __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    if (e & 16) c = _mm256_srli_epi32(c, 4);
    c = _mm256_sub_epi32(_mm256_and_si256(c, _mm256_set1_epi32(15)), _mm256_set1_epi32(8));
    const float d = _cvtsh_ss(static_cast<const uint16_t*>(scales)[e >> 5]);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(c), _mm256_set1_ps(d));
  }
};

// Lane j's shift for codes of width w: j * w.
alignas(32) constexpr int32_t kLaneShifts[5][8] = {
    {0}, {0, 1, 2, 3, 4, 5, 6, 7}, {0, 2, 4, 6, 8, 10, 12, 14}, {0}, {0, 4, 8, 12, 16, 20, 24, 28}};

// Codes i .. i + 7 (i a multiple of 8) of a field of `width` bits (1, 2 or 4; coordinate i at bits
// [i * width, (i + 1) * width)): one width-byte little-endian word spread over 8 lanes by a variable shift. Reads
// 4 bytes: up to 3 past the field's word, which the cache's padding covers at its end (kv_cache._lazily_zeroed).
inline __m256i field8(const uint8_t* field, int i, int width) {
  uint32_t word;
  std::memcpy(&word, field + (i >> 3) * width, sizeof(word));
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)),
                                            _mm256_load_si256(reinterpret_cast<const __m256i*>(kLaneShifts[width]))),
                          _mm256_set1_epi32((1 << width) - 1));
}

// Centroids of 8 codes < 16 from a 16-entry table.
inline __m256 lookup16(const float* table, __m256i code) {
#if defined(__AVX512VL__)
  return _mm256_permutex2var_ps(_mm256_load_ps(table), code, _mm256_load_ps(table + 8));
#else
  const __m256 lo = _mm256_permutevar8x32_ps(_mm256_load_ps(table), code);
  const __m256 hi = _mm256_permutevar8x32_ps(_mm256_load_ps(table + 8), code);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
#endif
}

// Turboquant rows (RowCodes) whose two parts take Hi and Lo bits: element e is coordinate e % D of row e / D, at
// codes->row_bytes bytes a row.
template <int Hi, int Lo>
struct TQCache {
  static constexpr bool kRowScale = true;
  static const char* address(const void* data, const RowCodes* codes, int64_t e) {
    return static_cast<const char*>(data) + (e >> codes->log2_D) * codes->row_bytes;
  }
  static int row_bytes(const RowCodes* codes, int) { return codes->row_bytes; }
  static float row_scale(const void* scales, const RowCodes* codes, int64_t row, int) {
    return _cvtsh_ss(static_cast<const uint16_t*>(scales)[row >> codes->log2_D]);
  }
  // Centroids of codes i .. i + 7 of a part of n coordinates at W bits (3: a 2-bit field, then a 1-bit field of
  // the high bits).
  template <int W>
  static __m256 values8(const float* centroids, const uint8_t* part, int n, int i) {
    if constexpr (W == 3)
      return lookup16(centroids, _mm256_or_si256(field8(part, i, 2), _mm256_slli_epi32(field8(part + n / 4, i, 1), 2)));
    return lookup16(centroids, field8(part, i, W));
  }
  static __m256 load8(const void* data, const void*, const RowCodes* codes, int64_t e) {
    const uint8_t* row = reinterpret_cast<const uint8_t*>(address(data, codes, e));
    const int D = codes->D, i = static_cast<int>(e & (D - 1)), split = codes->split;
    if constexpr (Hi == Lo) return values8<Hi>(codes->centroids[0], row, D, i);  // split == D
    if (i < split) return values8<Hi>(codes->centroids[0], row, split, i);
    return values8<Lo>(codes->centroids[1], row + split * Hi / 8, D - split, i - split);
  }
};

// Calls f(t, row) for the keys t in [start, len) with row = t's offset into `cache` ([blocks, block_size, KV, D])
// for KV head kvh: block by block, so the table lookup and the division happen once per block, and the next
// block's rows are prefetched (blocks lie anywhere in memory: the hardware prefetcher cannot guess the jump).
template <typename C, typename F>
inline void for_each_key(const PagedKV& kv, const void* cache, const RowCodes* codes, const int64_t* table, int start,
                         int len, int kvh, F f) {
  const int bs = kv.block_size;
  const int64_t row_stride = static_cast<int64_t>(kv.KV) * kv.D;
  const int row_bytes = C::row_bytes(codes, kv.D);
  for (int t = start; t < len;) {
    const int blk = t / bs, stop = std::min(len, (blk + 1) * bs);
    if (stop < len) {
      const char* next = C::address(cache, codes, table[blk + 1] * bs * row_stride + static_cast<int64_t>(kvh) * kv.D);
      for (int r = 0; r < bs; ++r)
        for (int i = 0; i < row_bytes; i += 64) _mm_prefetch(next + r * kv.KV * row_bytes + i, _MM_HINT_T0);
    }
    int64_t row = (table[blk] * bs + t % bs) * row_stride + static_cast<int64_t>(kvh) * kv.D;
    for (; t < stop; ++t, row += row_stride) f(t, row);
  }
}

#if defined(__AVX512VL__)
constexpr int kQueriesPerPass = 12;  // two accumulators per query: AVX-512VL gives ymm code 32 registers
#else
constexpr int kQueriesPerPass = 6;  // of 16 ymm registers
#endif

// scores[j][t - start] = scale * q_j . K_t for the NQ queries over keys [start, end), each key row converted once
// for all of them. Keys go in groups of 8 whose 8-lane partial sums are reduced together (one vector of 8 scores
// from 9 shuffles and adds, not 8 horizontal sums); the last group is padded with zeros, so a key's score is the
// same wherever it falls, and a query's scores do not depend on which other queries share the pass.
template <typename C, typename CV, int NQ>
void score_pass(const PagedKV& kv, const int64_t* table, int start, int end, int kvh, const float* const* qs,
                float scale, float* const* scores, bool prefetch_values) {
  const int D = kv.D;
  const void* keys = kv.cache.k;
  const RowCodes* codes = kv.cache.codes;  // the keys' (turboquant)
  const __m256 vscale = _mm256_set1_ps(scale);
  __m256 part[NQ][8];
  int pending = 0;
  auto flush = [&](int first) {
    for (int j = 0; j < NQ; ++j) {
      for (int p = pending; p < 8; ++p) part[j][p] = _mm256_setzero_ps();
      alignas(32) float reduced[8];
      _mm256_store_ps(reduced, _mm256_mul_ps(hsum8(part[j]), vscale));
      std::memcpy(scores[j] + first, reduced, pending * sizeof(float));
    }
    pending = 0;
  };
  const RowCodes* value_codes = codes ? codes + 1 : nullptr;
  for_each_key<C>(kv, keys, codes, table, start, end, kvh, [&](int t, int64_t row) {
    if (prefetch_values)  // the value row (same offset in the V cache) starts moving to L2 for the value pass
      for (int i = 0; i < CV::row_bytes(value_codes, D); i += 64)
        _mm_prefetch(CV::address(kv.cache.v, value_codes, row) + i, _MM_HINT_T1);
    __m256 a0[NQ], a1[NQ];  // two accumulators per query halve the dependent multiply-add chain
    for (int j = 0; j < NQ; ++j) a0[j] = a1[j] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= D; i += 16) {
      const __m256 k0 = C::load8(keys, kv.cache.k_scale, codes, row + i);
      const __m256 k1 = C::load8(keys, kv.cache.k_scale, codes, row + i + 8);
      for (int j = 0; j < NQ; ++j) {
        a0[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qs[j] + i), k0, a0[j]);
        a1[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qs[j] + i + 8), k1, a1[j]);
      }
    }
    if (i < D) {
      const __m256 k0 = C::load8(keys, kv.cache.k_scale, codes, row + i);
      for (int j = 0; j < NQ; ++j) a0[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qs[j] + i), k0, a0[j]);
    }
    if constexpr (C::kRowScale) {  // the key's scale, once per score
      const __m256 ks = _mm256_set1_ps(C::row_scale(kv.cache.k_scale, codes, row, D));
      for (int j = 0; j < NQ; ++j) part[j][pending] = _mm256_mul_ps(_mm256_add_ps(a0[j], a1[j]), ks);
    } else {
      for (int j = 0; j < NQ; ++j) part[j][pending] = _mm256_add_ps(a0[j], a1[j]);
    }
    if (++pending == 8) flush(t - 7 - start);
  });
  if (pending) flush(end - pending - start);
}

// outs[j][0 .. D) = sum over keys t in [start, end) of probs[j][t - start] * V_t, 16 dims at a time, each value
// row converted once per 16 dims for all NQ queries. A query's sum runs over t in order whatever NQ is.
template <typename C, int NQ>
void value_pass(const PagedKV& kv, const int64_t* table, int start, int end, int kvh, const float* const* probs,
                float* const* outs) {
  const void* values = kv.cache.v;
  const RowCodes* codes = kv.cache.codes ? kv.cache.codes + 1 : nullptr;  // the values' (turboquant)
  for (int d0 = 0; d0 < kv.D; d0 += 16) {
    const bool two = d0 + 16 <= kv.D;  // head_dim is a multiple of 8: the last piece may be 8 wide
    __m256 acc[NQ][2];
    for (int j = 0; j < NQ; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for_each_key<C>(kv, values, codes, table, start, end, kvh, [&](int t, int64_t row) {
      const __m256 v0 = C::load8(values, kv.cache.v_scale, codes, row + d0);
      const __m256 v1 = two ? C::load8(values, kv.cache.v_scale, codes, row + d0 + 8) : _mm256_setzero_ps();
      const float vs = C::row_scale(kv.cache.v_scale, codes, row, kv.D);  // the value's scale, folded into each weight
      for (int j = 0; j < NQ; ++j) {
        const __m256 p = C::kRowScale ? _mm256_set1_ps(probs[j][t - start] * vs)
                                      : _mm256_broadcast_ss(probs[j] + (t - start));
        acc[j][0] = _mm256_fmadd_ps(p, v0, acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(p, v1, acc[j][1]);
      }
    });
    for (int j = 0; j < NQ; ++j) {
      _mm256_storeu_ps(outs[j] + d0, acc[j][0]);
      if (two) _mm256_storeu_ps(outs[j] + d0 + 8, acc[j][1]);
    }
  }
}

// Softmax of s[0 .. n) in place, then zeros up to `padded` (keys this query does not see contribute 0 * V).
inline void softmax_row(float* s, int n, int padded) {
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
  for (; i < padded; ++i) s[i] = 0.0f;
}

// A pass's attention when the cache keeps recent rows (KVCacheRef::recent_of): query j, seeing keys [start,
// lens[j]), reads keys from first[j] on from the float16 twins and older ones from the codes. Scores: the codes'
// over [start, hi), the twins' over [lo, pass_end) (lo, hi: the least and greatest first[j]), each query taking
// its own; one softmax; values: the codes' sum with the twins' keys' weights zeroed, plus the twins' sum with
// the codes' keys' weights zeroed (exact zeros: a query's result does not depend on the pass it shares).
template <typename CK, typename CV, int NQ>
void recent_pass(const PagedKV& kv, const int64_t* table, int start, int pass_end, const int* lens, int kvh,
                 const float* const* qs, float scale, float* const* scores, float* const* outs) {
  const int bs = kv.block_size, D = kv.D;
  int first[NQ], lo = pass_end, hi = start;
  for (int j = 0; j < NQ; ++j) {
    first[j] = std::max(start, (lens[j] - 1) / bs / kv.cache.recent_blocks * kv.cache.recent_blocks * bs);
    lo = std::min(lo, first[j]);
  }
  // the trailing run of blocks with twins, back to lo's block
  thread_local std::vector<int64_t> twins;
  twins.resize(kv.max_blocks);
  int twinned = (pass_end - 1) / bs + 1;
  while (twinned > lo / bs && kv.cache.recent_of[table[twinned - 1]] >= 0) {
    --twinned;
    twins[twinned] = kv.cache.recent_of[table[twinned]];
  }
  lo = pass_end;
  for (int j = 0; j < NQ; ++j) {
    first[j] = std::min(lens[j], std::max(first[j], twinned * bs));
    lo = std::min(lo, first[j]);
    hi = std::max(hi, first[j]);
  }
  PagedKV recent = kv;
  recent.cache = KVCacheRef{kv.cache.recent_k, kv.cache.recent_v, nullptr, nullptr, nullptr, nullptr, nullptr, kKVFloat16};
  const int n = pass_end - lo;
  thread_local std::vector<float> buf;
  buf.resize(static_cast<size_t>(NQ) * (2 * n + D));
  float *twin_scores[NQ], *twin_probs[NQ], *twin_outs[NQ];
  for (int j = 0; j < NQ; ++j) {
    twin_scores[j] = buf.data() + static_cast<size_t>(j) * n;
    twin_probs[j] = buf.data() + static_cast<size_t>(NQ + j) * n;
    twin_outs[j] = buf.data() + static_cast<size_t>(2 * NQ) * n + static_cast<size_t>(j) * D;
  }
  score_pass<CK, CV, NQ>(kv, table, start, hi, kvh, qs, scale, scores, true);
  score_pass<F16Cache, F16Cache, NQ>(recent, twins.data(), lo, pass_end, kvh, qs, scale, twin_scores, false);
  for (int j = 0; j < NQ; ++j) {
    for (int t = first[j]; t < lens[j]; ++t) scores[j][t - start] = twin_scores[j][t - lo];
    softmax_row(scores[j], lens[j] - start, pass_end - start);
    for (int t = lo; t < pass_end; ++t) twin_probs[j][t - lo] = t >= first[j] ? scores[j][t - start] : 0.0f;
    for (int t = first[j]; t < hi; ++t) scores[j][t - start] = 0.0f;
  }
  value_pass<CV, NQ>(kv, table, start, hi, kvh, scores, outs);
  value_pass<F16Cache, NQ>(recent, twins.data(), lo, pass_end, kvh, twin_probs, twin_outs);
  for (int j = 0; j < NQ; ++j)
    for (int d = 0; d < D; ++d) outs[j][d] += twin_outs[j][d];
}

// CK reads the keys, CV the values.
template <typename CK, typename CV = CK>
void attention_task(const PagedKV& kv, int b, int rows, int kvh, int G, const float* q, int64_t q_stride, float scale,
                    float* out, int64_t out_stride) {
  const int D = kv.D;
  if (kv.window > 0 && rows > 1) {  // each row has its own window start: one row at a time
    for (int r = 0; r < rows; ++r)
      attention_task<CK, CV>(kv, b + r, 1, kvh, G, q + r * q_stride, q_stride, scale, out + r * out_stride, out_stride);
    return;
  }
  const int end = static_cast<int>(kv.seq_lens[b + rows - 1]);  // the last row sees the most keys
  const int start = kv.window > 0 ? std::max(0, end - kv.window) : 0;
  const int n = end - start;
  thread_local std::vector<float> score_buf;  // one pass's queries at a time: a prefill chunk has thousands
  if (score_buf.size() < static_cast<size_t>(kQueriesPerPass) * n) score_buf.resize(static_cast<size_t>(kQueriesPerPass) * n);
  const int64_t* table = kv.block_tables + static_cast<int64_t>(b) * kv.max_blocks;
  by_groups<kQueriesPerPass>(rows * G, [&](auto count, int j0) {
    constexpr int NQ = decltype(count)::value;
    const float* queries[NQ];
    float* outs[NQ];
    float* scores[NQ];
    for (int j = 0; j < NQ; ++j) {
      const int r = (j0 + j) / G, g = (j0 + j) % G;
      queries[j] = q + r * q_stride + g * D;
      outs[j] = out + r * out_stride + g * D;
      scores[j] = score_buf.data() + static_cast<size_t>(j) * n;
    }
    // keys up to the pass's last row: a prefill chunk's early rows skip the rest of the chunk
    const int pass_end = static_cast<int>(kv.seq_lens[b + (j0 + NQ - 1) / G]);
    if (kv.cache.recent_of && kv.window == 0) {
      int lens[NQ];
      for (int j = 0; j < NQ; ++j) lens[j] = static_cast<int>(kv.seq_lens[b + (j0 + j) / G]);
      recent_pass<CK, CV, NQ>(kv, table, start, pass_end, lens, kvh, queries, scale, scores, outs);
      return;
    }
    score_pass<CK, CV, NQ>(kv, table, start, pass_end, kvh, queries, scale, scores, j0 == 0);
    for (int j = 0; j < NQ; ++j)
      softmax_row(scores[j], static_cast<int>(kv.seq_lens[b + (j0 + j) / G]) - start, pass_end - start);
    value_pass<CV, NQ>(kv, table, start, pass_end, kvh, scores, outs);
  });
}

// x <- H x for D a power of two (the unnormalized Walsh-Hadamard transform, in place): log2(D) rounds of sums
// and differences, in the order cache/kv_cache.py's fwht adds them, so both give the same floats.
inline void fwht(float* x, int D) {
  for (int h = 1; h < D; h *= 2)
    for (int i = 0; i < D; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
}

// x <- R x = H (signs * x) / sqrt(D), and x <- R^T x = signs * (H x) / sqrt(D) (its inverse where signs are +-1: the
// values' vector; KVCacheRef::rotation).
inline void rotate(float* x, const float* signs, int D) {
  for (int i = 0; i < D; ++i) x[i] *= signs[i];
  fwht(x, D);
  const float norm = 1.0f / std::sqrt(static_cast<float>(D));
  for (int i = 0; i < D; ++i) x[i] *= norm;
}

inline void unrotate(float* x, const float* signs, int D) {
  fwht(x, D);
  const float norm = 1.0f / std::sqrt(static_cast<float>(D));
  for (int i = 0; i < D; ++i) x[i] = x[i] * norm * signs[i];
}

// Attention in the rotated space (int4, turboquant caches): queries turned by their vector of KV head kvh (the keys'
// smoothing factors folded in), outputs back by the values' R^T.
template <typename CK, typename CV = CK>
void rotated_attention_task(const PagedKV& kv, int b, int rows, int kvh, int G, const float* q, int64_t q_stride,
                            float scale, float* out, int64_t out_stride) {
    const int D = kv.D, n = rows * G;
    thread_local std::vector<float> rq, ro;
    rq.resize(static_cast<size_t>(n) * D);
    ro.resize(static_cast<size_t>(n) * D);
    for (int r = 0; r < rows; ++r)
      for (int g = 0; g < G; ++g) {
        float* row = rq.data() + static_cast<int64_t>(r * G + g) * D;
        std::memcpy(row, q + r * q_stride + g * D, D * sizeof(float));
        rotate(row, kv.cache.rotation(kRotateQueries, kvh, kv.KV, D), D);
      }
    attention_task<CK, CV>(kv, b, rows, kvh, G, rq.data(), static_cast<int64_t>(G) * D, scale, ro.data(),
                      static_cast<int64_t>(G) * D);
    for (int r = 0; r < rows; ++r)
      for (int g = 0; g < G; ++g) {
        float* row = ro.data() + static_cast<int64_t>(r * G + g) * D;
        unrotate(row, kv.cache.rotation(kRotateValues, kvh, kv.KV, D), D);
        std::memcpy(out + r * out_stride + g * D, row, D * sizeof(float));
      }
}

void decode_attention_task(const PagedKV& kv, int b, int rows, int kvh, int G, const float* q, int64_t q_stride,
                           float scale, float* out, int64_t out_stride) {
  if (kv.cache.type == kKVInt4) {
    rotated_attention_task<I4Cache>(kv, b, rows, kvh, G, q, q_stride, scale, out, out_stride);
  } else if (kv.cache.type == kKVTurboQuant) {  // the four kv_cache_bits (cache/turboquant.py TurboQuant)
    const RowCodes* k = kv.cache.codes;
    const RowCodes* v = k + 1;
    if (k->hi == 3) {  // 2.5 bits: keys 3, values 2
      rotated_attention_task<TQCache<3, 3>, TQCache<2, 2>>(kv, b, rows, kvh, G, q, q_stride, scale, out, out_stride);
    } else if (k->lo == 3) {  // 3: keys 3.5, values 2.5
      rotated_attention_task<TQCache<4, 3>, TQCache<3, 2>>(kv, b, rows, kvh, G, q, q_stride, scale, out, out_stride);
    } else if (v->hi == 3) {  // 3.5: keys 4, values 3
      rotated_attention_task<TQCache<4, 4>, TQCache<3, 3>>(kv, b, rows, kvh, G, q, q_stride, scale, out, out_stride);
    } else {  // 4: both 4
      rotated_attention_task<TQCache<4, 4>>(kv, b, rows, kvh, G, q, q_stride, scale, out, out_stride);
    }
  } else if (kv.cache.type == kKVInt8) {
    attention_task<I8Cache>(kv, b, rows, kvh, G, q, q_stride, scale, out, out_stride);
  } else if (kv.cache.type == kKVFloat16) {
    attention_task<F16Cache>(kv, b, rows, kvh, G, q, q_stride, scale, out, out_stride);
  } else {
    attention_task<F32Cache>(kv, b, rows, kvh, G, q, q_stride, scale, out, out_stride);
  }
}

// One head row as int8 codes: scale = max|x| / 127, code = x * (127 / max|x|) rounded to nearest even.
inline void quantize_head(const float* x, int D, int8_t* codes, float* scale) {
  float amax = 0.0f;
  for (int i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  *scale = amax / 127.0f;
  for (int i = 0; i < D; ++i) codes[i] = static_cast<int8_t>(std::nearbyint(x[i] * inv));
}

// One rotated head row (D a multiple of 32) as int4 codes: per group of 32, d = m / -8 for the element m of
// largest magnitude (the first such), rounded to float16; code = clamp(round(x / d) + 8, 0, 15) by x * (1 / d),
// rounded to nearest even.
inline void quantize_head_int4(const float* x, int D, uint8_t* codes, uint16_t* scales) {
  for (int g = 0; g < D / 32; ++g) {
    const float* xg = x + 32 * g;
    float amax = 0.0f, m = 0.0f;
    for (int i = 0; i < 32; ++i)
      if (std::fabs(xg[i]) > amax) {
        amax = std::fabs(xg[i]);
        m = xg[i];
      }
    scales[g] = _cvtss_sh(m / -8.0f, _MM_FROUND_TO_NEAREST_INT);
    const float d = _cvtsh_ss(scales[g]);
    const float inv = d != 0.0f ? 1.0f / d : 0.0f;
    auto code = [&](float v) { return static_cast<uint8_t>(std::clamp(std::nearbyint(v * inv) + 8.0f, 0.0f, 15.0f)); };
    for (int j = 0; j < 16; ++j) codes[16 * g + j] = code(xg[j]) | code(xg[16 + j]) << 4;
  }
}

// Codes i .. i + n - 1 (n a multiple of 8) into a field of `width` bits (field8's layout).
inline void pack_field(const uint8_t* codes, int n, int width, uint8_t* field) {
  const int per_byte = 8 / width;
  for (int j = 0; j < n / per_byte; ++j) {
    uint8_t byte = 0;
    for (int p = 0; p < per_byte; ++p) byte |= (codes[j * per_byte + p] & ((1 << width) - 1)) << (p * width);
    field[j] = byte;
  }
}

// One rotated head row as turboquant codes (cache/turboquant.py quantize): each coordinate x_i * sqrt(D) / |x|
// takes the number of its part's boundaries below it; the scale <x, c> / <c, c> over the chosen centroids c, as
// float16.
inline void quantize_head_tq(const float* x, const RowCodes& codes, uint8_t* out, uint16_t* scale) {
  const int D = codes.D;
  float sq = 0.0f;
  for (int i = 0; i < D; ++i) sq += x[i] * x[i];
  const float norm = std::sqrt(sq);
  const float unit = std::sqrt(static_cast<float>(D)) / (norm > 0.0f ? norm : 1.0f);
  uint8_t code[512];
  float xc = 0.0f, cc = 0.0f;
  for (int i = 0; i < D; ++i) {
    const int part = i >= codes.split;
    const float u = x[i] * unit, *bounds = codes.bounds[part];
    int c = 0;
    while (bounds[c] < u) ++c;  // bounds end in +inf
    code[i] = static_cast<uint8_t>(c);
    const float centroid = codes.centroids[part][c];
    xc += x[i] * centroid;
    cc += centroid * centroid;
  }
  *scale = _cvtss_sh(cc > 0.0f ? xc / cc : 0.0f, _MM_FROUND_TO_NEAREST_INT);
  const int parts[2][2] = {{0, codes.split}, {codes.split, D - codes.split}};  // (first, count)
  const int widths[2] = {codes.hi, codes.lo};
  for (int p = 0; p < 2; ++p) {
    const int first = parts[p][0], n = parts[p][1];
    if (n == 0) continue;
    if (widths[p] == 3) {  // the low 2 bits, then the high bit
      uint8_t low[512], high[512];
      for (int i = 0; i < n; ++i) {
        low[i] = code[first + i] & 3;
        high[i] = code[first + i] >> 2;
      }
      pack_field(low, n, 2, out);
      pack_field(high, n, 1, out + n / 4);
    } else {
      pack_field(code + first, n, widths[p], out);
    }
    out += n * widths[p] / 8;
  }
}

void write_kv_row(const float* k, const float* v, int64_t slot, int KV, int D, const KVCacheRef& cache) {
  const int width = KV * D;
  const float* rows[2] = {k, v};
  void* caches[2] = {cache.k, cache.v};
  void* scales[2] = {cache.k_scale, cache.v_scale};
  for (int c = 0; c < 2; ++c) {
    if (cache.type == kKVFloat32) {
      std::memcpy(static_cast<float*>(caches[c]) + slot * width, rows[c], width * sizeof(float));
    } else if (cache.type == kKVInt8 || cache.type == kKVInt4 || cache.type == kKVTurboQuant) {
      thread_local std::vector<float> row;
      row.resize(D);
      for (int h = 0; h < KV; ++h) {
        std::memcpy(row.data(), rows[c] + h * D, D * sizeof(float));
        if (c == 0 && cache.k_offset)
          for (int i = 0; i < D; ++i) row[i] -= cache.k_offset[h * D + i];
        const int64_t head = slot * KV + h;
        if (cache.type != kKVInt8) rotate(row.data(), cache.rotation(c == 0 ? kRotateKeys : kRotateValues, h, KV, D), D);
        const int32_t twin = cache.recent_of ? cache.recent_of[slot / cache.block_size] : -1;
        if (twin >= 0) {  // the row as the codes approximate it, also as float16 in its block's twin
          uint16_t* o = static_cast<uint16_t*>(c == 0 ? cache.recent_k : cache.recent_v) +
                        ((static_cast<int64_t>(twin) * cache.block_size + slot % cache.block_size) * KV + h) * D;
          for (int i = 0; i < D; i += 8)
            _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(row.data() + i), _MM_FROUND_TO_NEAREST_INT));
        }
        if (cache.type == kKVInt8) {
          quantize_head(row.data(), D, static_cast<int8_t*>(caches[c]) + head * D, static_cast<float*>(scales[c]) + head);
          continue;
        }
        if (cache.type == kKVTurboQuant) {
          const RowCodes& codes = cache.codes[c];
          quantize_head_tq(row.data(), codes, static_cast<uint8_t*>(caches[c]) + head * codes.row_bytes,
                           static_cast<uint16_t*>(scales[c]) + head);
          continue;
        }
        quantize_head_int4(row.data(), D, static_cast<uint8_t*>(caches[c]) + head * (D / 2),
                           static_cast<uint16_t*>(scales[c]) + head * (D / 32));
      }
    } else {
      uint16_t* o = static_cast<uint16_t*>(caches[c]) + slot * width;
      for (int i = 0; i < width; i += 8)  // width: a multiple of 8 (head_dim is)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm256_cvtps_ph(_mm256_loadu_ps(rows[c] + i), _MM_FROUND_TO_NEAREST_INT));
    }
  }
}

}  // namespace tm

extern "C" {

// q: [B, H, D] rows `q_stride` floats apart per token; caches: [blocks, block_size, KV, D];
// block_tables: [B, max_blocks] int64; seq_lens: [B] int64 tokens to attend (incl. the new one);
// window > 0 limits attention to the last `window` tokens; kv_type: tm::KVType (with its scales and signs as
// tm::KVCacheRef holds them; else null), recent_*: its recent rows (tm::KVCacheRef; null, 0: none).
// out: [B, H, D] contiguous.
void tm_paged_decode_attention(const float* q, int64_t q_stride, void* k_cache, void* v_cache, void* k_scale,
                               void* v_scale, const float* signs, const tm::RowCodes* codes,
                               const int64_t* block_tables, int max_blocks, const int64_t* seq_lens,
                               int B, int H, int KV, int D, int block_size, float scale, int window, int kv_type,
                               void* recent_k, void* recent_v, const int32_t* recent_of, int recent_blocks,
                               float* out) {
  const tm::PagedKV kv{{k_cache, v_cache, k_scale, v_scale, signs, nullptr, codes, kv_type, recent_k, recent_v,
                        recent_of, recent_blocks, block_size},
                       block_tables, max_blocks, seq_lens, KV, D, block_size, window};
#pragma omp parallel for schedule(dynamic, 1) collapse(2)
  for (int b = 0; b < B; ++b)
    for (int kvh = 0; kvh < KV; ++kvh)
      tm::decode_attention_task(kv, b, 1, kvh, H / KV, q + b * q_stride + kvh * (H / KV) * D, q_stride, scale,
                                out + (static_cast<int64_t>(b) * H + kvh * (H / KV)) * D, static_cast<int64_t>(H) * D);
}

// Store k and v rows ([T, KV * D] floats, `stride` apart) into cache slots: cache[slot_mapping[t], :], in the
// cache's kv_type (as tm_paged_decode_attention takes it; recent rows also into their blocks' twins).
void tm_write_kv(const float* k, const float* v, int64_t stride, const int64_t* slot_mapping, int T, int KV, int D,
                 void* k_cache, void* v_cache, void* k_scale, void* v_scale, const float* signs,
                 const float* k_offset, const tm::RowCodes* codes, int kv_type, void* recent_k, void* recent_v,
                 const int32_t* recent_of, int recent_blocks, int block_size) {
  const tm::KVCacheRef cache{k_cache, v_cache, k_scale, v_scale, signs, k_offset, codes, kv_type, recent_k, recent_v,
                             recent_of, recent_blocks, block_size};
  for (int t = 0; t < T; ++t) tm::write_kv_row(k + t * stride, v + t * stride, slot_mapping[t], KV, D, cache);
}

}  // extern "C"
