// Quantized linear kernels for x86 AVX2, with AVX512-VNNI where the build has it: y = x @ W^T with W kept in
// 4- or 8-bit blocks of 32 along K and x quantized on the fly to int8 per 32-block (as llama.cpp's Q8_1),
// so every inner product is an integer dot (maddubs, or vpdpbusd) and the weights are streamed once per call.
//
// Weight layouts (see tokenmill/quant/weights.py):
//   int4: qweight uint8 [N, K/2]; in each 32-block byte j holds q[j] (low nibble) and q[j+16] (high nibble);
//         w = scale[n, k/group] * q + min[n, k/group], q in [0, 15]
//   int8: qweight int8 [N, K]; w = scale[n, k/group] * q
// Scales (and mins) are float16 or float32. group is a multiple of 32, or 16 for int8 (GGUF Q6_K).
//
// Tiled layout (QMatrix::tiled; what the model's layers use, see QuantizedWeight.tile): rows go in tiles of 8,
// and a tile's 32-block b is stored as chunks of 4 elements, chunk c holding 4 bytes of each of the 8 rows:
//   int4: 4 chunks of 32 bytes; chunk c, bytes 4r..4r+3 = row r's GGUF bytes 4c..4c+3 (low nibbles: elements
//         4c..4c+3, high nibbles: elements 16+4c..16+4c+3); int8: 8 chunks, chunk c = row r's elements 4c..4c+3.
//   scales (and mins): one per 32-block, the 8 rows' values of a block side by side.
// Why: one activation chunk broadcast against a weight chunk gives products for 8 rows at once, so the integer
// sums of a block come out as one vector of 8 rows: no horizontal sums per row, one scale multiply per 8
// outputs, and the weights of a tile are unpacked once for up to 4 activation rows. On SmolLM2's shapes this
// runs 2.1-3.2x faster than the row layout (1 and 16 rows; BENCHMARKS.md).
#include "quant_linear.h"

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "static_count.h"
#include "vec_math.h"

namespace tm {
namespace {

inline float load_scale(const void* p, int64_t i, int f16) {
  return f16 ? _cvtsh_ss(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline __m256i unpack_nibbles(const uint8_t* p) {
  __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m256i v = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
  return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr bool kVnni = true;  // built for a CPU with AVX512-VNNI (build.py adds the flags where it has them)
#else
constexpr bool kVnni = false;
#endif

// acc + the 8 int32 sums of 4 products a (unsigned bytes) * b (signed bytes) each. With VNNI one instruction
// (vpdpbusd); else maddubs pairs into int16 (no saturation: every caller's pair stays below 2^15) and madd
// widens. Both give the same integers, so results do not depend on the build.
inline __m256i dot_accumulate(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, a, b);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

// 8 int32 partial sums of a (unsigned bytes) . b (signed bytes), as floats.
inline __m256 dot_u8s8(__m256i a, __m256i b) {
  return _mm256_cvtepi32_ps(dot_accumulate(_mm256_setzero_si256(), a, b));
}

// One activation row: q int8 [K], d = per-block scale, s = d * sum(q) per block (for the weight mins), and with
// VNNI u = q + 128 (see QActivations).
void quantize_row(const float* x, int K, int8_t* q, float* d, float* s, uint8_t* u) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[j]));
    }
    const float max_abs = hmax(amax);
    const float scale = max_abs / 127.0f;
    const __m256 inv = _mm256_set1_ps(max_abs != 0.0f ? 127.0f / max_abs : 0.0f);
    __m256i i[4];
    for (int j = 0; j < 4; ++j)
      i[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_ROUND_NEAREST | _MM_FROUND_NO_EXC));
    const int sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3])));
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    packed = _mm256_permutevar8x32_epi32(packed, perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), packed);
    if constexpr (kVnni)  // q + 128 == q ^ 0x80 on two's complement bytes
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + b * QK), _mm256_xor_si256(packed, _mm256_set1_epi8(-128)));
    d[b] = scale;
    s[b] = scale * static_cast<float>(sum);
  }
}

// 8 scales (or mins) of consecutive groups from index i, as floats.
inline __m256 load_scales8(const void* p, int64_t i, int f16) {
  return f16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)))
             : _mm256_loadu_ps(static_cast<const float*>(p) + i);
}

