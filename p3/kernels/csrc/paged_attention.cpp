// Paged decode attention for CPU: one query token per sequence attends to positions
// [0, context_len) of its sequence, reading K/V straight from the paged cache
// [num_blocks, block_size, num_kv_heads, head_dim] through the block table.
//
// A work item is one sequence and a range of its kv heads (all of them when there are
// enough sequences to keep the threads busy, else one), with every query head of those kv
// heads' groups, so each K/V row is read from memory once. Positions go in tiles of at
// most 16 tokens that never cross a block; softmax is online (running max and sum) in
// fp32. While a tile is computed, the next tile's rows are prefetched a few lines at a
// time: blocks are scattered, so the hardware prefetcher cannot guess them, and a burst
// of prefetches stalls the core as much as the misses it hides. Parallelism comes from
// at::parallel_for, i.e. torch's own thread pool.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>  // lighter than torch/extension.h: halves the build

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define P3_AVX512 1
#endif

namespace {

constexpr int kTile = 16;  // tokens per tile: one 512-bit vector of fp32 scores
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

// Where the cache rows of a work item's first kv head live.
template <typename T>
struct PagedRows {
  const T* base;         // cache data pointer already offset to the kv head
  int64_t block_stride;  // elements between blocks
  int64_t slot_stride;   // elements between tokens of one block

  const T* row(int64_t block, int offset) const {
    return base + block * block_stride + offset * slot_stride;
  }
};

// Prefetches the rows of the next tile (K first, then V), a few cache lines per step(),
// so the requests trickle out between the computations of the current tile.
class Prefetcher {
 public:
  void start(const void* k_rows, const void* v_rows, int64_t k_stride_bytes,
             int64_t v_stride_bytes, int64_t row_bytes, int rows, int steps) {
    base_[0] = static_cast<const char*>(k_rows);
    base_[1] = static_cast<const char*>(v_rows);
    stride_[0] = k_stride_bytes;
    stride_[1] = v_stride_bytes;
    row_bytes_ = row_bytes;
    rows_ = rows;
    const int64_t lines = 2 * rows * ((row_bytes + 63) / 64);
    per_step_ = static_cast<int>((lines + steps - 1) / steps);
    which_ = rows > 0 ? 0 : 2;
    row_ = 0;
    offset_ = 0;
  }

  void stop() { which_ = 2; }

  inline void step() {
    for (int i = 0; i < per_step_ && which_ < 2; ++i) {
      __builtin_prefetch(base_[which_] + row_ * stride_[which_] + offset_);
      offset_ += 64;
      if (offset_ >= row_bytes_) {
        offset_ = 0;
        if (++row_ == rows_) {
          row_ = 0;
          ++which_;
        }
      }
    }
  }

 private:
  const char* base_[2] = {nullptr, nullptr};
  int64_t stride_[2] = {0, 0};
  int64_t row_bytes_ = 0;
  int rows_ = 0;
  int per_step_ = 0;
  int which_ = 2;  // 0: K rows, 1: V rows, 2: done
  int row_ = 0;
  int64_t offset_ = 0;
};

// How many times one tile calls Prefetcher::step(): once per query head in tile_scores
// and tile_softmax, once per (16 dims, query head) in tile_values.
inline int prefetch_steps(int kv_count, int group, int head_dim) {
  return kv_count * group * (2 + (head_dim + 15) / 16);
}

#ifdef P3_AVX512

inline __mmask16 lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// exp for x <= 0 (Cephes polynomial, ~1 ulp); scalef does the 2^n and underflows to 0.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Lane i of the result is the sum of the 16 lanes of v[i] (a transposed reduction:
// 15 shuffle+add steps for 16 dot products instead of 16 full horizontal reductions).
inline __m512 reduce16x16(__m512* v) {
  // Each step halves the number of vectors and doubles the width already summed.
  __m512 a[8];
  for (int i = 0; i < 8; ++i) {
    __m512 lo = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    __m512 hi = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    a[i] = _mm512_add_ps(lo, hi);  // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
  }
  __m512 b[4];
  for (int i = 0; i < 4; ++i) {
    __m512 lo = _mm512_castpd_ps(
        _mm512_unpacklo_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1])));
    __m512 hi = _mm512_castpd_ps(
        _mm512_unpackhi_pd(_mm512_castps_pd(a[2 * i]), _mm512_castps_pd(a[2 * i + 1])));
    b[i] = _mm512_add_ps(lo, hi);  // per 128-bit lane: [x, y, z, w] partial sums
  }
  // Now b[i] holds, in each 128-bit lane L, the lane-L partial sums of 4 vectors
  // (4i .. 4i+3). Sum the four 128-bit lanes across vectors.
  __m512 c0 = _mm512_shuffle_f32x4(b[0], b[1], 0x88);  // lanes 0,2 of b0 | lanes 0,2 of b1
  __m512 c1 = _mm512_shuffle_f32x4(b[0], b[1], 0xDD);  // lanes 1,3 of b0 | lanes 1,3 of b1
  __m512 c2 = _mm512_shuffle_f32x4(b[2], b[3], 0x88);
  __m512 c3 = _mm512_shuffle_f32x4(b[2], b[3], 0xDD);
  __m512 d0 = _mm512_add_ps(c0, c1);  // [b0: L0+L1, L2+L3 | b1: L0+L1, L2+L3]
  __m512 d1 = _mm512_add_ps(c2, c3);
  __m512 e0 = _mm512_shuffle_f32x4(d0, d1, 0x88);  // [b0 L01, b1 L01, b2 L01, b3 L01]
  __m512 e1 = _mm512_shuffle_f32x4(d0, d1, 0xDD);  // [b0 L23, b1 L23, b2 L23, b3 L23]
  return _mm512_add_ps(e0, e1);
}

