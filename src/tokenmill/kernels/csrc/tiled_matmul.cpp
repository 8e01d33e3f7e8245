// The tiled quantized matrix products (QMatrix::tiled): the layout the model's packed weights are held in.
//
// Rows go in tiles of 8, and a tile's 32-block b is stored as chunks of 4 elements, chunk c holding 4 bytes of
// each of the 8 rows:
//   int4 (and the low nibbles of Q6_K's codes): 4 chunks of 32 bytes; chunk c, bytes 4r..4r+3 = row r's GGUF
//         bytes 4c..4c+3 (low nibbles: elements 4c..4c+3, high nibbles: elements 16+4c..16+4c+3);
//   int8: 8 chunks, chunk c = row r's elements 4c..4c+3.
//   plain scales (and mins): one per 32-block, the 8 rows' values side by side.
// Why: one activation chunk broadcast against a weight chunk gives products for 8 rows at once, so the integer
// sums of a block come out as one vector of 8 rows: no horizontal sums per row, one scale multiply per 8
// outputs, and the weights of a tile are unpacked once for up to 4 activation rows (2.1-3.2x faster than the
// row layout on SmolLM2's shapes, BENCHMARKS.md).
//
// The k-quants keep the GGUF file's bits per weight (Q4_K 4.5, Q6_K 6.5625) in the same tiling:
//   Q4_K: int4 codes as above; per tile and 32-block 12 bytes of 6-bit codes: byte r = row r's scale code low
//         nibble | min code low nibble << 4, then a 32-bit word whose nibble r = scale high 2 bits | min high
//         2 bits << 2; per tile and 256-block float16 d of the 8 rows, then their dmin. w = d*sc*q - dmin*m.
//   Q6_K: code low nibbles as int4; per tile and 32-block 64 bytes of high 2 bits: 32-byte vector v covers
//         chunks 2v and 2v+1, its byte 4r+j holding (bits 4h..4h+3 for chunk 2v+h) the high bits of row r's
//         elements 4c+j (low 2) and 16+4c+j (high 2); per tile and 32-block 16 int8 scales (the 8 rows' first
//         16 elements, then their last 16); per tile and 256-block the 8 rows' float16 d. w = d*sc*(q - 32).
//   Q5_0: code low nibbles as int4; per tile and 32-block 32 bytes of high bits: byte 4r+j holds (bits 2c and
//         2c+1) the high bits of row r's elements 4c+j and 16+4c+j; per tile and 32-block the 8 rows' float16 d.
//         w = d*(q - 16).
// Scales come out as the same float32 products the expanded formats hold (QuantizedWeight.untile), so a k-quant
// gives the same result as its expansion did, read at its own size.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>
#include <vector>

#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "quant_linear.h"
#include "simd_int8.h"
#include "static_count.h"

namespace tm {
namespace {

// The kernels' vector of output rows: one tile (8 rows) in a ymm; with AVX-512, two adjacent tiles (16 rows) in
// a zmm, so one activation broadcast, one scale multiply and one store serve 16 outputs (half the instructions
// per output; Zen 4 runs a zmm op in one slot for two cycles). Each lane's arithmetic is the same in both, so
// results do not depend on the width.
struct Tile8 {
  static constexpr int kTiles = 1;
  static constexpr int kRows = 4;  // activation rows per pass over the weights (16 ymm registers)
  using I = __m256i;
  using F = __m256;
  // bytes at p of the tile (stride: bytes between a tile's data and the next tile's; unused here)
  static I load(const void* p, int64_t) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  static I set1_8(char v) { return _mm256_set1_epi8(v); }
  static I zero() { return _mm256_setzero_si256(); }
  static I nibbles(I p, int shift) { return _mm256_and_si256(_mm256_srli_epi16(p, shift), _mm256_set1_epi8(0x0F)); }
  static I shl16(I p, int n) { return _mm256_slli_epi16(p, n); }
  static I shr16(I p, int n) { return _mm256_srli_epi16(p, n); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I sign8(I x, I p) { return _mm256_sign_epi8(x, p); }
  static I dot(I acc, I a, I b) { return dot_accumulate(acc, a, b); }
  static I maddubs(I a, I b) { return _mm256_maddubs_epi16(a, b); }
  static I add16(I a, I b) { return _mm256_add_epi16(a, b); }
  static I add32(I a, I b) { return _mm256_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I widen16(I a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
  static F join(const __m256* t) { return t[0]; }  // the tiles' 8-lane values as one vector
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
  static I set1_8(char v) { return _mm512_set1_epi8(v); }
  static I zero() { return _mm512_setzero_si512(); }
  static I nibbles(I p, int shift) { return _mm512_and_si512(_mm512_srli_epi16(p, shift), _mm512_set1_epi8(0x0F)); }
  static I shl16(I p, int n) { return _mm512_slli_epi16(p, n); }
  static I shr16(I p, int n) { return _mm512_srli_epi16(p, n); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I dot(I acc, I a, I b) { return _mm512_dpbusd_epi32(acc, a, b); }
  static I add32(I a, I b) { return _mm512_add_epi32(a, b); }
  static I sub32(I a, I b) { return _mm512_sub_epi32(a, b); }
  static F join(const __m256* t) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(t[0])), _mm256_castps_pd(t[1]), 1));
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

enum class Kind { kInt4, kInt8, kQ4K, kQ6K, kQ5_0 };

#ifdef TM_HAS_TILE16
// One activation row against Tile8 (batch-1 decode) on AVX-512: a zmm holds a tile's chunks c and c+1 (lanes
// 0-7 and 8-15), dotted with the activation's 4-byte groups of those chunks, put in place by one vpermd from the
// block's 32 bytes; the halves are added once per block. Half the loads and dot products of the ymm loop, with
// the same integer sums, so the result is Tile8's to the bit.
template <typename V, int MT>
constexpr bool kPairChunks = std::is_same_v<V, Tile8> && MT == 1;

// Lanes 0-7: dword `first` of the block xb, lanes 8-15: dword first + 1.
inline __m512i x_pair(__m512i xb, int first) {
  return _mm512_permutexvar_epi32(_mm512_add_epi32(_mm512_set1_epi32(first), _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)), xb);
}

inline __m512i x_block(const int8_t* x) { return _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))); }