// The weight scales (and mins) of blocks b0 .. b0+cnt-1 of row n, one lane per block (zeros past cnt).
inline void block_scales(const QMatrix& w, int64_t n, int b0, int cnt, __m256& ws, __m256& wm) {
  const int gb = w.group / QK, ng = w.K / w.group;
  const int64_t first = n * ng + b0;
  if (gb == 1 && cnt == 8) {
    ws = load_scales8(w.scale, first, w.f16);
    wm = w.min ? load_scales8(w.min, first, w.f16) : _mm256_setzero_ps();
    return;
  }
  alignas(32) float s[8] = {}, m[8] = {};
  for (int j = 0; j < cnt; ++j) {
    const int64_t g = n * ng + (b0 + j) / gb;
    s[j] = load_scale(w.scale, g, w.f16);
    if (w.min) m[j] = load_scale(w.min, g, w.f16);
  }
  ws = _mm256_load_ps(s);
  wm = _mm256_load_ps(m);
}

// 8 floats from p, zeros past cnt.
inline __m256 load_partial(const float* p, int cnt) {
  if (cnt == 8) return _mm256_loadu_ps(p);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(p, mask);
}

// One 32-block b of weight row n against MT activation rows: acc[i] += (w_b . x_ib) * factor[i * 8].
template <int BITS, int MT>
inline void block_dot(const QMatrix& w, int64_t n, const int8_t* xq, int b, const float* factor, __m256* acc) {
  const int64_t K = w.K;
  __m256i wa, wabs;
  if constexpr (BITS == 4) {
    wa = unpack_nibbles(static_cast<const uint8_t*>(w.q) + (n * K + static_cast<int64_t>(b) * QK) / 2);
  } else {
    wa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int8_t*>(w.q) + n * K + b * QK));
    wabs = _mm256_sign_epi8(wa, wa);
  }
  for (int i = 0; i < MT; ++i) {
    const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * K + b * QK));
    const __m256 p = BITS == 4 ? dot_u8s8(wa, xa) : dot_u8s8(wabs, _mm256_sign_epi8(xa, wa));
    acc[i] = _mm256_fmadd_ps(p, _mm256_broadcast_ss(factor + i * 8), acc[i]);
  }
}

// Up to MT activation rows (from m0) against weight row n: r[i] = x_{m0+i} . W_n.
// Blocks go 8 at a time: their weight scales times the activation scales are one vector multiply per row,
// stored so that each block's factor is a broadcast load (no shuffle, no register held per row), and the
// int4 mins' term (min * d_x * sum(q_x)) is one multiply per 8 blocks. Even and odd blocks go to two
// accumulators (hiding the fused multiply-add latency) for any MT: a row's result must not depend on how many
// rows share its call, or greedy tokens would change with the batch (speculative verification must reproduce
// plain decoding exactly; tests/test_fused_decode.py).
template <int BITS, int MT>
inline void dot_rows(const QMatrix& w, int64_t n, const QActivations& a, int m0, float* r) {
  const int K = w.K, nb = K / QK;
  const QActivations x = a.from(m0, K);
  const int8_t* xq = x.q;
  const float *xd = x.d, *xs = x.s;
  __m256 acc0[MT], acc1[MT];
  float min_term[MT] = {};
  for (int i = 0; i < MT; ++i) acc0[i] = acc1[i] = _mm256_setzero_ps();
  if (BITS == 8 && w.group == 16) {  // 16-groups (GGUF Q6_K): the low and high 4 lanes get their own scale
    for (int b = 0; b < nb; ++b) {
      const __m256 ws = _mm256_set_m128(_mm_set1_ps(load_scale(w.scale, (n * nb + b) * 2 + 1, w.f16)),
                                        _mm_set1_ps(load_scale(w.scale, (n * nb + b) * 2, w.f16)));
      const __m256i wa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int8_t*>(w.q) + n * K + b * QK));
      const __m256i wabs = _mm256_sign_epi8(wa, wa);
      for (int i = 0; i < MT; ++i) {
        const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + static_cast<int64_t>(i) * K + b * QK));
        acc0[i] = _mm256_fmadd_ps(dot_u8s8(wabs, _mm256_sign_epi8(xa, wa)), _mm256_mul_ps(ws, _mm256_set1_ps(xd[i * nb + b])), acc0[i]);
      }
    }
  } else {
    alignas(32) float factor[MT * 8];
    for (int b0 = 0; b0 < nb; b0 += 8) {
      const int cnt = std::min(8, nb - b0);
      __m256 ws, wm;
      block_scales(w, n, b0, cnt, ws, wm);
      for (int i = 0; i < MT; ++i) {
        _mm256_store_ps(factor + i * 8, _mm256_mul_ps(ws, load_partial(xd + i * nb + b0, cnt)));
        if constexpr (BITS == 4) min_term[i] += hsum(_mm256_mul_ps(wm, load_partial(xs + i * nb + b0, cnt)));
      }
      int j = 0;
      for (; j + 2 <= cnt; j += 2) {
        block_dot<BITS, MT>(w, n, xq, b0 + j, factor + j, acc0);
        block_dot<BITS, MT>(w, n, xq, b0 + j + 1, factor + j + 1, acc1);
      }
      if (j < cnt) block_dot<BITS, MT>(w, n, xq, b0 + j, factor + j, acc0);
    }
  }
  for (int i = 0; i < MT; ++i) r[i] = hsum(_mm256_add_ps(acc0[i], acc1[i])) + min_term[i];
}

