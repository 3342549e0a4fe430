// moe_permute.cu — received (row, slot) pairs grouped by local expert, inside an expert in (row, slot) order: one block
// per expert scans the [M, K] local ids with ballots, so the order is fixed (no atomics) and equals the CPU's.
#include "cuda/moe/moe_kernels.h"
#include "cuda/moe/moe_types.cuh"

namespace deepep4j {
namespace cuda {
namespace moe {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads) permutation_kernel(Permutation p, const int64_t* offsets) {
  __shared__ int warp_count[kThreads / 32];
  __shared__ int64_t base;
  const int j = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t total = p.m * p.k;
  if (threadIdx.x == 0) base = offsets[j];
  __syncthreads();
  for (int64_t s0 = 0; s0 < total; s0 += kThreads) {
    const int64_t s = s0 + threadIdx.x;
    const bool mine = s < total && p.recv_topk_idx[s] == j;
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int64_t before = base;
    for (int w = 0; w < warp; ++w) before += warp_count[w];
    before += __popc(ballot & ((1u << lane) - 1u));
    if (mine) {
      p.assign_row[before] = int32_t(s / p.k);
      p.assign_slot[before] = int32_t(s);
      p.pos[s] = int32_t(before);
    }
    __syncthreads();
    if (threadIdx.x == 0)
      for (int w = 0; w < kThreads / 32; ++w) base += warp_count[w];
    __syncthreads();
  }
}

}  // namespace

cudaError_t launch_permutation(const Permutation& p, const int64_t* offsets_dev, cudaStream_t s) {
  if (p.m * p.k == 0) return cudaSuccess;
  cudaError_t e = cudaMemsetAsync(p.pos, 0xff, size_t(p.m * p.k) * sizeof(int32_t), s);  // -1: no local expert
  const size_t padded = size_t(p.offsets[p.num_local]) * sizeof(int32_t);  // -1: padding (the kernel fills the rest)
  if (e == cudaSuccess) e = cudaMemsetAsync(p.assign_row, 0xff, padded, s);
  if (e == cudaSuccess) e = cudaMemsetAsync(p.assign_slot, 0xff, padded, s);
  if (e != cudaSuccess) return e;
  permutation_kernel<<<unsigned(p.num_local), kThreads, 0, s>>>(p, offsets_dev);
  return cudaGetLastError();
}

// Loads this file's kernels now (cudaFuncGetAttributes), for every dtype: see preload_moe_kernels.
cudaError_t preload_permute_kernels() { return preload({(const void*)permutation_kernel}); }

}  // namespace moe
}  // namespace cuda
}  // namespace deepep4j
