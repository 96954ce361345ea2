// Paged decode attention for CPU: one query token per sequence attends to positions
// [0, context_len) of its sequence, reading K/V straight from the paged cache
// [num_blocks, block_size, num_kv_heads, head_dim] through the block table.
//
// The cache holds q's dtype (float32 or bfloat16) or int8. An int8 cache comes with one fp32
// scale per token and kv head, [num_blocks, block_size, num_kv_heads], and is dequantized
// inside the dot products: a row's int8 values are widened to fp32 as they are loaded,
// q.k = scale_k * sum(q_i k_i), and each probability is multiplied by its row's v scale
// before it weighs the row's int8 values. Nothing else differs between the dtypes.
//
// A work item is one sequence and a range of its kv heads (all of them when there are
// enough sequences to keep the threads busy, else one), with every query head of those kv
// heads' groups, so each K/V row is read from memory once. Positions go in tiles of at
// most 16 tokens that never cross a block; softmax is online (running max and sum) in
// fp32. While a tile is computed, the next tile's rows are prefetched a few lines at a
// time: blocks are scattered, so the hardware prefetcher cannot guess them, and a burst
// of prefetches stalls the core as much as the misses it hides. Parallelism comes from
// at::parallel_for, i.e. torch's own thread pool.
//
// Three implementations of a tile's arithmetic, picked per call (pick_isa): AVX-512 when
// the build has it (-march=native on an AVX-512 machine), else AVX2 + FMA when the CPU has
// them (compiled with a target attribute, so any x86-64 build carries it; for int8 caches,
// and for the others when asked), else portable loops. `isa` caps the choice (P3_CPU_ISA,
// or "portable" on an AVX2 machine for testing).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>  // lighter than torch/extension.h: halves the build

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define P3_X86 1
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define P3_AVX512 1
#endif

namespace {

constexpr int kTile = 16;  // tokens per tile: one 512-bit vector of fp32 scores
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }

// Where the cache rows of a work item's first kv head live.
template <typename C>
struct PagedRows {
  const C* base;         // cache data pointer already offset to the kv head
  int64_t block_stride;  // elements between blocks
  int64_t slot_stride;   // elements between tokens of one block

  const C* row(int64_t block, int offset) const {
    return base + block * block_stride + offset * slot_stride;
  }
};

// Where an int8 cache's scales for a work item's first kv head live (base null: not int8).
struct PagedScales {
  const float* base;
  int64_t block_stride;
  int64_t slot_stride;

