// Argument checks and conversions of the class-streaming ops (op_args.h).
#include "op_args.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

namespace marginkern {
namespace {

void check_vector(const char* op, const char* name, const at::Tensor& t, int64_t n, const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape (", n, ",), got shape ",
              t.sizes());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " with the other tensors, got ",
              t.device());
}

// The per-row and per-class vectors of a Spec whose N, C, acc and device are set.
void set_spec_vectors(const char* op, Spec& s, const at::Tensor& row_scale,
                      const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
                      std::optional<double> softcap, const at::Tensor& target) {
  TORCH_CHECK(!softcap || (std::isfinite(*softcap) && *softcap > 0), op,
              ": softcap must be None or a positive finite number, got ", softcap.value_or(0.0));
  s.row_scale = float_vector(op, "row_scale", row_scale, s.N, s.acc, s.device);
  if (col_scale) s.col_scale = float_vector(op, "col_scale", *col_scale, s.C * s.K, s.acc, s.device);
  if (bias) s.bias = float_vector(op, "bias", *bias, s.C, s.acc, s.device);
  s.softcap = softcap;
  check_vector(op, "target", target, s.N, s.device);
  TORCH_CHECK(at::isIntegralType(target.scalar_type(), /*includeBool=*/false), op,
              ": target must be an integer tensor, got dtype ", target.scalar_type());
  s.target = target.to(at::kLong).contiguous();
  // On the CPU the range check is free. On a GPU it would cost a host sync per call (per class chunk in
  // the backward pass); the kernels there only compare targets with column indices, never index memory
  // with them, and the Python API has checked the targets already (marginkern/checks.py).
  if (s.N > 0 && s.device.is_cpu()) {
    const auto [lo, hi] = at::aminmax(s.target);
    TORCH_CHECK(lo.item<int64_t>() >= -1 && hi.item<int64_t>() < s.C, op,
                ": target must hold class indices in [0, C=", s.C, ") or -1 (no target column), got values in [",
                lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  }
}

}  // namespace

at::Tensor float_vector(const char* op, const char* name, const at::Tensor& t, int64_t n, at::ScalarType acc,
                        const at::Device& device) {
  check_vector(op, name, t, n, device);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got dtype ", t.scalar_type());
  return t.to(acc).contiguous();
}

Spec make_spec(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
               const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
               std::optional<double> softcap, const at::Tensor& target, bool upcast_x, int64_t subcenters,
               const at::Tensor& target_subcenter) {
  TORCH_CHECK(x.dim() == 2, op, ": x must have shape (N, D), got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), op, ": w must have shape (C, D=", x.size(1),
              ") to match x, got shape ", w.sizes());
  TORCH_CHECK(w.device() == x.device(), op, ": x and w must be on the same device, got ", x.device(), " and ",
              w.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got dtype ",
              x.scalar_type());
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), op, ": w must have the dtype of x (", x.scalar_type(),
              "), got ", w.scalar_type());
  TORCH_CHECK(subcenters >= 1 && w.size(0) % subcenters == 0, op, ": w must have C·subcenters rows, got ",
              w.size(0), " rows for subcenters=", subcenters);
  TORCH_CHECK(subcenters == 1 || (!bias && col_scale), op,
              ": sub-centres take a col_scale (cosine logits) and no bias");
  TORCH_CHECK(subcenters <= std::numeric_limits<int>::max(), op, ": subcenters must be below 2^31");
  Spec s;
  s.N = x.size(0);
  s.K = subcenters;
  s.C = w.size(0) / subcenters;
  s.acc = accumulation_dtype(x.scalar_type());
  s.device = x.device();
  s.x = upcast_x ? x.to(s.acc) : x.contiguous();
  s.w = w;
  set_spec_vectors(op, s, row_scale, col_scale, bias, softcap, target);
  if (target_subcenter.defined()) {
    check_vector(op, "target_subcenter", target_subcenter, s.N, s.device);
    s.target_subcenter = target_subcenter.to(at::kLong).contiguous();
    if (s.N > 0 && s.device.is_cpu()) {
      const auto [lo, hi] = at::aminmax(s.target_subcenter);
      TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < s.K, op,
                  ": target_subcenter must hold sub-centre indices in [0, subcenters=", s.K, "), got values in [",
                  lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
    }
  }
  return s;
}