template <int BITS, int MT>
inline void store_rows(const QMatrix& w, int64_t n, const QActivations& a, int m0, float* out, int64_t ldo,
                       const float* bias, bool accumulate) {
  float r[MT];
  dot_rows<BITS, MT>(w, n, a, m0, r);
  const float b = bias ? bias[n] : 0.0f;
  for (int i = 0; i < MT; ++i) {
    float* o = out + static_cast<int64_t>(m0 + i) * ldo + n;
    *o = accumulate ? *o + (r[i] + b) : r[i] + b;
  }
}

constexpr int kPrefetchRows = 4;

template <int BITS>
void qmatmul_bits(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
                  bool accumulate) {
  const int64_t row_bytes = static_cast<int64_t>(w.K) * BITS / 8;
#pragma omp for schedule(static)
  for (int n = 0; n < w.N; ++n) {
    if (n + kPrefetchRows < w.N) {  // the row kPrefetchRows ahead: its weight bytes and scales start arriving now
      const char* next = static_cast<const char*>(w.q) + (n + kPrefetchRows) * row_bytes;
      for (int64_t off = 0; off < row_bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
    }
    by_groups<4>(M, [&](auto rows, int m) { store_rows<BITS, decltype(rows)::value>(w, n, a, m, out, ldo, bias, accumulate); });
  }
}

// The tiled kernels' vector of output rows: one tile (8 rows) in a ymm; with AVX-512, two adjacent tiles (16
// rows) in a zmm, so one activation broadcast, one scale multiply and one store serve 16 outputs (half the
// instructions per output; Zen 4 runs a zmm op in one slot for two cycles). Each lane's arithmetic is the same in
// both, so results do not depend on the width.
struct Tile8 {
  static constexpr int kTiles = 1;
  static constexpr int kRows = 4;  // activation rows per pass over the weights (16 ymm registers)
  using I = __m256i;
  using F = __m256;
  // bytes at p of the tile (stride: bytes between a tile's data and the next tile's; unused here)
  static I load(const void* p, int64_t) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I zero() { return _mm256_setzero_si256(); }
  static I nibbles(I p, int shift) { return _mm256_and_si256(_mm256_srli_epi16(p, shift), _mm256_set1_epi8(0x0F)); }
  static I sign8(I x, I p) { return _mm256_sign_epi8(x, p); }
  static I dot(I acc, I a, I b) { return dot_accumulate(acc, a, b); }
  static I maddubs(I a, I b) { return _mm256_maddubs_epi16(a, b); }
  static I add16(I a, I b) { return _mm256_add_epi16(a, b); }
  static I sub32(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I widen16(I a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
  static F scales(const void* p, int64_t i, int64_t, int f16) { return load_scales8(p, i, f16); }
  static F zerof() { return _mm256_setzero_ps(); }
  static F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static F bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
struct Tile16 {
  static constexpr int kTiles = 2;
  static constexpr int kRows = 8;  // activation rows per pass over the weights (32 zmm registers; 1.03-1.1x over 4)
  using I = __m512i;
  using F = __m512;
  static I load(const void* p, int64_t stride) {
    const __m256i a = _mm256_loadu_si256(static_cast<const __m256i*>(p));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint8_t*>(p) + stride));
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
  }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  static I zero() { return _mm512_setzero_si512(); }
  static I nibbles(I p, int shift) { return _mm512_and_si512(_mm512_srli_epi16(p, shift), _mm512_set1_epi8(0x0F)); }
  static I dot(I acc, I a, I b) { return _mm512_dpbusd_epi32(acc, a, b); }
  static I sub32(I a, I b) { return _mm512_sub_epi32(a, b); }
  static F scales(const void* p, int64_t i, int64_t stride, int f16) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(load_scales8(p, i, f16))),
                                               _mm256_castps_pd(load_scales8(p, i + stride, f16)), 1));
  }
  static F zerof() { return _mm512_setzero_ps(); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F bcast(const float* p) { return _mm512_set1_ps(*p); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, F v) { _mm512_storeu_ps(p, v); }
};
#define TM_HAS_TILE16 1
#endif

