// Quantized linears and embeddings on CPU: weights in GGUF's own blocks of 32 (Q8_0, Q4_0,
// Q4_1, the same bytes as on disk), activations quantized on the fly to int8 per block of 32
// (a fp32 scale d and, for Q4_1's min, the block's d * sum(q)), integer dot products, fp32
// accumulation.
//
// One output y[m][n] is, whatever the batch, the tile or the variant:
//   acc[l] = fma(dw_b * da_b, float(sum of the 4 products of lane l in block b), acc[l]),
//   over the blocks b in order, l = 0..7 (lane l holds elements 4l..4l+3 of a block);
//   y = hsum(acc) + sum_b(mw_b * sa_b) (Q4_1 only, in block order) + bias,
// with hsum = ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)), the AVX2 reduction. The integer lane
// sums are exact, so every variant (portable C++, AVX2) gives the same bits, and a row's
// result never depends on what else is in the batch (batch invariance).
//
// Variants: "portable" (plain C++, any CPU) and "avx2" (maddubs/madd; also what an AVX-512
// machine runs until it has a variant of its own). The caller picks one by level; an x86
// variant is compiled with a target attribute and only called when the CPU has it, so one
// build serves every machine and the sources compile on aarch64.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define P3_X86 1
#define P3_AVX2_FN __attribute__((target("avx2,fma,f16c")))
#endif

namespace {

constexpr int kBlock = 32;
enum Kind : int { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2 };
enum Level : int { kPortable = 0, kAvx2 = 1 };

constexpr int block_bytes(Kind kind) {
  return kind == kQ8_0 ? 34 : kind == kQ4_0 ? 18 : 20;
}
constexpr int qs_offset(Kind kind) { return kind == kQ4_1 ? 4 : 2; }

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return c10::detail::fp16_ieee_to_fp32_value(h);
}

// Activations, quantized per block of 32: q = round-half-even(x / d), d = max|x| / 127.
struct QuantizedRows {
  int64_t rows = 0, blocks = 0;
  std::vector<int8_t> q;   // [rows, blocks * 32]
  std::vector<float> d;    // [rows, blocks]
  std::vector<float> sum;  // [rows, blocks]: d * sum(q), for Q4_1's min term
  const int8_t* q_at(int64_t m, int64_t b) const { return q.data() + (m * blocks + b) * kBlock; }
  float d_at(int64_t m, int64_t b) const { return d[m * blocks + b]; }
  float sum_at(int64_t m, int64_t b) const { return sum[m * blocks + b]; }
};

inline void quantize_block_portable(const float* x, int8_t* q, float* d, float* s) {
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float scale = amax / 127.f;
  const float inv = scale != 0.f ? 1.f / scale : 0.f;
  int total = 0;
  for (int i = 0; i < kBlock; ++i) {
    const int v = static_cast<int>(std::nearbyint(x[i] * inv));
    q[i] = static_cast<int8_t>(v);
    total += v;
  }
  *d = scale;
  *s = scale * static_cast<float>(total);
}

inline float hsum8(const float* a) {
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// -- portable ------------------------------------------------------------------------------

template <Kind K>
inline void unpack_portable(const uint8_t* block, int* w) {
  const uint8_t* qs = block + qs_offset(K);
  if constexpr (K == kQ8_0) {
    for (int i = 0; i < kBlock; ++i) w[i] = static_cast<int8_t>(qs[i]);
  } else {
    const int offset = K == kQ4_0 ? 8 : 0;
    for (int i = 0; i < 16; ++i) {
      w[i] = (qs[i] & 0x0F) - offset;
      w[i + 16] = (qs[i] >> 4) - offset;
    }
  }
}

template <Kind K>
void rows_portable(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x, int64_t n0,
                   int64_t n1, float* out, int64_t ldo) {
  int wq[kBlock];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t m = 0; m < x.rows; ++m) {
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      float mins = 0.f;
      for (int64_t b = 0; b < x.blocks; ++b) {
        const uint8_t* block = row + b * block_bytes(K);
        unpack_portable<K>(block, wq);
        const int8_t* a = x.q_at(m, b);
        const float scale = half_at(block) * x.d_at(m, b);
        for (int l = 0; l < 8; ++l) {
          int lane = 0;
          for (int i = 4 * l; i < 4 * l + 4; ++i) lane += wq[i] * a[i];
          acc[l] = std::fma(scale, static_cast<float>(lane), acc[l]);
        }
        if constexpr (K == kQ4_1) mins += half_at(block + 2) * x.sum_at(m, b);
      }
      out[m * ldo + n] = hsum8(acc) + mins;
    }
  }
}

