// Quantized linear kernels for x86 AVX2, with AVX512-VNNI where the build has it: y = x @ W^T with W kept in
// 4- or 8-bit blocks of 32 along K and x quantized on the fly to int8 per 32-block (as llama.cpp's Q8_1),
// so every inner product is an integer dot (maddubs, or vpdpbusd) and the weights are streamed once per call.
//
// Row layout (see tokenmill/quant/weights.py; the tiled layout the model uses is in tiled_matmul.cpp):
//   int4: qweight uint8 [N, K/2]; in each 32-block byte j holds q[j] (low nibble) and q[j+16] (high nibble);
//         w = scale[n, k/group] * q + min[n, k/group], q in [0, 15]
//   int8: qweight int8 [N, K]; w = scale[n, k/group] * q
// Scales (and mins) are float16 or float32. group is a multiple of 32, or 16 for int8 (GGUF Q6_K).
#include "quant_linear.h"

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "simd_int8.h"
#include "static_count.h"
#include "vec_math.h"

namespace tm {
namespace {

// One activation row: q int8 [K], d = per-block scale, s = d * sum(q) per block (for the weight mins), h = sum(q)
// per 16 values, and with VNNI u = q + 128 (see QActivations).
void quantize_row(const float* x, int K, int8_t* q, float* d, float* s, uint8_t* u, int32_t* h) {
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
    h[2 * b] = hsum_i32(_mm256_add_epi32(i[0], i[1]));
    h[2 * b + 1] = hsum_i32(_mm256_add_epi32(i[2], i[3]));
    const int sum = h[2 * b] + h[2 * b + 1];
    __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    packed = _mm256_permutevar8x32_epi32(packed, perm);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * QK), packed);
    if constexpr (kVnni)  // q + 128 == q ^ 0x80 on two's complement bytes
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(u + b * QK), _mm256_xor_si256(packed, _mm256_set1_epi8(-128)));
    d[b] = scale;
    s[b] = scale * static_cast<float>(sum);
  }
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

// Index of the scale (and min) of row n's element k (plain formats).
inline int64_t scale_index(const QMatrix& w, int64_t n, int k) {
  if (w.tiled) return ((n / 8) * (w.K / QK) + k / QK) * 8 + n % 8;
  return n * (w.K / w.group) + k / w.group;
}

}  // namespace

QActivations activation_buffers(int M, int K) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> d, s;
  thread_local std::vector<uint8_t> u;
  thread_local std::vector<int32_t> h;
  const size_t n = static_cast<size_t>(M) * K;
  if (q.size() < n) {
    q.resize(n);
    d.resize(n / QK);
    s.resize(n / QK);
    u.resize(n);
    h.resize(n / (QK / 2));
  }
  return QActivations{q.data(), d.data(), s.data(), u.data(), h.data()};
}

void quantize_rows(const float* x, int64_t x_stride, int M, int K, const QActivations& a) {
  const int nb = K / QK;
#pragma omp for schedule(static)
  for (int m = 0; m < M; ++m)
    quantize_row(x + m * x_stride, K, a.q + static_cast<int64_t>(m) * K, a.d + m * nb, a.s + m * nb,
                 a.u + static_cast<int64_t>(m) * K, a.h + 2 * m * nb);
}

void qmatmul(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
             bool accumulate) {
  if (w.tiled)
    qmatmul_tiled(w, a, M, out, ldo, bias, accumulate);
  else if (w.bits == 4)
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

int tm_amx_in_use() { return amx_in_use(); }

// Float32 rows of the weight: all N rows when rows == nullptr, else the listed ones (an embedding lookup).
void tm_dequantize(const QMatrix* w, const int64_t* rows, int64_t num_rows, float* out) {
  const int K = w->K, nb = K / QK;
#pragma omp parallel for schedule(static) if (num_rows * K >= (1 << 16))
  for (int64_t r = 0; r < num_rows; ++r) {
    const int64_t n = rows ? rows[r] : r;
    float* o = out + r * K;
    if (w->format != kPlain) {
      for (int b = 0; b < nb; ++b) dequantize_kquant_block(*w, n, b, o + b * QK);
      continue;
    }
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
