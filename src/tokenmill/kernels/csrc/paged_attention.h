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
// value) / -8. Reads turn the queries by R and the outputs back by R^T. Turboquant: rotated the same way, then
// each coordinate a Lloyd-Max code (RowCodes) and one float16 scale per row: x = scale * centroid[code].
enum KVType : int { kKVFloat32 = 0, kKVFloat16 = 1, kKVInt8 = 2, kKVInt4 = 3, kKVTurboQuant = 4 };

// How a turboquant head row is coded (cache/turboquant.py; built there as this struct's bytes): coordinates
// [0, split) at `hi` bits, [split, D) at `lo` bits (2 to 4), each part stored as bit fields (4: one 4-bit field;
// 3: a 2-bit then a 1-bit field; 2) in which coordinate i of n takes bits [i * w, (i + 1) * w); `row_bytes` per row and
// one float16 scale per row (stored apart). Centroids and boundaries are in units of
// |row| / sqrt(D): a coordinate so measured takes the number of boundaries below it as its code.
struct RowCodes {
  int D, log2_D, split, hi, lo, row_bytes, pad[2];
  alignas(32) float centroids[2][32];  // [0]: the hi part's, [1]: the lo part's (2^bits of them)
  float bounds[2][32];  // 2^bits - 1 ascending decision boundaries each, the rest +inf
};

// The rotation's three vectors per KV head (cache/kv_cache.py rotation): R = H diag(vector) / sqrt(D) turns queries
// by signs * s and keys by signs / s (s: the keys' smoothing factors, 1 without smoothing, so q.k is unchanged) and
// values by the signs alone (outputs come back by R^T with the same vector).
enum RotationPart : int { kRotateQueries = 0, kRotateKeys = 1, kRotateValues = 2 };

struct KVCacheRef {  // one layer's K and V
  void* k;  // [blocks, block_size, KV, D] (int4: D / 2 bytes per head row)
  void* v;
  void* k_scale;  // int8: float32 [blocks, block_size, KV]; int4: float16 [blocks, block_size, KV, D / 32]; else null
  void* v_scale;
  const float* signs;  // int4, turboquant: the rotation's vectors [3][KV][D] (RotationPart); else null
  const float* k_offset;  // int8, int4, turboquant: [KV, D] subtracted from each key before it is quantized (a vector every
                          // key of the layer loses alike: each query's scores move by one constant, the softmax
                          // stays); null: none
  const RowCodes* codes;  // turboquant: [2] the keys' and the values' codes; else null
  int type;  // KVType
  // Recent rows (CacheConfig.kv_cache_recent_blocks, KIVI's full-precision residual): a compressed cache may keep
  // the rows of blocks near a sequence's end also as float16, as the codes approximate them (rotated, keys minus
  // the offset), in recent_k / recent_v [twins, block_size, KV, D] at twin recent_of[block] (-1: none). A query at
  // position p reads the blocks of its aligned group of recent_blocks blocks, up to its own (blocks
  // p / block_size / recent_blocks * recent_blocks .. p / block_size), from there (as far back as every block up to
  // its own has a twin) and older keys from the codes: a function of the key's and the query's positions only, so
  // a verify or prefill row reads what a plain decode row at its position would, and a prefix hit that ends on a
  // group's boundary leaves no shared block in a window. Layers with a sliding window read only the codes (their
  // tables start at the window, not at position 0).
  void* recent_k = nullptr;
  void* recent_v = nullptr;
  const int32_t* recent_of = nullptr;
  int recent_blocks = 0;
  int block_size = 0;  // the write's slot -> block, for recent_of

  // The vector that turns part `part` of KV head `head`'s rows.
  const float* rotation(int part, int head, int KV, int D) const {
    return signs + (static_cast<int64_t>(part) * KV + head) * D;
  }
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
