// The whole decoder stack of a Llama-family (or Gemma 3) model for a step's token rows (decode tokens, and the rows of verify
// and prefill chunks, each attending to its own prefix), in one call and one OpenMP parallel region: per layer
// RMSNorm -> fused QKV (+bias) -> RoPE -> KV write -> paged attention -> o_proj (+residual) -> RMSNorm ->
// gate/up -> SiLU-and-mul -> down (+residual), with barriers between the stages instead of a Python call, a
// tensor allocation and a thread-team start per op. At batch 1 those per-op costs, not the weights, dominated
// the step (about 300 ops of 5-50 us each).
// Weights are tokenmill's packed int4/int8 matrices (a projection may come in parts of different formats);
// activations float32, quantized to int8 per 32 values for the integer dot products.
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "paged_attention.h"
#include "quant_linear.h"
#include "row_ops.h"

namespace {

constexpr int kMaxParts = 3;

struct Linear {  // output columns: the parts' rows, concatenated
  tm::QMatrix parts[kMaxParts];
  int num_parts;
  const float* bias;  // [N] or null
};

struct Layer {
  const float* input_norm;
  const float* post_attention_norm;
  Linear qkv, o, gate_up, down;
  void* k_cache;  // [blocks, block_size, KV, D] of this layer, of type Dims::kv_type (tm::KVType)
  void* v_cache;
  void* k_scale;  // compressed caches: their scales (tm::KVCacheRef); else null
  void* v_scale;
  const float* signs;  // int4, turboquant: the layer's rotation vectors [3][KV][D] (tm::KVCacheRef); else null
  const float* k_offset;  // compressed: [KV, D] taken off each key before it is quantized (tm::KVCacheRef); or null
  const tm::RowCodes* codes;  // turboquant: the keys' and values' codes; else null
  void* recent_k;  // compressed caches' recent rows (tm::KVCacheRef): float16 twins of this layer, or null
  void* recent_v;
  const float* cos;  // [positions, D] this layer's RoPE tables
  const float* sin;
  int group;   // its KV group (cache/kv_layout.py): which block tables it reads
  int window;  // sliding window, 0 = none
  // Gemma 3 (null elsewhere): RMSNorm over each q and k head before RoPE, and "sandwich" norms of the attention
  // and MLP outputs before they join the residual stream (post_attention_norm is then its pre-MLP norm).
  const float* q_norm;
  const float* k_norm;
  const float* attn_out_norm;
  const float* mlp_out_norm;
};

struct Group {  // one KV group's view of the step
  const int64_t* block_tables;  // [M, max_blocks]
  int max_blocks;
  const int64_t* seq_lens;  // [M] keys up to the new token, counted from the table's first block
  const int64_t* slots;     // [M] cache slot of the new token
};

struct Dims {
  int hidden, heads, kv_heads, head_dim, intermediate, block_size;
  float eps, scale;
  int kv_type;  // tm::KVType
  const int32_t* recent_of;  // each block's twin of recent rows, -1 none (tm::KVCacheRef); null: no recent rows
  int recent_blocks;
  int gelu;  // the MLP's gate activation: 0 SiLU (SwiGLU), 1 tanh-approximated GELU (GeGLU)
};

// out[m * ldo + col] (+)= x_m . W_col + bias[col] over all parts (inside the parallel region).
void linear(const Linear& lin, const tm::QActivations& a, int M, float* out, int64_t ldo, bool accumulate) {
  int col = 0;
  for (int p = 0; p < lin.num_parts; ++p) {
    tm::qmatmul(lin.parts[p], a, M, out + col, ldo, lin.bias ? lin.bias + col : nullptr, accumulate);
    col += lin.parts[p].N;
  }
}

// Runs of rows that attend to the same block table from consecutive positions (the rows of a verify or prefill
// chunk) as (first row, count) pairs: attention reads each key of a run once for all its rows.
std::vector<std::pair<int, int>> table_runs(const Group& g, int M, int block_size) {
  std::vector<std::pair<int, int>> runs;
  for (int m = 0; m < M;) {
    const int64_t* table = g.block_tables + static_cast<int64_t>(m) * g.max_blocks;
    int r = 1;
    for (; m + r < M && g.seq_lens[m + r] == g.seq_lens[m + r - 1] + 1; ++r) {
      const int64_t* next = g.block_tables + static_cast<int64_t>(m + r) * g.max_blocks;
      if (!std::equal(table, table + (g.seq_lens[m + r] - 1) / block_size + 1, next)) break;
    }
    runs.emplace_back(m, r);
    m += r;
  }
  return runs;
}

// x += rms_norm(y) * w, row by row (inside the parallel region): a sublayer's output joins the residual stream
// through its own norm; y is overwritten.
void add_normed(float* x, float* y, const float* w, float eps, int M, int H) {
#pragma omp for schedule(static)
  for (int m = 0; m < M; ++m) {
    float* row = y + static_cast<int64_t>(m) * H;
    float* out = x + static_cast<int64_t>(m) * H;
    tm::rms_norm_row(row, w, eps, H, row);
    for (int i = 0; i < H; ++i) out[i] += row[i];
  }
}

template <typename T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace

extern "C" {

// x: [M, hidden] residual stream in and out; positions: [M]; groups: one per KV group.
void tm_decode_layers(const Layer* layers, int num_layers, const Group* groups, const Dims* dims, int M,
                      const int64_t* positions, float* x) {
  const Dims& d = *dims;
  const int H = d.hidden, D = d.head_dim, G = d.heads / d.kv_heads, I = d.intermediate;
  const int q_width = d.heads * D, kv_width = d.kv_heads * D, qkv_width = q_width + 2 * kv_width;
  const int k_max = std::max({H, q_width, I});
  thread_local std::vector<float> h_buf, qkv_buf, attn_buf, gu_buf, act_buf;
  float* h = grow(h_buf, static_cast<size_t>(M) * H);
  float* qkv = grow(qkv_buf, static_cast<size_t>(M) * qkv_width);
  float* attn = grow(attn_buf, static_cast<size_t>(M) * q_width);
  float* gu = grow(gu_buf, static_cast<size_t>(M) * 2 * I);
  float* act = grow(act_buf, static_cast<size_t>(M) * I);
  const tm::QActivations qa = tm::activation_buffers(M, k_max);
  int num_groups = 0;
  for (int l = 0; l < num_layers; ++l) num_groups = std::max(num_groups, layers[l].group + 1);
  std::vector<std::vector<std::pair<int, int>>> runs;
  for (int g = 0; g < num_groups; ++g) runs.push_back(table_runs(groups[g], M, d.block_size));
  constexpr int kChunk = 64;  // gated-activation work unit, so one row still spreads over the threads
  const int chunks = (I + kChunk - 1) / kChunk;
#pragma omp parallel
  for (int l = 0; l < num_layers; ++l) {
    const Layer& ly = layers[l];
    const Group& grp = groups[ly.group];
    const tm::KVCacheRef cache{ly.k_cache, ly.v_cache, ly.k_scale, ly.v_scale, ly.signs, ly.k_offset, ly.codes,
                               d.kv_type, ly.recent_k, ly.recent_v, d.recent_of, d.recent_blocks, d.block_size};
#pragma omp for schedule(static)
    for (int m = 0; m < M; ++m) tm::rms_norm_row(x + static_cast<int64_t>(m) * H, ly.input_norm, d.eps, H, h + static_cast<int64_t>(m) * H);
    tm::quantize_rows(h, H, M, H, qa);
    linear(ly.qkv, qa, M, qkv, qkv_width, false);
#pragma omp for schedule(static)
    for (int m = 0; m < M; ++m) {  // RoPE on q and k, then store k and v in the cache
      float* row = qkv + static_cast<int64_t>(m) * qkv_width;
      const float* c = ly.cos + positions[m] * D;
      const float* s = ly.sin + positions[m] * D;
      if (ly.q_norm)
        for (int head = 0; head < d.heads + d.kv_heads; ++head)
          tm::rms_norm_row(row + head * D, head < d.heads ? ly.q_norm : ly.k_norm, d.eps, D, row + head * D);
      for (int head = 0; head < d.heads + d.kv_heads; ++head) tm::rotate_half_row(row + head * D, c, s, D);
      tm::write_kv_row(row + q_width, row + q_width + kv_width, grp.slots[m], d.kv_heads, D, cache);
    }
    const tm::PagedKV kv{cache, grp.block_tables, grp.max_blocks, grp.seq_lens, d.kv_heads, D, d.block_size,
                         ly.window};
    // One task per (run of rows, KV head) reads each key once for its query heads; with fewer tasks than
    // threads can balance (batch 1: 3 KV heads on 2 threads), one task per query head instead.
    const std::vector<std::pair<int, int>>& layer_runs = runs[ly.group];
    const int num_runs = static_cast<int>(layer_runs.size());
    const int per_task = num_runs * d.kv_heads >= 4 * omp_get_num_threads() ? G : 1;
    const int tasks_per_run = d.heads / per_task;
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int i = 0; i < num_runs; ++i)
      for (int t = 0; t < tasks_per_run; ++t) {
        const auto [m, rows] = layer_runs[i];
        const int head = t * per_task;
        tm::decode_attention_task(kv, m, rows, head / G, per_task, qkv + static_cast<int64_t>(m) * qkv_width + head * D,
                                  qkv_width, d.scale, attn + static_cast<int64_t>(m) * q_width + head * D, q_width);
      }
    tm::quantize_rows(attn, q_width, M, q_width, qa);
    if (ly.attn_out_norm) {
      linear(ly.o, qa, M, h, H, false);
      add_normed(x, h, ly.attn_out_norm, d.eps, M, H);
    } else {
      linear(ly.o, qa, M, x, H, true);
    }
#pragma omp for schedule(static)
    for (int m = 0; m < M; ++m)
      tm::rms_norm_row(x + static_cast<int64_t>(m) * H, ly.post_attention_norm, d.eps, H, h + static_cast<int64_t>(m) * H);
    tm::quantize_rows(h, H, M, H, qa);
    linear(ly.gate_up, qa, M, gu, 2 * I, false);
#pragma omp for schedule(static) collapse(2)
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < chunks; ++c) {
        const int64_t row = static_cast<int64_t>(m) * 2 * I, i0 = c * kChunk;
        const int n = std::min(kChunk, I - static_cast<int>(i0));
        tm::act_and_mul_row(gu + row + i0, gu + row + I + i0, n, d.gelu, act + static_cast<int64_t>(m) * I + i0);
      }
    tm::quantize_rows(act, I, M, I, qa);
    if (ly.mlp_out_norm) {
      linear(ly.down, qa, M, h, H, false);
      add_normed(x, h, ly.mlp_out_norm, d.eps, M, H);
    } else {
      linear(ly.down, qa, M, x, H, true);
    }
  }
}

}  // extern "C"