void quantize_rows_portable(const float* x, int64_t m0, int64_t m1, int64_t cols,
                            QuantizedRows& out) {
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < out.blocks; ++b) {
      const int64_t i = m * out.blocks + b;
      quantize_block_portable(x + m * cols + b * kBlock, out.q.data() + i * kBlock, &out.d[i],
                              &out.sum[i]);
    }
  }
}

// -- AVX2 ------------------------------------------------------------------------------------

#ifdef P3_X86

P3_AVX2_FN inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// A weight block made ready for products with any activation block: `mag` goes into
// maddubs as the unsigned operand, `sign` (for the signed kinds) moves onto the activation.
struct Prepared {
  __m256i mag, sign;
  float d, m;  // scale and (Q4_1) min
};

template <Kind K>
P3_AVX2_FN inline Prepared prepare_avx2(const uint8_t* block) {
  Prepared p;
  uint16_t h[2];
  std::memcpy(h, block, 4);
  p.d = _cvtsh_ss(h[0]);
  p.m = K == kQ4_1 ? _cvtsh_ss(h[1]) : 0.f;
  const uint8_t* qs = block + qs_offset(K);
  if constexpr (K == kQ8_0) {
    p.sign = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
  } else {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(packed),
                                                 _mm_srli_epi16(packed, 4), 1);
    p.sign = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
    if constexpr (K == kQ4_0) p.sign = _mm256_sub_epi8(p.sign, _mm256_set1_epi8(8));
  }
  p.mag = K == kQ4_1 ? p.sign : _mm256_sign_epi8(p.sign, p.sign);
  return p;
}

