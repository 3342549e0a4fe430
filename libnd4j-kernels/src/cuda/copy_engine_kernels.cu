// copy_engine_kernels.cu — the SM side of copy-engine transfers: pack slots for the copy engine, unpack landed slots,
// reduce landed rows. The bulk bytes between GPUs move by cudaMemcpyAsync on a copy stream (copy_engine.cu), so these
// kernels only touch local memory and poll arrival words.
#include "cuda/ring_common.cuh"
#include "cuda/slot_ops.cuh"

namespace deepep4j {
namespace cuda {

namespace {

constexpr int kCeThreads = kRingThreads;
constexpr int kCeWarps = kCeThreads / 32;

// Waits (lane 0, result shared with the warp) until chunk j from `src` landed in this step; false at the deadline.
__device__ __forceinline__ bool warp_wait_arrival(const Step& st, int src, int j, uint64_t deadline, int where,
                                                  int lane) {
  int ok = 1;
  if (lane == 0) {
    ok = wait_reach(arrivals(st.peers.region[st.rank], src) + j, st.epoch, deadline) ? 1 : 0;
    if (!ok) record_timeout(st, where, src);
  }
  return __shfl_sync(0xffffffffu, ok, 0) != 0;
}

// Rows [lo, hi) of chunk j among those this rank receives from s (receive order follows s's channels).
__device__ __forceinline__ void chunk_rows_from(const CePlan& p, const Routing& h, int s, int j, int64_t* lo,
                                                int64_t* hi) {
  const int32_t* off = h.recv_offset + s * h.channels;
  *lo = off[p.chunk_channel[j]] - off[0];
  *hi = p.chunk_channel[j + 1] < h.channels ? off[p.chunk_channel[j + 1]] - off[0] : p.in_rows[s];
}

__global__ void __launch_bounds__(kCeThreads, 1)
    ce_dispatch_kernel(Step st, CePlan p, Routing h, DispatchIo io) {
  const bool skip = step_skipped(st);
  const uint64_t deadline = global_ns() + st.timeout_ns;
  const int R = st.num_ranks, me = st.rank, C = h.channels, L = h.num_experts / R, lane = threadIdx.x % 32;
  const int64_t gw = int64_t(blockIdx.x) * kCeWarps + threadIdx.x / 32, GW = int64_t(gridDim.x) * kCeWarps;
  // Metadata slots are DispatchSlots without a row: the slot helpers run on an io whose rows are 0 bytes long.
  const DispatchSlot mlay = ce_dispatch_meta(h.num_topk, io.num_scales);
  DispatchIo meta_io = io;
  meta_io.row_bytes = 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.epoch_word = st.epoch;  // counted with token 0 below
  // 1. Peers' rows first, so the copy engine starts early: tokens in order, each row read once and written to the
  //    staging of every peer it goes to (rows, then metadata, in that peer's receive order). Every token is counted
  //    in its chunk, also when the step is skipped: the copy stream waits for these counts.
  const uint64_t peers = ~(1ull << me);
  for (int64_t t = gw; t < h.num_tokens; t += GW) {
    const int c = int(t / h.tokens_per_channel);
    const uint64_t mask = skip ? 0ull : h.token_mask[t] & peers;
    auto pos = [&](int d) { return h.send_prefix[d * C + c] + h.send_pos[t * R + d]; };
    for (int d = 0; d < R; ++d)
      if (mask >> d & 1ull) {
        uint8_t* meta = p.staging + p.staging_off[d] + ce_dispatch_meta_off(p.out_rows[d], io.row_bytes);
        write_dispatch_slot(meta + pos(d) * mlay.bytes, mlay, meta_io, h, t, d, L, lane);
      }
    if (mask != 0) {
      constexpr int kUnroll = 8;
      const int4* src = reinterpret_cast<const int4*>(io.x + t * io.row_bytes);
      const int64_t n = io.row_bytes / 16;
      for (int64_t i = lane; i < n; i += 32 * kUnroll) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          if (i + 32 * u < n) v[u] = __ldg(src + i + 32 * u);
        for (int d = 0; d < R; ++d) {
          if (!(mask >> d & 1ull)) continue;
          int4* dst = reinterpret_cast<int4*>(p.staging + p.staging_off[d] + pos(d) * io.row_bytes);
#pragma unroll
          for (int u = 0; u < kUnroll; ++u)
            if (i + 32 * u < n) dst[i + 32 * u] = v[u];
        }
      }
    }
    __threadfence();
    __syncwarp();
    if (lane == 0) atomicAdd(p.packed + p.chunk_of(c), 1u);
  }
  if (skip) return;
  // 2. Own rows, while the copy engines move the peers' rows: straight from x into the receive arrays.
  for (int64_t t = gw; t < h.num_tokens; t += GW)
    if (h.token_mask[t] >> me & 1ull) {
      const int c = int(t / h.tokens_per_channel);
      copy_own_token(io, h, t, h.recv_offset[me * C + c] + h.send_pos[t * R + me], me, L, lane);
    }
  // 3. Unpack what landed in the landing zones, chunk by chunk in the order the copies were queued; from sources that
  //    wrote rows straight into recv_x only the metadata, once everything landed.
  uint8_t* region = st.peers.region[me];
  for (int j = 0; j < p.chunks; ++j)
    for (int s = 0; s < R; ++s) {
      if (s == me || (p.direct_in >> s & 1ull)) continue;
      int64_t lo, hi;
      chunk_rows_from(p, h, s, j, &lo, &hi);
      const uint8_t* rows = p.zone(region, s);
      const uint8_t* meta = rows + ce_dispatch_meta_off(p.in_rows[s], io.row_bytes);
      const int64_t row0 = h.recv_offset[s * C];
      bool landed = false;
      for (int64_t q = lo + gw; q < hi; q += GW) {
        if (!landed && !(landed = warp_wait_arrival(st, s, j, deadline, 2, lane))) return;
        read_dispatch_slot(meta + q * mlay.bytes, mlay, meta_io, h, row0 + q, s, lane);
        warp_copy<true>(io.recv_x + (row0 + q) * io.row_bytes, rows + q * io.row_bytes, io.row_bytes, lane);
      }
    }
  for (int s = 0; s < R; ++s) {
    if (s == me || !(p.direct_in >> s & 1ull)) continue;
    const uint8_t* meta = p.zone(region, s) + ce_dispatch_meta_off(p.in_rows[s], io.row_bytes);
    const int64_t row0 = h.recv_offset[s * C];
    bool landed = false;
    for (int64_t q = gw; q < p.in_rows[s]; q += GW) {
      if (!landed && !(landed = warp_wait_arrival(st, s, kCeAllLanded, deadline, 2, lane))) return;
      read_dispatch_slot(meta + q * mlay.bytes, mlay, meta_io, h, row0 + q, s, lane);
    }
  }
}

// Plans are written from the step's own direction: in combine, out_rows[s] are the rows going back to s (received
// from it in dispatch) and in_rows[d] the rows coming back from d.
__global__ void __launch_bounds__(256) ce_combine_meta_kernel(Step st, CePlan p, Routing h, CombineIo io) {
  const int R = st.num_ranks, K = h.num_topk;
  if (blockIdx.x == 0 && threadIdx.x == 0) *p.epoch_word = st.epoch;  // the copy stream runs after this kernel
  for (int s = 0; s < R; ++s) {
    if (s == st.rank) continue;
    const int64_t n = p.out_rows[s], row0 = h.recv_offset[s * h.channels];
    float* scales = reinterpret_cast<float*>(p.staging + p.staging_off[s]);
    float* weights = scales + DispatchSlot::align16(n * 4) / 4;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
      scales[i] = row_scale(io, h, row0 + i);
      for (int k = 0; k < K; ++k)
        weights[i * K + k] = io.y_topk_weights != nullptr ? io.y_topk_weights[(row0 + i) * K + k] : 0.0f;
    }
  }
}

// kRows bounds the ranks (R <= kRows): the table of returned rows is per thread (local memory), 1.5 KB at 64 rows.
template <int kRows>
__global__ void __launch_bounds__(kCeThreads, 1)
    ce_combine_kernel(Step st, CePlan p, Routing h, CombineIo io) {
  if (step_skipped(st)) return;
  const uint64_t deadline = global_ns() + st.timeout_ns;
  const int R = st.num_ranks, me = st.rank, C = h.channels, K = h.num_topk, lane = threadIdx.x % 32;
  const int64_t gw = int64_t(blockIdx.x) * kCeWarps + threadIdx.x / 32, GW = int64_t(gridDim.x) * kCeWarps;
  uint8_t* region = st.peers.region[me];
  const int64_t own0 = h.recv_offset[me * C];
  ReturnedRow rows[kRows];
  // Tokens in order across all warps: chunks land in token order, so every warp moves along with the copies.
  for (int64_t t = gw; t < h.num_tokens; t += GW) {
    const uint64_t mask = h.token_mask[t];
    const int c = int(t / h.tokens_per_channel);
    for (int d = 0; d < R; ++d) {
      rows[d] = ReturnedRow{nullptr, 0.0f, nullptr};
      if (!(mask >> d & 1ull)) continue;
      const int64_t pos = h.send_prefix[d * C + c] + h.send_pos[t * R + d];
      if (d == me) {
        const int64_t m = own0 + pos;
        rows[d] = ReturnedRow{io.y + m * io.row_bytes, row_scale(io, h, m),
                              io.y_topk_weights != nullptr ? io.y_topk_weights + m * K : nullptr};
        continue;
      }
      if (!warp_wait_arrival(st, d, p.chunk_of(c), deadline, 4, lane)) return;
      const int64_t n = p.in_rows[d];
      const uint8_t* zone = p.zone(region, d);
      const float* scales = reinterpret_cast<const float*>(zone + ce_combine_meta_off(n, io.row_bytes));
      const float* weights = scales + DispatchSlot::align16(n * 4) / 4;
      rows[d] = ReturnedRow{zone + pos * io.row_bytes, __ldcg(scales + pos), weights + pos * K};
    }
    reduce_token_any(rows, R, io, t, K, lane);
  }
}

}  // namespace

