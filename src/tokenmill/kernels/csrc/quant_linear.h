// Quantized matrix products (see quant_linear.cpp), as building blocks that work inside a caller's OpenMP
// parallel region (orphaned `omp for`: the team splits the work; called outside a region, one thread does it).
#pragma once
#include <stdint.h>

namespace tm {

constexpr int QK = 32;  // activation / weight block length

// Formats of a packed weight (tokenmill/quant/weights.py). kPlain: int4 w = scale * q + min, or int8
// w = scale * q, with float scales. The k-quants keep GGUF's own sizes, always tiled (see quant_linear.cpp):
// kQ4K: int4 codes, a 6-bit scale and min code per 32-block and a float16 (d, dmin) per 256: w = d * sc * q -
// dmin * m; kQ6K: 6-bit codes (low nibbles like int4, 2 high bits in qh), an int8 scale per 16 and a float16 d
// per 256: w = d * sc * (q - 32).
// kQ5_0: 5-bit codes (low nibbles like int4, the high bit in qh), a float16 d per 32: w = d * (q - 16).
enum Format : int { kPlain = 0, kQ4K = 1, kQ6K = 2, kQ5_0 = 3 };

// A packed weight W [N, K]. Row layout: row n's bytes, then row n+1's. Tiled layout: rows interleaved 8 at a
// time (see quant_linear.cpp), one scale (and min) per 32-block.
struct QMatrix {
  const void* q;
  const void* scale;  // kQ4K: the packed 6-bit codes; kQ6K: int8
  const void* min;    // int4 only (kPlain)
  int bits;           // 4, 6 (kQ6K) or 8
  int f16;            // scales (and mins) are float16, else float32 (kPlain)
  int group;          // elements per scale: a multiple of 32, or 16 (int8 and kQ6K); 32 when tiled
  int N, K;
  int tiled;
  int format;
  const void* qh;     // kQ6K, kQ5_0: the codes' high bits
  const void* super;  // kQ4K, kQ6K: float16 per 256-block (kQ4K: d and dmin)
};

// Activation rows quantized to int8 per 32 values: row m at q + m * K, its block scales at d + m * K / 32, and
// s = d * sum(q) per block (what the weight mins multiply). u = q + 128 as unsigned bytes (VNNI builds only):
// vpdpbusd multiplies unsigned by signed bytes, so against int8 weights the activations go in offset by 128.
// h: the integer sums of q per 16 values (what kQ6K's code offset of 32 multiplies).
struct QActivations {
  int8_t* q;
  float* d;
  float* s;
  uint8_t* u;
  int32_t* h;

  // The rows from m0 on (of length K).
  QActivations from(int m0, int K) const {
    const int64_t first = static_cast<int64_t>(m0) * K;
    return QActivations{q + first, d + first / QK, s + first / QK, u + first, h + first / (QK / 2)};
  }
};

// The calling thread's activation buffers, sized for M rows of K (reused by its later calls).
QActivations activation_buffers(int M, int K);

// Quantize M rows of x (`x_stride` floats apart) of length K into a.
void quantize_rows(const float* x, int64_t x_stride, int M, int K, const QActivations& a);

// out[m * ldo + n] (+)= (x_m . W_n) + bias[n] for m < M, n < N; bias may be null.
void qmatmul(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
             bool accumulate);

// qmatmul for a tiled weight (tiled_matmul.cpp).
void qmatmul_tiled(const QMatrix& w, const QActivations& a, int M, float* out, int64_t ldo, const float* bias,
                   bool accumulate);

// Whether large enough products run on AMX tiles here (an AMX build, and the OS granted the tile state).
bool amx_in_use();

// The 32 float values of a k-quant's (or Q5_0's) row n, block b, exactly as its expansion dequantizes them.
void dequantize_kquant_block(const QMatrix& w, int64_t n, int b, float* out);

}  // namespace tm