inline __m256i halves(__m512i v) { return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)); }

// lanes 0-7 rotated left by a, 8-15 by b (a right shift by k is a rotation by 32 - k; callers keep only bits that
// a 16-bit shift would have brought from the same byte).
inline __m512i rotate_halves(__m512i v, int a, int b) {
  return _mm512_rolv_epi32(v, _mm512_mask_set1_epi32(_mm512_set1_epi32(a & 31), 0xFF00, b & 31));
}
#else
template <typename V, int MT>
constexpr bool kPairChunks = false;
#endif

// Each thread streams its tiles' bytes front to back; the hardware prefetcher alone leaves the loads waiting
// (batch-1 products of Qwen2.5-1.5B's Q4_K matrices read 15 GB/s without this, 25 with it; 1-8 KB ahead were
// within 5% of each other). With Tile16 the second tile's bytes are one tile further on, in the same stream.
constexpr int kPrefetchBytes = 4096;

// Prefetch the `bytes` (a multiple of 64) that lie kPrefetchBytes (scaled to the stream's bytes per block) ahead.
inline void prefetch_ahead(const void* p, int bytes) {
  const char* ahead = static_cast<const char*>(p) + kPrefetchBytes * bytes / 128;
  for (int off = 0; off < bytes; off += 64) _mm_prefetch(ahead + off, _MM_HINT_T0);
}

inline __m256 half8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// The 8 rows' scales s and mins m of tile t's 32-block b (kInt8: m = 0; kQ6K: s for the block's first 16
// elements, m for its last 16).
template <Kind KIND>
inline void block_scales8(const QMatrix& w, int64_t t, int b, __m256& s, __m256& m) {
  const int nb = w.K / QK;
  const int64_t block = t * nb + b, super = t * (nb / 8) + b / 8;
  if constexpr (KIND == Kind::kInt4 || KIND == Kind::kInt8 || KIND == Kind::kQ5_0) {
    s = load_scales8(w.scale, block * 8, w.f16);
    m = KIND == Kind::kInt4 ? load_scales8(w.min, block * 8, w.f16) : _mm256_setzero_ps();
  } else if constexpr (KIND == Kind::kQ4K) {
    const uint8_t* p = static_cast<const uint8_t*>(w.scale) + block * 12;
    const __m256i low = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    uint32_t word;
    memcpy(&word, p + 8, 4);
    const __m256i high = _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(word)),
                                           _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    const __m256i three = _mm256_set1_epi32(3), fifteen = _mm256_set1_epi32(15);
    const __m256i sc = _mm256_or_si256(_mm256_and_si256(low, fifteen), _mm256_slli_epi32(_mm256_and_si256(high, three), 4));
    const __m256i mc = _mm256_or_si256(_mm256_srli_epi32(low, 4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(high, 2), three), 4));
    const uint16_t* dm = static_cast<const uint16_t*>(w.super) + super * 16;
    s = _mm256_mul_ps(half8(dm), _mm256_cvtepi32_ps(sc));
    m = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(half8(dm + 8), _mm256_cvtepi32_ps(mc)));
  } else {
    const int8_t* p = static_cast<const int8_t*>(w.scale) + block * 16;
    const __m256 d = half8(static_cast<const uint16_t*>(w.super) + super * 8);
    s = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)))));
    m = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8)))));
  }
}