cudaError_t launch_ce_dispatch(const Step& step, const CePlan& plan, const Routing& h, const DispatchIo& io,
                               int32_t num_sms, cudaStream_t s) {
  ce_dispatch_kernel<<<num_sms, kCeThreads, 0, s>>>(step, plan, h, io);
  return cudaGetLastError();
}

cudaError_t launch_ce_combine_meta(const Step& step, const CePlan& plan, const Routing& h, const CombineIo& io,
                                   cudaStream_t s) {
  ce_combine_meta_kernel<<<32, 256, 0, s>>>(step, plan, h, io);
  return cudaGetLastError();
}

cudaError_t launch_ce_combine(const Step& step, const CePlan& plan, const Routing& h, const CombineIo& io,
                              int32_t num_sms, cudaStream_t s) {
  if (step.num_ranks <= kFewRanks)
    ce_combine_kernel<kFewRanks><<<num_sms, kCeThreads, 0, s>>>(step, plan, h, io);
  else
    ce_combine_kernel<DEEPEP4J_MAX_RANKS><<<num_sms, kCeThreads, 0, s>>>(step, plan, h, io);
  return cudaGetLastError();
}

cudaError_t load_ce_kernels(int32_t num_ranks, KernelSet* k) {
  return k->add({reinterpret_cast<const void*>(ce_dispatch_kernel), reinterpret_cast<const void*>(ce_combine_meta_kernel),
                 num_ranks <= kFewRanks ? reinterpret_cast<const void*>(ce_combine_kernel<kFewRanks>)
                                        : reinterpret_cast<const void*>(ce_combine_kernel<DEEPEP4J_MAX_RANKS>)});
}

}  // namespace cuda
}  // namespace deepep4j