// s[g * kTile + t] = dot(q[g], row t) for the n rows of one tile. kFull: n == kTile, so
// the token loops unroll and the 16 accumulators stay in registers.
template <bool kFull, typename T>
inline void tile_scores(const T* q, const T* rows, int64_t row_stride, int n, int group,
                        int head_dim, float* s, Prefetcher& pf) {
  const int count = kFull ? kTile : n;
  for (int g = 0; g < group; ++g) {
    pf.step();
    const T* qg = q + g * head_dim;
    __m512 acc[kTile];
#pragma GCC unroll 16
    for (int t = 0; t < kTile; ++t) acc[t] = _mm512_setzero_ps();
    for (int d = 0; d < head_dim; d += 16) {
      __mmask16 m = lanes(std::min(16, head_dim - d));
      __m512 qv = load16(qg + d, m);
#pragma GCC unroll 16
      for (int t = 0; t < count; ++t) {
        acc[t] = _mm512_fmadd_ps(qv, load16(rows + t * row_stride + d, m), acc[t]);
      }
    }
    _mm512_storeu_ps(s + g * kTile, reduce16x16(acc));
  }
}

#ifdef __AVX512BF16__
// bf16 x bf16 dot products straight from the cache: vdpbf16ps multiplies 32 pairs exactly
// and accumulates in fp32, with no conversion of the K rows.
inline __mmask32 lanes32(int n) { return n >= 32 ? ~0u : (1u << n) - 1u; }

template <bool kFull>
inline void tile_scores(const at::BFloat16* q, const at::BFloat16* rows, int64_t row_stride,
                        int n, int group, int head_dim, float* s, Prefetcher& pf) {
  const int count = kFull ? kTile : n;
  for (int g = 0; g < group; ++g) {
    pf.step();
    const at::BFloat16* qg = q + g * head_dim;
    __m512 acc[kTile];
#pragma GCC unroll 16
    for (int t = 0; t < kTile; ++t) acc[t] = _mm512_setzero_ps();
    for (int d = 0; d < head_dim; d += 32) {
      __mmask32 m = lanes32(head_dim - d);
      __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(m, qg + d);
#pragma GCC unroll 16
      for (int t = 0; t < count; ++t) {
        __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(m, rows + t * row_stride + d);
        acc[t] = _mm512_dpbf16_ps(acc[t], qv, kv);
      }
    }
    _mm512_storeu_ps(s + g * kTile, reduce16x16(acc));
  }
}
#endif