  const float* at(int64_t block, int offset) const {
    return base == nullptr ? nullptr : base + block * block_stride + offset * slot_stride;
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

// How many times one tile calls Prefetcher::step(): once per query head in scores and
// softmax, once per (16 dims, query head) in values.
inline int prefetch_steps(int kv_count, int group, int head_dim) {
  return kv_count * group * (2 + (head_dim + 15) / 16);
}

// Each implementation below has, for T the dtype of q and C that of the cache rows:
//   scores<kFull>(q, rows, row_stride, n, group, hd, s, pf):
//       s[g * kTile + t] = dot(q[g], row t) for the n rows of one tile (kFull: n == kTile);
//   softmax(s, n, group, hd, w, m, l, acc, pf): online-softmax step over the scores times
//       w[t] (the attention scale, times the row's k scale for int8): probabilities in place,
//       zero beyond n, the running accumulator, max and sum of each head rescaled as the max
//       grows;
//   values<kFull>(p, rows, row_stride, n, group, hd, acc, pf): acc[g] += sum_t p[g][t] row t.

// -- portable: plain loops the compiler may vectorise ------------------------------------------

struct Portable {
  template <bool kFull, typename T, typename C>
  static void scores(const T* q, const C* rows, int64_t row_stride, int n, int group,
                     int head_dim, float* s, Prefetcher& pf) {
    for (int g = 0; g < group; ++g) {
      pf.step();
      const T* qg = q + g * head_dim;
      for (int t = 0; t < n; ++t) {
        const C* r = rows + t * row_stride;
        float dot = 0.f;
        for (int d = 0; d < head_dim; ++d) dot += to_float(qg[d]) * to_float(r[d]);
        s[g * kTile + t] = dot;
      }
    }
  }

  static void softmax(float* s, int n, int group, int head_dim, const float* w, float* m,
                      float* l, float* acc, Prefetcher& pf) {
    for (int g = 0; g < group; ++g) {
      pf.step();
      float* sg = s + g * kTile;
      for (int t = 0; t < n; ++t) sg[t] *= w[t];
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

  template <bool kFull, typename C>
  static void values(const float* p, const C* rows, int64_t row_stride, int n, int group,
                     int head_dim, float* acc, Prefetcher& pf) {
    for (int t = 0; t < n; ++t) {
      const C* r = rows + t * row_stride;
      for (int g = 0; g < group; ++g) {
        pf.step();
        float w = p[g * kTile + t];
        float* a = acc + g * head_dim;
        for (int d = 0; d < head_dim; ++d) a[d] += w * to_float(r[d]);
      }
    }
  }
};

// -- AVX2 + FMA: 8 fp32 lanes, any x86-64 build (a target attribute), picked at run time ----

#ifdef P3_X86
#define P3_AVX2 __attribute__((target("avx2,fma")))

namespace avx2 {

P3_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

P3_AVX2 inline __m256 load8(const at::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

P3_AVX2 inline __m256 load8(const int8_t* p) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

// Lane i of the result is the sum of the 8 lanes of v[i].
P3_AVX2 inline __m256 reduce8x8(const __m256* v) {
  const __m256 a0 = _mm256_hadd_ps(v[0], v[1]), a1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 a2 = _mm256_hadd_ps(v[4], v[5]), a3 = _mm256_hadd_ps(v[6], v[7]);
  // per 128-bit half: [v0, v1, v2, v3] (b0) and [v4 .. v7] (b1) partial sums
  const __m256 b0 = _mm256_hadd_ps(a0, a1), b1 = _mm256_hadd_ps(a2, a3);
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20),
                       _mm256_permute2f128_ps(b0, b1, 0x31));
}

P3_AVX2 inline float hmax8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

P3_AVX2 inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

// exp for x <= 0 (Cephes polynomial, ~1 ulp); below -87 it gives exp(-87), not 0, which
// callers mask where it matters (lanes past the tile).
P3_AVX2 inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Lanes [base, base + 8) of a tile that hold one of its n tokens: all ones, else zero.
P3_AVX2 inline __m256 valid8(int n, int base) {
  const __m256i index = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                         _mm256_set1_epi32(base));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), index));
}

// Eight rows at a time (8 accumulators, q and a row in registers: 10 of the 16).
template <bool kFull, typename T, typename C>
P3_AVX2 void scores(const T* q, const C* rows, int64_t row_stride, int n, int group,
                    int head_dim, float* s, Prefetcher& pf) {
  for (int g = 0; g < group; ++g) {
    pf.step();
    const T* qg = q + g * head_dim;
    for (int h = 0; h < (kFull ? kTile : n); h += 8) {
      const int count = kFull ? 8 : std::min(8, n - h);
      const C* r = rows + h * row_stride;
      __m256 acc[8];
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) acc[t] = _mm256_setzero_ps();
      for (int d = 0; d < head_dim; d += 8) {
        const __m256 qv = load8(qg + d);
#pragma GCC unroll 8
        for (int t = 0; t < 8; ++t) {
          if (kFull || t < count) acc[t] = _mm256_fmadd_ps(qv, load8(r + t * row_stride + d), acc[t]);
        }
      }
      _mm256_storeu_ps(s + g * kTile + h, reduce8x8(acc));
    }
  }
}