template <Kind K>
P3_AVX2_FN inline __m256 lanes_avx2(const Prepared& w, __m256i a) {
  const __m256i signed_a = K == kQ4_1 ? a : _mm256_sign_epi8(a, w.sign);
  const __m256i pairs = _mm256_maddubs_epi16(w.mag, signed_a);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// An MR x NR tile of outputs over every block: each weight block is unpacked once and used
// for MR activation rows.
template <Kind K, int MR, int NR>
P3_AVX2_FN void tile_avx2(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x,
                          int64_t m0, int64_t n0, float* out, int64_t ldo) {
  __m256 acc[MR][NR];
  float mins[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps(), mins[i][j] = 0.f;
  for (int64_t b = 0; b < x.blocks; ++b) {
    Prepared p[NR];
    for (int j = 0; j < NR; ++j) p[j] = prepare_avx2<K>(w + (n0 + j) * row_bytes + b * block_bytes(K));
    for (int i = 0; i < MR; ++i) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.q_at(m0 + i, b)));
      const float da = x.d_at(m0 + i, b);
      for (int j = 0; j < NR; ++j) {
        const __m256 scale = _mm256_set1_ps(p[j].d * da);
        acc[i][j] = _mm256_fmadd_ps(scale, lanes_avx2<K>(p[j], a), acc[i][j]);
      }
      if constexpr (K == kQ4_1) {
        const float sa = x.sum_at(m0 + i, b);
        for (int j = 0; j < NR; ++j) mins[i][j] += p[j].m * sa;
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      out[(m0 + i) * ldo + n0 + j] = hsum_avx2(acc[i][j]) + mins[i][j];
}

template <Kind K, int NR>
P3_AVX2_FN void column_avx2(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x,
                            int64_t n0, float* out, int64_t ldo) {
  constexpr int MR = 4;
  int64_t m = 0;
  for (; m + MR <= x.rows; m += MR) tile_avx2<K, MR, NR>(w, row_bytes, x, m, n0, out, ldo);
  switch (x.rows - m) {
    case 3: tile_avx2<K, 3, NR>(w, row_bytes, x, m, n0, out, ldo); break;
    case 2: tile_avx2<K, 2, NR>(w, row_bytes, x, m, n0, out, ldo); break;
    case 1: tile_avx2<K, 1, NR>(w, row_bytes, x, m, n0, out, ldo); break;
    default: break;
  }
}

template <Kind K>
P3_AVX2_FN void rows_avx2(const uint8_t* w, int64_t row_bytes, const QuantizedRows& x,
                          int64_t n0, int64_t n1, float* out, int64_t ldo) {
  // one activation row (decode): 4 weight rows at a time keep 4 streams of loads going;
  // several rows: 2 weight rows x 4 activation rows per tile
  const int64_t nr = x.rows == 1 ? 4 : 2;
  int64_t n = n0;
  for (; n + nr <= n1; n += nr) {
    if (nr == 4) {
      tile_avx2<K, 1, 4>(w, row_bytes, x, 0, n, out, ldo);
    } else {
      column_avx2<K, 2>(w, row_bytes, x, n, out, ldo);
    }
  }
  for (; n < n1; ++n) column_avx2<K, 1>(w, row_bytes, x, n, out, ldo);
}

P3_AVX2_FN void quantize_rows_avx2(const float* x, int64_t m0, int64_t m1, int64_t cols,
                                   QuantizedRows& out) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < out.blocks; ++b) {
      const float* src = x + m * cols + b * kBlock;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int k = 0; k < 4; ++k) {
        v[k] = _mm256_loadu_ps(src + 8 * k);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[k], abs_mask));
      }
      float lanes[8];
      _mm256_storeu_ps(lanes, amax);
      float top = 0.f;
      for (float lane : lanes) top = std::max(top, lane);
      const float scale = top / 127.f;
      const __m256 inv = _mm256_set1_ps(scale != 0.f ? 1.f / scale : 0.f);
      __m256i q[4];
      __m256i total = _mm256_setzero_si256();
      for (int k = 0; k < 4; ++k) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(v[k], inv),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q[k] = _mm256_cvtps_epi32(r);
        total = _mm256_add_epi32(total, q[k]);
      }
      // int32 x 32 -> int8 x 32 in element order (packs work within 128-bit lanes)
      const __m256i q16a = _mm256_packs_epi32(q[0], q[1]);
      const __m256i q16b = _mm256_packs_epi32(q[2], q[3]);
      const __m256i q8 = _mm256_packs_epi16(q16a, q16b);
      const __m256i ordered = _mm256_permutevar8x32_epi32(q8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      const int64_t i = m * out.blocks + b;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + i * kBlock), ordered);
      int32_t sums[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums), total);
      int sum = 0;
      for (int32_t s : sums) sum += s;
      out.d[i] = scale;
      out.sum[i] = scale * static_cast<float>(sum);
    }
  }
}

#endif  // P3_X86

// -- interleaved groups of 8 rows ------------------------------------------------------------
// The layout linears use at run time (repacked at load, p3.kernels.quant.interleave): for
// every 8 weight rows and block b, one group block of 8 x block bytes: the 8 fp16 scales,
// (Q4_1) the 8 fp16 mins, then the quants in chunks of 4 bytes, chunk-major, row-minor:
// Q4 chunk c (0..3) of row k holds the row's bytes 4c..4c+3 (elements 4c.. in the low
// nibbles, 16 + 4c.. in the high ones), Q8_0 chunk c (0..7) its elements 4c..4c+3. One
// 256-bit load then holds 4 weights of each of 8 rows, and the activation's 4 matching bytes
// are broadcast: 8 outputs per pass, a full integer dot per row and block, one scale vector.
// Here y[m][n] = sum over b in order of fma(dw * da, float(dot_b), .) + sum_b (mw * sa).

constexpr int kGroup = 8;
constexpr int kPrefetchBytes = 2048;
constexpr int group_bytes(Kind kind) { return block_bytes(kind) * kGroup; }
constexpr int group_qs(Kind kind) { return kind == kQ4_1 ? 32 : 16; }

