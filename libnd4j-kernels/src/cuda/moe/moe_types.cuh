// moe_types.cuh — element and accumulation types of the MoE block's kernels: bf16 and fp32 accumulate in fp32, fp64
// in fp64; with_types runs a functor with the pair of a block dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "deepep4j.h"

namespace deepep4j {
namespace cuda {
namespace moe {

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T, class A> __device__ __forceinline__ T from_acc(A v) { return T(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

template <class A> __device__ __forceinline__ A load_value(const void* p, int32_t dtype, int64_t i) {
  return dtype == DEEPEP4J_FLOAT64 ? A(static_cast<const double*>(p)[i]) : A(static_cast<const float*>(p)[i]);
}
template <class A> __device__ __forceinline__ void store_value(void* p, int32_t dtype, int64_t i, A v) {
  if (dtype == DEEPEP4J_FLOAT64)
    static_cast<double*>(p)[i] = double(v);
  else
    static_cast<float*>(p)[i] = float(v);
}

template <class F>
cudaError_t with_types(int32_t dtype, F&& f) {
  if (dtype == DEEPEP4J_FLOAT64) return f(double{}, double{});
  if (dtype == DEEPEP4J_BFLOAT16) return f(__nv_bfloat16{}, float{});
  return f(float{}, float{});
}

inline unsigned blocks_for(int64_t n, int threads, int64_t cap = 65535 * 8) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return unsigned(b > cap ? cap : b);
}

}  // namespace moe
}  // namespace cuda
}  // namespace deepep4j
