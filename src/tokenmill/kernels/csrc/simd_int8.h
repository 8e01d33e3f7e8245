// AVX2 helpers of the int8-dot kernels (quant_linear.cpp, tiled_matmul.cpp): scale loads, nibble unpacking and
// the unsigned-by-signed byte dot, one instruction with AVX512-VNNI.
#pragma once
#include <immintrin.h>
#include <stdint.h>

namespace tm {

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr bool kVnni = true;  // built for a CPU with AVX512-VNNI (build.py adds the flags where it has them)
#else
constexpr bool kVnni = false;
#endif

inline float load_scale(const void* p, int64_t i, int f16) {
  return f16 ? _cvtsh_ss(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// 8 scales (or mins) of consecutive groups from index i, as floats.
inline __m256 load_scales8(const void* p, int64_t i, int f16) {
  return f16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)))
             : _mm256_loadu_ps(static_cast<const float*>(p) + i);
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

}  // namespace tm
