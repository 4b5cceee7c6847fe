// CUDA kernels of the class-streaming ops (schemas in csrc/cpu/streaming_ce.cpp, math in
// csrc/cpu/streaming_ce.h): per class chunk, cuBLAS (through ATen) writes the N × chunk dot products in
// fp32 into a reused buffer, reading 16-bit x and w as they are, then the hand-written epilogue of
// epilogue_kernels.cu turns them into row statistics or dL/da. Registered for the ops the CUDA tile
// backend calls (marginkern/cpp_tiles.py, CudaTiles): streaming_row_stats, streaming_grad_logits,
// row_stats_of_dots, grads_of_dots_. The engine's Python loop runs the backward GEMMs, as for Triton.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <optional>
#include <tuple>

#include "../common/op_args.h"
#include "epilogue_kernels.h"

namespace marginkern {
namespace {

void check_float32_accumulation(const char* op, const Spec& s) {
  TORCH_CHECK(s.acc == at::kFloat, op,
              ": the CUDA kernels take float32, float16 or bfloat16 tensors; float64 runs on the reference "
              "backend");
}

void check_launch(const char* op, cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

bool is_16bit(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// aten::mm.dtype_out (16-bit operands, fp32 result) where this torch has it: looked up at run time, so
// that the extension builds against a torch without it (and then upcasts the operands instead).
using MmDtypeOut = at::Tensor&(const at::Tensor&, const at::Tensor&, at::ScalarType, at::Tensor&);
std::optional<c10::TypedOperatorHandle<MmDtypeOut>> find_mm_dtype_out() {
  const auto handle = c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype_out"});
  if (!handle) return std::nullopt;
  return handle->typed<MmDtypeOut>();
}

// 0: not tried yet, 1: mm.dtype_out works for 16-bit CUDA operands, −1: it does not.
std::atomic<int> mm_dtype_out_state{0};

// dots ← a · bᵀ in fp32. Two 16-bit operands go to cuBLAS as they are, with an fp32 output (mm.dtype_out),
// as the engine's mm_accumulate; where that fails they are upcast (slower, same result).
void fp32_dots(at::Tensor dots, const at::Tensor& a, const at::Tensor& b) {
  static const auto mm_dtype_out = find_mm_dtype_out();
  if (is_16bit(a) && a.scalar_type() == b.scalar_type() && mm_dtype_out && mm_dtype_out_state.load() >= 0) {
    try {
      mm_dtype_out->call(a, b.t(), at::kFloat, dots);
      mm_dtype_out_state.store(1);
      return;
    } catch (const c10::OutOfMemoryError&) {
      throw;
    } catch (const c10::Error&) {
      if (mm_dtype_out_state.load() == 1) throw;  // it worked before: this is a real error
      mm_dtype_out_state.store(-1);
    }
  }
  at::mm_out(dots, a.to(at::kFloat), b.to(at::kFloat).t());
}

// The (N, c1 − c0) fp32 dot products of a chunk, at the start of `buffer`.
at::Tensor chunk_dots(const at::Tensor& a, const at::Tensor& b, const at::Tensor& buffer, int64_t c0, int64_t c1) {
  at::Tensor dots = buffer.narrow(0, 0, a.size(0) * (c1 - c0)).view({a.size(0), c1 - c0});
  fp32_dots(dots, a, b.narrow(0, c0, c1 - c0));
  return dots;
}

cuda::LogitArgs logit_args(const Spec& s, const ChunkColumnTensors& cols, const at::Tensor& dots, int64_t c0) {
  return {s.N,
          dots.size(1),
          c0,
          dots.data_ptr<float>(),
          dots.stride(0),
          s.row_scale.data_ptr<float>(),
          cols.scale.data_ptr<float>(),
          cols.bias.data_ptr<float>(),
          s.target.data_ptr<int64_t>(),
          s.softcap.has_value(),
          static_cast<float>(s.softcap.value_or(1.0))};
}

// Folds the chunk [c0, c0 + dots.size(1)) into the running row statistics.
void accumulate_chunk(const char* op, const Spec& s, const at::Tensor& dots, int64_t c0, const at::Tensor& target_logit,
                      at::Tensor& run_max, at::Tensor& run_sum, at::Tensor& total, bool need_sum_logits) {
  const ChunkColumnTensors cols(s, Cost{}, c0, c0 + dots.size(1));
  check_launch(op, cuda::accumulate_row_stats(logit_args(s, cols, dots, c0), target_logit.data_ptr<float>(),
                                              run_max.data_ptr<float>(), run_sum.data_ptr<float>(),
                                              need_sum_logits ? total.data_ptr<float>() : nullptr,
                                              c10::cuda::getCurrentCUDAStream()));
}

cuda::GradDtype grad_dtype_of(at::ScalarType t) {
  if (t == at::kHalf) return cuda::GradDtype::kFloat16;
  if (t == at::kBFloat16) return cuda::GradDtype::kBFloat16;
  return cuda::GradDtype::kFloat32;
}

// grad ← dL/da of the chunk [c0, c0 + dots.size(1)); cost_dots is q·kᵀ of the chunk (undefined without cost).
void grads_into(const char* op, const Spec& s, const Cost& cost, const RowGrads& rg, int64_t c0,
                const at::Tensor& dots, const at::Tensor& cost_dots, const at::Tensor& grad) {
  const ChunkColumnTensors cols(s, cost, c0, c0 + dots.size(1));
  const cuda::GradArgs grad_args{rg.lse.data_ptr<float>(),
                                 rg.coef_p.data_ptr<float>(),
                                 rg.coef_u.data_ptr<float>(),
                                 rg.target_grad.data_ptr<float>(),
                                 cost.present() ? cost_dots.data_ptr<float>() : nullptr,
                                 cost.present() ? cost_dots.stride(0) : 0,
                                 cost.present() ? cols.cost_scale.data_ptr<float>() : nullptr,
                                 cost.present() ? cost.row_coef.data_ptr<float>() : nullptr};
  check_launch(op, cuda::grad_logits(logit_args(s, cols, dots, c0), grad_args, grad.data_ptr(), grad.stride(0),
                                     grad_dtype_of(grad.scalar_type()), c10::cuda::getCurrentCUDAStream()));
}

// lse = max + log(Σexp); a row of −inf logits gives −inf + log 0 = −inf, +inf gives +inf + log 1.
at::Tensor finish_lse(const at::Tensor& run_max, const at::Tensor& run_sum) { return at::log(run_sum).add_(run_max); }

std::tuple<at::Tensor, at::Tensor> streaming_row_stats_cuda(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale, const std::optional<at::Tensor>& col_scale,
    const std::optional<at::Tensor>& bias, std::optional<double> softcap, const at::Tensor& target,
    const at::Tensor& target_logit, bool need_sum_logits, int64_t class_chunk) {
  constexpr const char* op = "marginkern::streaming_row_stats";
  const Spec s = make_spec(op, x, w, row_scale, col_scale, bias, softcap, target, /*upcast_x=*/false);
  const c10::cuda::CUDAGuard guard(x.device());  // after make_spec has checked that every tensor is there
  check_float32_accumulation(op, s);
  check_class_chunk(op, class_chunk);
  const at::Tensor target_logit_acc = float_vector(op, "target_logit", target_logit, s.N, s.acc, s.device);
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor run_max = at::full({s.N}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor run_sum = at::zeros({s.N}, opts);
  at::Tensor total = need_sum_logits ? at::zeros({s.N}, opts) : at::empty({0}, opts);
  if (s.N == 0) return {run_max, total};
  const at::Tensor buffer = at::empty({s.N * std::min(class_chunk, std::max<int64_t>(s.C, 1))}, opts);
  for (int64_t c0 = 0; c0 < s.C; c0 += class_chunk) {
    const int64_t c1 = std::min(s.C, c0 + class_chunk);
    const at::Tensor dots = chunk_dots(s.x, s.w, buffer, c0, c1);
    accumulate_chunk(op, s, dots, c0, target_logit_acc, run_max, run_sum, total, need_sum_logits);
  }
  return {finish_lse(run_max, run_sum), total};
}

// dL/da of the classes [c0, c1) in x's dtype when that is 16-bit (what the engine's backward GEMMs read;
// the engine pre-scales the coefficients of a float16 G), else fp32.
at::Tensor streaming_grad_logits_cuda(
    const at::Tensor& x, const at::Tensor& w, const at::Tensor& row_scale, const std::optional<at::Tensor>& col_scale,
    const std::optional<at::Tensor>& bias, std::optional<double> softcap, const at::Tensor& target,
    const at::Tensor& lse, const at::Tensor& coef_p, const at::Tensor& coef_u, const at::Tensor& target_grad,
    int64_t c0, int64_t c1, const std::optional<at::Tensor>& cost_query,
    const std::optional<at::Tensor>& cost_query_scale, const std::optional<at::Tensor>& cost_keys,
    const std::optional<at::Tensor>& cost_key_scale, const std::optional<at::Tensor>& cost_coef) {
  constexpr const char* op = "marginkern::streaming_grad_logits";
  const Spec s = make_spec(op, x, w, row_scale, col_scale, bias, softcap, target, /*upcast_x=*/false);
  const c10::cuda::CUDAGuard guard(x.device());  // after make_spec has checked that every tensor is there
  check_float32_accumulation(op, s);
  const Cost cost = make_cost(op, s, cost_query, cost_query_scale, cost_keys, cost_key_scale, cost_coef);
  const RowGrads rg = make_row_grads(op, s, lse, coef_p, coef_u, target_grad);
  TORCH_CHECK(0 <= c0 && c0 <= c1 && c1 <= s.C, op, ": the class range [c0, c1) must lie in [0, C=", s.C, "], got [",
              c0, ", ", c1, ")");
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor grad = at::empty({s.N, c1 - c0}, x.options().dtype(is_16bit(x) ? x.scalar_type() : at::kFloat));
  if (s.N == 0 || c1 == c0) return grad;
  // fp32 grads are written over their own dot products; 16-bit ones need the fp32 buffer beside them
  const at::Tensor buffer = is_16bit(x) ? at::empty({s.N * (c1 - c0)}, opts) : grad.view({-1});
  const at::Tensor dots = chunk_dots(s.x, s.w, buffer, c0, c1);
  at::Tensor cost_dots;
  if (cost.present()) cost_dots = chunk_dots(cost.query, cost.keys, at::empty({s.N * (c1 - c0)}, opts), c0, c1);
  grads_into(op, s, cost, rg, c0, dots, cost_dots, grad);
  return grad;
}

std::tuple<at::Tensor, at::Tensor> row_stats_of_dots_cuda(
    const at::Tensor& dots, const at::Tensor& row_scale, const std::optional<at::Tensor>& col_scale,
    const std::optional<at::Tensor>& bias, std::optional<double> softcap, const at::Tensor& target,
    const at::Tensor& target_logit, bool need_sum_logits) {
  constexpr const char* op = "marginkern::row_stats_of_dots";
  const Spec s = make_dots_spec(op, dots, row_scale, col_scale, bias, softcap, target);
  const c10::cuda::CUDAGuard guard(dots.device());
  check_float32_accumulation(op, s);
  const at::Tensor target_logit_acc = float_vector(op, "target_logit", target_logit, s.N, s.acc, s.device);
  const auto opts = dots.options();
  at::Tensor run_max = at::full({s.N}, -std::numeric_limits<double>::infinity(), opts);
  at::Tensor run_sum = at::zeros({s.N}, opts);
  at::Tensor total = need_sum_logits ? at::zeros({s.N}, opts) : at::empty({0}, opts);
  if (s.N == 0 || s.C == 0) return {run_max, total};
  accumulate_chunk(op, s, dots, 0, target_logit_acc, run_max, run_sum, total, need_sum_logits);
  return {finish_lse(run_max, run_sum), total};
}

void grads_of_dots_cuda_(const at::Tensor& dots, const at::Tensor& row_scale, const std::optional<at::Tensor>& col_scale,
                         const std::optional<at::Tensor>& bias, std::optional<double> softcap, const at::Tensor& target,
                         const at::Tensor& lse, const at::Tensor& coef_p, const at::Tensor& coef_u,
                         const at::Tensor& target_grad) {
  constexpr const char* op = "marginkern::grads_of_dots_";
  const Spec s = make_dots_spec(op, dots, row_scale, col_scale, bias, softcap, target);
  const c10::cuda::CUDAGuard guard(dots.device());
  check_float32_accumulation(op, s);
  const RowGrads rg = make_row_grads(op, s, lse, coef_p, coef_u, target_grad);
  if (s.N == 0 || s.C == 0) return;
  grads_into(op, s, Cost{}, rg, 0, dots, at::Tensor(), dots);
}

}  // namespace
}  // namespace marginkern

// streaming_grads has no CUDA kernel: on the GPU the engine's own chunk loop runs the backward GEMMs.
TORCH_LIBRARY_IMPL(marginkern, CUDA, m) {
  m.impl("streaming_row_stats", TORCH_FN(marginkern::streaming_row_stats_cuda));
  m.impl("streaming_grad_logits", TORCH_FN(marginkern::streaming_grad_logits_cuda));
  m.impl("row_stats_of_dots", TORCH_FN(marginkern::row_stats_of_dots_cuda));
  m.impl("grads_of_dots_", TORCH_FN(marginkern::grads_of_dots_cuda_));
}