template <Kind K>
inline int group_weight(const uint8_t* block, int row, int e) {
  const uint8_t* qs = block + group_qs(K);
  if constexpr (K == kQ8_0) {
    return static_cast<int8_t>(qs[((e / 4) * kGroup + row) * 4 + e % 4]);
  } else {
    const int i = e % 16;
    const uint8_t byte = qs[((i / 4) * kGroup + row) * 4 + i % 4];
    const int v = e < 16 ? (byte & 0x0F) : (byte >> 4);
    return K == kQ4_0 ? v - 8 : v;
  }
}

template <Kind K>
void groups_portable(const uint8_t* w, int64_t nb, const QuantizedRows& x, int64_t g0,
                     int64_t g1, float* out, int64_t ldo) {
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t m = 0; m < x.rows; ++m) {
      float acc[kGroup] = {}, mins[kGroup] = {};
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* block = w + (g * nb + b) * group_bytes(K);
        const int8_t* a = x.q_at(m, b);
        const float da = x.d_at(m, b);
        for (int k = 0; k < kGroup; ++k) {
          int dot = 0;
          for (int e = 0; e < kBlock; ++e) dot += group_weight<K>(block, k, e) * a[e];
          acc[k] = std::fma(half_at(block + 2 * k) * da, static_cast<float>(dot), acc[k]);
          if constexpr (K == kQ4_1) mins[k] += half_at(block + 16 + 2 * k) * x.sum_at(m, b);
        }
      }
      for (int k = 0; k < kGroup; ++k) out[m * ldo + g * kGroup + k] = acc[k] + mins[k];
    }
  }
}

#ifdef P3_X86

P3_AVX2_FN inline __m256i broadcast4(const int8_t* a) {
  int32_t v;
  std::memcpy(&v, a, 4);
  return _mm256_set1_epi32(v);
}

// The 8 quant registers of a group block: Q4 as values 0..15 (Q4_0: minus 8), elements
// 4c.. in register c and 16 + 4c.. in register 4 + c; Q8_0 chunk c in register c.
template <Kind K>
P3_AVX2_FN inline void unpack_group(const uint8_t* block, __m256i* wv) {
  const uint8_t* qs = block + group_qs(K);
  if constexpr (K == kQ8_0) {
    for (int c = 0; c < 8; ++c) wv[c] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
  } else {
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
      wv[c] = _mm256_and_si256(raw, low);
      wv[4 + c] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
      if constexpr (K == kQ4_0) {
        wv[c] = _mm256_sub_epi8(wv[c], _mm256_set1_epi8(8));
        wv[4 + c] = _mm256_sub_epi8(wv[4 + c], _mm256_set1_epi8(8));
      }
    }
  }
}

// The 8 rows' integer dots with one activation block (exact in int32; the int16 partial
// sums cannot overflow: Q4_1 16 x 15 x 127, Q4_0 16 x 8 x 127; Q8_0 widens every pair).
template <Kind K>
P3_AVX2_FN inline __m256i group_dots(const __m256i* wv, const int8_t* a) {
  const __m256i ones = _mm256_set1_epi16(1);
  auto element = [&](int r) { return broadcast4(a + (r < 4 ? 4 * r : 16 + 4 * (r - 4))); };
  if constexpr (K == kQ4_1) {
    __m256i s = _mm256_maddubs_epi16(wv[0], element(0));
    for (int r = 1; r < 8; ++r) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(wv[r], element(r)));
    return _mm256_madd_epi16(s, ones);
  } else if constexpr (K == kQ4_0) {
    __m256i s = _mm256_setzero_si256();
    for (int r = 0; r < 8; ++r) {
      const __m256i signed_a = _mm256_sign_epi8(element(r), wv[r]);
      s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_sign_epi8(wv[r], wv[r]), signed_a));
    }
    return _mm256_madd_epi16(s, ones);
  } else {
    __m256i s = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i signed_a = _mm256_sign_epi8(broadcast4(a + 4 * c), wv[c]);
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(wv[c], wv[c]), signed_a);
      s = _mm256_add_epi32(s, _mm256_madd_epi16(pairs, ones));
    }
    return s;
  }
}