inline int32_t chunk_at(const void* p) {
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

// Integer block sums of the tile(s) from t, 32-block b, against MT activation rows: s[i] lane r = q_r . x_i.
template <typename V, int BITS, int MT>
inline void tile_block_sums(const QMatrix& w, int64_t t, int b, const int8_t* xq, const uint8_t* xu, typename V::I* s) {
  using I = typename V::I;
  const int K = w.K, nb = K / QK;
  const int64_t tile_bytes = static_cast<int64_t>(nb) * 4 * BITS * 8;  // one tile's weights, all blocks
  if constexpr (BITS == 4) {
    const uint8_t* q = static_cast<const uint8_t*>(w.q) + (t * nb + b) * 128;
    prefetch_ahead(q, 128);
#ifdef TM_HAS_TILE16
    if constexpr (kPairChunks<V, MT>) {
      const __m512i xb = x_block(xq + b * QK), low = _mm512_set1_epi8(0x0F);
      __m512i acc = _mm512_setzero_si512();
      for (int c = 0; c < 4; c += 2) {
        const __m512i p = _mm512_loadu_si512(q + c * 32);
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(p, low), x_pair(xb, c));
        acc = _mm512_dpbusd_epi32(acc, _mm512_and_si512(_mm512_srli_epi16(p, 4), low), x_pair(xb, 4 + c));
      }
      s[0] = halves(acc);
      return;
    }
#endif
    I s16[MT];  // without VNNI: int16 sums stay below 8 * 2 * 15 * 127 = 30480, widened once per block
    for (int i = 0; i < MT; ++i) s[i] = s16[i] = V::zero();
    for (int c = 0; c < 4; ++c) {
      const I p = V::load(q + c * 32, tile_bytes);
      const I lo = V::nibbles(p, 0), hi = V::nibbles(p, 4);
      for (int i = 0; i < MT; ++i) {
        const int8_t* x = xq + static_cast<int64_t>(i) * K + b * QK + 4 * c;
        const I xlb = V::set1(chunk_at(x)), xhb = V::set1(chunk_at(x + 16));
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
    prefetch_ahead(q, 256);
    I offset = V::zero();  // 128 * sum(w) per output row
    for (int i = 0; i < MT; ++i) s[i] = V::zero();
    for (int c = 0; c < 8; ++c) {
      const I p = V::load(q + c * 32, tile_bytes);
      offset = V::dot(offset, V::set1(static_cast<int32_t>(0x80808080u)), p);
      for (int i = 0; i < MT; ++i) s[i] = V::dot(s[i], V::set1(chunk_at(xu + static_cast<int64_t>(i) * K + b * QK + 4 * c)), p);
    }
    for (int i = 0; i < MT; ++i) s[i] = V::sub32(s[i], offset);
  } else {  // signed x signed: |w| . (x * sign(w)); a pair reaches 2 * 127 * 127 < 2^15
    const int8_t* q = static_cast<const int8_t*>(w.q) + (t * nb + b) * 256;
    prefetch_ahead(q, 256);
    for (int i = 0; i < MT; ++i) s[i] = V::zero();
    for (int c = 0; c < 8; ++c) {
      const I p = V::load(q + c * 32, tile_bytes);
      const I pabs = V::sign8(p, p);
      for (int i = 0; i < MT; ++i)
        s[i] = V::dot(s[i], pabs, V::sign8(V::set1(chunk_at(xq + static_cast<int64_t>(i) * K + b * QK + 4 * c)), p));
    }
  }
}

// v << n for n >= 0, v >> -n else (16-bit lanes; callers mask whole bytes).
template <typename V>
inline typename V::I shift16(typename V::I v, int n) {
  return n >= 0 ? V::shl16(v, n) : V::shr16(v, -n);
}

// Integer block sums of the formats whose codes are a low nibble and high bits (Q6_K: 2, offset 32; Q5_0: 1,
// offset 16), one per 16-element half (Q6_K gives each half its own scale): lo[i] lane r = (q_r - offset) . x_i
// over the block's first 16 elements, hi[i] over its last 16. Codes are unsigned bytes (below 64) against signed
// activations; the offset comes off as offset * (the activations' half sum).
template <typename V, Kind KIND, int MT>
inline void high_bit_block_sums(const QMatrix& w, int64_t t, int b, const QActivations& x, typename V::I* lo,
                                typename V::I* hi) {
  using I = typename V::I;
  constexpr bool q6 = KIND == Kind::kQ6K;
  constexpr int high_bytes = q6 ? 64 : 32, offset = q6 ? 32 : 16;
  const int K = w.K, nb = K / QK;
  const uint8_t* q = static_cast<const uint8_t*>(w.q) + (t * nb + b) * 128;
  const uint8_t* qh = static_cast<const uint8_t*>(w.qh) + (t * nb + b) * high_bytes;
  prefetch_ahead(q, 128);
  prefetch_ahead(qh, high_bytes);
  const I mask = V::set1_8(q6 ? 0x30 : 0x10);
#ifdef TM_HAS_TILE16
  if constexpr (kPairChunks<V, MT>) {
    const __m512i xb = x_block(x.q + b * QK), low = _mm512_set1_epi8(0x0F), zmask = _mm512_set1_epi8(q6 ? 0x30 : 0x10);
    __m512i lo_acc = _mm512_setzero_si512(), hi_acc = _mm512_setzero_si512();
    for (int c = 0; c < 4; c += 2) {
      const __m512i h = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + (q6 ? 16 * c : 0))));
      const __m512i p = _mm512_loadu_si512(q + c * 32);
      // the shifts of the scalar loop below for chunks c and c + 1
      const __m512i l = rotate_halves(h, q6 ? 4 : 4 - 2 * c, q6 ? 0 : 2 - 2 * c);
      const __m512i u = rotate_halves(h, q6 ? 2 : 3 - 2 * c, q6 ? -2 : 1 - 2 * c);
      const __m512i ql = _mm512_or_si512(_mm512_and_si512(p, low), _mm512_and_si512(l, zmask));
      const __m512i qu = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(p, 4), low), _mm512_and_si512(u, zmask));
      lo_acc = _mm512_dpbusd_epi32(lo_acc, ql, x_pair(xb, c));
      hi_acc = _mm512_dpbusd_epi32(hi_acc, qu, x_pair(xb, 4 + c));
    }
    const int32_t* sums = x.h + 2 * b;
    lo[0] = _mm256_sub_epi32(halves(lo_acc), _mm256_set1_epi32(offset * sums[0]));
    hi[0] = _mm256_sub_epi32(halves(hi_acc), _mm256_set1_epi32(offset * sums[1]));
    return;
  }
