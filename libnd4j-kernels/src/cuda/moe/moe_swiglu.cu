// moe_swiglu.cu — SwiGLU's elementwise part: h = silu(a) * b and its backward, in the accumulation type, V elements
// per thread and step (16-byte accesses where the arrays allow, see load_chunk).
#include "cuda/moe/moe_kernels.h"
#include "cuda/moe/moe_types.cuh"

namespace deepep4j {
namespace cuda {
namespace moe {
namespace {

template <class T, class A, int V>
__global__ void swiglu_forward_kernel(int64_t n, const T* a, const T* b, T* h) {
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * V; i < n;
       i += int64_t(gridDim.x) * blockDim.x * V) {
    T av[V], bv[V], hv[V];
    load_chunk<V>(a + i, av);
    load_chunk<V>(b + i, bv);
    for (int e = 0; e < V; ++e) {
      const A x = to_acc(av[e]);
      const A sig = A(1) / (A(1) + exp(-x));
      hv[e] = from_acc<T, A>(x * sig * to_acc(bv[e]));
    }
    store_chunk<V>(h + i, hv);
  }
}

template <class T, class A, int V>
__global__ void swiglu_backward_kernel(int64_t n, const T* a, const T* b, const T* gh, T* ga, T* gb) {
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * V; i < n;
       i += int64_t(gridDim.x) * blockDim.x * V) {
    T av[V], bv[V], gv[V], gav[V], gbv[V];
    load_chunk<V>(a + i, av);
    load_chunk<V>(b + i, bv);
    load_chunk<V>(gh + i, gv);
    for (int e = 0; e < V; ++e) {
      const A x = to_acc(av[e]), y = to_acc(bv[e]), g = to_acc(gv[e]);
      const A sig = A(1) / (A(1) + exp(-x));
      gav[e] = from_acc<T, A>(g * y * sig * (A(1) + x * (A(1) - sig)));  // silu'(x) = sig (1 + x (1 - sig))
      gbv[e] = from_acc<T, A>(g * x * sig);
    }
    store_chunk<V>(ga + i, gav);
    store_chunk<V>(gb + i, gbv);
  }
}

}  // namespace

cudaError_t launch_swiglu_forward(int32_t dtype, int64_t n, const void* a, const void* b, void* h, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  return with_types(dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    return with_width<T>({n}, {a, b, h}, [&](auto v) {
      constexpr int V = decltype(v)::value;
      swiglu_forward_kernel<T, decltype(acc), V><<<blocks_for((n + V - 1) / V, 256), 256, 0, s>>>(
          n, static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(h));
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_swiglu_backward(int32_t dtype, int64_t n, const void* a, const void* b, const void* gh, void* ga,
                                   void* gb, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  return with_types(dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    return with_width<T>({n}, {a, b, gh, ga, gb}, [&](auto v) {
      constexpr int V = decltype(v)::value;
      swiglu_backward_kernel<T, decltype(acc), V><<<blocks_for((n + V - 1) / V, 256), 256, 0, s>>>(
          n, static_cast<const T*>(a), static_cast<const T*>(b), static_cast<const T*>(gh), static_cast<T*>(ga),
          static_cast<T*>(gb));
      return cudaGetLastError();
    });
  });
}

// Loads this file's kernels now, for every dtype and width: see preload_moe_kernels.
cudaError_t preload_swiglu_kernels() {
  return for_each_dtype([](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    constexpr int V = kWide<T>;
    return preload({(const void*)swiglu_forward_kernel<T, A, 1>, (const void*)swiglu_forward_kernel<T, A, V>,
                    (const void*)swiglu_backward_kernel<T, A, 1>, (const void*)swiglu_backward_kernel<T, A, V>});
  });
}

}  // namespace moe
}  // namespace cuda
}  // namespace deepep4j
