// Fused elementwise kernels of a decoder layer on CPU: RoPE + KV store and SiLU-and-mul here,
// residual add + RMSNorm in rms_norm.cpp. Each gives the same bits as the chain of torch ops it
// replaces (the references are in p3/kernels/fused.py), because it repeats torch's arithmetic:
// - every intermediate that torch materialises in the model dtype is rounded to it here too;
// - sums are added in torch's order, exp is torch's own (at::vec's Sleef where torch's
//   vectorised loop runs, std::exp on the tails it leaves to its scalar loop);
// hence at::vec is built for the ISA torch dispatches to (Python checks that the two agree:
// fused_capability()), and build.py passes -ffp-contract=off: an fma rounds once where torch
// rounds twice. Rows are split across torch's thread pool as soon as there is a little work:
// between two oneDNN calls its threads are spinning, not asleep, so waking them is cheap, and a
// thread spinning next door slows a lone one down more than sharing the work costs.

#include "fused.h"

#ifdef P3_FUSED_CAPABILITY
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace {

using namespace p3_fused;

// ---------------------------------------------------------------------------------------------
// RoPE, as torch computes x * cos + roll(x, hd / 2) * sin_signed: three roundings to T.

template <typename T>
void rope_half(const T* x, const T* partner, const T* cos, const T* sin, T* out, int64_t n) {
  for (int64_t d = 0; d < n; d += kW) {
    const int64_t m = std::min(kW, n - d);
    const fVec a = round_to<T>(load(x + d, m) * load(cos + d, m));
    const fVec b = round_to<T>(load(partner + d, m) * load(sin + d, m));
    store(out + d, a + b, m);
  }
}

struct RopeShape {
  int64_t heads, kv_heads, hd;  // a qkv row: q heads, then kv_heads k heads and v heads
  int64_t block_size, block_stride;  // of the caches [blocks, block_size, kv_heads, hd]
};

// Symmetric int8 for one head of hd values: scale = amax / 127, q = round-half-even(x / scale),
// as p3.kernels.attention.quantize_kv computes it in fp32 (division, not a reciprocal: the
// same bits). An all-zero head gets scale 0 and q 0.
template <typename T>
void quantize_head(const T* x, int64_t hd, int8_t* q, float* scale) {
  float amax = 0.f;
  for (int64_t d = 0; d < hd; ++d) amax = std::max(amax, std::abs(static_cast<float>(x[d])));
  const float s = amax / 127.f;
  *scale = s;
  for (int64_t d = 0; d < hd; ++d) {
    const float v = s > 0.f ? static_cast<float>(x[d]) / s : 0.f;
    q[d] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(v))));
  }
}

// For an int8 cache, every roped q and k head is turned by an orthonormal Hadamard transform,
// as p3.kernels.attention.hadamard_heads computes it: on each stretch of n values (n the
// largest power of two dividing hd), log2(n) rounds of fp32 butterflies (a + b, a - b, pairs
// h apart for h = 1, 2, 4, ...), times 1 / sqrt(n) as an fp32 constant, rounded to T once.
// q . k is unchanged (H is orthonormal), but the few outlier channels of a key spread over all
// of them, so its one int8 scale fits the head better (KL to fp32 on the default model: 4x
// less on 8k tokens of the Python docs; top-1 agreement 98.4% -> 99.2%).
template <typename T>
void hadamard_head(T* x, int64_t hd) {
  constexpr int64_t kMaxStretch = 1024;
  const int64_t n = std::min(hd & -hd, kMaxStretch);
  const float norm = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  float buf[kMaxStretch];
  for (int64_t at = 0; at < hd; at += n) {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(x[at + i]);
    for (int64_t h = 1; h < n; h *= 2) {
      for (int64_t i = 0; i < n; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float a = buf[j], b = buf[j + h];
          buf[j] = a + b;
          buf[j + h] = a - b;
        }
      }
    }
    for (int64_t i = 0; i < n; ++i) x[at + i] = static_cast<T>(buf[i] * norm);
  }
}