P3_AVX2 void softmax(float* s, int n, int group, int head_dim, const float* w, float* m,
                     float* l, float* acc, Prefetcher& pf) {
  const __m256 valid_lo = valid8(n, 0), valid_hi = valid8(n, 8);
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  const __m256 w_lo = _mm256_loadu_ps(w), w_hi = _mm256_loadu_ps(w + 8);
  for (int g = 0; g < group; ++g) {
    pf.step();
    float* sg = s + g * kTile;
    // lanes past n may hold anything (scores writes only whole groups of 8): -inf there
    const __m256 lo = _mm256_blendv_ps(neg_inf, _mm256_mul_ps(_mm256_loadu_ps(sg), w_lo), valid_lo);
    const __m256 hi = _mm256_blendv_ps(neg_inf, _mm256_mul_ps(_mm256_loadu_ps(sg + 8), w_hi), valid_hi);
    const float tile_max = hmax8(_mm256_max_ps(lo, hi));
    if (tile_max > m[g]) {
      const __m256 alpha = _mm256_set1_ps(std::exp(m[g] - tile_max));  // 0 on the first tile
      l[g] *= std::exp(m[g] - tile_max);
      float* a = acc + g * head_dim;
      for (int d = 0; d < head_dim; d += 8) _mm256_storeu_ps(a + d, _mm256_mul_ps(_mm256_loadu_ps(a + d), alpha));
      m[g] = tile_max;
    }
    const __m256 mv = _mm256_set1_ps(m[g]);
    const __m256 p_lo = _mm256_and_ps(exp8(_mm256_sub_ps(lo, mv)), valid_lo);
    const __m256 p_hi = _mm256_and_ps(exp8(_mm256_sub_ps(hi, mv)), valid_hi);
    l[g] += hsum8(_mm256_add_ps(p_lo, p_hi));
    _mm256_storeu_ps(sg, p_lo);
    _mm256_storeu_ps(sg + 8, p_hi);
  }
}

// Per 8 dims: 8 rows widened to fp32 once, then every query head's weighted sum of them, so
// an int8 or bf16 row is converted once however large the group.
template <bool kFull, typename C>
P3_AVX2 void values(const float* p, const C* rows, int64_t row_stride, int n, int group,
                    int head_dim, float* acc, Prefetcher& pf) {
  for (int d = 0; d < head_dim; d += 8) {
    for (int h = 0; h < (kFull ? kTile : n); h += 8) {
      const int count = kFull ? 8 : std::min(8, n - h);
      __m256 v[8];
#pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        v[t] = kFull || t < count ? load8(rows + (h + t) * row_stride + d) : _mm256_setzero_ps();
      }
      for (int g = 0; g < group; ++g) {
        if (h == 0 && d % 16 == 0) pf.step();
        const float* pg = p + g * kTile + h;  // zero beyond n
        __m256 part0 = _mm256_mul_ps(_mm256_set1_ps(pg[0]), v[0]);
        __m256 part1 = _mm256_mul_ps(_mm256_set1_ps(pg[1]), v[1]);
#pragma GCC unroll 8
        for (int t = 2; t < 8; t += 2) {
          part0 = _mm256_fmadd_ps(_mm256_set1_ps(pg[t]), v[t], part0);
          part1 = _mm256_fmadd_ps(_mm256_set1_ps(pg[t + 1]), v[t + 1], part1);
        }
        float* a = acc + g * head_dim + d;
        _mm256_storeu_ps(a, _mm256_add_ps(_mm256_loadu_ps(a), _mm256_add_ps(part0, part1)));
      }
    }
  }
}

// rows [n, head_dim] of the tile widened to fp32 into out (n * head_dim floats).
template <typename C>
P3_AVX2 void widen_rows(const C* rows, int64_t row_stride, int n, int head_dim, float* out) {
  for (int t = 0; t < n; ++t) {
    for (int d = 0; d < head_dim; d += 8) {
      _mm256_storeu_ps(out + t * head_dim + d, load8(rows + t * row_stride + d));
    }
  }
}

}  // namespace avx2

struct Avx2 {
  // With several query heads per kv head, an int8 or bf16 tile is widened to fp32 once,
  // not once per head (measured here: an int8 decode with 3 query heads per kv head ~25%
  // faster; with one, widening first is slower, so it is skipped).
  template <bool kFull, typename T, typename C>
  static void scores(const T* q, const C* rows, int64_t row_stride, int n, int group,
                     int head_dim, float* s, Prefetcher& pf) {
    if constexpr (!std::is_same_v<C, float>) {
      if (group > 1) {
        thread_local std::vector<float> wide;
        wide.resize(static_cast<size_t>(kTile) * head_dim);
        avx2::widen_rows(rows, row_stride, kFull ? kTile : n, head_dim, wide.data());
        avx2::scores<kFull>(q, static_cast<const float*>(wide.data()), head_dim, n, group,
                            head_dim, s, pf);
        return;
      }
    }
    avx2::scores<kFull>(q, rows, row_stride, n, group, head_dim, s, pf);
  }
  static void softmax(float* s, int n, int group, int head_dim, const float* w, float* m,
                      float* l, float* acc, Prefetcher& pf) {
    avx2::softmax(s, n, group, head_dim, w, m, l, acc, pf);
  }
  template <bool kFull, typename C>
  static void values(const float* p, const C* rows, int64_t row_stride, int n, int group,
                     int head_dim, float* acc, Prefetcher& pf) {
    avx2::values<kFull>(p, rows, row_stride, n, group, head_dim, acc, pf);
  }
};