// Online-softmax step: turn the tile's scores into probabilities in place, rescaling the
// running accumulator, max and sum of each head when the max grows.
inline void tile_softmax(float* s, int n, int group, int head_dim, float scale, float* m,
                         float* l, float* acc, Prefetcher& pf) {
  __mmask16 valid = lanes(n);
  for (int g = 0; g < group; ++g) {
    pf.step();
    __m512 sv = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, s + g * kTile), _mm512_set1_ps(scale));
    float tile_max = _mm512_mask_reduce_max_ps(valid, sv);
    if (tile_max > m[g]) {
      float alpha = std::exp(m[g] - tile_max);  // 0 on the first tile (m = -inf)
      l[g] *= alpha;
      float* a = acc + g * head_dim;
      for (int d = 0; d < head_dim; ++d) a[d] *= alpha;
      m[g] = tile_max;
    }
    __m512 p = _mm512_maskz_mov_ps(valid, exp16(_mm512_sub_ps(sv, _mm512_set1_ps(m[g]))));
    l[g] += _mm512_reduce_add_ps(p);
    _mm512_storeu_ps(s + g * kTile, p);
  }
}

// acc[g] += sum_t p[g][t] * row t. Four partial sums break the FMA dependency chain.
template <bool kFull, typename T>
inline void tile_values(const float* p, const T* rows, int64_t row_stride, int n, int group,
                        int head_dim, float* acc, Prefetcher& pf) {
  const int count = kFull ? kTile : n;
  for (int d = 0; d < head_dim; d += 16) {
    __mmask16 m = lanes(std::min(16, head_dim - d));
    __m512 v[kTile];
#pragma GCC unroll 16
    for (int t = 0; t < kTile; ++t) {
      v[t] = t < count ? load16(rows + t * row_stride + d, m) : _mm512_setzero_ps();
    }
    for (int g = 0; g < group; ++g) {
      pf.step();
      const float* pg = p + g * kTile;  // zero beyond n
      __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                        _mm512_setzero_ps()};
#pragma GCC unroll 16
      for (int t = 0; t < kTile; ++t) {
        part[t % 4] = _mm512_fmadd_ps(_mm512_set1_ps(pg[t]), v[t], part[t % 4]);
      }
      float* a = acc + g * head_dim + d;
      __m512 sum = _mm512_add_ps(_mm512_add_ps(part[0], part[1]), _mm512_add_ps(part[2], part[3]));
      _mm512_mask_storeu_ps(a, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, a), sum));
    }
  }
}

#else  // portable fallback: plain loops the compiler may vectorise

template <bool kFull, typename T>
inline void tile_scores(const T* q, const T* rows, int64_t row_stride, int n, int group,
                        int head_dim, float* s, Prefetcher& pf) {
  for (int g = 0; g < group; ++g) {
    pf.step();
    const T* qg = q + g * head_dim;
    for (int t = 0; t < n; ++t) {
      const T* r = rows + t * row_stride;
      float dot = 0.f;
      for (int d = 0; d < head_dim; ++d) dot += to_float(qg[d]) * to_float(r[d]);
      s[g * kTile + t] = dot;
    }
  }
}

inline void tile_softmax(float* s, int n, int group, int head_dim, float scale, float* m,
                         float* l, float* acc, Prefetcher& pf) {
  for (int g = 0; g < group; ++g) {
    pf.step();
    float* sg = s + g * kTile;
    for (int t = 0; t < n; ++t) sg[t] *= scale;
    float tile_max = *std::max_element(sg, sg + n);
    if (tile_max > m[g]) {
      float alpha = std::exp(m[g] - tile_max);
      l[g] *= alpha;
      float* a = acc + g * head_dim;
      for (int d = 0; d < head_dim; ++d) a[d] *= alpha;
      m[g] = tile_max;
    }
    for (int t = 0; t < n; ++t) {
      sg[t] = std::exp(sg[t] - m[g]);
      l[g] += sg[t];
    }
  }
}

template <bool kFull, typename T>
inline void tile_values(const float* p, const T* rows, int64_t row_stride, int n, int group,
                        int head_dim, float* acc, Prefetcher& pf) {
  for (int t = 0; t < n; ++t) {
    const T* r = rows + t * row_stride;
    for (int g = 0; g < group; ++g) {
      pf.step();
      float w = p[g * kTile + t];
      float* a = acc + g * head_dim;
      for (int d = 0; d < head_dim; ++d) a[d] += w * to_float(r[d]);
    }
  }
}

#endif