// One activation row (decode): accumulators in registers, two groups (16 rows) a pass sharing
// the activation's broadcasts, quants unpacked as they are loaded. The same operations per
// row and block as groups_avx2 (the integer sums only regroup), so the same bits.
template <Kind K>
P3_AVX2_FN inline __m256i group_dots_streamed(const uint8_t* block, const __m256i* bcast) {
  const uint8_t* qs = block + group_qs(K);
  const __m256i ones = _mm256_set1_epi16(1);
  if constexpr (K == kQ8_0) {
    __m256i even = _mm256_setzero_si256(), odd = _mm256_setzero_si256();
    for (int c = 0; c < 8; ++c) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
      const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(bcast[c], w));
      if (c % 2) odd = _mm256_add_epi32(odd, _mm256_madd_epi16(pairs, ones));
      else even = _mm256_add_epi32(even, _mm256_madd_epi16(pairs, ones));
    }
    return _mm256_add_epi32(even, odd);
  } else {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
      __m256i lo = _mm256_and_si256(raw, low);
      __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
      if constexpr (K == kQ4_1) {
        s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(lo, bcast[c]));
        s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(hi, bcast[4 + c]));
      } else {
        lo = _mm256_sub_epi8(lo, _mm256_set1_epi8(8));
        hi = _mm256_sub_epi8(hi, _mm256_set1_epi8(8));
        s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_sign_epi8(lo, lo), _mm256_sign_epi8(bcast[c], lo)));
        s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_sign_epi8(hi, hi), _mm256_sign_epi8(bcast[4 + c], hi)));
      }
    }
    return _mm256_madd_epi16(_mm256_add_epi16(s0, s1), ones);
  }
}

template <Kind K>
P3_AVX2_FN __attribute__((always_inline)) inline void one_group_block(
    const uint8_t* block, const __m256i* bcast, __m256 da, __m256 sa, __m256& acc, __m256& mins) {
  const char* ahead = reinterpret_cast<const char*>(block) + kPrefetchBytes;
  for (int line = 0; line < group_bytes(K); line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
  const __m256 dots = _mm256_cvtepi32_ps(group_dots_streamed<K>(block, bcast));
  const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
  acc = _mm256_fmadd_ps(_mm256_mul_ps(dw, da), dots, acc);
  if constexpr (K == kQ4_1) {
    const __m256 mw =
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16)));
    mins = _mm256_add_ps(mins, _mm256_mul_ps(mw, sa));
  }
}

template <Kind K>
P3_AVX2_FN void groups_avx2_one_row(const uint8_t* w, int64_t nb, const QuantizedRows& x,
                                    int64_t g0, int64_t g1, float* out) {
  for (int64_t g = g0; g < g1; g += 2) {
    const bool pair = g + 1 < g1;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 mins0 = _mm256_setzero_ps(), mins1 = _mm256_setzero_ps();
    const uint8_t* first = w + g * nb * group_bytes(K);
    const uint8_t* second = first + nb * group_bytes(K);
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* a = x.q_at(0, b);
      __m256i bcast[8];
      if constexpr (K == kQ8_0) {
        for (int c = 0; c < 8; ++c) bcast[c] = broadcast4(a + 4 * c);
      } else {
        for (int c = 0; c < 4; ++c) {
          bcast[c] = broadcast4(a + 4 * c);
          bcast[4 + c] = broadcast4(a + 16 + 4 * c);
        }
      }
      const __m256 da = _mm256_set1_ps(x.d_at(0, b));
      const __m256 sa = _mm256_set1_ps(K == kQ4_1 ? x.sum_at(0, b) : 0.f);
      one_group_block<K>(first + b * group_bytes(K), bcast, da, sa, acc0, mins0);
      if (pair) one_group_block<K>(second + b * group_bytes(K), bcast, da, sa, acc1, mins1);
    }
    _mm256_storeu_ps(out + g * kGroup, _mm256_add_ps(acc0, mins0));
    if (pair) _mm256_storeu_ps(out + (g + 1) * kGroup, _mm256_add_ps(acc1, mins1));
  }
}