#endif
  for (int i = 0; i < MT; ++i) lo[i] = hi[i] = V::zero();
  I h = V::load(qh, static_cast<int64_t>(nb) * high_bytes);
  I lo16[MT], hi16[MT];  // without VNNI: int16 sums of two chunks stay below 2 * 2 * 63 * 127 = 32004
  for (int c = 0; c < 4; ++c) {
    if (q6 && c == 2) h = V::load(qh + 32, static_cast<int64_t>(nb) * high_bytes);
    // the high bits of this chunk's low-nibble and high-nibble elements, moved to bit 4 (and 5)
    const int lo_shift = q6 ? (c % 2 ? 0 : 4) : 4 - 2 * c, hi_shift = q6 ? (c % 2 ? -2 : 2) : 3 - 2 * c;
    const I p = V::load(q + c * 32, static_cast<int64_t>(nb) * 128);
    const I ql = V::or_(V::nibbles(p, 0), V::and_(shift16<V>(h, lo_shift), mask));
    const I qhi = V::or_(V::nibbles(p, 4), V::and_(shift16<V>(h, hi_shift), mask));
    for (int i = 0; i < MT; ++i) {
      const int8_t* xc = x.q + static_cast<int64_t>(i) * K + b * QK + 4 * c;
      const I xl = V::set1(chunk_at(xc)), xh = V::set1(chunk_at(xc + 16));
      if constexpr (kVnni) {
        lo[i] = V::dot(lo[i], ql, xl);
        hi[i] = V::dot(hi[i], qhi, xh);
      } else {
        lo16[i] = c % 2 ? V::add16(lo16[i], V::maddubs(ql, xl)) : V::maddubs(ql, xl);
        hi16[i] = c % 2 ? V::add16(hi16[i], V::maddubs(qhi, xh)) : V::maddubs(qhi, xh);
      }
    }
    if constexpr (!kVnni)
      if (c % 2)
        for (int i = 0; i < MT; ++i) {
          lo[i] = V::add32(lo[i], V::widen16(lo16[i]));
          hi[i] = V::add32(hi[i], V::widen16(hi16[i]));
        }
  }
  for (int i = 0; i < MT; ++i) {
    const int32_t* sums = x.h + static_cast<int64_t>(i) * (K / 16) + 2 * b;
    lo[i] = V::sub32(lo[i], V::set1(offset * sums[0]));
    hi[i] = V::sub32(hi[i], V::set1(offset * sums[1]));
  }
}

