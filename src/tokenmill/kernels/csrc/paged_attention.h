// Decode attention over the paged KV cache (see paged_attention.cpp), as one task per (sequence, KV head) so
// both the single-op kernel and the fused decode step can spread the tasks over their threads.
#pragma once
#include <stdint.h>

namespace tm {

// What a cache element is: float32; float16 (half the bytes to stream; F16C converts 8 values per instruction);
// int8 codes with one float32 scale per (slot, KV head), symmetric: x = scale * code, scale = max|x| / 127; or
// int4, rotated: each head row is turned by R = H diag(signs) / sqrt(D) (a Walsh-Hadamard transform with the
// layer's random signs: orthogonal, so q.k = Rq.Rk, and outliers spread over all coordinates), then stored as
// 4-bit codes per group of 32 with a float16 scale: x = d * (code - 8), d = (the group's largest-magnitude
// value) / -8. Reads turn the queries by R and the outputs back by R^T.
enum KVType : int { kKVFloat32 = 0, kKVFloat16 = 1, kKVInt8 = 2, kKVInt4 = 3 };

struct KVCacheRef {  // one layer's K and V
  void* k;  // [blocks, block_size, KV, D] (int4: D / 2 bytes per head row)
  void* v;
  void* k_scale;  // int8: float32 [blocks, block_size, KV]; int4: float16 [blocks, block_size, KV, D / 32]; else null
  void* v_scale;
  const float* signs;  // int4: the rotation's signs [D]; else null
  const float* k_offset;  // int8, int4: [KV, D] subtracted from each key before it is quantized (a vector every
                          // key of the layer loses alike: each query's scores move by one constant, the softmax
                          // stays); null: none
  int type;  // KVType
};

struct PagedKV {
  KVCacheRef cache;
  const int64_t* block_tables;  // [B, max_blocks]
  int max_blocks;
  const int64_t* seq_lens;  // [B] keys to attend, counted from the table's first block, incl. the new token
  int KV, D, block_size;
  int window;  // > 0: only the last `window` keys
};

// Store one token's k and v rows (KV heads of D floats each) into cache slot `slot`, in the cache's type (int8,
// int4: each head's codes and scales, the same arithmetic as cache/kv_cache.py's quantize_int8 and
// rotate + quantize_int4).
void write_kv_row(const float* k, const float* v, int64_t slot, int KV, int D, const KVCacheRef& cache);

// The query heads that read KV head kvh in `rows` consecutive rows from row b, which share row b's block table
// (one decode row, or a verify or prefill chunk's positions: each key and value row is then read once for all).
// Row b + r attends seq_lens[b + r] keys; its G heads are at q + r * q_stride + g * D (all H / KV of them, or
// fewer to split the work finer), written to out + r * out_stride + g * D.
void decode_attention_task(const PagedKV& kv, int b, int rows, int kvh, int G, const float* q, int64_t q_stride,
                           float scale, float* out, int64_t out_stride);

}  // namespace tm
