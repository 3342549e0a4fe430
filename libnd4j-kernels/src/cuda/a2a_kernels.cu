// a2a_kernels.cu — the local permutes around NCCL's all-to-all: pack rows per destination, unpack what arrived, and
// the fp32 reduce of returned rows. One warp per token or row; the slot code is shared with the ring kernels.
#include "cuda/slot_ops.cuh"

namespace deepep4j {
namespace cuda {

namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;

__device__ __forceinline__ int64_t stream_index(const Routing& h, const RankBases& base, int64_t t, int d, int R) {
  const int c = int(t / h.tokens_per_channel);
  return base.v[d] + h.send_prefix[d * h.channels + c] + h.send_pos[t * R + d];
}

__global__ void __launch_bounds__(kThreads) pack_dispatch(Routing h, int R, DispatchIo io, RankBases dest,
                                                          uint8_t* staging, int64_t slot_bytes) {
  const DispatchSlot lay = DispatchSlot::make(io.row_bytes, h.num_topk, io.num_scales);
  const int lane = threadIdx.x % 32, L = h.num_experts / R;
  for (int64_t t = blockIdx.x * int64_t(kWarps) + threadIdx.x / 32; t < h.num_tokens; t += int64_t(gridDim.x) * kWarps) {
    const uint64_t mask = h.token_mask[t];
    for (int d = 0; d < R; ++d)
      if (mask >> d & 1ull)
        write_dispatch_slot(staging + stream_index(h, dest, t, d, R) * slot_bytes, lay, io, h, t, d, L, lane);
  }
}

__global__ void __launch_bounds__(kThreads) unpack_dispatch(Routing h, int R, int64_t M, DispatchIo io, RankBases src,
                                                            const uint8_t* staging, int64_t slot_bytes) {
  const DispatchSlot lay = DispatchSlot::make(io.row_bytes, h.num_topk, io.num_scales);
  const int lane = threadIdx.x % 32;
  for (int64_t m = blockIdx.x * int64_t(kWarps) + threadIdx.x / 32; m < M; m += int64_t(gridDim.x) * kWarps) {
    int s = 0;
    while (s + 1 < R && src.v[s + 1] <= m) ++s;
    read_dispatch_slot(staging + m * slot_bytes, lay, io, h, m, s, lane);
  }
}

__global__ void __launch_bounds__(kThreads) pack_combine(Routing h, int64_t M, CombineIo io, uint8_t* staging,
                                                         int64_t slot_bytes) {
  const CombineSlot lay = CombineSlot::make(io.row_bytes, h.num_topk);
  const int lane = threadIdx.x % 32;
  for (int64_t m = blockIdx.x * int64_t(kWarps) + threadIdx.x / 32; m < M; m += int64_t(gridDim.x) * kWarps)
    write_combine_slot(staging + m * slot_bytes, lay, io, h, m, lane);
}

// kRows bounds the ranks (R <= kRows): the table of returned rows is per thread (local memory), 1.5 KB at 64 rows.
template <int kRows>
__global__ void __launch_bounds__(kThreads) reduce_combine(Routing h, int R, CombineIo io, RankBases dest,
                                                           const uint8_t* staging, int64_t slot_bytes) {
  const CombineSlot lay = CombineSlot::make(io.row_bytes, h.num_topk);
  const int lane = threadIdx.x % 32;
  ReturnedRow rows[kRows];
  for (int64_t t = blockIdx.x * int64_t(kWarps) + threadIdx.x / 32; t < h.num_tokens; t += int64_t(gridDim.x) * kWarps) {
    const uint64_t mask = h.token_mask[t];
    for (int d = 0; d < R; ++d)
      rows[d] = slot_row((mask >> d & 1ull) ? staging + stream_index(h, dest, t, d, R) * slot_bytes : nullptr, lay);
    reduce_token_any(rows, R, io, t, h.num_topk, lane);
  }
}

int blocks_for(int64_t items) { return int(std::max<int64_t>(1, std::min<int64_t>((items + kWarps - 1) / kWarps, 2048))); }

}  // namespace

cudaError_t launch_a2a_pack_dispatch(const Routing& h, int32_t R, const DispatchIo& io, const RankBases& dest,
                                     uint8_t* staging, int64_t slot_bytes, cudaStream_t s) {
  if (h.num_tokens > 0) pack_dispatch<<<blocks_for(h.num_tokens), kThreads, 0, s>>>(h, R, io, dest, staging, slot_bytes);
  return cudaGetLastError();
}

cudaError_t launch_a2a_unpack_dispatch(const Routing& h, int32_t R, int64_t M, const DispatchIo& io,
                                       const RankBases& src, const uint8_t* staging, int64_t slot_bytes,
                                       cudaStream_t s) {
  if (M > 0) unpack_dispatch<<<blocks_for(M), kThreads, 0, s>>>(h, R, M, io, src, staging, slot_bytes);
  return cudaGetLastError();
}

cudaError_t launch_a2a_pack_combine(const Routing& h, int64_t M, const CombineIo& io, uint8_t* staging,
                                    int64_t slot_bytes, cudaStream_t s) {
  if (M > 0) pack_combine<<<blocks_for(M), kThreads, 0, s>>>(h, M, io, staging, slot_bytes);
  return cudaGetLastError();
}

cudaError_t launch_a2a_reduce_combine(const Routing& h, int32_t R, const CombineIo& io, const RankBases& dest,
                                      const uint8_t* staging, int64_t slot_bytes, cudaStream_t s) {
  if (h.num_tokens <= 0) return cudaGetLastError();
  if (R <= kFewRanks)
    reduce_combine<kFewRanks><<<blocks_for(h.num_tokens), kThreads, 0, s>>>(h, R, io, dest, staging, slot_bytes);
  else
    reduce_combine<DEEPEP4J_MAX_RANKS><<<blocks_for(h.num_tokens), kThreads, 0, s>>>(h, R, io, dest, staging,
                                                                                   slot_bytes);
  return cudaGetLastError();
}

cudaError_t load_a2a_kernels(int32_t num_ranks, KernelSet* k) {
  return k->add({reinterpret_cast<const void*>(pack_dispatch), reinterpret_cast<const void*>(unpack_dispatch),
                 reinterpret_cast<const void*>(pack_combine),
                 num_ranks <= kFewRanks ? reinterpret_cast<const void*>(reduce_combine<kFewRanks>)
                                        : reinterpret_cast<const void*>(reduce_combine<DEEPEP4J_MAX_RANKS>)});
}

}  // namespace cuda
}  // namespace deepep4j