// The tile(s) from t (8 output rows each) against MT activation rows from m0: r[i] lane j = x_{m0+i} . W_{8t+j}.
// A row's arithmetic is the same whatever MT is: a row's result must not depend on how many rows share its
// call, or greedy tokens would change with the batch (speculative verification must reproduce plain decoding
// exactly; tests/test_fused_decode.py).
template <typename V, Kind KIND, int MT>
inline void tile_rows(const QMatrix& w, int64_t t, const QActivations& a, int m0, typename V::F* r) {
  using F = typename V::F;
  const int K = w.K, nb = K / QK;
  const QActivations x = a.from(m0, K);
  for (int i = 0; i < MT; ++i) r[i] = V::zerof();
  for (int b = 0; b < nb; ++b) {
    __m256 s8[2], m8[2];
    for (int j = 0; j < V::kTiles; ++j) block_scales8<KIND>(w, t + j, b, s8[j], m8[j]);
    const F ws = V::join(s8), wm = V::join(m8);
    if constexpr (KIND == Kind::kQ6K) {
      typename V::I lo[MT], hi[MT];
      high_bit_block_sums<V, KIND, MT>(w, t, b, x, lo, hi);
      for (int i = 0; i < MT; ++i) {
        const F xd = V::bcast(x.d + i * nb + b);
        r[i] = V::fmadd(V::cvt(lo[i]), V::mul(ws, xd), r[i]);
        r[i] = V::fmadd(V::cvt(hi[i]), V::mul(wm, xd), r[i]);
      }
    } else if constexpr (KIND == Kind::kQ5_0) {
      typename V::I lo[MT], hi[MT];
      high_bit_block_sums<V, KIND, MT>(w, t, b, x, lo, hi);
      for (int i = 0; i < MT; ++i) r[i] = V::fmadd(V::cvt(V::add32(lo[i], hi[i])), V::mul(ws, V::bcast(x.d + i * nb + b)), r[i]);
    } else {
      typename V::I s[MT];
      tile_block_sums<V, KIND == Kind::kInt8 ? 8 : 4, MT>(w, t, b, x.q, x.u, s);
      for (int i = 0; i < MT; ++i) {
        r[i] = V::fmadd(V::cvt(s[i]), V::mul(ws, V::bcast(x.d + i * nb + b)), r[i]);
        if constexpr (KIND != Kind::kInt8) r[i] = V::fmadd(wm, V::bcast(x.s + i * nb + b), r[i]);
      }
    }
  }
}

template <typename V, Kind KIND, int MT>
inline void store_tile(const QMatrix& w, int64_t t, const QActivations& a, int m0, float* out, int64_t ldo,
                       const float* bias, bool accumulate) {
  typename V::F r[MT];
  tile_rows<V, KIND, MT>(w, t, a, m0, r);
  const typename V::F b = bias ? V::loadf(bias + t * 8) : V::zerof();
  for (int i = 0; i < MT; ++i) {
    float* o = out + static_cast<int64_t>(m0 + i) * ldo + t * 8;
    const typename V::F v = V::add(r[i], b);
    V::storef(o, accumulate ? V::add(V::loadf(o), v) : v);
  }
}

// The tile(s) from t against all M activation rows, V::kRows rows per pass over their weights.
template <typename V, Kind KIND>
inline void store_tile_all_rows(const QMatrix& w, int64_t t, const QActivations& a, int M, float* out, int64_t ldo,
                                const float* bias, bool accumulate) {
  by_groups<V::kRows>(M, [&](auto rows, int m) { store_tile<V, KIND, decltype(rows)::value>(w, t, a, m, out, ldo, bias, accumulate); });
}

template <typename V, Kind KIND>
void qmatmul_tiles(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
                   bool accumulate) {
  const int groups = w.N / 8 / V::kTiles;
#pragma omp for schedule(static)
  for (int g = 0; g < groups; ++g)
    store_tile_all_rows<V, KIND>(w, static_cast<int64_t>(g) * V::kTiles, a, M, out, ldo, bias, accumulate);
}

#if defined(TM_HAS_TILE16) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define TM_HAS_AMX 1
// AMX (Xeon 4th generation on): one tile product multiplies 16 activation rows by 16 weight rows over a whole
// 32-block (8192 byte products), where the zmm loop needs 128 vpdpbusd. The int32 block sums it gives are the zmm
// loop's (signed activations against the codes: tdpbsud, or tdpbssd for int8), and the float arithmetic after
// them is the same per output, so a row's result does not change with the path (verify chunks must reproduce
// decoding). Per group of 16 weight rows, its codes are laid out once as the products' B tiles (K/4 rows of
// 16 x 4 bytes per block) and its scales expanded to floats, both reused for every 16 activation rows; the
// rows past the last 16 take the zmm loop.

// Linux hands AMX's 8 KB of tile state to a process only on request (arch_prctl ARCH_REQ_XCOMP_PERM); a child
// forked after it keeps the permission.
bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return permitted;
}

// Two sets of tile registers, so a block's products run while the previous block's sums are scaled. One 32-block
// product per set: A (16 activation rows x 32 bytes), B (8 code rows of 16 x 4 bytes), C (16 x 16 int32) in tmm0-2
// and tmm3-5.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {32, 64, 64, 32, 64, 64};
  uint8_t rows[16] = {16, 8, 16, 16, 8, 16};
};

// C += A . B: int8 weights are signed, every other format's codes unsigned.
#define TM_TILE_DOT(KIND, c, a, b) \
  do {                             \
    if constexpr (KIND == Kind::kInt8) _tile_dpbssd(c, a, b); else _tile_dpbsud(c, a, b); \
  } while (0)