template <Kind K>
P3_AVX2_FN void groups_avx2(const uint8_t* w, int64_t nb, const QuantizedRows& x, int64_t g0,
                            int64_t g1, float* out, int64_t ldo) {
  if (x.rows == 1) return groups_avx2_one_row<K>(w, nb, x, g0, g1, out);
  constexpr int64_t kRows = 64;  // activation rows whose sums stay in L1 while blocks stream
  alignas(32) float acc[kRows * kGroup], mins[kRows * kGroup];
  for (int64_t m0 = 0; m0 < x.rows; m0 += kRows) {
    const int64_t rows = std::min(kRows, x.rows - m0);
    for (int64_t g = g0; g < g1; ++g) {
      std::fill_n(acc, rows * kGroup, 0.f);
      std::fill_n(mins, rows * kGroup, 0.f);
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* block = w + (g * nb + b) * group_bytes(K);
        // the thread's blocks are one contiguous stream: ask for them well ahead
        const char* ahead = reinterpret_cast<const char*>(block) + kPrefetchBytes;
        for (int line = 0; line < group_bytes(K); line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        __m256i wv[8];
        unpack_group<K>(block, wv);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
        __m256 mw = _mm256_setzero_ps();
        if constexpr (K == kQ4_1) mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16)));
        for (int64_t i = 0; i < rows; ++i) {
          const __m256 dots = _mm256_cvtepi32_ps(group_dots<K>(wv, x.q_at(m0 + i, b)));
          const __m256 scale = _mm256_mul_ps(dw, _mm256_set1_ps(x.d_at(m0 + i, b)));
          float* a = acc + i * kGroup;
          _mm256_store_ps(a, _mm256_fmadd_ps(scale, dots, _mm256_load_ps(a)));
          if constexpr (K == kQ4_1) {
            float* mn = mins + i * kGroup;
            const __m256 term = _mm256_mul_ps(mw, _mm256_set1_ps(x.sum_at(m0 + i, b)));
            _mm256_store_ps(mn, _mm256_add_ps(_mm256_load_ps(mn), term));
          }
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const __m256 y = _mm256_add_ps(_mm256_load_ps(acc + i * kGroup), _mm256_load_ps(mins + i * kGroup));
        _mm256_storeu_ps(out + (m0 + i) * ldo + g * kGroup, y);
      }
    }
  }
}

#endif  // P3_X86

template <Kind K>
void groups_for_level(int level, const uint8_t* w, int64_t nb, const QuantizedRows& x,
                      int64_t g0, int64_t g1, float* out, int64_t ldo) {
#ifdef P3_X86
  if (level == kAvx2) return groups_avx2<K>(w, nb, x, g0, g1, out, ldo);
#endif
  groups_portable<K>(w, nb, x, g0, g1, out, ldo);
}

// -- dispatch --------------------------------------------------------------------------------

bool level_available(int level) {
  if (level == kPortable) return true;
#ifdef P3_X86
  if (level == kAvx2) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }
#endif
  return false;
}

void check_level(int level) {
  TORCH_CHECK(level_available(level), "quant kernels: level ", level,
              " is not available on this CPU (0 = portable, 1 = avx2)");
}

Kind kind_of(int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "quant kernels: unknown kind ", kind);
  return static_cast<Kind>(kind);
}

at::Tensor float_rows(const at::Tensor& x, int64_t cols, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), what, ": CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == cols, what, ": last dim must be ", cols);
  if (x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous()) return x;
  return x.reshape({-1, cols}).to(at::kFloat).contiguous();
}

QuantizedRows quantize(const at::Tensor& x2d, int level) {
  QuantizedRows out;
  out.rows = x2d.size(0);
  out.blocks = x2d.size(1) / kBlock;
  out.q.resize(out.rows * out.blocks * kBlock);
  out.d.resize(out.rows * out.blocks);
  out.sum.resize(out.rows * out.blocks);
  const float* data = x2d.data_ptr<float>();
  const int64_t cols = x2d.size(1);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cols));
  at::parallel_for(0, out.rows, grain, [&](int64_t m0, int64_t m1) {
#ifdef P3_X86
    if (level == kAvx2) return quantize_rows_avx2(data, m0, m1, cols, out);
#endif
    quantize_rows_portable(data, m0, m1, cols, out);
  });
  return out;
}