// Integer block sums of the tile(s) from t, 32-block b, against MT activation rows: s[i] lane r = q_r . x_i.
template <typename V, int BITS, int MT>
inline void tile_block_sums(const QMatrix& w, int64_t t, int b, const int8_t* xq, const uint8_t* xu, typename V::I* s) {
  using I = typename V::I;
  const int K = w.K, nb = K / QK;
  const int64_t tile_bytes = static_cast<int64_t>(nb) * 4 * BITS * 8;  // one tile's weights, all blocks
  if constexpr (BITS == 4) {
    const uint8_t* q = static_cast<const uint8_t*>(w.q) + (t * nb + b) * 128;
    I s16[MT];  // without VNNI: int16 sums stay below 8 * 2 * 15 * 127 = 30480, widened once per block
    for (int i = 0; i < MT; ++i) s[i] = s16[i] = V::zero();
    for (int c = 0; c < 4; ++c) {
      const I p = V::load(q + c * 32, tile_bytes);
      const I lo = V::nibbles(p, 0), hi = V::nibbles(p, 4);
      for (int i = 0; i < MT; ++i) {
        const int8_t* x = xq + static_cast<int64_t>(i) * K + b * QK + 4 * c;
        int32_t xl, xh;
        memcpy(&xl, x, 4);
        memcpy(&xh, x + 16, 4);
        const I xlb = V::set1(xl), xhb = V::set1(xh);
        if constexpr (kVnni)
          s[i] = V::dot(V::dot(s[i], lo, xlb), hi, xhb);
        else
          s16[i] = V::add16(s16[i], V::add16(V::maddubs(lo, xlb), V::maddubs(hi, xhb)));
      }
    }
    if constexpr (!kVnni)
      for (int i = 0; i < MT; ++i) s[i] = V::widen16(s16[i]);
  } else if constexpr (kVnni) {  // (x + 128) . w - 128 * sum(w): one vpdpbusd per row and chunk, x broadcast from memory
    const int8_t* q = static_cast<const int8_t*>(w.q) + (t * nb + b) * 256;
    I offset = V::zero();  // 128 * sum(w) per output row
    for (int i = 0; i < MT; ++i) s[i] = V::zero();
    for (int c = 0; c < 8; ++c) {
      const I p = V::load(q + c * 32, tile_bytes);
      offset = V::dot(offset, V::set1(static_cast<int32_t>(0x80808080u)), p);
      for (int i = 0; i < MT; ++i) {
        int32_t xc;
        memcpy(&xc, xu + static_cast<int64_t>(i) * K + b * QK + 4 * c, 4);
        s[i] = V::dot(s[i], V::set1(xc), p);
      }
    }
    for (int i = 0; i < MT; ++i) s[i] = V::sub32(s[i], offset);
  } else {  // signed x signed: |w| . (x * sign(w)); a pair reaches 2 * 127 * 127 < 2^15
    const int8_t* q = static_cast<const int8_t*>(w.q) + (t * nb + b) * 256;
    for (int i = 0; i < MT; ++i) s[i] = V::zero();
    for (int c = 0; c < 8; ++c) {
      const I p = V::load(q + c * 32, tile_bytes);
      const I pabs = V::sign8(p, p);
      for (int i = 0; i < MT; ++i) {
        int32_t xc;
        memcpy(&xc, xq + static_cast<int64_t>(i) * K + b * QK + 4 * c, 4);
        s[i] = V::dot(s[i], pabs, V::sign8(V::set1(xc), p));
      }
    }
  }
}

