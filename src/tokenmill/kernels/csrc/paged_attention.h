// Decode attention over the paged KV cache (see paged_attention.cpp), as one task per (sequence, KV head) so
// both the single-op kernel and the fused decode step can spread the tasks over their threads.
#pragma once
#include <stdint.h>

namespace tm {

// What a cache element is: float32; float16 (half the bytes to stream; F16C converts 8 values per instruction);
// or int8 codes with one float32 scale per (slot, KV head), symmetric: x = scale * code, scale = max|x| / 127.
enum KVType : int { kKVFloat32 = 0, kKVFloat16 = 1, kKVInt8 = 2 };

struct KVCacheRef {  // one layer's K and V
  void* k;  // [blocks, block_size, KV, D]
  void* v;
  float* k_scale;  // int8: [blocks, block_size, KV]; else null
  float* v_scale;
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

// Store one token's k and v rows (KV heads of D floats each) into cache slot `slot`, in the cache's type (int8:
// each head's codes and scale; the same arithmetic as cache/kv_cache.py quantize_int8).
void write_kv_row(const float* k, const float* v, int64_t slot, int KV, int D, const KVCacheRef& cache);

// The query heads that read KV head kvh in `rows` consecutive rows from row b, which share row b's block table
// (one decode row, or a verify or prefill chunk's positions: each key and value row is then read once for all).
// Row b + r attends seq_lens[b + r] keys; its G heads are at q + r * q_stride + g * D (all H / KV of them, or
// fewer to split the work finer), written to out + r * out_stride + g * D.
void decode_attention_task(const PagedKV& kv, int b, int rows, int kvh, int G, const float* q, int64_t q_stride,
                           float scale, float* out, int64_t out_stride);

}  // namespace tm