// The CPU runs AVX2 + FMA code (checked once).
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif  // P3_X86

// -- AVX-512: 16 fp32 lanes, when the build targets it ----------------------------------------

#ifdef P3_AVX512
namespace avx512 {

inline __mmask16 lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }

inline __m512 load16(const at::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __m512 load16(const int8_t* p, __mmask16 m) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
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

// The token loops unroll for kFull and the 16 accumulators stay in registers.
template <bool kFull, typename T, typename C>
inline void tile_scores(const T* q, const C* rows, int64_t row_stride, int n, int group,
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

inline void tile_softmax(float* s, int n, int group, int head_dim, const float* w, float* m,
                         float* l, float* acc, Prefetcher& pf) {
  __mmask16 valid = lanes(n);
  const __m512 wv = _mm512_maskz_loadu_ps(valid, w);
  for (int g = 0; g < group; ++g) {
    pf.step();
    __m512 sv = _mm512_mul_ps(_mm512_maskz_loadu_ps(valid, s + g * kTile), wv);
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

// Four partial sums break the FMA dependency chain.
template <bool kFull, typename C>
inline void tile_values(const float* p, const C* rows, int64_t row_stride, int n, int group,
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

}  // namespace avx512

struct Avx512 {
  template <bool kFull, typename T, typename C>
  static void scores(const T* q, const C* rows, int64_t row_stride, int n, int group,
                     int head_dim, float* s, Prefetcher& pf) {
    avx512::tile_scores<kFull>(q, rows, row_stride, n, group, head_dim, s, pf);
  }
  static void softmax(float* s, int n, int group, int head_dim, const float* w, float* m,
                      float* l, float* acc, Prefetcher& pf) {
    avx512::tile_softmax(s, n, group, head_dim, w, m, l, acc, pf);
  }
  template <bool kFull, typename C>
  static void values(const float* p, const C* rows, int64_t row_stride, int n, int group,
                     int head_dim, float* acc, Prefetcher& pf) {
    avx512::tile_values<kFull>(p, rows, row_stride, n, group, head_dim, acc, pf);
  }
};
#endif  // P3_AVX512

// -- one work item, whatever the ISA -----------------------------------------------------------

// Running state of every query head of one work item; allocated once per parallel chunk.
struct Scratch {
  std::vector<float> acc, s, m, l, w, ones;
  Prefetcher prefetcher;
  Scratch(int heads, int head_dim)
      : acc(heads * head_dim), s(heads * kTile), m(heads), l(heads), w(kTile), ones(kTile, 1.f) {}
};

// One work item: sequence `context_len` tokens long, of which it attends to the last `window`
// (0: all; a sliding window), scores soft-capped to (-softcap, softcap) by tanh when softcap
// > 0 (Gemma 2); kv heads [0, kv_count) counted from
// k.base / v.base (and ks.base / vs.base for an int8 cache), and their `kv_count * group`
// query heads from q (rows of head_dim). Each tile of positions is visited once for all
// those kv heads, so the cache streams through once even when a slot holds several heads.
template <typename Isa, typename T, typename C>
void attend(const T* q, T* out, const PagedRows<C>& k, const PagedRows<C>& v,
            const PagedScales& ks, const PagedScales& vs, int64_t head_stride, int kv_count,
            const int32_t* block_table, int64_t num_blocks, int block_size, int context_len,
            int group, int head_dim, float scale, int window, float softcap, Scratch& w) {
  const int hd = head_dim;
  const bool quantized = ks.base != nullptr;
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  std::fill(w.m.begin(), w.m.end(), kNegInf);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  std::fill(w.w.begin(), w.w.end(), scale);  // the score multipliers, per token for int8
  float* mult = w.w.data();

  // A tile: at most kTile consecutive positions inside one block.
  struct Tile {
    const C* k_rows;
    const C* v_rows;
    const float* k_scales;  // null unless int8
    const float* v_scales;
    int n;
  };
  auto tile_at = [&](int pos) {
    const int64_t block = block_table[pos / block_size];
    TORCH_CHECK(block >= 0 && block < num_blocks, "paged_decode: block id ", block,
                " out of range [0, ", num_blocks, ")");
    const int offset = pos % block_size;
    return Tile{k.row(block, offset), v.row(block, offset), ks.at(block, offset),
                vs.at(block, offset), std::min({kTile, block_size - offset, context_len - pos})};
  };
  const int64_t span_bytes = ((kv_count - 1) * head_stride + hd) * sizeof(C);
  const int steps = prefetch_steps(kv_count, group, hd);
  Prefetcher& pf = w.prefetcher;
  const int first = window > 0 ? std::max(0, context_len - window) : 0;
  Tile next = context_len > 0 ? tile_at(first) : Tile{nullptr, nullptr, nullptr, nullptr, 0};
  for (int pos = first; pos < context_len;) {
    const Tile tile = next;
    pos += tile.n;
    if (pos < context_len) {
      next = tile_at(pos);
      pf.start(next.k_rows, next.v_rows, k.slot_stride * sizeof(C), v.slot_stride * sizeof(C),
               span_bytes, next.n, steps);
      if (quantized) {  // a tile's scales span a line or two of each scale tensor
        __builtin_prefetch(next.k_scales);
        __builtin_prefetch(next.k_scales + (next.n - 1) * ks.slot_stride + kv_count - 1);
        __builtin_prefetch(next.v_scales);
        __builtin_prefetch(next.v_scales + (next.n - 1) * vs.slot_stride + kv_count - 1);
      }
    } else {
      pf.stop();
    }
    for (int j = 0; j < kv_count; ++j) {
      const T* qj = q + j * group * hd;
      const C* k_rows = tile.k_rows + j * head_stride;
      const C* v_rows = tile.v_rows + j * head_stride;
      float* acc = w.acc.data() + j * group * hd;
      float* s = w.s.data() + j * group * kTile;
      if (tile.n == kTile) {
        Isa::template scores<true>(qj, k_rows, k.slot_stride, kTile, group, hd, s, pf);
      } else {
        Isa::template scores<false>(qj, k_rows, k.slot_stride, tile.n, group, hd, s, pf);
      }
      if (quantized) {  // q.k = scale_k * sum(q_i k_i)
        for (int t = 0; t < tile.n; ++t) mult[t] = scale * tile.k_scales[t * ks.slot_stride + j];
      }
      const float* tile_mult = mult;
      if (softcap > 0.f) {  // cap * tanh(score / cap), the scores scaled first
        for (int g = 0; g < group; ++g) {
          for (int t = 0; t < tile.n; ++t) {
            float& x = s[g * kTile + t];
            x = softcap * std::tanh(x * mult[t] / softcap);
          }
        }
        tile_mult = w.ones.data();
      }
      Isa::softmax(s, tile.n, group, hd, tile_mult, w.m.data() + j * group,
                   w.l.data() + j * group, acc, pf);
      if (quantized) {  // each probability weighs its row's int8 values times the row's scale
        for (int g = 0; g < group; ++g) {
          for (int t = 0; t < tile.n; ++t) s[g * kTile + t] *= tile.v_scales[t * vs.slot_stride + j];
        }
      }
      if (tile.n == kTile) {
        Isa::template values<true>(s, v_rows, v.slot_stride, kTile, group, hd, acc, pf);
      } else {
        Isa::template values<false>(s, v_rows, v.slot_stride, tile.n, group, hd, acc, pf);
      }
    }
  }

  for (int h = 0; h < kv_count * group; ++h) {
    const float inv = w.l[h] > 0.f ? 1.f / w.l[h] : 0.f;  // context_len 0 -> zeros
    for (int d = 0; d < hd; ++d) out[h * hd + d] = static_cast<T>(w.acc[h * hd + d] * inv);
  }
}

struct DecodeArgs {
  const at::Tensor& q;
  const at::Tensor& k_cache;
  const at::Tensor& v_cache;
  const at::Tensor& block_tables;
  const at::Tensor& context_lens;
  double scale;
  int64_t window;
  double softcap;
  int64_t kv_heads_per_item;
  const std::optional<at::Tensor>& k_scale;
  const std::optional<at::Tensor>& v_scale;
  at::Tensor& out;
};

template <typename Isa, typename T, typename C>
void paged_decode_impl(const DecodeArgs& a) {
  const at::Tensor &q = a.q, &k_cache = a.k_cache, &v_cache = a.v_cache;
  const at::Tensor& block_tables = a.block_tables;
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
  T* out_ptr = a.out.data_ptr<T>();
  const C* k_ptr = static_cast<const C*>(k_cache.data_ptr());
  const C* v_ptr = static_cast<const C*>(v_cache.data_ptr());
  const float* ks_ptr = a.k_scale ? a.k_scale->data_ptr<float>() : nullptr;
  const float* vs_ptr = a.v_scale ? a.v_scale->data_ptr<float>() : nullptr;
  const int32_t* bt_ptr = block_tables.data_ptr<int32_t>();
  const int64_t bt_stride = block_tables.stride(0);
  const int32_t* ctx_ptr = a.context_lens.data_ptr<int32_t>();

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
  const int kv_per_item = a.kv_heads_per_item > 0 ? static_cast<int>(a.kv_heads_per_item)
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
      PagedRows<C> k{k_ptr + kvh0 * head_stride, k_cache.stride(0), k_cache.stride(1)};
      PagedRows<C> v{v_ptr + kvh0 * head_stride, v_cache.stride(0), v_cache.stride(1)};
      PagedScales ks{nullptr, 0, 0}, vs{nullptr, 0, 0};
      if (ks_ptr != nullptr) {
        ks = {ks_ptr + kvh0, a.k_scale->stride(0), a.k_scale->stride(1)};
        vs = {vs_ptr + kvh0, a.v_scale->stride(0), a.v_scale->stride(1)};
      }
      attend<Isa, T, C>(q_ptr + b * q.stride(0) + head0 * q.stride(1),
                        out_ptr + b * a.out.stride(0) + head0 * a.out.stride(1), k, v, ks, vs,
                        head_stride, kv_per_item, bt_ptr + b * bt_stride, num_blocks,
                        block_size, ctx_ptr[b], group, head_dim, static_cast<float>(a.scale),
                        static_cast<int>(a.window), static_cast<float>(a.softcap), scratch);
    }
  });
}

// The implementation a call runs: the best this build and CPU have, at most `cap` ("" or
// "auto": no cap; "portable", "avx2", "avx512"; "neon", an ARM level, means portable here:
// p3.kernels.cpu.isa() gives any of them). The AVX2 path serves int8 caches; a cache in q's
// dtype takes it only when asked (float_avx2): it is 3-4x faster than the portable loops on
// an AVX2-only machine, but rounds differently, and the default model as stored (quantized
// activations) then greedily picks other tokens at near ties than it has so far.
std::string pick_isa(const std::string& cap, int head_dim, bool int8_cache, bool float_avx2) {
  TORCH_CHECK(cap.empty() || cap == "auto" || cap == "portable" || cap == "avx2" ||
                  cap == "avx512" || cap == "neon",
              "paged_decode: isa must be auto, portable, avx2, avx512 or neon, got ", cap);
  const bool no_cap = cap.empty() || cap == "auto";
#ifdef P3_AVX512
  if (no_cap || cap == "avx512") return "avx512";
#endif
#ifdef P3_X86
  // 8 dims at a time, with no masked tail
  if ((no_cap || cap == "avx2" || cap == "avx512") && cpu_has_avx2() && head_dim % 8 == 0 &&
      (int8_cache || float_avx2)) {
    return "avx2";
  }
#endif
  (void)no_cap;
  (void)head_dim;
  (void)int8_cache;
  (void)float_avx2;
  return "portable";
}

template <typename T, typename C>
void dispatch_isa(const std::string& isa, const DecodeArgs& a) {
#ifdef P3_AVX512
  if (isa == "avx512") return paged_decode_impl<Avx512, T, C>(a);
#endif
#ifdef P3_X86
  if (isa == "avx2") return paged_decode_impl<Avx2, T, C>(a);
#endif
  paged_decode_impl<Portable, T, C>(a);
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        double scale, int64_t kv_heads_per_item,
                        const std::optional<at::Tensor>& k_scale,
                        const std::optional<at::Tensor>& v_scale, const std::string& isa,
                        bool float_avx2, int64_t window, double softcap) {
  TORCH_CHECK(q.device().is_cpu(), "paged_decode: CPU tensors only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode: expected q [B, H, hd] and caches [blocks, block_size, kvh, hd]");
  const bool quantized = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() &&
                  (quantized || q.scalar_type() == k_cache.scalar_type()),
              "paged_decode: the caches must share q's dtype or both be int8");
  TORCH_CHECK(quantized == (k_scale.has_value() && v_scale.has_value()),
              "paged_decode: k_scale and v_scale go with an int8 cache, and only with one");
  if (quantized) {
    for (const at::Tensor* scales : {&*k_scale, &*v_scale}) {
      TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->dim() == 3 &&
                      scales->sizes() == k_cache.sizes().slice(0, 3) && scales->stride(2) == 1,
                  "paged_decode: scales must be fp32 [blocks, block_size, kvh], kvh innermost");
    }
    TORCH_CHECK(k_scale->strides() == v_scale->strides(), "paged_decode: scales differ in layout");
  }
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
  TORCH_CHECK(window >= 0 && softcap >= 0, "paged_decode: window and softcap must be >= 0");
  const DecodeArgs a{qc, k_cache, v_cache, block_tables, context_lens, scale, window, softcap,
                     kv_heads_per_item, k_scale, v_scale, out};
  const std::string chosen = pick_isa(isa, static_cast<int>(q.size(2)), quantized, float_avx2);

  switch (q.scalar_type()) {
    case at::kFloat:
      quantized ? dispatch_isa<float, int8_t>(chosen, a) : dispatch_isa<float, float>(chosen, a);
      break;
    case at::kBFloat16:
      quantized ? dispatch_isa<at::BFloat16, int8_t>(chosen, a)
                : dispatch_isa<at::BFloat16, at::BFloat16>(chosen, a);
      break;
    default:
      TORCH_CHECK(false, "paged_decode: float32 and bfloat16 only, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

namespace p3_ops {  // for the layer loop (layers.cpp)
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        double scale, const std::optional<at::Tensor>& k_scale,
                        const std::optional<at::Tensor>& v_scale, const std::string& isa) {
  return ::paged_decode(q, k_cache, v_cache, block_tables, context_lens, scale, 0, k_scale,
                        v_scale, isa, true, 0, 0.0);
}
}  // namespace p3_ops

void register_fused(pybind11::module_& m);  // fused.cpp
void register_quant(pybind11::module_& m);  // quant.cpp
void register_layers(pybind11::module_& m);  // layers.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "Paged decode attention (CPU)", pybind11::arg("q"),
        pybind11::arg("k_cache"), pybind11::arg("v_cache"), pybind11::arg("block_tables"),
        pybind11::arg("context_lens"), pybind11::arg("scale"),
        pybind11::arg("kv_heads_per_item") = 0, pybind11::arg("k_scale") = pybind11::none(),
        pybind11::arg("v_scale") = pybind11::none(), pybind11::arg("isa") = "",
        pybind11::arg("float_avx2") = false, pybind11::arg("window") = 0,
        pybind11::arg("softcap") = 0.0,
        pybind11::call_guard<pybind11::gil_scoped_release>());  // the node's loop runs on
  m.def(
      "decode_isa",
      [](int64_t head_dim, const std::string& cap, bool int8_cache, bool float_avx2) {
        return pick_isa(cap, static_cast<int>(head_dim), int8_cache, float_avx2);
      },
      pybind11::arg("head_dim"), pybind11::arg("isa") = "", pybind11::arg("int8_cache") = true,
      pybind11::arg("float_avx2") = false);
  m.def("has_avx512", []() {
#ifdef P3_AVX512
    return true;
#else
    return false;
#endif
  });
  register_fused(m);
  register_quant(m);
  register_layers(m);
}
