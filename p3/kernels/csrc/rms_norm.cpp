// RMSNorm on CPU, alone or after the residual add, as torch computes
// w * (h.float() * rsqrt(h.float().pow(2).mean(-1) + eps)).to(T): the same bits, so the sum of
// squares is added in the order of torch's sum kernel (SumKernel.cpp: vectorized_inner_sum,
// row_sum, multi_row_sum). See fused.cpp.

#include "fused.h"

#ifdef P3_FUSED_CAPABILITY
#include <ATen/ops/empty_like.h>

#include <cmath>

namespace {

using namespace p3_fused;

inline int64_t ceil_log2(int64_t x) { return x <= 2 ? 1 : 64 - __builtin_clzll(x - 1); }

// torch's row_sum over `size` terms: multi_row_sum's 4 interleaved accumulators, cascaded
// every 16 steps over 4 levels, then the leftover terms, then the 4 accumulators in order.
template <typename Acc, typename Term>
Acc cascade_sum(int64_t size, const Term& term) {
  constexpr int kIlp = 4, kLevels = 4;
  const int64_t steps = size / kIlp;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(steps) / kLevels);
  const int64_t level_step = int64_t{1} << level_power, level_mask = level_step - 1;
  Acc acc[kLevels][kIlp];
  for (auto& level : acc) std::fill_n(level, kIlp, Acc(0.f));
  int64_t i = 0;
  while (i + level_step <= steps) {
    for (int64_t j = 0; j < level_step; ++j, ++i) {
      for (int k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + term(i * kIlp + k);
    }
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k) {
        acc[j][k] = acc[j][k] + acc[j - 1][k];
        acc[j - 1][k] = Acc(0.f);
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < steps; ++i) {
    for (int k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + term(i * kIlp + k);
  }
  for (int j = 1; j < kLevels; ++j) {
    for (int k = 0; k < kIlp; ++k) acc[0][k] = acc[0][k] + acc[j][k];
  }
  for (int64_t t = steps * kIlp; t < size; ++t) acc[0][0] = acc[0][0] + term(t);
  for (int k = 1; k < kIlp; ++k) acc[0][0] = acc[0][0] + acc[0][k];
  return acc[0][0];
}

// 8 fp32 lanes: torch registers its sum kernel with plain REGISTER_DISPATCH, which leaves the
// AVX512 slot empty, so even under AVX512 dispatch sums run in the AVX2 kernel's 8 lanes.
struct Lanes8 {
  __m256 v;
  explicit Lanes8(float x = 0.f) : v(_mm256_set1_ps(x)) {}
  explicit Lanes8(__m256 x) : v(x) {}
  Lanes8 operator+(const Lanes8& o) const { return Lanes8(_mm256_add_ps(v, o.v)); }
};
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

// sum(h[j]^2) as torch sums a contiguous fp32 row: vectorized_inner_sum (whole vectors
// cascaded, then the scalar tail, then the lanes in order), or scalar_inner_sum if shorter.
template <typename T>
float sum_of_squares(const T* h, int64_t n) {
  auto square = [h](int64_t j) { return static_cast<float>(h[j]) * static_cast<float>(h[j]); };
  if (n < 8) return cascade_sum<float>(n, square);
  const Lanes8 lanes = cascade_sum<Lanes8>(n / 8, [h](int64_t v) {
    const __m256 x = load8(h + v * 8);
    return Lanes8(_mm256_mul_ps(x, x));
  });
  float total = 0.f;
  for (int64_t j = n / 8 * 8; j < n; ++j) total += square(j);
  alignas(32) float partial[8];
  _mm256_store_ps(partial, lanes.v);
  for (float p : partial) total += p;
  return total;
}

// out = w * round_T(h * rsqrt(mean(h^2) + eps)) for one row h of T values.
template <typename T>
void rms_norm_row(const T* h, const T* w, T* out, int64_t n, float eps) {
  const float mean = sum_of_squares(h, n) / static_cast<float>(n);
  const fVec r(1.f / std::sqrt(mean + eps));
  for (int64_t j = 0; j < n; j += kW) {
    const int64_t m = std::min(kW, n - j);
    store(out + j, load(w + j, m) * round_to<T>(load(h + j, m) * r), m);
  }
}

// Rows of x, or of sum = round_T(x + residual) if there is a residual, normalised into out.
template <typename T>
void rms_norm_rows(const T* x, const T* residual, T* sum, const T* w, T* out, int64_t rows,
                   int64_t n, float eps) {
  for_rows(rows, n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* h = x + i * n;
      if (residual != nullptr) {
        for (int64_t j = 0; j < n; j += kW) {
          const int64_t m = std::min(kW, n - j);
          store(sum + i * n + j, load(h + j, m) + load(residual + i * n + j, m), m);
        }
        h = sum + i * n;
      }
      rms_norm_row(h, w, out + i * n, n, eps);
    }
  });
}

// (norm(x), {}) without a residual; (norm(x + residual), x + residual) with one.
std::tuple<at::Tensor, at::Tensor> norm(const at::Tensor& x_in, const at::Tensor* residual_in,
                                        const at::Tensor& weight, double eps) {
  const int64_t n = x_in.size(-1);
  const at::Tensor x = rows_of(x_in, x_in, n, "x"), w = rows_of(weight, x_in, n, "weight");
  TORCH_CHECK(w.numel() == n, "rms_norm: weight must be [hidden]");
  at::Tensor residual, sum, out = at::empty_like(x);
  if (residual_in != nullptr) {
    residual = rows_of(*residual_in, x_in, n, "residual");
    TORCH_CHECK(residual.sizes() == x.sizes(), "fused_add_rms_norm: x, residual differ in shape");
    sum = at::empty_like(x);
  }
  dispatch(x, "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(x.data_ptr<T>(), residual.defined() ? residual.data_ptr<T>() : nullptr,
                     sum.defined() ? sum.data_ptr<T>() : nullptr, w.data_ptr<T>(),
                     out.data_ptr<T>(), x.numel() / n, n, static_cast<float>(eps));
  });
  return {out, sum};
}

}  // namespace

namespace p3_ops {  // for the layer loop (layers.cpp)
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor* residual,
                                            const at::Tensor& w, double eps) {
  return norm(x, residual, w, eps);
}
}  // namespace p3_ops

void register_rms_norm(pybind11::module_& m) {
  using pybind11::arg;
  m.def(
      "rms_norm",
      [](const at::Tensor& x, const at::Tensor& w, double eps) {
        return std::get<0>(norm(x, nullptr, w, eps));
      },
      arg("x"), arg("weight"), arg("eps"), pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def(
      "fused_add_rms_norm",
      [](const at::Tensor& x, const at::Tensor& residual, const at::Tensor& w, double eps) {
        return norm(x, &residual, w, eps);
      },
      arg("x"), arg("residual"), arg("weight"), arg("eps"),
      pybind11::call_guard<pybind11::gil_scoped_release>());
}

#else

void register_rms_norm(pybind11::module_&) {}

#endif