// Running state of every query head of one work item; allocated once per parallel chunk.
struct Scratch {
  std::vector<float> acc, s, m, l;
  Prefetcher prefetcher;
  Scratch(int heads, int head_dim)
      : acc(heads * head_dim), s(heads * kTile), m(heads), l(heads) {}
};

// One work item: sequence `context_len` tokens long, kv heads [0, kv_count) counted from
// k.base / v.base, and their `kv_count * group` query heads from q (rows of head_dim). Each
// tile of positions is visited once for all those kv heads, so the cache streams through
// once even when a slot holds several heads.
template <typename T>
void attend(const T* q, T* out, const PagedRows<T>& k, const PagedRows<T>& v,
            int64_t head_stride, int kv_count, const int32_t* block_table, int64_t num_blocks,
            int block_size, int context_len, int group, int head_dim, float scale, Scratch& w) {
  const int hd = head_dim;
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);

  // A tile: at most kTile consecutive positions inside one block.
  struct Tile {
    const T* k_rows;
    const T* v_rows;
    int n;
  };
  auto tile_at = [&](int pos) {
    const int64_t block = block_table[pos / block_size];
    TORCH_CHECK(block >= 0 && block < num_blocks, "paged_decode: block id ", block,
                " out of range [0, ", num_blocks, ")");
    const int offset = pos % block_size;
    return Tile{k.row(block, offset), v.row(block, offset),
                std::min({kTile, block_size - offset, context_len - pos})};
  };
  const int64_t span_bytes = ((kv_count - 1) * head_stride + hd) * sizeof(T);
  const int steps = prefetch_steps(kv_count, group, hd);
  Prefetcher& pf = w.prefetcher;
  Tile next = context_len > 0 ? tile_at(0) : Tile{nullptr, nullptr, 0};
  for (int pos = 0; pos < context_len;) {
    const Tile tile = next;
    pos += tile.n;
    if (pos < context_len) {
      next = tile_at(pos);
      pf.start(next.k_rows, next.v_rows, k.slot_stride * sizeof(T), v.slot_stride * sizeof(T),
               span_bytes, next.n, steps);
    } else {
      pf.stop();
    }
    for (int j = 0; j < kv_count; ++j) {
      const T* qj = q + j * group * hd;
      const T* k_rows = tile.k_rows + j * head_stride;
      const T* v_rows = tile.v_rows + j * head_stride;
      float* acc = w.acc.data() + j * group * hd;
      float* s = w.s.data() + j * group * kTile;
      if (tile.n == kTile) {
        tile_scores<true>(qj, k_rows, k.slot_stride, kTile, group, hd, s, pf);
      } else {
        tile_scores<false>(qj, k_rows, k.slot_stride, tile.n, group, hd, s, pf);
      }
      tile_softmax(s, tile.n, group, hd, scale, w.m.data() + j * group, w.l.data() + j * group,
                   acc, pf);
      if (tile.n == kTile) {
        tile_values<true>(s, v_rows, v.slot_stride, kTile, group, hd, acc, pf);
      } else {
        tile_values<false>(s, v_rows, v.slot_stride, tile.n, group, hd, acc, pf);
      }
    }
  }

  for (int h = 0; h < kv_count * group; ++h) {
    const float inv = w.l[h] > 0.f ? 1.f / w.l[h] : 0.f;  // context_len 0 -> zeros
    for (int d = 0; d < hd; ++d) out[h * hd + d] = static_cast<T>(w.acc[h * hd + d] * inv);
  }
}

