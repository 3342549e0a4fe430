// moe_accumulate.cu — adds the bf16 products of a grouped GEMM into their fp32 outputs (the expert weight gradients):
// one launch for every group, blockIdx.y = group.
#include "cuda/moe/moe_kernels.h"
#include "cuda/moe/moe_types.cuh"

namespace deepep4j {
namespace cuda {
namespace moe {
namespace {

__global__ void accumulate_kernel(const AccumulateGroup* groups, float alpha, float beta) {
  const AccumulateGroup g = groups[blockIdx.y];
  const int64_t total = g.m * g.n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / g.n, j = i % g.n;
    float* c = g.c + r * g.ldc + j;
    const float p = alpha * __bfloat162float(g.product[i]);
    *c = beta == 0.0f ? p : beta * *c + p;
  }
}

}  // namespace

cudaError_t launch_accumulate_groups(const AccumulateGroup* groups, int32_t count, float alpha, float beta,
                                     cudaStream_t s) {
  if (count == 0) return cudaSuccess;
  accumulate_kernel<<<dim3(64, unsigned(count)), 256, 0, s>>>(groups, alpha, beta);
  return cudaGetLastError();
}

// Loads this file's kernels now (cudaFuncGetAttributes), for every dtype: see preload_moe_kernels.
cudaError_t preload_accumulate_kernels() {
  cudaFuncAttributes a;
  return cudaFuncGetAttributes(&a, accumulate_kernel);
}

}  // namespace moe
}  // namespace cuda
}  // namespace deepep4j