// The tile(s) from t (8 output rows each) against MT activation rows from m0: r[i] lane j = x_{m0+i} . W_{8t+j}.
// Each activation row's arithmetic is the same whatever MT is (batch invariance, see dot_rows).
template <typename V, int BITS, int MT>
inline void tile_rows(const QMatrix& w, int64_t t, const QActivations& a, int m0, typename V::F* r) {
  const int K = w.K, nb = K / QK;
  const QActivations x = a.from(m0, K);
  const int8_t* xq = x.q;
  const float *xd = x.d, *xs = x.s;
  const int64_t tile_scales = static_cast<int64_t>(nb) * 8;
  for (int i = 0; i < MT; ++i) r[i] = V::zerof();
  for (int b = 0; b < nb; ++b) {
    typename V::I s[MT];
    tile_block_sums<V, BITS, MT>(w, t, b, xq, x.u, s);
    const typename V::F ws = V::scales(w.scale, (t * nb + b) * 8, tile_scales, w.f16);
    const typename V::F wm = BITS == 4 ? V::scales(w.min, (t * nb + b) * 8, tile_scales, w.f16) : V::zerof();
    for (int i = 0; i < MT; ++i) {
      r[i] = V::fmadd(V::cvt(s[i]), V::mul(ws, V::bcast(xd + i * nb + b)), r[i]);
      if constexpr (BITS == 4) r[i] = V::fmadd(wm, V::bcast(xs + i * nb + b), r[i]);
    }
  }
}

template <typename V, int BITS, int MT>
inline void store_tile(const QMatrix& w, int64_t t, const QActivations& a, int m0, float* out, int64_t ldo,
                       const float* bias, bool accumulate) {
  typename V::F r[MT];
  tile_rows<V, BITS, MT>(w, t, a, m0, r);
  const typename V::F b = bias ? V::loadf(bias + t * 8) : V::zerof();
  for (int i = 0; i < MT; ++i) {
    float* o = out + static_cast<int64_t>(m0 + i) * ldo + t * 8;
    const typename V::F v = V::add(r[i], b);
    V::storef(o, accumulate ? V::add(V::loadf(o), v) : v);
  }
}

// The tile(s) from t against all M activation rows, V::kRows rows per pass over their weights.
template <typename V, int BITS>
inline void store_tile_all_rows(const QMatrix& w, int64_t t, const QActivations& a, int M, float* out, int64_t ldo,
                                const float* bias, bool accumulate) {
  by_groups<V::kRows>(M, [&](auto rows, int m) { store_tile<V, BITS, decltype(rows)::value>(w, t, a, m, out, ldo, bias, accumulate); });
}

template <typename V, int BITS>
void qmatmul_tiles(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
                   bool accumulate) {
  const int groups = w.N / 8 / V::kTiles;
#pragma omp for schedule(static)
  for (int g = 0; g < groups; ++g)
    store_tile_all_rows<V, BITS>(w, static_cast<int64_t>(g) * V::kTiles, a, M, out, ldo, bias, accumulate);
}

// zmm pairs of tiles above Tile8::kRows activation rows: one pass over the weights where ymm needs two
// (int4, 5-8 rows: 1.0-1.65x faster on Zen 4; a batch-1 verify of 4 drafts is 5 rows), 1.3-1.45x at 16-512 rows;
// int8 (SmolLM2's 49k x 576 output layer), 16-64 rows: 1.25x over ymm with the same offset trick. Up to 4 rows,
// decode-sized calls that stream the weights, one tile per ymm was faster (batch-1 decode 1.1x; int8 1.4x).
template <int BITS>
void qmatmul_tiled(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
                   bool accumulate) {
#ifdef TM_HAS_TILE16
  if (M > Tile8::kRows) {
    qmatmul_tiles<Tile16, BITS>(w, a, M, out, ldo, bias, accumulate);
    if ((w.N / 8) % 2 == 0) return;
    // the odd last tile: one thread, ymm (an orphaned `single`; its implied barrier keeps the team together)
#pragma omp single
    store_tile_all_rows<Tile8, BITS>(w, w.N / 8 - 1, a, M, out, ldo, bias, accumulate);
    return;
  }
#endif
  qmatmul_tiles<Tile8, BITS>(w, a, M, out, ldo, bias, accumulate);
}

// The 32 codes of row n's block b as bytes (int4: 0..15 unsigned; int8: signed), in element order.
inline __m256i block_codes(const QMatrix& w, int64_t n, int b) {
  const int64_t K = w.K;
  if (!w.tiled) {
    if (w.bits == 4) return unpack_nibbles(static_cast<const uint8_t*>(w.q) + (n * K + static_cast<int64_t>(b) * QK) / 2);
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int8_t*>(w.q) + n * K + b * QK));
  }
  const int64_t block = (n / 8) * (K / QK) + b;
  const int32_t* words = reinterpret_cast<const int32_t*>(static_cast<const uint8_t*>(w.q) + block * 4 * w.bits * 8) + n % 8;
  if (w.bits == 4) {  // chunk c's word r is row r's GGUF bytes 4c..4c+3
    const __m128i g = _mm_setr_epi32(words[0], words[8], words[16], words[24]);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(g, 4), g), _mm256_set1_epi8(0x0F));
  }
  return _mm256_setr_epi32(words[0], words[8], words[16], words[24], words[32], words[40], words[48], words[56]);
}

