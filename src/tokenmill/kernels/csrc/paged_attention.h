// Decode attention over the paged KV cache (see paged_attention.cpp), as one task per (sequence, KV head) so
// both the single-op kernel and the fused decode step can spread the tasks over their threads.
#pragma once
#include <stdint.h>

namespace tm {

struct PagedKV {
  const float* k_cache;  // [blocks, block_size, KV, D]
  const float* v_cache;
  const int64_t* block_tables;  // [B, max_blocks]
  int max_blocks;
  const int64_t* seq_lens;  // [B] keys to attend, counted from the table's first block, incl. the new token
  int KV, D, block_size;
  int window;  // > 0: only the last `window` keys
};

// G query heads of sequence b that read KV head kvh (all H / KV of them, or fewer to split the work finer):
// their rows at q_heads[g * D] in, out_heads[g * D] out.
void decode_attention_task(const float* q_heads, const PagedKV& kv, int b, int kvh, int G, float scale,
                           float* out_heads);

}  // namespace tm