// Block b's products for 16 activation rows at xb (as amx_activations lays them out) against its B tile at bt, in
// set S, stored as int32 rows of 16 in c. GCC's tile intrinsics take register numbers as literals.
template <Kind KIND, int S>
__attribute__((always_inline)) inline void amx_block(const int8_t* xb, const uint8_t* bt, int32_t* c) {
  if constexpr (S == 0) {
    _tile_loadd(0, xb, 32);
    _tile_loadd(1, bt, 64);
    _tile_zero(2);
    TM_TILE_DOT(KIND, 2, 0, 1);
    _tile_stored(2, c, 64);
  } else {
    _tile_loadd(3, xb, 32);
    _tile_loadd(4, bt, 64);
    _tile_zero(5);
    TM_TILE_DOT(KIND, 5, 3, 4);
    _tile_stored(5, c, 64);
  }
}
#undef TM_TILE_DOT

constexpr int kAmxRows = 16;  // activation rows per tile product

// Where tile products pay, by format (0: never). Laying out a group's weights costs about a tile pass over it, and
// per pass the float scaling of the block sums (the zmm loop's own arithmetic) is much of the time, so the gain
// is in the integer work: most for int8, least for Q6_K, whose two scales per block double the scaling (2 cores,
// AVX-512 + AMX, Qwen2.5-1.5B-sized products, benchmarks/kernel_builds.py; AMX / zmm at 32, 64 and 512 rows:
// Q8_0 1.3x, 1.55x, 1.8x; Q5_0 1.1x, 1.35x, 1.3x; Q4_K 1.0-1.2x, 1.2-1.45x, 1.3x; Q4_1 1.0x, 1.15x, 1.25x;
// Q6_K 0.8x, 0.9x, 0.95x).
template <Kind KIND>
constexpr int kAmxMinRows = KIND == Kind::kQ6K ? 0 : KIND == Kind::kInt8 ? 32 : 64;

// Tiles t and t + 1 as the products' B tiles, block after block, and per block their 16 rows' scales s and mins m
// (block_scales8) as floats in scales.
template <Kind KIND>
void amx_weights(const QMatrix& w, int64_t t, uint8_t* codes, float* scales) {
  using V = Tile16;
  const int nb = w.K / QK;
  for (int b = 0; b < nb; ++b) {
    __m512i rows[8];
    if constexpr (KIND == Kind::kInt8) {
      const uint8_t* q = static_cast<const uint8_t*>(w.q) + (t * nb + b) * 256;
      for (int c = 0; c < 8; ++c) rows[c] = V::load(q + c * 32, static_cast<int64_t>(nb) * 256);
    } else if constexpr (KIND == Kind::kQ5_0) {
      const uint8_t* q = static_cast<const uint8_t*>(w.q) + (t * nb + b) * 128;
      const uint8_t* qh = static_cast<const uint8_t*>(w.qh) + (t * nb + b) * 32;
      const __m512i mask = V::set1_8(0x10), h = V::load(qh, static_cast<int64_t>(nb) * 32);
      for (int c = 0; c < 4; ++c) {  // the codes of high_bit_block_sums (its shifts)
        const int lo_shift = 4 - 2 * c, hi_shift = 3 - 2 * c;
        const __m512i p = V::load(q + c * 32, static_cast<int64_t>(nb) * 128);
        rows[c] = V::or_(V::nibbles(p, 0), V::and_(shift16<V>(h, lo_shift), mask));
        rows[4 + c] = V::or_(V::nibbles(p, 4), V::and_(shift16<V>(h, hi_shift), mask));
      }
    } else {
      const uint8_t* q = static_cast<const uint8_t*>(w.q) + (t * nb + b) * 128;
      for (int c = 0; c < 4; ++c) {
        const __m512i p = V::load(q + c * 32, static_cast<int64_t>(nb) * 128);
        rows[c] = V::nibbles(p, 0);
        rows[4 + c] = V::nibbles(p, 4);
      }
    }
    for (int c = 0; c < 8; ++c) _mm512_storeu_si512(codes + (static_cast<int64_t>(b) * 8 + c) * 64, rows[c]);
    __m256 s8[2], m8[2];
    for (int j = 0; j < 2; ++j) block_scales8<KIND>(w, t + j, b, s8[j], m8[j]);
    V::storef(scales + b * 32, V::join(s8));
    V::storef(scales + b * 32 + 16, V::join(m8));
  }
}

// The activation rows' codes of each 16 rows and block as the products' A tile: 16 x 32 bytes, contiguous (read
// with the rows K bytes apart, a tile load touches 16 lines for 32 bytes of each and held the products back).
void amx_activations(const QActivations& a, int M, int K, int8_t* packed) {
  const int nb = K / QK;
  for (int m0 = 0; m0 + kAmxRows <= M; m0 += kAmxRows)
    for (int b = 0; b < nb; ++b)
      for (int i = 0; i < kAmxRows; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + ((static_cast<int64_t>(m0) * nb + b * kAmxRows + i) * QK)),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + static_cast<int64_t>(m0 + i) * K + b * QK)));
}