at::Tensor finish_linear(at::Tensor out, const at::Tensor& x,
                         const c10::optional<at::Tensor>& bias, int64_t n) {
  if (bias.has_value() && bias->defined()) out.add_(bias->to(at::kFloat));
  if (x.dim() != 2) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = n;
    out = out.view(shape);
  }
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

template <Kind K>
void rows_for_level(int level, const uint8_t* w, int64_t row_bytes, const QuantizedRows& x,
                    int64_t n0, int64_t n1, float* out, int64_t ldo) {
#ifdef P3_X86
  if (level == kAvx2) return rows_avx2<K>(w, row_bytes, x, n0, n1, out, ldo);
#endif
  rows_portable<K>(w, row_bytes, x, n0, n1, out, ldo);
}

// y [M, N] = x [M, K] W^T (+ bias), W the [N, K / 32 * block bytes] blocks of `kind`.
// interleaved: blocks are [N / 8, K / 32 * 8 * block bytes] groups (see above).
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t kind_id,
                        const c10::optional<at::Tensor>& bias, int64_t level, bool interleaved) {
  const Kind kind = kind_of(kind_id);
  check_level(static_cast<int>(level));
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous(),
              "quant_linear: blocks must be contiguous uint8 [N, row bytes]");
  const int64_t group = interleaved ? kGroup : 1;
  const int64_t n = blocks.size(0) * group, row_bytes = blocks.size(1) / group;
  TORCH_CHECK(blocks.size(1) % (block_bytes(kind) * group) == 0, "quant_linear: row bytes ",
              blocks.size(1), " is not a whole number of blocks");
  const int64_t k = row_bytes / block_bytes(kind) * kBlock;
  const at::Tensor x2d = float_rows(x, k, "quant_linear");
  const QuantizedRows q = quantize(x2d, static_cast<int>(level));
  at::Tensor out = at::empty({q.rows, n}, x2d.options());
  float* y = out.data_ptr<float>();
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  if (interleaved) {
    const int64_t nb = k / kBlock;
    at::parallel_for(0, n / kGroup, 1, [&](int64_t g0, int64_t g1) {
      switch (kind) {
        case kQ8_0: return groups_for_level<kQ8_0>(level, w, nb, q, g0, g1, y, n);
        case kQ4_0: return groups_for_level<kQ4_0>(level, w, nb, q, g0, g1, y, n);
        case kQ4_1: return groups_for_level<kQ4_1>(level, w, nb, q, g0, g1, y, n);
      }
    });
    return finish_linear(out, x, bias, n);
  }
  // chunks of 16 weight rows (a multiple of every tile width) from torch's thread pool
  constexpr int64_t kRows = 16;
  const int64_t chunks = (n + kRows - 1) / kRows;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const int64_t n0 = c0 * kRows, n1 = std::min(n, c1 * kRows);
    switch (kind) {
      case kQ8_0: return rows_for_level<kQ8_0>(level, w, row_bytes, q, n0, n1, y, n);
      case kQ4_0: return rows_for_level<kQ4_0>(level, w, row_bytes, q, n0, n1, y, n);
      case kQ4_1: return rows_for_level<kQ4_1>(level, w, row_bytes, q, n0, n1, y, n);
    }
  });
  return finish_linear(out, x, bias, n);
}

// Rows `ids` of a blocks table, dequantized: w = q d (+ m for Q4_1), as GGUF defines them.
template <Kind K>
void embed_rows(const int64_t* id, int64_t t0, int64_t t1, const uint8_t* w, int64_t nb,
                bool interleaved, float* y) {
  int q[kBlock];
  for (int64_t i = t0; i < t1; ++i) {
    for (int64_t b = 0; b < nb; ++b) {
      float d, mn = 0.f;
      if (interleaved) {
        const int64_t g = id[i] / kGroup, k = id[i] % kGroup;
        const uint8_t* block = w + (g * nb + b) * group_bytes(K);
        d = half_at(block + 2 * k);
        if constexpr (K == kQ4_1) mn = half_at(block + 16 + 2 * k);
        for (int e = 0; e < kBlock; ++e) q[e] = group_weight<K>(block, static_cast<int>(k), e);
      } else {
        const uint8_t* block = w + (id[i] * nb + b) * block_bytes(K);
        d = half_at(block);
        if constexpr (K == kQ4_1) mn = half_at(block + 2);
        unpack_portable<K>(block, q);
      }
      float* dst = y + (i * nb + b) * kBlock;
      for (int e = 0; e < kBlock; ++e) {
        dst[e] = K == kQ4_1 ? static_cast<float>(q[e]) * d + mn : static_cast<float>(q[e]) * d;
      }
    }
  }
}

