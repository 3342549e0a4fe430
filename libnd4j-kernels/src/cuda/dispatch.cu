// dispatch.cu — the ring dispatch: per channel a sender block streams its tokens to every destination's ring in peer
// memory, and a receiver block copies what its sources streamed into the receive arrays, in source-token order.
#include <algorithm>

#include "cuda/ring_common.cuh"
#include "cuda/slot_ops.cuh"

namespace deepep4j {
namespace cuda {

namespace {

// A channel's own rows (this rank's tokens for its own experts) need no ring: the sender block copies the first
// half of them and the receiver block the rest, so each carries R - 1/2 rows per token (the sender also fills the
// peers' rings, the receiver drains them). Measured (2 ranks on one H200, 4096 tokens): with all own rows on the
// sender, senders were busy 277 us and receivers waited 55 us of 289 for them.
__device__ __forceinline__ int sender_own_rows(int n) { return (n + 1) / 2; }

// Own rows [from, to) of channel c, copied by every warp of the block (the sender after its rings, the receiver
// before them), so the rings get all of a block's warps.
__device__ __forceinline__ void copy_own_rows(const Step& st, const DispatchIo& io, const Routing& h, int C, int c,
                                              int L, int from, int to, BulkWarp* bulk) {
  const int32_t* list = h.send_list + st.rank * h.num_tokens + c * h.tokens_per_channel;
  const int64_t row0 = h.recv_offset[st.rank * C + c];
  for (int i = from + int(threadIdx.x) / 32; i < to; i += kRingWarps)
    copy_own_token(io, h, list[i], row0 + i, st.rank, L, threadIdx.x % 32, bulk);
  trace_mark(st, kTraceOwnEnd);
}

__global__ void __launch_bounds__(kRingThreads, 1)
    dispatch_kernel(Step st, Rings rg, Routing h, DispatchIo io) {
  __shared__ int s_abort[kMaxGroups];
  __shared__ uint32_t s_word[kMaxGroups];
  __shared__ int s_avail[kMaxGroups];
  if (threadIdx.x < kMaxGroups) s_abort[threadIdx.x] = 0;
  if (step_skipped(st)) return;  // the barrier before this step failed; the host reports why
  const uint64_t start = global_ns(), deadline = start + st.timeout_ns;
  trace_start(st, start);
  const int R = st.num_ranks, C = rg.channels;
  const bool sender = int(blockIdx.x) < C;
  const int c = sender ? blockIdx.x : blockIdx.x - C;
  const DispatchSlot lay = DispatchSlot::make(io.row_bytes, h.num_topk, io.num_scales);
  const int L = h.num_experts / R;
  BulkWarp bulk(ring_smem(), threadIdx.x / 32, threadIdx.x % 32);
  const int own_rows = h.send_counts[st.rank * C + c];
  if (sender) {
    // Groups fill the other ranks' rings first (with two ranks every warp fills the one peer's), so receivers, busy
    // with their half of the own rows meanwhile, find rows waiting; then every warp copies the first half (no ring).
    if (R > 1) {
      const Groups g = Groups::make(R - 1);
      for (int j = g.group; g.active() && j < R - 1; j += g.groups) {
        const int d = (st.rank + 1 + j) % R;
        const int32_t* list = h.send_list + d * h.num_tokens + c * h.tokens_per_channel;
        auto write = [&](int i, uint8_t* slot) { write_dispatch_slot(slot, lay, io, h, list[i], d, L, g.lane, &bulk); };
        if (!send_stream(st, rg, g, c, d, h.send_counts[d * C + c], 1, deadline, &s_word[g.group],
                         &s_abort[g.group], &bulk, write))
          return;
      }
    }
    copy_own_rows(st, io, h, C, c, L, 0, sender_own_rows(own_rows), &bulk);
    trace_mark(st, kTraceEnd);
    return;
  }
  // Receiver: the second half of the channel's own rows, then groups take the other ranks' rings, so with two ranks
  // every warp reads the one peer's ring.
  copy_own_rows(st, io, h, C, c, L, sender_own_rows(own_rows), own_rows, &bulk);
  if (R == 1) {
    trace_mark(st, kTraceEnd);
    return;
  }
  const Groups g = Groups::make(R - 1);
  if (!g.active()) return;
  uint8_t* own = st.peers.region[st.rank];
  for (int j = g.group; j < R - 1; j += g.groups) {
    const int s = (st.rank + 1 + j) % R;
    const uint32_t* tail = tails(own) + c * R + s;
    uint32_t* head = heads(own) + c * R + s;
    const int n = h.recv_counts[s * C + c];
    const int64_t row0 = h.recv_offset[s * C + c];
    if (g.leader()) s_word[g.group] = ld_acquire_sys(head);
    g.sync();
    const uint32_t base = s_word[g.group];
    for (int done = 0; done < n;) {
      if (g.leader()) {
        if (!traced_wait(st, tail, base + uint32_t(done) + 1u, deadline)) {
          record_timeout(st, 2, s);
          s_abort[g.group] = 1;
        } else {
          s_avail[g.group] = min(n, int(ld_acquire_sys(tail) - base));
        }
      }
      g.sync();
      if (s_abort[g.group]) return;
      const int upto = s_avail[g.group];
      for (int i = done + g.warp_in_group; i < upto; i += g.warps_per_group)
        read_dispatch_slot(rg.slot(own, c, s, R, base + uint32_t(i)), lay, io, h, row0 + i, s, g.lane, &bulk);
      g.sync();
      if (g.leader()) st_release_sys(head, base + uint32_t(upto));
      done = upto;
    }
    g.sync();
  }
  trace_mark(st, kTraceEnd);
}

__global__ void pad_recv_kernel(Step st, const int64_t* num_recv, int64_t worst, int32_t k, DispatchIo io) {
  if (*reinterpret_cast<volatile int32_t*>(step_failed(st.peers.region[st.rank])) != 0) return;  // outputs untouched
  const int64_t m = *num_recv;
  for (int64_t i = m + blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < worst; i += int64_t(gridDim.x) * blockDim.x) {
    for (int j = 0; j < k; ++j) {
      if (io.recv_topk_idx) io.recv_topk_idx[i * k + j] = -1;
      if (io.recv_topk_weights) io.recv_topk_weights[i * k + j] = 0.0f;
    }
    if (io.recv_src_token) io.recv_src_token[i] = -1;
    if (io.recv_src_rank) io.recv_src_rank[i] = -1;
  }
}

}  // namespace

cudaError_t launch_pad_recv(const Step& step, const int64_t* num_recv, int64_t worst, int32_t num_topk,
                            const DispatchIo& io, cudaStream_t s) {
  const int blocks = int(std::min<int64_t>((worst + 255) / 256, 256));
  if (blocks > 0) pad_recv_kernel<<<blocks, 256, 0, s>>>(step, num_recv, worst, num_topk, io);
  return cudaGetLastError();
}

cudaError_t launch_dispatch(const Step& step, const Rings& rings, const Routing& h, const DispatchIo& io,
                            int32_t num_sms, cudaStream_t s) {
  dispatch_kernel<<<num_sms, kRingThreads, ring_smem_bytes(), s>>>(step, rings, h, io);
  return cudaGetLastError();
}

cudaError_t load_ring_dispatch_kernels(KernelSet* k) {
  if (cudaError_t e = allow_ring_smem(reinterpret_cast<const void*>(dispatch_kernel))) return e;
  return k->add({reinterpret_cast<const void*>(dispatch_kernel), reinterpret_cast<const void*>(pad_recv_kernel)});
}

}  // namespace cuda
}  // namespace deepep4j