// Rows m0..m0+15 against tiles t and t + 1 (laid out by amx_weights): tile_rows' arithmetic on the integer sums
// the tile products give.
template <Kind KIND>
void amx_rows(const QMatrix& w, int64_t t, const uint8_t* codes, const float* scales, const QActivations& a,
              const int8_t* packed, int m0, float* out, int64_t ldo, const float* bias, bool accumulate) {
  using V = Tile16;
  const int K = w.K, nb = K / QK;
  const QActivations x = a.from(m0, K);
  alignas(64) int32_t sums[2][kAmxRows * 16];  // each set's C tile, as stored
  __m512 r[kAmxRows];
#pragma GCC unroll 16
  for (int i = 0; i < kAmxRows; ++i) r[i] = V::zerof();
  // Block b + 1's products run while block b's sums are scaled.
  const int8_t* xa = packed + static_cast<int64_t>(m0) * nb * QK;
  amx_block<KIND, 0>(xa, codes, sums[0]);
  for (int b = 0; b < nb; ++b) {
    if (b + 1 < nb) {
      const int8_t* xn = xa + static_cast<int64_t>(b + 1) * kAmxRows * QK;
      const uint8_t* cn = codes + static_cast<int64_t>(b + 1) * 512;
      if (b % 2)
        amx_block<KIND, 0>(xn, cn, sums[0]);
      else
        amx_block<KIND, 1>(xn, cn, sums[1]);
    }
    const int32_t* c = sums[b % 2];
    const __m512 ws = V::loadf(scales + b * 32), wm = V::loadf(scales + b * 32 + 16);
#pragma GCC unroll 16
    for (int i = 0; i < kAmxRows; ++i) {
      __m512i s = _mm512_load_si512(c + 16 * i);
      if constexpr (KIND == Kind::kQ5_0) {  // the zmm loop's (lo - 16 h0) + (hi - 16 h1), as one sum
        const int32_t* h = x.h + static_cast<int64_t>(i) * (K / 16) + 2 * b;
        s = _mm512_sub_epi32(_mm512_sub_epi32(s, _mm512_set1_epi32(16 * h[0])), _mm512_set1_epi32(16 * h[1]));
      }
      r[i] = V::fmadd(V::cvt(s), V::mul(ws, V::bcast(x.d + i * nb + b)), r[i]);
      if constexpr (KIND == Kind::kInt4 || KIND == Kind::kQ4K) r[i] = V::fmadd(wm, V::bcast(x.s + i * nb + b), r[i]);
    }
  }
  const __m512 bv = bias ? V::loadf(bias + t * 8) : V::zerof();
#pragma GCC unroll 16  // every index a constant, so r can stay in registers
  for (int i = 0; i < kAmxRows; ++i) {
    float* o = out + static_cast<int64_t>(m0 + i) * ldo + t * 8;
    const __m512 v = V::add(r[i], bv);
    V::storef(o, accumulate ? V::add(V::loadf(o), v) : v);
  }
}

// qmatmul_tiles for M >= kAmxRows: tile products for the whole 16s of rows, the zmm loop for the rest.
template <Kind KIND>
void qmatmul_amx(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
                 bool accumulate) {
  static const TileConfig config;
  const int nb = w.K / QK, groups = w.N / 16, whole = M / kAmxRows * kAmxRows;
  thread_local std::vector<uint8_t> codes;
  thread_local std::vector<float> scales;
  thread_local std::vector<int8_t> packed;  // each thread its own copy: no barrier before the products
  codes.resize(static_cast<size_t>(nb) * 512);
  scales.resize(static_cast<size_t>(nb) * 32);
  packed.resize(static_cast<size_t>(whole) * w.K);
  amx_activations(a, M, w.K, packed.data());
  _tile_loadconfig(&config);
#pragma omp for schedule(static)
  for (int g = 0; g < groups; ++g) {
    const int64_t t = 2 * static_cast<int64_t>(g);
    amx_weights<KIND>(w, t, codes.data(), scales.data());
    for (int m = 0; m < whole; m += kAmxRows)
      amx_rows<KIND>(w, t, codes.data(), scales.data(), a, packed.data(), m, out, ldo, bias, accumulate);
    by_groups<Tile16::kRows>(M - whole, [&](auto rows, int m) {
      store_tile<Tile16, KIND, decltype(rows)::value>(w, t, a, whole + m, out, ldo, bias, accumulate);
    });
  }
  _tile_release();
}
#endif

