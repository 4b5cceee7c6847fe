// CUDA kernels of the epilogue (epilogue_kernels.h).
//
// Cost model (bench/NOTES.md): per class chunk cuBLAS writes N × cc fp32 dot products and these kernels
// read them once (forward) or read them and write 16-bit dL/da (backward): 8 resp. 6 bytes per logit
// against 2·D FLOPs of the chunk's GEMM, so for D ≥ 512 the epilogue's traffic hides under the GEMMs on an
// H100 (ridge ≈ 300 FLOP/byte). Simple, coalesced kernels are enough; the GEMMs are cuBLAS's.
#include "epilogue_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common/logit_math.h"

namespace marginkern::cuda {
namespace {

namespace lm = logit_math;

// The `Math` of logit_math.h on the GPU: CUDA's full-precision float functions (not the __expf
// intrinsics, whose error grows with |x|).
struct CudaMath {
  __host__ __device__ static float exp(float x) { return ::expf(x); }
  __host__ __device__ static float tanh(float x) { return ::tanhf(x); }
};

constexpr int kRowThreads = 256;   // threads per row in the forward kernel
constexpr int kGradThreads = 256;  // classes per thread block in the backward kernel
constexpr int kMaxGridY = 65535;   // CUDA's limit on gridDim.y
constexpr unsigned kFullWarp = 0xffffffffu;

__device__ __forceinline__ lm::MaxSumExp<float> shuffle_xor(lm::MaxSumExp<float> s, int lane_mask) {
  return {__shfl_xor_sync(kFullWarp, s.max, lane_mask), __shfl_xor_sync(kFullWarp, s.sum, lane_mask)};
}

template <bool kSoftcap>
__global__ void __launch_bounds__(kRowThreads)
    accumulate_row_stats_kernel(LogitArgs a, const float* __restrict__ target_logit, float* __restrict__ run_max,
                                float* __restrict__ run_sum, float* __restrict__ total) {
  constexpr int kWarps = kRowThreads / 32;
  __shared__ float warp_max[kWarps], warp_sum[kWarps], warp_total[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float cap = a.softcap, inv_cap = 1.0f / a.softcap;
  for (int64_t n = blockIdx.x; n < a.N; n += gridDim.x) {
    const float* row = a.dots + n * a.ld_dots;
    const float r = a.row_scale[n];
    const int64_t target_col = a.target[n] - a.c0;  // in [0, cc) when this block holds the target class
    lm::MaxSumExp<float> part{-lm::infinity<float>(), 0.0f};
    float sum_z = 0.0f;
    for (int64_t j = threadIdx.x; j < a.cc; j += kRowThreads) {
      float z = lm::logit<CudaMath, float, kSoftcap>(row[j], r * a.col_scale[j], a.bias[j], cap, inv_cap).z;
      z = j == target_col ? target_logit[n] : z;
      part = lm::push<CudaMath>(part, z);
      sum_z += z;
    }
    for (int mask = 16; mask > 0; mask >>= 1) {
      part = lm::merge<CudaMath>(part, shuffle_xor(part, mask));
      sum_z += __shfl_xor_sync(kFullWarp, sum_z, mask);
    }
    if (lane == 0) warp_max[warp] = part.max, warp_sum[warp] = part.sum, warp_total[warp] = sum_z;
    __syncthreads();
    if (threadIdx.x == 0) {
      lm::MaxSumExp<float> row_state{run_max[n], run_sum[n]};
      float row_total = 0.0f;
      for (int k = 0; k < kWarps; ++k) {
        row_state = lm::merge<CudaMath>(row_state, lm::MaxSumExp<float>{warp_max[k], warp_sum[k]});
        row_total += warp_total[k];
      }
      run_max[n] = row_state.max;
      run_sum[n] = row_state.sum;
      if (total != nullptr) total[n] += row_total;
    }
    __syncthreads();  // the shared slots are rewritten for the next row
  }
}

template <typename OutT>
__device__ __forceinline__ OutT to_grad_dtype(float g);

template <>
__device__ __forceinline__ float to_grad_dtype<float>(float g) {
  return g;
}

template <>
__device__ __forceinline__ __half to_grad_dtype<__half>(float g) {
  // Saturate instead of overflowing to inf; NaN stays NaN (fminf/fmaxf would turn it into a number).
  constexpr float kHalfMax = 65504.0f;
  g = g > kHalfMax ? kHalfMax : g;
  g = g < -kHalfMax ? -kHalfMax : g;
  return __float2half_rn(g);
}

template <>
__device__ __forceinline__ __nv_bfloat16 to_grad_dtype<__nv_bfloat16>(float g) {
  return __float2bfloat16_rn(g);
}

// Thread (x, y) computes class j = blockIdx.x·kGradThreads + threadIdx.x of the rows y, y + gridDim.y, …:
// the column's scale and bias are loaded once, the row's coefficients are broadcast reads.
template <bool kSoftcap, bool kCost, typename OutT>
__global__ void __launch_bounds__(kGradThreads)
    grad_logits_kernel(LogitArgs a, GradArgs g, OutT* grad, int64_t ld_grad) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kGradThreads + threadIdx.x;
  if (j >= a.cc) return;
  const float col_scale = a.col_scale[j], bias = a.bias[j];
  const float cost_scale = kCost ? g.cost_scale[j] : 0.0f;
  const float cap = a.softcap, inv_cap = 1.0f / a.softcap;
  for (int64_t n = blockIdx.y; n < a.N; n += gridDim.y) {
    const float dot = a.dots[n * a.ld_dots + j];  // read before grad (possibly the same memory) is written
    float out;
    if (j == a.target[n] - a.c0) {
      out = g.target_grad[n];
    } else {
      const lm::LogitAndChain<float> zc =
          lm::logit<CudaMath, float, kSoftcap>(dot, a.row_scale[n] * col_scale, bias, cap, inv_cap);
      float weight_p = g.coef_p[n];
      if constexpr (kCost) weight_p -= g.cost_row_coef[n] * cost_scale * g.cost_dots[n * g.ld_cost + j];
      out = lm::grad_of_logit<CudaMath>(zc.z, zc.chain, weight_p, g.coef_u[n], g.lse[n]);
    }
    grad[n * ld_grad + j] = to_grad_dtype<OutT>(out);
  }
}

template <bool kSoftcap, bool kCost>
cudaError_t launch_grad_logits(const LogitArgs& a, const GradArgs& g, void* grad, int64_t ld_grad, GradDtype dtype,
                               cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((a.cc + kGradThreads - 1) / kGradThreads),
                  static_cast<unsigned>(a.N < kMaxGridY ? a.N : kMaxGridY));
  switch (dtype) {
    case GradDtype::kFloat32:
      grad_logits_kernel<kSoftcap, kCost, float>
          <<<grid, kGradThreads, 0, stream>>>(a, g, static_cast<float*>(grad), ld_grad);
      break;
    case GradDtype::kFloat16:
      grad_logits_kernel<kSoftcap, kCost, __half>
          <<<grid, kGradThreads, 0, stream>>>(a, g, static_cast<__half*>(grad), ld_grad);
      break;
    case GradDtype::kBFloat16:
      grad_logits_kernel<kSoftcap, kCost, __nv_bfloat16>
          <<<grid, kGradThreads, 0, stream>>>(a, g, static_cast<__nv_bfloat16*>(grad), ld_grad);
      break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t accumulate_row_stats(const LogitArgs& args, const float* target_logit, float* run_max, float* run_sum,
                                 float* total, cudaStream_t stream) {
  if (args.N == 0 || args.cc == 0) return cudaSuccess;
  const unsigned blocks = static_cast<unsigned>(args.N < (1 << 30) ? args.N : (1 << 30));
  if (args.has_softcap) {
    accumulate_row_stats_kernel<true><<<blocks, kRowThreads, 0, stream>>>(args, target_logit, run_max, run_sum, total);
  } else {
    accumulate_row_stats_kernel<false><<<blocks, kRowThreads, 0, stream>>>(args, target_logit, run_max, run_sum, total);
  }
  return cudaGetLastError();
}

cudaError_t grad_logits(const LogitArgs& args, const GradArgs& grad_args, void* grad, int64_t ld_grad,
                        GradDtype dtype, cudaStream_t stream) {
  if (args.N == 0 || args.cc == 0) return cudaSuccess;
  const bool cost = grad_args.cost_dots != nullptr;
  if (args.has_softcap) {
    return cost ? launch_grad_logits<true, true>(args, grad_args, grad, ld_grad, dtype, stream)
                : launch_grad_logits<true, false>(args, grad_args, grad, ld_grad, dtype, stream);
  }
  return cost ? launch_grad_logits<false, true>(args, grad_args, grad, ld_grad, dtype, stream)
              : launch_grad_logits<false, false>(args, grad_args, grad, ld_grad, dtype, stream);
}

}  // namespace marginkern::cuda
