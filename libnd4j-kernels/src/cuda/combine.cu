// combine.cu — the ring combine: per channel a sender block streams the received rows back to their source ranks, and
// a receiver block reduces, token by token in original order, the rows every visited rank returned (fp32 sums). A
// rank's own rows need no ring: the receiver reads them straight from y. (With them on the rings, 2 ranks on one
// H200, 4096 tokens: senders were busy 340 us, receivers waited 110 us of 387 for them.)
#include "cuda/ring_common.cuh"
#include "cuda/slot_ops.cuh"

namespace deepep4j {
namespace cuda {

namespace {

// kRows bounds the ranks (R <= kRows): the per-warp table of returned rows lives in local memory, and at 64 entries
// (1.6 KB per thread) it is larger than the default 1 KB stack, so each launch would resize the device's local
// memory, which waits for every running kernel — with two ranks on one GPU a queued launch then waits for the
// other rank's spinning kernel, which waits for this one (a deadlock until timeout_ms).
template <int kRows>
__global__ void __launch_bounds__(kRingThreads, 1)
    combine_kernel(Step st, Rings rg, Routing h, CombineIo io) {
  __shared__ int s_abort[kMaxGroups];
  __shared__ uint32_t s_word[kMaxGroups];
  __shared__ uint32_t s_base[DEEPEP4J_MAX_RANKS], s_need[DEEPEP4J_MAX_RANKS];
  if (threadIdx.x < kMaxGroups) s_abort[threadIdx.x] = 0;
  if (step_skipped(st)) return;
  const uint64_t start = global_ns(), deadline = start + st.timeout_ns;
  trace_start(st, start);
  const int R = st.num_ranks, C = rg.channels, K = h.num_topk;
  const bool sender = int(blockIdx.x) < C;
  const int c = sender ? blockIdx.x : blockIdx.x - C;
  const CombineSlot lay = CombineSlot::make(io.row_bytes, K);
  if (sender) {
    if (R == 1) return;
    const Groups g = Groups::make(R - 1);
    if (!g.active()) return;
    for (int j = g.group; j < R - 1; j += g.groups) {
      const int s = (st.rank + 1 + j) % R;
      const int64_t row0 = h.recv_offset[s * C + c];
      auto write = [&](int i, uint8_t* slot) { write_combine_slot(slot, lay, io, h, row0 + i, g.lane); };
      if (!send_stream(st, rg, g, c, s, h.recv_counts[s * C + c], 3, deadline, &s_word[g.group],
                       &s_abort[g.group], nullptr, write))
        return;
    }
    trace_mark(st, kTraceEnd);
    return;
  }
  // Receiver: every warp reduces tokens of this channel; warp 0 tracks one stream per lane (rank d = lane, lane+32).
  uint8_t* own = st.peers.region[st.rank];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t0 = min(h.num_tokens, c * h.tokens_per_channel);
  const int64_t t1 = min(h.num_tokens, t0 + h.tokens_per_channel);
  for (int d = threadIdx.x; d < R; d += blockDim.x) {
    s_base[d] = ld_acquire_sys(heads(own) + c * R + d);
    s_need[d] = 0;
  }
  __syncthreads();
  ReturnedRow rows[kRows];
  const int64_t own_row0 = h.recv_offset[st.rank * C + c];  // our own tokens' rows of this channel in y
  // A round takes up to half a ring of tokens (never more than a ring from one stream), so senders fill the other half
  // while this one is reduced.
  const int round = max(rg.chunk, rg.slots / 2);
  for (int64_t a = t0; a < t1; a += round) {
    const int64_t b = min(t1, a + round);
    if (warp == 0) {
      const uint64_t t_wait = st.trace ? global_ns() : 0;
      // Rows this round needs from each rank: ballots over the round's token masks (lane d counts rank d, d + 32).
      uint32_t cnt[2] = {0, 0};
      for (int64_t base = a; base < b; base += 32) {
        const uint64_t m = base + lane < b ? h.token_mask[base + lane] : 0ull;
        for (int d = 0; d < R; ++d) {
          const uint32_t c = __popc(__ballot_sync(0xffffffffu, (m >> d) & 1ull));
          if (d % 32 == lane) cnt[d / 32] += c;
        }
      }
      for (int d = lane; d < R; d += 32) {
        s_need[d] += cnt[d / 32];
        if (d != st.rank && cnt[d / 32] && !wait_reach(tails(own) + c * R + d, s_base[d] + s_need[d], deadline)) {
          record_timeout(st, 4, d);
          s_abort[0] = 1;
        }
      }
      __syncwarp();
      if (lane == 0) trace_waited(st, t_wait);  // the warp's wait for every rank's rows of the round
    }
    __syncthreads();
    if (s_abort[0]) return;
    for (int64_t t = a + warp; t < b; t += kRingWarps) {
      const uint64_t mask = h.token_mask[t];
      for (int d = 0; d < R; ++d)
        rows[d] = d == st.rank ? own_row(io, h, (mask >> d & 1ull) ? own_row0 + h.send_pos[t * R + d] : -1)
                               : slot_row((mask >> d & 1ull)
                                              ? rg.slot(own, c, d, R, s_base[d] + uint32_t(h.send_pos[t * R + d]))
                                              : nullptr,
                                          lay);
      reduce_token_any(rows, R, io, t, K, lane);
    }
    __syncthreads();
    if (warp == 0)
      for (int d = lane; d < R; d += 32)
        if (d != st.rank) st_release_sys(heads(own) + c * R + d, s_base[d] + s_need[d]);
  }
  trace_mark(st, kTraceEnd);
}

}  // namespace

cudaError_t launch_combine(const Step& step, const Rings& rings, const Routing& h, const CombineIo& io,
                           int32_t num_sms, cudaStream_t s) {
  if (step.num_ranks <= kFewRanks)
    combine_kernel<kFewRanks><<<num_sms, kRingThreads, 0, s>>>(step, rings, h, io);
  else
    combine_kernel<DEEPEP4J_MAX_RANKS><<<num_sms, kRingThreads, 0, s>>>(step, rings, h, io);
  return cudaGetLastError();
}

cudaError_t load_ring_combine_kernels(int32_t num_ranks, KernelSet* k) {
  return k->add({num_ranks <= kFewRanks ? reinterpret_cast<const void*>(&combine_kernel<kFewRanks>)
                                        : reinterpret_cast<const void*>(&combine_kernel<DEEPEP4J_MAX_RANKS>)});
}

}  // namespace cuda
}  // namespace deepep4j