Spec make_dots_spec(const char* op, const at::Tensor& dots, const at::Tensor& row_scale,
                    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
                    std::optional<double> softcap, const at::Tensor& target) {
  TORCH_CHECK(dots.dim() == 2 && dots.is_contiguous(), op, ": dots must be a contiguous (N, C) tensor, got shape ",
              dots.sizes());
  TORCH_CHECK(dots.scalar_type() == at::kFloat || dots.scalar_type() == at::kDouble, op,
              ": dots must be float32 or float64 (the accumulation dtype), got ", dots.scalar_type());
  TORCH_CHECK(dots.size(1) <= std::numeric_limits<int>::max(), op, ": dots must have fewer than 2^31 columns");
  Spec s;
  s.N = dots.size(0);
  s.C = dots.size(1);
  s.acc = dots.scalar_type();
  s.device = dots.device();
  set_spec_vectors(op, s, row_scale, col_scale, bias, softcap, target);
  return s;
}

Cost make_cost(const char* op, const Spec& s, const std::optional<at::Tensor>& query,
               const std::optional<at::Tensor>& query_scale, const std::optional<at::Tensor>& keys,
               const std::optional<at::Tensor>& key_scale, const std::optional<at::Tensor>& coef) {
  const int given = query.has_value() + query_scale.has_value() + keys.has_value() + key_scale.has_value() +
                    coef.has_value();
  TORCH_CHECK(given == 0 || given == 5, op,
              ": the cost term needs all of cost_query, cost_query_scale, cost_keys, cost_key_scale and "
              "cost_coef, or none of them; got ", given, " of 5");
  Cost c;
  if (given == 0) return c;
  TORCH_CHECK(query->dim() == 2 && query->size(0) == s.N, op, ": cost_query must have shape (N=", s.N,
              ", E), got shape ", query->sizes());
  TORCH_CHECK(keys->dim() == 2 && keys->size(0) == s.C && keys->size(1) == query->size(1), op,
              ": cost_keys must have shape (C=", s.C, ", E=", query->size(1), "), got shape ", keys->sizes());
  TORCH_CHECK(query->device() == s.device && keys->device() == s.device, op,
              ": cost_query and cost_keys must be on ", s.device, " with the other tensors, got ", query->device(),
              " and ", keys->device());
  TORCH_CHECK(at::isFloatingType(query->scalar_type()) && at::isFloatingType(keys->scalar_type()), op,
              ": cost_query and cost_keys must be floating-point tensors, got ", query->scalar_type(), " and ",
              keys->scalar_type());
  c.query = query->to(s.acc);
  c.keys = *keys;
  c.key_scale = float_vector(op, "cost_key_scale", *key_scale, s.C, s.acc, s.device);
  c.row_coef = float_vector(op, "cost_coef", *coef, s.N, s.acc, s.device)
                   .mul(float_vector(op, "cost_query_scale", *query_scale, s.N, s.acc, s.device));
  return c;
}

RowGrads make_row_grads(const char* op, const Spec& s, const at::Tensor& lse, const at::Tensor& coef_p,
                        const at::Tensor& coef_u, const at::Tensor& target_grad) {
  return {float_vector(op, "lse", lse, s.N, s.acc, s.device), float_vector(op, "coef_p", coef_p, s.N, s.acc, s.device),
          float_vector(op, "coef_u", coef_u, s.N, s.acc, s.device),
          float_vector(op, "target_grad", target_grad, s.N, s.acc, s.device)};
}

void check_class_chunk(const char* op, int64_t class_chunk) {
  // The row loops index a chunk with int: 32-bit lanes vectorize twice as wide as 64-bit ones.
  TORCH_CHECK(class_chunk >= 1 && class_chunk <= std::numeric_limits<int>::max(), op,
              ": class_chunk must be in [1, 2^31), got ", class_chunk);
}

ChunkColumnTensors::ChunkColumnTensors(const Spec& s, const Cost& cost, int64_t c0, int64_t c1) {
  const auto opts = s.row_scale.options();  // accumulation dtype on the op's device (dots ops have no x)
  scale = s.col_scale.defined() && s.K == 1 ? s.col_scale.narrow(0, c0, c1 - c0) : at::ones({c1 - c0}, opts);
  bias = s.bias.defined() ? s.bias.narrow(0, c0, c1 - c0) : at::zeros({c1 - c0}, opts);
  if (cost.present()) cost_scale = cost.key_scale.narrow(0, c0, c1 - c0);
}

}  // namespace marginkern
