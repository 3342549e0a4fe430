// moe_swiglu.cu — SwiGLU's elementwise part: h = silu(a) * b and its backward, in the accumulation type.
#include "cuda/moe/moe_kernels.h"
#include "cuda/moe/moe_types.cuh"

namespace deepep4j {
namespace cuda {
namespace moe {
namespace {

template <class T, class A>
__global__ void swiglu_forward_kernel(int64_t n, const T* a, const T* b, T* h) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const A x = to_acc(a[i]);
    const A sig = A(1) / (A(1) + exp(-x));
    h[i] = from_acc<T, A>(x * sig * to_acc(b[i]));
  }
}

template <class T, class A>
__global__ void swiglu_backward_kernel(int64_t n, const T* a, const T* b, const T* gh, T* ga, T* gb) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const A x = to_acc(a[i]), y = to_acc(b[i]), g = to_acc(gh[i]);
    const A sig = A(1) / (A(1) + exp(-x));
    ga[i] = from_acc<T, A>(g * y * sig * (A(1) + x * (A(1) - sig)));  // silu'(x) = sig (1 + x (1 - sig))
    gb[i] = from_acc<T, A>(g * x * sig);
  }
}

}  // namespace

cudaError_t launch_swiglu_forward(int32_t dtype, int64_t n, const void* a, const void* b, void* h, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  return with_types(dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    swiglu_forward_kernel<T, decltype(acc)><<<blocks_for(n, 256), 256, 0, s>>>(
        n, static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(h));
    return cudaGetLastError();
  });
}

cudaError_t launch_swiglu_backward(int32_t dtype, int64_t n, const void* a, const void* b, const void* gh, void* ga,
                                   void* gb, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  return with_types(dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    swiglu_backward_kernel<T, decltype(acc)><<<blocks_for(n, 256), 256, 0, s>>>(
        n, static_cast<const T*>(a), static_cast<const T*>(b), static_cast<const T*>(gh), static_cast<T*>(ga),
        static_cast<T*>(gb));
    return cudaGetLastError();
  });
}

// Loads this file's kernels now (cudaFuncGetAttributes), for every dtype: see preload_moe_kernels.
cudaError_t preload_swiglu_kernels() {
  cudaError_t e = cudaSuccess;
  for (int32_t dtype : {DEEPEP4J_FLOAT32, DEEPEP4J_BFLOAT16, DEEPEP4J_FLOAT64})
    if (e == cudaSuccess)
      e = with_types(dtype, [](auto t, auto acc) {
        using T = decltype(t);
        using A = decltype(acc);
        cudaFuncAttributes a;
        for (const void* f : {(const void*)swiglu_forward_kernel<T, A>, (const void*)swiglu_backward_kernel<T, A>})
          if (cudaError_t e2 = cudaFuncGetAttributes(&a, f)) return e2;
        return cudaSuccess;
      });
  return e;
}

}  // namespace moe
}  // namespace cuda
}  // namespace deepep4j
