// A replica's decoder layers in one call (CPU, one shard, every linear in interleaved blocks):
// the same kernels, in the same order, as the Python modules of p3/model.py call them (so the
// same bits), without ~300 Python-level calls a step. Each layer:
//   h, residual = rms_norm(x + residual)          (the first layer: rms_norm(x), residual = x)
//   qkv = h Wqkv (+ b); qk = rope + store k, v; attention over the paged cache; o = attn Wo
//   h, residual = rms_norm(o + residual); x = silu_mul(h Wgate_up) Wdown
// and it returns (x, residual), as the Python loop does.

#include "fused.h"  // first: it picks the ISA of at::vec

#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#ifdef P3_FUSED_CAPABILITY

namespace p3_ops {
std::tuple<at::Tensor, at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor* residual,
                                            const at::Tensor& w, double eps);
at::Tensor rope_store_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                         at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
                         int64_t num_heads, int64_t num_kv_heads,
                         const std::optional<at::Tensor>& k_scale,
                         const std::optional<at::Tensor>& v_scale);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        double scale, const std::optional<at::Tensor>& k_scale,
                        const std::optional<at::Tensor>& v_scale, const std::string& isa);
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t kind,
                        const c10::optional<at::Tensor>& bias, int64_t level, bool interleaved);
}  // namespace p3_ops

namespace {

// One layer's weights and cache, as lists over the layers (index i is layer i).
struct Layers {
  std::vector<at::Tensor> attn_norm, mlp_norm, qkv, qkv_bias, o_proj, gate_up, down;
  std::vector<int64_t> kinds;  // 4 a layer: qkv, o_proj, gate_up, down
  std::vector<at::Tensor> k_cache, v_cache, k_scale, v_scale;  // undefined scales: no int8
};

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() && t.numel() ? std::optional<at::Tensor>(t) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> forward_layers(
    at::Tensor x, std::optional<at::Tensor> residual, const Layers& layers,
    const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
    const at::Tensor& block_tables, const at::Tensor& context_lens, int64_t num_heads,
    int64_t num_kv_heads, double scale, double eps, int64_t level, const std::string& isa) {
  const int64_t tokens = x.size(0);
  at::Tensor res = residual.has_value() ? *residual : at::Tensor();
  for (size_t i = 0; i < layers.qkv.size(); ++i) {
    at::Tensor h;
    if (res.defined()) {
      std::tie(h, res) = p3_ops::rms_norm(x, &res, layers.attn_norm[i], eps);
    } else {
      h = std::get<0>(p3_ops::rms_norm(x, nullptr, layers.attn_norm[i], eps));
      res = x;
    }
    const int64_t* kind = layers.kinds.data() + 4 * i;
    const at::Tensor qkv = p3_ops::quant_linear(h, layers.qkv[i], kind[0],
                                                maybe(layers.qkv_bias[i]), level, true);
    at::Tensor k_cache = layers.k_cache[i], v_cache = layers.v_cache[i];
    const auto k_scale = maybe(layers.k_scale[i]), v_scale = maybe(layers.v_scale[i]);
    const at::Tensor qk = p3_ops::rope_store_kv(qkv, cos, sin, k_cache, v_cache, slots,
                                                num_heads, num_kv_heads, k_scale, v_scale);
    const at::Tensor q = qk.slice(1, 0, num_heads);
    const at::Tensor attn = p3_ops::paged_decode(q, k_cache, v_cache, block_tables,
                                                 context_lens, scale, k_scale, v_scale, isa);
    const at::Tensor o = p3_ops::quant_linear(attn.reshape({tokens, -1}), layers.o_proj[i],
                                              kind[1], std::nullopt, level, true);
    std::tie(h, res) = p3_ops::rms_norm(o, &res, layers.mlp_norm[i], eps);
    const at::Tensor gate_up =
        p3_ops::quant_linear(h, layers.gate_up[i], kind[2], std::nullopt, level, true);
    x = p3_ops::quant_linear(p3_ops::silu_mul(gate_up), layers.down[i], kind[3], std::nullopt,
                             level, true);
  }
  return {x, res};
}

}  // namespace

void register_layers(pybind11::module_& m) {
  using pybind11::arg;
  pybind11::class_<Layers>(m, "Layers")
      .def(pybind11::init<>())
      .def_readwrite("attn_norm", &Layers::attn_norm)
      .def_readwrite("mlp_norm", &Layers::mlp_norm)
      .def_readwrite("qkv", &Layers::qkv)
      .def_readwrite("qkv_bias", &Layers::qkv_bias)
      .def_readwrite("o_proj", &Layers::o_proj)
      .def_readwrite("gate_up", &Layers::gate_up)
      .def_readwrite("down", &Layers::down)
      .def_readwrite("kinds", &Layers::kinds)
      .def_readwrite("k_cache", &Layers::k_cache)
      .def_readwrite("v_cache", &Layers::v_cache)
      .def_readwrite("k_scale", &Layers::k_scale)
      .def_readwrite("v_scale", &Layers::v_scale);
  m.def("forward_layers", &forward_layers, arg("x"), arg("residual"), arg("layers"), arg("cos"),
        arg("sin"), arg("slots"), arg("block_tables"), arg("context_lens"), arg("num_heads"),
        arg("num_kv_heads"), arg("scale"), arg("eps"), arg("level"), arg("isa"),
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

#else

void register_layers(pybind11::module_&) {}

#endif
