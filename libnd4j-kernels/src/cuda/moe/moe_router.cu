// moe_router.cu — the router on the GPU: scores (softmax or sigmoid of the logits GEMM's output), top-k by score +
// bias with ties to the lower expert id, renormalised weights, per-expert load; and its backward. One block per token
// (its E scores in shared memory), the Java Router's arithmetic in the accumulation type.
#include <cfloat>

#include "cuda/moe/moe_kernels.h"
#include "cuda/moe/moe_types.cuh"

namespace deepep4j {
namespace cuda {
namespace moe {
namespace {

constexpr int kThreads = 128;

template <class A>
__device__ A block_sum(A v, A* shared) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < int(blockDim.x / 32); ++w) total += shared[w];  // fixed order: deterministic
  return total;
}

template <class A>
__device__ A block_max(A v, A* shared) {
  for (int o = 16; o > 0; o /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  A m = shared[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w) m = max(m, shared[w]);
  return m;
}

// Largest value, ties to the lower id; id -1 for "none".
template <class A>
__device__ void block_argmax(A* v, int* id, A* sv, int* sid) {
  for (int o = 16; o > 0; o /= 2) {
    A ov = __shfl_xor_sync(0xffffffffu, *v, o);
    int oi = __shfl_xor_sync(0xffffffffu, *id, o);
    if (oi >= 0 && (*id < 0 || ov > *v || (ov == *v && oi < *id))) {
      *v = ov;
      *id = oi;
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) {
    sv[warp] = *v;
    sid[warp] = *id;
  }
  __syncthreads();
  *v = sv[0];
  *id = sid[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w)
    if (sid[w] >= 0 && (*id < 0 || sv[w] > *v || (sv[w] == *v && sid[w] < *id))) {
      *v = sv[w];
      *id = sid[w];
    }
}

template <class A>
__global__ void __launch_bounds__(kThreads) router_forward_kernel(RouterForward r) {
  extern __shared__ unsigned char smem[];
  A* sel = reinterpret_cast<A*>(smem);  // score + bias, -inf once taken
  __shared__ A red[kThreads / 32];
  __shared__ int red_id[kThreads / 32];
  const int64_t t = blockIdx.x;
  const int E = r.e, K = r.k;
  A* s = static_cast<A*>(r.scores) + t * E;
  if (r.score_function == DEEPEP4J_SCORE_SIGMOID) {
    for (int c = threadIdx.x; c < E; c += blockDim.x) s[c] = A(1) / (A(1) + exp(-s[c]));
  } else {
    A mx = -DBL_MAX;
    for (int c = threadIdx.x; c < E; c += blockDim.x) mx = max(mx, s[c]);
    mx = block_max(mx, red);
    A sum = 0;
    for (int c = threadIdx.x; c < E; c += blockDim.x) {
      const A e = exp(s[c] - mx);
      s[c] = e;
      sum += e;
    }
    sum = block_sum(sum, red);
    for (int c = threadIdx.x; c < E; c += blockDim.x) s[c] /= sum;
  }
  for (int c = threadIdx.x; c < E; c += blockDim.x) sel[c] = s[c] + (r.bias ? A(r.bias[c]) : A(0));
  __syncthreads();
  A* gate = static_cast<A*>(r.gate) + t * K;
  __shared__ int chosen[DEEPEP4J_MAX_TOPK];
  for (int j = 0; j < K; ++j) {
    int best = -1;
    if (r.replay) {
      best = int(r.replay[t * K + j]);
    } else {
      A v = 0;
      for (int c = threadIdx.x; c < E; c += blockDim.x) {
        const bool taken = isinf(double(sel[c])) && sel[c] < 0;
        if (!taken && (best < 0 || sel[c] > v)) {
          v = sel[c];
          best = c;
        }
      }
      block_argmax(&v, &best, red, red_id);
    }
    if (threadIdx.x == 0) {
      chosen[j] = best;
      if (!r.replay) sel[best] = -INFINITY;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    A sum = 0;
    for (int j = 0; j < K; ++j) {
      const int e = chosen[j];
      r.topk_idx[t * K + j] = e;
      gate[j] = s[e];
      sum += s[e];
      atomicAdd(r.load + e, 1);
    }
    static_cast<A*>(r.gate_sum)[t] = sum;
    for (int j = 0; j < K; ++j) {
      const A w = r.normalize ? gate[j] / sum : gate[j];
      static_cast<A*>(r.weights)[t * K + j] = w;
      r.weights_f32[t * K + j] = float(w);
    }
  }
}

// prob_sum[e] = sum over tokens of scores[t, e], in token order per lane and a fixed lane order (deterministic).
template <class A>
__global__ void prob_sum_kernel(const A* scores, int64_t n, int e, A* out) {
  __shared__ A part[8][32];
  const int c = blockIdx.x * 32 + threadIdx.x % 32, lane = threadIdx.x / 32;
  A sum = 0;
  if (c < e)
    for (int64_t t = lane; t < n; t += 8) sum += scores[t * e + c];
  part[lane][threadIdx.x % 32] = sum;
  __syncthreads();
  if (lane == 0 && c < e) {
    A total = 0;
    for (int l = 0; l < 8; ++l) total += part[l][threadIdx.x];
    out[c] = total;
  }
}

template <class T, class A>
__global__ void __launch_bounds__(kThreads) router_backward_kernel(RouterBackward r) {
  extern __shared__ unsigned char smem[];
  A* gs = reinterpret_cast<A*>(smem);
  __shared__ A red[kThreads / 32];
  const int64_t n = blockIdx.x;
  const int E = r.e, K = r.k;
  const A* s = static_cast<const A*>(r.scores) + n * E;
  const A* w = static_cast<const A*>(r.weights) + n * K;
  const A* gw = static_cast<const A*>(r.grad_weights) + n * K;
  for (int c = threadIdx.x; c < E; c += blockDim.x) gs[c] = A(r.aux_factor * r.load[c]);
  __syncthreads();
  if (threadIdx.x == 0) {
    A dot = 0;
    for (int j = 0; j < K; ++j) dot += gw[j] * w[j];
    const A gsum = static_cast<const A*>(r.gate_sum)[n];
    for (int j = 0; j < K; ++j) gs[r.topk_idx[n * K + j]] += r.normalize ? (gw[j] - dot) / gsum : gw[j];
  }
  __syncthreads();
  T* out = static_cast<T*>(r.grad_logits) + n * E;
  if (r.score_function == DEEPEP4J_SCORE_SIGMOID) {
    for (int c = threadIdx.x; c < E; c += blockDim.x) out[c] = from_acc<T, A>(gs[c] * s[c] * (A(1) - s[c]));
    return;
  }
  A d = 0;
  for (int c = threadIdx.x; c < E; c += blockDim.x) d += gs[c] * s[c];
  d = block_sum(d, red);
  for (int c = threadIdx.x; c < E; c += blockDim.x) out[c] = from_acc<T, A>(s[c] * (gs[c] - d));
}

}  // namespace

cudaError_t launch_router_forward(int32_t dtype, const RouterForward& r, cudaStream_t s) {
  if (r.n == 0) return cudaSuccess;
  cudaError_t e = cudaMemsetAsync(r.load, 0, size_t(r.e) * sizeof(int32_t), s);
  if (e != cudaSuccess) return e;
  if (dtype == DEEPEP4J_FLOAT64) {
    router_forward_kernel<double><<<unsigned(r.n), kThreads, size_t(r.e) * 8, s>>>(r);
    prob_sum_kernel<double><<<unsigned((r.e + 31) / 32), 256, 0, s>>>(static_cast<const double*>(r.scores), r.n, r.e,
                                                                       static_cast<double*>(r.prob_sum));
  } else {
    router_forward_kernel<float><<<unsigned(r.n), kThreads, size_t(r.e) * 4, s>>>(r);
    prob_sum_kernel<float><<<unsigned((r.e + 31) / 32), 256, 0, s>>>(static_cast<const float*>(r.scores), r.n, r.e,
                                                                     static_cast<float*>(r.prob_sum));
  }
  return cudaGetLastError();
}

cudaError_t launch_router_backward(int32_t dtype, const RouterBackward& r, cudaStream_t s) {
  if (r.n == 0) return cudaSuccess;
  return with_types(dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    router_backward_kernel<T, A><<<unsigned(r.n), kThreads, size_t(r.e) * sizeof(A), s>>>(r);
    return cudaGetLastError();
  });
}

// Loads this file's kernels now (cudaFuncGetAttributes), for every dtype: see preload_moe_kernels.
cudaError_t preload_router_kernels() {
  if (cudaError_t e = preload({(const void*)router_forward_kernel<double>, (const void*)router_forward_kernel<float>,
                               (const void*)prob_sum_kernel<double>, (const void*)prob_sum_kernel<float>}))
    return e;
  return for_each_dtype(
      [](auto t, auto acc) { return preload({(const void*)router_backward_kernel<decltype(t), decltype(acc)>}); });
}

}  // namespace moe
}  // namespace cuda
}  // namespace deepep4j
