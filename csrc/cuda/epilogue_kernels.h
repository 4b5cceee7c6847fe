// Hand-written CUDA epilogue of the engine's class-streaming ops: what runs on a block of raw dot products
// a = x·wᵀ after cuBLAS has computed it (csrc/cuda/streaming_ce_cuda.cpp runs the GEMMs). The element
// math is csrc/common/logit_math.h, the same as the CPU row loops'; formulas in csrc/cpu/streaming_ce.h.
//
// Plain CUDA, no torch header: the launchers take raw device pointers, so that nvcc compiles this file
// anywhere (CI checks that it does, tests/test_cuda_sources.py) and its host side is ordinary C++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace marginkern::cuda {

// The logits of a block of dot products: dots (N, cc), row stride ld_dots, of the classes c0 + j.
struct LogitArgs {
  int64_t N, cc, c0;
  const float* dots;
  int64_t ld_dots;
  const float* row_scale;  // (N,)
  const float* col_scale;  // (cc,) of this block of classes; ones when the spec has none
  const float* bias;       // (cc,); zeros when the spec has none
  const int64_t* target;   // (N,) absolute class index, −1: no target column
  bool has_softcap;
  float softcap;
};

// What dL/da needs beyond the logits; the cost_* pointers are null without the EMO cost term.
struct GradArgs {
  const float *lse, *coef_p, *coef_u, *target_grad;  // (N,)
  const float* cost_dots;                            // (N, cc) q·kᵀ of the block, row stride ld_cost
  int64_t ld_cost;
  const float* cost_scale;     // (cc,) cost_key_scale of the block
  const float* cost_row_coef;  // (N,) cost_coef · cost_query_scale
};

enum class GradDtype { kFloat32, kFloat16, kBFloat16 };

// Folds the block's logits (the target column's is target_logit[n]) into the running (max, Σexp) of
// every row, and Σz into total when it is not null. One thread block per row.
cudaError_t accumulate_row_stats(const LogitArgs& args, const float* target_logit, float* run_max, float* run_sum,
                                 float* total, cudaStream_t stream);

// grad (N, cc), row stride ld_grad, of `dtype` ← dL/da (float16 saturates at ±65504, as the Triton path);
// grad may be dots itself (float32, same stride): each element is read before it is written, by one thread.
cudaError_t grad_logits(const LogitArgs& args, const GradArgs& grad_args, void* grad, int64_t ld_grad,
                        GradDtype dtype, cudaStream_t stream);

}  // namespace marginkern::cuda
