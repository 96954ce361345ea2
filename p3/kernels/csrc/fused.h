// Shared by the fused kernels (fused.cpp, rms_norm.cpp): at::vec built for the vector ISA
// torch dispatches to, vectors of T read as fp32 and rounded back as torch rounds, rows split
// across threads, dtype dispatch. See fused.cpp for why the kernels repeat torch's arithmetic.
// Include it first: it picks the ISA of at::vec before any ATen header is read.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define P3_FUSED_CAPABILITY "AVX512"
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define P3_FUSED_CAPABILITY "AVX2"
#endif

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

void register_rms_norm(pybind11::module_& m);  // rms_norm.cpp

#ifdef P3_FUSED_CAPABILITY
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace p3_fused {

using c10::BFloat16;
using fVec = at::vec::Vectorized<float>;
constexpr int64_t kW = fVec::size();
constexpr int64_t kMinTaskElements = 4096;  // a thread gets at least this much work

// n <= kW values of T as floats, and back (rounded to nearest even, as torch rounds).
inline fVec load(const float* p, int64_t n = kW) { return fVec::loadu(p, n); }
inline void store(float* p, const fVec& v, int64_t n = kW) { v.store(p, n); }

#ifdef CPU_CAPABILITY_AVX512
// One 16-lane vector at a time (at::vec converts bf16 32 lanes at a time, as two vectors).
inline __mmask16 lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline fVec widen(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline fVec load(const BFloat16* p, int64_t n = kW) {
  return widen(n == kW ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                       : _mm256_maskz_loadu_epi16(lanes(n), p));
}
inline void store(BFloat16* p, const fVec& v, int64_t n = kW) {
  const __m256i bits = at::vec::cvtfp32_bf16(v);  // torch's rounding, NaN included
  if (n == kW) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bits);
  } else {
    _mm256_mask_storeu_epi16(p, lanes(n), bits);
  }
}
inline fVec round_to_bf16(const fVec& v) { return widen(at::vec::cvtfp32_bf16(v)); }
#else
inline fVec load(const BFloat16* p, int64_t n = kW) {
  const auto bits = at::vec::Vectorized<BFloat16>::loadu(p, n);
  return std::get<0>(at::vec::convert_to_float<BFloat16>(bits));
}
inline void store(BFloat16* p, const fVec& v, int64_t n = kW) {
  at::vec::convert_from_float<BFloat16>(v, v).store(p, n);
}
inline fVec round_to_bf16(const fVec& v) {
  const auto bits = at::vec::convert_from_float<BFloat16>(v, v);
  return std::get<0>(at::vec::convert_to_float<BFloat16>(bits));
}
#endif

// v rounded to T's precision: what torch keeps of an op that writes a T tensor.
template <typename T>
inline fVec round_to(const fVec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return round_to_bf16(v);
  }
}

// f(begin, end) over [0, rows), rows of row_elements each, in tasks of kMinTaskElements or more.
template <typename F>
void for_rows(int64_t rows, int64_t row_elements, const F& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinTaskElements / row_elements), f);
}

// f(T{}) for t's dtype T.
template <typename F>
void dispatch(const at::Tensor& t, const char* op, const F& f) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return f(float{});
    case at::kBFloat16:
      return f(BFloat16{});
    default:
      TORCH_CHECK(false, op, ": float32 and bfloat16 only, got ", t.scalar_type());
  }
}

// t as contiguous rows of `cols` values of like's dtype (copied only if not contiguous).
inline at::Tensor rows_of(const at::Tensor& t, const at::Tensor& like, int64_t cols,
                          const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == like.scalar_type() && t.dim() >= 1 &&
                  cols > 0 && t.size(-1) == cols,
              "p3 fused kernels: ", what, " must be a CPU tensor of ", like.scalar_type(),
              " with ", cols, " values in its last dim");
  return t.contiguous();
}

}  // namespace p3_fused

#endif