at::Tensor quant_embedding(const at::Tensor& ids, const at::Tensor& blocks, int64_t kind_id,
                           at::ScalarType dtype, bool interleaved) {
  const Kind kind = kind_of(kind_id);
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte && blocks.is_contiguous(),
              "quant_embedding: blocks must be contiguous uint8 [V, row bytes]");
  const int64_t group = interleaved ? kGroup : 1;
  const int64_t rows = blocks.size(0) * group, row_bytes = blocks.size(1) / group;
  const int64_t nb = row_bytes / block_bytes(kind), k = nb * kBlock;
  const at::Tensor flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t t = flat.numel();
  at::Tensor out = at::empty({t, k}, blocks.options().dtype(at::kFloat));
  const int64_t* id = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < rows, "quant_embedding: id ", id[i], " out of range");
  }
  float* y = out.data_ptr<float>();
  const uint8_t* w = blocks.data_ptr<uint8_t>();
  at::parallel_for(0, t, 16, [&](int64_t t0, int64_t t1) {
    switch (kind) {
      case kQ8_0: return embed_rows<kQ8_0>(id, t0, t1, w, nb, interleaved, y);
      case kQ4_0: return embed_rows<kQ4_0>(id, t0, t1, w, nb, interleaved, y);
      case kQ4_1: return embed_rows<kQ4_1>(id, t0, t1, w, nb, interleaved, y);
    }
  });
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(k);
  out = out.view(shape);
  return dtype == at::kFloat ? out : out.to(dtype);
}

// The activations' quantization as the kernels do it: (q int8 [M, K], d [M, K/32], d*sum(q)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_activations(const at::Tensor& x,
                                                                     int64_t level) {
  check_level(static_cast<int>(level));
  TORCH_CHECK(x.size(-1) % kBlock == 0, "quantize_activations: last dim must be a multiple of 32");
  const at::Tensor x2d = float_rows(x, x.size(-1), "quantize_activations");
  const QuantizedRows q = quantize(x2d, static_cast<int>(level));
  at::Tensor qt = at::empty({q.rows, q.blocks * kBlock}, x2d.options().dtype(at::kChar));
  at::Tensor dt = at::empty({q.rows, q.blocks}, x2d.options());
  at::Tensor st = at::empty({q.rows, q.blocks}, x2d.options());
  std::memcpy(qt.data_ptr<int8_t>(), q.q.data(), q.q.size());
  std::memcpy(dt.data_ptr<float>(), q.d.data(), q.d.size() * sizeof(float));
  std::memcpy(st.data_ptr<float>(), q.sum.data(), q.sum.size() * sizeof(float));
  return {qt, dt, st};
}

}  // namespace

namespace p3_ops {  // for the layer loop (layers.cpp)
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t kind,
                        const c10::optional<at::Tensor>& bias, int64_t level, bool interleaved) {
  return ::quant_linear(x, blocks, kind, bias, level, interleaved);
}
}  // namespace p3_ops

// Every kernel lets go of the GIL while it runs: a node's event loop (its heartbeats) shares
// the process with the engine's step thread, and a long prefill must not silence it.
void register_quant(pybind11::module_& m) {
  using pybind11::arg;
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("quant_linear", &quant_linear, arg("x"), arg("blocks"), arg("kind"), arg("bias"),
        arg("level"), arg("interleaved") = false, release());
  m.def("quant_embedding", &quant_embedding, arg("ids"), arg("blocks"), arg("kind"),
        arg("dtype"), arg("interleaved") = false, release());
  m.def("quantize_activations", &quantize_activations, arg("x"), arg("level"), release());
  m.def("quant_level_available", [](int64_t level) { return level_available(int(level)); });
}
