// moe_accumulate.cu — adds the bf16 products of a grouped GEMM into their fp32 outputs (the expert weight gradients):
// one launch for every group, blockIdx.y = group; 8 elements per thread and step where every group allows it.
#include "cuda/moe/moe_kernels.h"
#include "cuda/moe/moe_types.cuh"

namespace deepep4j {
namespace cuda {
namespace moe {
namespace {

template <int V>
__global__ void accumulate_kernel(const AccumulateGroup* groups, float alpha, float beta) {
  const AccumulateGroup g = groups[blockIdx.y];
  const uint32_t per_row = uint32_t(g.n / V), total = uint32_t(g.m) * per_row;  // < 2^31 (checked at launch)
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
    const uint32_t r = i / per_row, j = (i - r * per_row) * V;
    __nv_bfloat16 p[V];
    load_chunk<V>(g.product + int64_t(i) * V, p);
    float* c = g.c + int64_t(r) * g.ldc + j;
    float out[V];
    if (beta == 0.0f) {
      for (int e = 0; e < V; ++e) out[e] = alpha * __bfloat162float(p[e]);
    } else {
      if constexpr (V % 4 == 0) {
        for (int q = 0; q < V / 4; ++q) *reinterpret_cast<float4*>(out + 4 * q) = reinterpret_cast<const float4*>(c)[q];
      } else {
        for (int e = 0; e < V; ++e) out[e] = c[e];
      }
      for (int e = 0; e < V; ++e) out[e] = beta * out[e] + alpha * __bfloat162float(p[e]);
    }
    if constexpr (V % 4 == 0) {
      for (int q = 0; q < V / 4; ++q) reinterpret_cast<float4*>(c)[q] = *reinterpret_cast<const float4*>(out + 4 * q);
    } else {
      for (int e = 0; e < V; ++e) c[e] = out[e];
    }
  }
}

}  // namespace

cudaError_t launch_accumulate_groups(const AccumulateGroup* groups, int32_t count, bool wide, float alpha, float beta,
                                     cudaStream_t s) {
  if (count == 0) return cudaSuccess;
  const dim3 grid(wide ? 32 : 64, unsigned(count));
  if (wide)
    accumulate_kernel<8><<<grid, 256, 0, s>>>(groups, alpha, beta);
  else
    accumulate_kernel<1><<<grid, 256, 0, s>>>(groups, alpha, beta);
  return cudaGetLastError();
}

bool accumulate_can_widen(const AccumulateGroup& g) {
  return g.n % 8 == 0 && g.ldc % 4 == 0 && reinterpret_cast<uintptr_t>(g.c) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(g.product) % 16 == 0;
}

// Loads this file's kernels now: see preload_moe_kernels.
cudaError_t preload_accumulate_kernels() {
  return preload({(const void*)accumulate_kernel<1>, (const void*)accumulate_kernel<8>});
}

}  // namespace moe
}  // namespace cuda
}  // namespace deepep4j
