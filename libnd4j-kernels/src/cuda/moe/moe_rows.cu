// moe_rows.cu — moving rows between the receive order and expert order: gather (with a per-row scale), the weighted
// sum of a row's slots back into receive order (slots in order: deterministic), per-assignment dot products (the
// routing-weight gradients), and the per-slot values between [M, K] arrays (or fp64 row tails) and expert order.
#include <algorithm>

#include "cuda/moe/moe_kernels.h"
#include "cuda/moe/moe_types.cuh"

namespace deepep4j {
namespace cuda {
namespace moe {
namespace {

// Row kernels: one block per row, each thread V consecutive elements at a time (see load_chunk).
template <class T, class A, int V>
__global__ void gather_rows_kernel(int64_t h, const T* src, int64_t stride, const int32_t* row, const A* scale, T* dst) {
  const int64_t a = blockIdx.x;
  const int32_t r = row[a];  // < 0: padding, a zero row
  const T* in = src + int64_t(r) * stride;
  T* out = dst + a * h;
  const A sc = scale && r >= 0 ? scale[a] : A(1);
  for (int64_t i = int64_t(threadIdx.x) * V; i < h; i += int64_t(blockDim.x) * V) {
    T v[V];
    if (r >= 0)
      load_chunk<V>(in + i, v);
    else
      for (int j = 0; j < V; ++j) v[j] = from_acc<T, A>(A(0));
    if (scale)
      for (int j = 0; j < V; ++j) v[j] = from_acc<T, A>(sc * to_acc(v[j]));
    store_chunk<V>(out + i, v);
  }
}

template <class T, class A, int V>
__global__ void scatter_rows_kernel(int32_t k, int64_t h, const int32_t* pos, const T* src, const A* scale, T* out,
                                    int64_t out_stride) {
  const int64_t m = blockIdx.x;
  int32_t p[DEEPEP4J_MAX_TOPK];
  A sc[DEEPEP4J_MAX_TOPK];
  for (int j = 0; j < k; ++j) {
    p[j] = pos[m * k + j];
    sc[j] = p[j] >= 0 && scale ? scale[p[j]] : A(1);
  }
  for (int64_t i = int64_t(threadIdx.x) * V; i < h; i += int64_t(blockDim.x) * V) {
    A acc[V];
    for (int e = 0; e < V; ++e) acc[e] = 0;
    for (int j = 0; j < k; ++j) {
      if (p[j] < 0) continue;
      T v[V];
      load_chunk<V>(src + int64_t(p[j]) * h + i, v);
      for (int e = 0; e < V; ++e) acc[e] += sc[j] * to_acc(v[e]);
    }
    T o[V];
    for (int e = 0; e < V; ++e) o[e] = from_acc<T, A>(acc[e]);
    store_chunk<V>(out + m * out_stride + i, o);
  }
}

template <class T, class A, int V>
__global__ void row_dots_kernel(int64_t h, const T* rows, int64_t stride, const int32_t* row, const T* src, A* out) {
  __shared__ A part[32];
  const int64_t a = blockIdx.x;
  const T* g = rows + int64_t(row[a]) * stride;
  const T* y = src + a * h;
  A d = 0;
  for (int64_t i = int64_t(threadIdx.x) * V; i < h && row[a] >= 0; i += int64_t(blockDim.x) * V) {
    T gv[V], yv[V];
    load_chunk<V>(g + i, gv);
    load_chunk<V>(y + i, yv);
    for (int e = 0; e < V; ++e) d += to_acc(gv[e]) * to_acc(yv[e]);
  }
  for (int o = 16; o > 0; o /= 2) d += __shfl_xor_sync(0xffffffffu, d, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = d;
  __syncthreads();
  if (threadIdx.x == 0) {
    A total = 0;
    for (int w = 0; w < int(blockDim.x / 32); ++w) total += part[w];
    out[a] = total;
  }
}

template <class A>
__global__ void gather_slots_kernel(int64_t count, int32_t k, const int32_t* slot, const void* values, int32_t vdt,
                                    int64_t stride, int64_t offset, A* out) {
  for (int64_t a = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; a < count; a += int64_t(gridDim.x) * blockDim.x) {
    const int64_t s = slot[a];
    out[a] = s < 0 ? A(0) : load_value<A>(values, vdt, (s / k) * stride + offset + s % k);
  }
}

template <class A>
__global__ void scatter_slots_kernel(int64_t total, int32_t k, const int32_t* pos, const A* src, void* values,
                                     int32_t vdt, int64_t stride, int64_t offset) {
  for (int64_t s = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; s < total; s += int64_t(gridDim.x) * blockDim.x)
    store_value<A>(values, vdt, (s / k) * stride + offset + s % k, pos[s] >= 0 ? src[pos[s]] : A(0));
}

template <class A>
__global__ void columns_kernel(bool pack, int64_t total, int32_t k, const void* in, int32_t odt, int64_t stride,
                               int64_t offset, void* out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t at = (i / k) * stride + offset + i % k;
    if (pack)
      store_value<A>(out, odt, at, static_cast<const A*>(in)[i]);
    else
      static_cast<A*>(out)[i] = load_value<A>(in, odt, at);
  }
}

// Threads for a row of h elements taken `v` at a time: one chunk each, in whole warps, 32 to 256.
int threads_for(int64_t h, int v) {
  const int64_t chunks = (h + v - 1) / v;
  return int(std::min<int64_t>(256, std::max<int64_t>(32, (chunks + 31) / 32 * 32)));
}

}  // namespace

cudaError_t launch_gather_rows(int32_t dtype, int64_t count, int64_t h, const void* src, int64_t src_stride,
                               const int32_t* row, const void* scale, void* dst, cudaStream_t s) {
  if (count == 0) return cudaSuccess;
  return with_types(dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    return with_width<T>({h, src_stride}, {src, dst}, [&](auto v) {
      constexpr int V = decltype(v)::value;
      gather_rows_kernel<T, A, V><<<unsigned(count), threads_for(h, V), 0, s>>>(
          h, static_cast<const T*>(src), src_stride, row, static_cast<const A*>(scale), static_cast<T*>(dst));
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_scatter_rows(int32_t dtype, int64_t m, int32_t k, int64_t h, const int32_t* pos, const void* src,
                                const void* scale, void* out, int64_t out_stride, cudaStream_t s) {
  if (m == 0) return cudaSuccess;
  return with_types(dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    return with_width<T>({h, out_stride}, {src, out}, [&](auto v) {
      constexpr int V = decltype(v)::value;
      scatter_rows_kernel<T, A, V><<<unsigned(m), threads_for(h, V), 0, s>>>(
          k, h, pos, static_cast<const T*>(src), static_cast<const A*>(scale), static_cast<T*>(out), out_stride);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_row_dots(int32_t dtype, int64_t count, int64_t h, const void* rows, int64_t stride,
                            const int32_t* row, const void* src, void* out, cudaStream_t s) {
  if (count == 0) return cudaSuccess;
  return with_types(dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    return with_width<T>({h, stride}, {rows, src}, [&](auto v) {
      constexpr int V = decltype(v)::value;
      row_dots_kernel<T, A, V><<<unsigned(count), threads_for(h, V), 0, s>>>(
          h, static_cast<const T*>(rows), stride, row, static_cast<const T*>(src), static_cast<A*>(out));
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_gather_slots(int32_t dtype, int64_t count, int32_t k, const int32_t* slot, const void* values,
                                int32_t vdt, int64_t stride, int64_t offset, void* out, cudaStream_t s) {
  if (count == 0) return cudaSuccess;
  return with_types(dtype, [&](auto, auto acc) {
    using A = decltype(acc);
    gather_slots_kernel<A><<<blocks_for(count, 256), 256, 0, s>>>(count, k, slot, values, vdt, stride, offset,
                                                                  static_cast<A*>(out));
    return cudaGetLastError();
  });
}

cudaError_t launch_scatter_slots(int32_t dtype, int64_t m, int32_t k, const int32_t* pos, const void* src,
                                 void* values, int32_t vdt, int64_t stride, int64_t offset, cudaStream_t s) {
  const int64_t total = m * k;
  if (total == 0) return cudaSuccess;
  return with_types(dtype, [&](auto, auto acc) {
    using A = decltype(acc);
    scatter_slots_kernel<A><<<blocks_for(total, 256), 256, 0, s>>>(total, k, pos, static_cast<const A*>(src), values,
                                                                   vdt, stride, offset);
    return cudaGetLastError();
  });
}

cudaError_t launch_columns(bool pack, int32_t dtype, int64_t rows, int32_t k, const void* in, int32_t odt,
                           int64_t stride, int64_t offset, void* out, cudaStream_t s) {
  const int64_t total = rows * k;
  if (total == 0) return cudaSuccess;
  return with_types(dtype, [&](auto, auto acc) {
    using A = decltype(acc);
    columns_kernel<A><<<blocks_for(total, 256), 256, 0, s>>>(pack, total, k, in, odt, stride, offset, out);
    return cudaGetLastError();
  });
}

// Loads this file's kernels now, for every dtype and width: see preload_moe_kernels.
cudaError_t preload_rows_kernels() {
  return for_each_dtype([](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    constexpr int V = kWide<T>;
    return preload({(const void*)gather_rows_kernel<T, A, 1>, (const void*)gather_rows_kernel<T, A, V>,
                    (const void*)scatter_rows_kernel<T, A, 1>, (const void*)scatter_rows_kernel<T, A, V>,
                    (const void*)row_dots_kernel<T, A, 1>, (const void*)row_dots_kernel<T, A, V>,
                    (const void*)gather_slots_kernel<A>, (const void*)scatter_slots_kernel<A>,
                    (const void*)columns_kernel<A>});
  });
}

}  // namespace moe
}  // namespace cuda
}  // namespace deepep4j