// Index of the scale (and min) of row n's element k.
inline int64_t scale_index(const QMatrix& w, int64_t n, int k) {
  if (w.tiled) return ((n / 8) * (w.K / QK) + k / QK) * 8 + n % 8;
  return n * (w.K / w.group) + k / w.group;
}

// The calling thread's activation buffers, sized for M rows of K.
QActivations activation_buffers(int M, int K) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> d, s;
  thread_local std::vector<uint8_t> u;
  const size_t n = static_cast<size_t>(M) * K;
  if (q.size() < n) {
    q.resize(n);
    d.resize(n / QK);
    s.resize(n / QK);
    u.resize(n);
  }
  return QActivations{q.data(), d.data(), s.data(), u.data()};
}

}  // namespace

void quantize_rows(const float* x, int64_t x_stride, int M, int K, const QActivations& a) {
  const int nb = K / QK;
#pragma omp for schedule(static)
  for (int m = 0; m < M; ++m)
    quantize_row(x + m * x_stride, K, a.q + static_cast<int64_t>(m) * K, a.d + m * nb, a.s + m * nb,
                 a.u + static_cast<int64_t>(m) * K);
}

void qmatmul(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
             bool accumulate) {
  if (w.tiled) {
    if (w.bits == 4)
      qmatmul_tiled<4>(w, a, M, out, ldo, bias, accumulate);
    else
      qmatmul_tiled<8>(w, a, M, out, ldo, bias, accumulate);
  } else if (w.bits == 4)
    qmatmul_bits<4>(w, a, M, out, ldo, bias, accumulate);
  else
    qmatmul_bits<8>(w, a, M, out, ldo, bias, accumulate);
}

}  // namespace tm

extern "C" {

using namespace tm;

// y = x @ W^T: x float32 [M, K] contiguous, out float32 [M, N].
void tm_linear(const float* x, int M, const QMatrix* w, float* out) {
  const QActivations a = activation_buffers(M, w->K);
#pragma omp parallel
  {
    quantize_rows(x, w->K, M, w->K, a);
    qmatmul(*w, a, M, out, w->N, nullptr, false);
  }
}

// Float32 rows of the weight: all N rows when rows == nullptr, else the listed ones (an embedding lookup).
void tm_dequantize(const QMatrix* w, const int64_t* rows, int64_t num_rows, float* out) {
  const int K = w->K, nb = K / QK;
#pragma omp parallel for schedule(static) if (num_rows * K >= (1 << 16))
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t n = rows ? rows[r] : r;
    float* o = out + r * K;
    for (int b = 0; b < nb; ++b) {
      const int64_t g0 = scale_index(*w, n, b * QK), g1 = scale_index(*w, n, b * QK + QK / 2);
      const __m256 ws0 = _mm256_set1_ps(load_scale(w->scale, g0, w->f16));
      const __m256 ws1 = _mm256_set1_ps(load_scale(w->scale, g1, w->f16));
      const __m256 wm = w->bits == 4 ? _mm256_set1_ps(load_scale(w->min, g0, w->f16)) : _mm256_setzero_ps();
      const __m256i v = block_codes(*w, n, b);
      for (int j = 0; j < 4; ++j) {
        const __m128i bytes = j < 2 ? _mm256_castsi256_si128(v) : _mm256_extracti128_si256(v, 1);
        const __m128i part = (j & 1) ? _mm_srli_si128(bytes, 8) : bytes;
        const __m256i ints = w->bits == 4 ? _mm256_cvtepu8_epi32(part) : _mm256_cvtepi8_epi32(part);
        // scale * q + min, rounded twice like the reference (no fused multiply-add): bit-exact dequantization
        const __m256 prod = _mm256_mul_ps(j < 2 ? ws0 : ws1, _mm256_cvtepi32_ps(ints));
        _mm256_storeu_ps(o + b * QK + 8 * j, w->bits == 4 ? _mm256_add_ps(prod, wm) : prod);
      }
    }
  }
}

}  // extern "C"
