// moe_types.cuh — element and accumulation types of the MoE block's kernels: bf16 and fp32 accumulate in fp32, fp64
// in fp64; with_types runs a functor with the pair of a block dtype; 16-byte chunks for the memory-bound kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

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

// Runs f(T{}, A{}) for each block dtype's pair, stopping at the first error (the preload_*_kernels functions).
template <class F>
cudaError_t for_each_dtype(F&& f) {
  for (int32_t dtype : {DEEPEP4J_FLOAT32, DEEPEP4J_BFLOAT16, DEEPEP4J_FLOAT64})
    if (cudaError_t e = with_types(dtype, f)) return e;
  return cudaSuccess;
}

// Loads the given kernels now (cudaFuncGetAttributes loads a kernel's module): see preload_moe_kernels.
inline cudaError_t preload(std::initializer_list<const void*> kernels) {
  cudaFuncAttributes a;
  for (const void* f : kernels)
    if (cudaError_t e = cudaFuncGetAttributes(&a, f)) return e;
  return cudaSuccess;
}

// V consecutive elements moved as one 16-byte access where V * sizeof(T) == 16 (the row and elementwise kernels are
// bound by memory traffic; 2-byte bf16 accesses leave most of the bandwidth unused), else one by one.
template <int V, class T>
__device__ __forceinline__ void load_chunk(const T* p, T (&out)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(p);
  } else {
    for (int i = 0; i < V; ++i) out[i] = p[i];
  }
}
template <int V, class T>
__device__ __forceinline__ void store_chunk(T* p, const T (&in)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(in);
  } else {
    for (int i = 0; i < V; ++i) p[i] = in[i];
  }
}

// The chunk width for T: 16 bytes when every count is a multiple of it and every pointer 16-byte aligned, else 1.
template <class T>
constexpr int kWide = int(16 / sizeof(T));
template <class T>
inline bool can_widen(std::initializer_list<int64_t> counts, std::initializer_list<const void*> ptrs) {
  for (int64_t c : counts)
    if (c % kWide<T> != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

// Runs f(std::integral_constant<int, V>) with V = kWide<T> when can_widen<T>(counts, ptrs), else V = 1.
template <class T, class F>
cudaError_t with_width(std::initializer_list<int64_t> counts, std::initializer_list<const void*> ptrs, F&& f) {
  if (can_widen<T>(counts, ptrs)) return f(std::integral_constant<int, kWide<T>>{});
  return f(std::integral_constant<int, 1>{});
}

inline unsigned blocks_for(int64_t n, int threads, int64_t cap = 65535 * 8) {
  int64_t b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return unsigned(b > cap ? cap : b);
}

}  // namespace moe
}  // namespace cuda
}  // namespace deepep4j