// qkv [T, (H + 2 KVH) hd] -> qk [T, H + KVH, hd] roped (and turned, if `turn`); store(t, slot,
// k, raw v) puts each token's k and v heads (KVH x hd each) into the cache.
template <typename T, typename Store>
void rope_store_kv_rows(const T* qkv, const T* cos, const T* sin, T* qk, const int64_t* slots,
                        int64_t tokens, const RopeShape& s, bool turn, const Store& store) {
  const int64_t hd = s.hd, half = hd / 2, roped = (s.heads + s.kv_heads) * hd;
  const int64_t kv = s.kv_heads * hd;
  for_rows(tokens, roped + kv, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T *x = qkv + t * (roped + kv), *c = cos + t * hd, *sn = sin + t * hd;
      T* out = qk + t * roped;
      for (int64_t h = 0; h < roped; h += hd) {
        rope_half(x + h, x + h + half, c, sn, out + h, half);
        rope_half(x + h + half, x + h, c + half, sn + half, out + h + half, half);
        if (turn) hadamard_head(out + h, hd);
      }
      store(slots[t], out + s.heads * hd, x + roped);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// SiLU and mul, as torch computes F.silu(gate) * up: silu(x) = x / (1 + exp(-x)) in fp32.

// torch's vectorized_loop runs its vector op over whole pairs of Vectorized<T> from the start
// of each stretch of a row it is handed, and its scalar op (std::exp, not Sleef) on the rest.
template <typename T>
void silu_mul_stretch(const T* gate, const T* up, T* out, int64_t n) {
  const int64_t step = 2 * at::vec::Vectorized<T>::size(), body = n / step * step;
  const fVec one(1.f);
  for (int64_t j = 0; j < body; j += kW) {
    const fVec g = load(gate + j);
    store(out + j, round_to<T>(g / (one + g.neg().exp())) * load(up + j));
  }
  for (int64_t j = body; j < n; ++j) {
    const float g = static_cast<float>(gate[j]);
    const T silu = static_cast<T>(g / (1.f + std::exp(-g)));
    out[j] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(up[j]));
  }
}

// Where TensorIterator::for_each cuts an op's flat index range between threads: at multiples
// of this, which may fall inside a row and so start a new stretch.
int64_t torch_thread_chunk(int64_t numel) {
  const int64_t grain = 32768, threads = at::get_num_threads();  // at::internal::GRAIN_SIZE
  if (numel < grain || threads == 1 || at::in_parallel_region()) return numel;
  const int64_t tasks = std::min(threads, (numel + grain - 1) / grain);
  return (numel + tasks - 1) / tasks;
}

template <typename T>
void silu_mul_rows(const T* gate_up, T* out, int64_t rows, int64_t n) {
  const int64_t chunk = torch_thread_chunk(rows * n);
  for_rows(rows, n, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* gate = gate_up + i * 2 * n;
      for (int64_t j = 0, stop; j < n; j = stop) {
        stop = std::min(n, j + chunk - (i * n + j) % chunk);
        silu_mul_stretch(gate + j, gate + n + j, out + i * n + j, stop - j);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Entry points: CPU tensors of one dtype, float32 or bfloat16, read as rows of their last dim.

void check_slots(const at::Tensor& slots, int64_t tokens, int64_t num_slots) {
  TORCH_CHECK(
      slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == tokens,
      "rope_store_kv: slot_mapping must be a contiguous int64 [T]");
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(s[t] >= 0 && s[t] < num_slots, "rope_store_kv: slot ", s[t],
                " out of range [0, ", num_slots, ")");
  }
}

// k_scale, v_scale: given for an int8 cache, [blocks, block_size, KVH] fp32.
at::Tensor rope_store_kv(const at::Tensor& qkv_in, const at::Tensor& cos_in,
                         const at::Tensor& sin_in, at::Tensor& k_cache, at::Tensor& v_cache,
                         const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads,
                         const std::optional<at::Tensor>& k_scale,
                         const std::optional<at::Tensor>& v_scale) {
  const int64_t hd = cos_in.size(-1), width = (num_heads + 2 * num_kv_heads) * hd;
  const at::Tensor qkv = rows_of(qkv_in, qkv_in, width, "qkv [T, (H + 2 KVH) hd]");
  const at::Tensor cos = rows_of(cos_in, qkv, hd, "cos"), sin = rows_of(sin_in, qkv, hd, "sin");
  const int64_t tokens = qkv.numel() / width;
  TORCH_CHECK(hd % 2 == 0 && cos.numel() == tokens * hd && sin.numel() == tokens * hd,
              "rope_store_kv: expected cos, sin [T, 1, hd] with hd even");
  const bool quantized = k_cache.scalar_type() == at::kChar;
  const std::vector<int64_t> cache_shape{k_cache.size(0), k_cache.size(1), num_kv_heads, hd};
  for (const at::Tensor* cache : {&k_cache, &v_cache}) {
    TORCH_CHECK(cache->sizes() == cache_shape && cache->is_contiguous() &&
                    cache->scalar_type() == (quantized ? at::kChar : qkv.scalar_type()),
                "rope_store_kv: caches must be contiguous [blocks, block_size, KVH, hd], in "
                "qkv's dtype or both int8");
  }
  TORCH_CHECK(quantized == (k_scale.has_value() && v_scale.has_value()),
              "rope_store_kv: k_scale and v_scale go with an int8 cache, and only with one");
  if (quantized) {
    for (const at::Tensor* scales : {&*k_scale, &*v_scale}) {
      TORCH_CHECK(scales->sizes() == at::IntArrayRef(cache_shape).slice(0, 3) &&
                      scales->is_contiguous() && scales->scalar_type() == at::kFloat,
                  "rope_store_kv: scales must be contiguous fp32 [blocks, block_size, KVH]");
    }
  }
  check_slots(slot_mapping, tokens, k_cache.size(0) * k_cache.size(1));
  at::Tensor qk = at::empty({tokens, num_heads + num_kv_heads, hd}, qkv.options());
  const RopeShape shape{num_heads, num_kv_heads, hd, k_cache.size(1), k_cache.stride(0)};
  const int64_t kv = num_kv_heads * hd;
  dispatch(qkv, "rope_store_kv", [&](auto tag) {
    using T = decltype(tag);
    const T *q_in = qkv.data_ptr<T>(), *c = cos.data_ptr<T>(), *sn = sin.data_ptr<T>();
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    if (quantized) {
      int8_t *kq = k_cache.data_ptr<int8_t>(), *vq = v_cache.data_ptr<int8_t>();
      float *ks = k_scale->data_ptr<float>(), *vs = v_scale->data_ptr<float>();
      rope_store_kv_rows<T>(q_in, c, sn, qk.data_ptr<T>(), slots, tokens, shape, true,
                            [&](int64_t slot, const T* k, const T* v) {
                              for (int64_t h = 0; h < num_kv_heads; ++h) {
                                const int64_t row = slot * num_kv_heads + h;
                                quantize_head(k + h * hd, hd, kq + row * hd, ks + row);
                                quantize_head(v + h * hd, hd, vq + row * hd, vs + row);
                              }
                            });
    } else {
      T *kc = k_cache.data_ptr<T>(), *vc = v_cache.data_ptr<T>();
      rope_store_kv_rows<T>(q_in, c, sn, qk.data_ptr<T>(), slots, tokens, shape, false,
                            [&](int64_t slot, const T* k, const T* v) {
                              const int64_t at = slot / shape.block_size * shape.block_stride +
                                                 slot % shape.block_size * kv;
                              std::copy_n(k, kv, kc + at);
                              std::copy_n(v, kv, vc + at);
                            });
    }
  });
  return qk;
}

at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  const int64_t n = gate_up_in.size(-1) / 2;
  const at::Tensor gate_up = rows_of(gate_up_in, gate_up_in, 2 * n, "gate_up [.., 2 I]");
  std::vector<int64_t> shape = gate_up.sizes().vec();
  shape.back() = n;
  at::Tensor out = at::empty(shape, gate_up.options());
  dispatch(gate_up, "silu_mul", [&](auto tag) {
    using T = decltype(tag);
    silu_mul_rows<T>(gate_up.data_ptr<T>(), out.data_ptr<T>(), out.numel() / n, n);
  });
  return out;
}

}  // namespace

namespace p3_ops {  // for the layer loop (layers.cpp)
at::Tensor rope_store_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                         int64_t num_heads, int64_t num_kv_heads,
                         const std::optional<at::Tensor>& k_scale,
                         const std::optional<at::Tensor>& v_scale) {
  return ::rope_store_kv(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads,
                         k_scale, v_scale);
}
at::Tensor silu_mul(const at::Tensor& gate_up) { return ::silu_mul(gate_up); }
}  // namespace p3_ops

void register_fused(pybind11::module_& m) {
  using pybind11::arg;
  m.def("fused_capability", []() { return std::string(P3_FUSED_CAPABILITY); });
  register_rms_norm(m);
  m.def("rope_store_kv", &rope_store_kv, arg("qkv"), arg("cos"), arg("sin"), arg("k_cache"),
        arg("v_cache"), arg("slot_mapping"), arg("num_heads"), arg("num_kv_heads"),
        arg("k_scale") = pybind11::none(), arg("v_scale") = pybind11::none(),
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("silu_mul", &silu_mul, arg("gate_up"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

#else  // an ISA this file has no at::vec build for: Python keeps to torch

void register_fused(pybind11::module_& m) {
  m.def("fused_capability", []() { return std::string(); });
}

#endif
