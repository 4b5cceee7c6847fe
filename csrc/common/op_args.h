// The arguments of the engine's class-streaming ops (schemas at the end of csrc/cpu/streaming_ce.cpp,
// math in csrc/cpu/streaming_ce.h), checked once and converted to contiguous accumulation-dtype tensors
// on the device of x (or dots). Shared by the CPU ops (csrc/cpu) and the CUDA ops (csrc/cuda): one place
// that names a bad argument and says what was expected.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>

namespace marginkern {

// What the ops compute in: float64 for float64 inputs, else float32 (engine.accumulation_dtype).
inline at::ScalarType accumulation_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// The logit definition shared by the ops.
struct Spec {
  at::Tensor x;          // (N, D): in the accumulation dtype, or as given (see make_spec's upcast_x)
  at::Tensor w;          // (C, D), input dtype: upcast per chunk where needed, never as a whole
  at::Tensor row_scale;  // (N,)
  at::Tensor col_scale;  // (C,), undefined when absent
  at::Tensor bias;       // (C,), undefined when absent
  at::Tensor target;     // (N,) int64, −1 = no target column in this row
  std::optional<double> softcap;
  at::ScalarType acc;
  at::Device device{at::kCPU};  // of x (or dots): every tensor of the call must be there
  int64_t N, C;          // C counts classes: with K sub-centres w has K·C rows and col_scale K·C entries
  int64_t K = 1;         // sub-centres per class (streaming_ce.h)
  at::Tensor target_subcenter;  // (N,) int64 in [0, K): the backward's target sub-centre; undefined unless K > 1
  // the hard-negative re-weighting (streaming_ce.h HardNegatives): (α, β, γ) and the (N,) thresholds in the
  // accumulation dtype; the thresholds undefined when absent (CPU only)
  std::array<double, 3> hard_coefs{0.0, 1.0, 0.0};
  at::Tensor hard_threshold;
};

// The EMO cost term of the backward ops; every tensor undefined when absent.
struct Cost {
  at::Tensor query;      // (N, E), accumulation dtype
  at::Tensor keys;       // (C, E), its own dtype: upcast per chunk
  at::Tensor key_scale;  // (C,)
  at::Tensor row_coef;   // (N,) cost_coef · cost_query_scale
  bool present() const { return query.defined(); }
};

// The per-row vectors of the backward ops.
struct RowGrads {
  at::Tensor lse, coef_p, coef_u, target_grad;  // (N,)
  at::Tensor entropy_coef;                      // (N,) the entropy term (CPU only), undefined when absent
};

// `t` as a contiguous (n,) vector in the accumulation dtype, on `device`.
at::Tensor float_vector(const char* op, const char* name, const at::Tensor& t, int64_t n, at::ScalarType acc,
                        const at::Device& device);

// upcast_x: x in the accumulation dtype (the CPU GEMMs); false keeps a float16/bfloat16 x as it is (the
// CUDA GEMMs read 16-bit operands and write fp32).
// subcenters K > 1: w holds K rows per class (no bias then); target_subcenter is needed by the backward ops.
Spec make_spec(const char* op, const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale,
               const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
               std::optional<double> softcap, const at::Tensor& target, bool upcast_x = true, int64_t subcenters = 1,
               const at::Tensor& target_subcenter = at::Tensor());

// The Spec of an (N, C) matrix of raw dot products computed elsewhere (the 3-GEMM path): no x, no w.
Spec make_dots_spec(const char* op, const at::Tensor& dots, const at::Tensor& row_scale,
                    const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
                    std::optional<double> softcap, const at::Tensor& target);

Cost make_cost(const char* op, const Spec& s, const std::optional<at::Tensor>& query,
               const std::optional<at::Tensor>& query_scale, const std::optional<at::Tensor>& keys,
               const std::optional<at::Tensor>& key_scale, const std::optional<at::Tensor>& coef);

RowGrads make_row_grads(const char* op, const Spec& s, const at::Tensor& lse, const at::Tensor& coef_p,
                        const at::Tensor& coef_u, const at::Tensor& target_grad);

void check_class_chunk(const char* op, int64_t class_chunk);

// The chunk's column vectors [c0, c1); ones / zeros stand in for an absent col_scale / bias, so that
// one branch-free loop serves every case. With sub-centres the scale is ones too: the reduction over each
// class's K rows has applied the rows' col_scale already (streaming_ce.cpp).
struct ChunkColumnTensors {
  at::Tensor scale, bias, cost_scale;
  ChunkColumnTensors(const Spec& s, const Cost& cost, int64_t c0, int64_t c1);
};

}  // namespace marginkern