// zmm pairs of tiles above Tile8::kRows activation rows: one pass over the weights where ymm needs two
// (int4, 5-8 rows: 1.0-1.65x faster on Zen 4; a batch-1 verify of 4 drafts is 5 rows), 1.3-1.45x at 16-512 rows;
// int8 (SmolLM2's 49k x 576 output layer), 16-64 rows: 1.25x over ymm with the same offset trick. Up to 4 rows,
// decode-sized calls that stream the weights, one tile per ymm was faster (batch-1 decode 1.1x; int8 1.4x).
template <Kind KIND>
void qmatmul_kind(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
                  bool accumulate) {
#ifdef TM_HAS_TILE16
  if (M > Tile8::kRows) {
    bool tiles = true;
#ifdef TM_HAS_AMX
    if constexpr (kAmxMinRows<KIND> > 0) {
      if (M >= kAmxMinRows<KIND> && amx_permitted()) {
        qmatmul_amx<KIND>(w, a, M, out, ldo, bias, accumulate);
        tiles = false;
      }
    }
#endif
    if (tiles) qmatmul_tiles<Tile16, KIND>(w, a, M, out, ldo, bias, accumulate);
    if ((w.N / 8) % 2 == 0) return;
    // the odd last tile: one thread, ymm (an orphaned `single`; its implied barrier keeps the team together)
#pragma omp single
    store_tile_all_rows<Tile8, KIND>(w, w.N / 8 - 1, a, M, out, ldo, bias, accumulate);
    return;
  }
#endif
  qmatmul_tiles<Tile8, KIND>(w, a, M, out, ldo, bias, accumulate);
}

// Row n's 6-bit Q4_K scale and min codes of 32-block b.
inline void q4k_codes(const QMatrix& w, int64_t n, int b, int& sc, int& m) {
  const uint8_t* p = static_cast<const uint8_t*>(w.scale) + ((n / 8) * (w.K / QK) + b) * 12;
  uint32_t word;
  memcpy(&word, p + 8, 4);
  const int low = p[n % 8], high = (word >> (4 * (n % 8))) & 15;
  sc = (low & 15) | (high & 3) << 4;
  m = (low >> 4) | (high >> 2) << 4;
}

}  // namespace

void qmatmul_tiled(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
                   bool accumulate) {
  if (w.format == kQ4K)
    qmatmul_kind<Kind::kQ4K>(w, a, M, out, ldo, bias, accumulate);
  else if (w.format == kQ6K)
    qmatmul_kind<Kind::kQ6K>(w, a, M, out, ldo, bias, accumulate);
  else if (w.format == kQ5_0)
    qmatmul_kind<Kind::kQ5_0>(w, a, M, out, ldo, bias, accumulate);
  else if (w.bits == 4)
    qmatmul_kind<Kind::kInt4>(w, a, M, out, ldo, bias, accumulate);
  else
    qmatmul_kind<Kind::kInt8>(w, a, M, out, ldo, bias, accumulate);
}

bool amx_in_use() {
#ifdef TM_HAS_AMX
  return amx_permitted();
#else
  return false;
#endif
}

void dequantize_kquant_block(const QMatrix& w, int64_t n, int b, float* out) {
  const int nb = w.K / QK, r = n % 8;
  const int64_t block = (n / 8) * nb + b, super = (n / 8) * (nb / 8) + b / 8;
  const uint8_t* q = static_cast<const uint8_t*>(w.q) + block * 128 + 4 * r;
  const uint16_t* d = static_cast<const uint16_t*>(w.super);
  if (w.format == kQ4K) {
    int sc, m;
    q4k_codes(w, n, b, sc, m);
    const float scale = _cvtsh_ss(d[super * 16 + r]) * static_cast<float>(sc);
    const float min = -(_cvtsh_ss(d[super * 16 + 8 + r]) * static_cast<float>(m));
    for (int e = 0; e < QK; ++e) {
      const int byte = q[(e % 16) / 4 * 32 + e % 4];
      out[e] = scale * static_cast<float>(e < 16 ? byte & 15 : byte >> 4) + min;
    }
    return;
  }
  if (w.format == kQ5_0) {
    const uint8_t* qh = static_cast<const uint8_t*>(w.qh) + block * 32 + 4 * r;
    const float dd = _cvtsh_ss(static_cast<const uint16_t*>(w.scale)[block * 8 + r]);
    for (int e = 0; e < QK; ++e) {
      const int half = e / 16, c = (e % 16) / 4, j = e % 4;
      const int low = half ? q[c * 32 + j] >> 4 : q[c * 32 + j] & 15;
      out[e] = dd * static_cast<float>((low | ((qh[j] >> (2 * c + half)) & 1) << 4) - 16);
    }
    return;
  }
  const int8_t* sc = static_cast<const int8_t*>(w.scale) + block * 16 + r;
  const uint8_t* qh = static_cast<const uint8_t*>(w.qh) + block * 64 + 4 * r;
  const float dd = _cvtsh_ss(d[super * 8 + r]);
  for (int e = 0; e < QK; ++e) {
    const int half = e / 16, c = (e % 16) / 4, j = e % 4;
    const int low = half ? q[c * 32 + j] >> 4 : q[c * 32 + j] & 15;
    const int high = (qh[(c / 2) * 32 + j] >> (4 * (c % 2) + 2 * half)) & 3;
    out[e] = dd * static_cast<float>(sc[8 * half]) * static_cast<float>((low | high << 4) - 32);
  }
}

}  // namespace tm