template <typename T>
void paged_decode_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& block_tables, const at::Tensor& context_lens,
                       double scale, int64_t kv_heads_per_item, at::Tensor& out) {
  const int64_t batch = q.size(0);
  const int num_heads = q.size(1);
  const int head_dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0);
  const int block_size = k_cache.size(1);
  const int num_kv_heads = k_cache.size(2);
  const int group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  TORCH_CHECK(k_cache.stride(2) == v_cache.stride(2), "paged_decode: caches differ in layout");
  const int64_t head_stride = k_cache.stride(2);

  const T* q_ptr = q.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const T* k_ptr = k_cache.data_ptr<T>();
  const T* v_ptr = v_cache.data_ptr<T>();
  const int32_t* bt_ptr = block_tables.data_ptr<int32_t>();
  const int64_t bt_stride = block_tables.stride(0);
  const int32_t* ctx_ptr = context_lens.data_ptr<int32_t>();

  int64_t total_rows = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t ctx = ctx_ptr[b];
    TORCH_CHECK(ctx >= 0 && ctx <= max_blocks * block_size, "paged_decode: context_len ", ctx,
                " of sequence ", b, " does not fit its block table");
    total_rows += ctx;
  }
  // Work item: one sequence and all its kv heads, which streams each slot once; with too
  // few sequences to keep every thread busy, one sequence and one kv head instead.
  const int threads = at::get_num_threads();
  const int kv_per_item = kv_heads_per_item > 0 ? static_cast<int>(kv_heads_per_item)
                          : batch >= 2 * threads ? num_kv_heads
                                                 : 1;
  TORCH_CHECK(num_kv_heads % kv_per_item == 0, "paged_decode: kv_heads_per_item must divide ",
              num_kv_heads);
  const int items_per_seq = num_kv_heads / kv_per_item;
  const int64_t items = batch * items_per_seq;
  // Waking the other threads costs tens of microseconds: stay on one for tiny work.
  const int64_t rows_per_item = std::max<int64_t>(1, total_rows * kv_per_item /
                                                         std::max<int64_t>(1, batch));
  const int64_t grain = std::max<int64_t>(1, 4096 / rows_per_item);

  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    Scratch scratch(kv_per_item * group, head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / items_per_seq;
      const int kvh0 = (item % items_per_seq) * kv_per_item;
      const int64_t head0 = static_cast<int64_t>(kvh0) * group;
      PagedRows<T> k{k_ptr + kvh0 * head_stride, k_cache.stride(0), k_cache.stride(1)};
      PagedRows<T> v{v_ptr + kvh0 * head_stride, v_cache.stride(0), v_cache.stride(1)};
      attend<T>(q_ptr + b * q.stride(0) + head0 * q.stride(1),
                out_ptr + b * out.stride(0) + head0 * out.stride(1), k, v, head_stride,
                kv_per_item, bt_ptr + b * bt_stride, num_blocks, block_size, ctx_ptr[b], group,
                head_dim, static_cast<float>(scale), scratch);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        double scale, int64_t kv_heads_per_item) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode: expected q [B, H, hd] and caches [blocks, block_size, kvh, hd]");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() &&
                  q.scalar_type() == v_cache.scalar_type(),
              "paged_decode: q and caches must share a dtype");
  TORCH_CHECK(q.size(2) == k_cache.size(3), "paged_decode: head_dim mismatch");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "paged_decode: heads not a multiple of kv heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "paged_decode: block_tables and context_lens must be int32");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) &&
                  block_tables.stride(1) == 1,
              "paged_decode: block_tables must be [B, max_blocks] with unit column stride");
  TORCH_CHECK(context_lens.numel() == q.size(0) && context_lens.is_contiguous(),
              "paged_decode: context_lens must be a contiguous [B]");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "paged_decode: head_dim must be the innermost contiguous dim of the caches");
  // q's heads of one group must be adjacent rows of head_dim values.
  at::Tensor qc = (q.stride(2) == 1 && q.stride(1) == q.size(2)) ? q : q.contiguous();
  at::Tensor out = at::empty_like(qc, qc.options().memory_format(at::MemoryFormat::Contiguous));

  switch (q.scalar_type()) {
    case at::kFloat:
      paged_decode_impl<float>(qc, k_cache, v_cache, block_tables, context_lens, scale,
                              kv_heads_per_item, out);
      break;
    case at::kBFloat16:
      paged_decode_impl<at::BFloat16>(qc, k_cache, v_cache, block_tables, context_lens, scale,
                                      kv_heads_per_item, out);
      break;
    default:
      TORCH_CHECK(false, "paged_decode: float32 and bfloat16 only, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

void register_fused(pybind11::module_& m);  // fused.cpp
void register_quant(pybind11::module_& m);  // quant.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "Paged decode attention (CPU)", pybind11::arg("q"),
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("block_tables"),
        pybind11::arg("context_lens"), pybind11::arg("scale"),
        pybind11::arg("kv_heads_per_item") = 0);
  m.def("has_avx512", []() {
#ifdef P3_AVX512
    return true;
#else
    return false;
#endif
  });
  register_fused(m);
  register_quant(m);
}
