// kernels.h — launchers of the CUDA kernels (layout, plan, notify/barrier, dispatch, combine, all-to-all pack/unpack).
// Each queues work on `stream` and returns the launch's cudaError_t; kernels that wait on peers stop at their deadline
// and record DEEPEP4J_ERR_TIMEOUT in the mailbox instead of hanging.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "cuda/handle.h"
#include "cuda/region.h"

namespace deepep4j {
namespace cuda {

// Host-mapped result of one step's kernels: 0 or a deepep4j_status, and which peer it concerns.
struct Mailbox {
  int32_t status;
  int32_t peer;
  int32_t where;    // which wait gave up (for the message)
  int32_t ce_veto;  // 1 when some rank voted against copy-engine transfers at the last barrier
  int32_t abandoned_by;  // status TIMEOUT: 1 + the rank that gave up on the barrier (1 + kLateRank: we came too late)
  char message[kStatusBytes];
  uint64_t direct[DEEPEP4J_MAX_RANKS];  // what each rank published to this one at the last barrier (PeerStatus)
};

// Where waits stop: every kernel's deadline is its start time plus timeout_ns.
// Stream-ordered steps (sticky = 1) carry epoch 0: their barrier takes the next epoch from the region's counter, so a
// replayed CUDA graph (whose kernel arguments are frozen) still numbers its barriers afresh; and a failure sticks:
// every later step of this rank moves nothing until the host has reported it (the buffer is broken then).
struct Step {
  Peers peers;
  int32_t rank, num_ranks;
  uint32_t epoch;
  int32_t sticky;
  uint64_t timeout_ns;
  Mailbox* mailbox;  // device view of the host-mapped mailbox
  uint64_t* trace;   // config.cuda_trace, ring kernels: kTraceWords per block (ring_trace.h), else NULL
};

// A traced ring kernel's words per block, in globaltimer nanoseconds: when it started and ended, how long its waits
// for peers took (senders: for ring room; receivers: for rows), and when a dispatch block's share of its own rows
// (dispatch.cu: sender_own_rows) was copied.
enum TraceWord { kTraceStart, kTraceEnd, kTraceWait, kTraceOwnEnd, kTraceWords };

cudaError_t launch_layout(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int32_t r, int32_t* per_rank,
                          int32_t* per_expert, uint8_t* in_rank, cudaStream_t s);

// Fills the handle's token_mask, topk, send_pos, send_list, send_counts, expert_counts; *bad gets the smallest flat
// index of an out-of-range topk_idx entry (left untouched when all are valid).
cudaError_t launch_plan(const int64_t* topk_idx, const Routing& h, int32_t num_ranks,
                        unsigned long long* bad, cudaStream_t s);

// Publishes this rank's status, message and copy-engine vote, waits for every rank (barrier `step.epoch`), and records
// in the mailbox the first peer that failed or never came, and whether any rank voted against copy-engine transfers.
struct DirectTargets {
  uint64_t v[DEEPEP4J_MAX_RANKS];  // per destination rank: the PeerStatus::direct to publish to it
};
cudaError_t launch_barrier(const Step& step, int32_t status, const char* message, cudaStream_t s,
                           int32_t ce_vote = 0, const DirectTargets* direct = nullptr);

// Notify: writes header + counts to every peer's notify slot, barrier, copies every received slot to `gathered`
// ([R] slots of `slot_bytes`).
cudaError_t launch_notify(const Step& step, const NotifyHeader& header, const Routing* h, int32_t local_experts,
                          uint8_t* gathered, int64_t slot_bytes, cudaStream_t s);

// Stream-ordered notify of a worst-case sized handle, finished on the device: after the exchange the kernel checks
// that every rank sent the same (K, E, dtype, H), writes recv_offset / recv_counts, M (handle and caller copies) and
// the per-local-expert counts; a bad topk_idx (plan's `bad`) fails the exchange itself, M > worst fails the next step.
struct QueuedNotify {
  const int64_t* topk_idx;
  const unsigned long long* bad;  // plan's first bad flat index, ULLONG_MAX when none
  int32_t* recv_offset;           // [R*C]
  int32_t* recv_counts;           // [R*C]
  int64_t* num_recv;              // handle's device M
  int64_t* num_recv_out;          // caller's device M, or NULL
  int32_t* per_expert_out;        // caller's device [L], or NULL
  int64_t worst;
};
cudaError_t launch_notify_queued(const Step& step, const NotifyHeader& header, const Routing& h, int32_t local_experts,
                                 uint8_t* gathered, int64_t slot_bytes, const QueuedNotify& q, cudaStream_t s);

struct DispatchIo {
  const uint8_t* x;
  const float* x_scales;
  const float* topk_weights;
  uint8_t* recv_x;
  float* recv_x_scales;
  int64_t* recv_topk_idx;
  float* recv_topk_weights;
  int64_t* recv_src_token;
  int32_t* recv_src_rank;
  int64_t row_bytes;
  int32_t num_scales;
};

struct CombineIo {
  const uint8_t* y;
  const float* recv_topk_weights;
  const float* y_topk_weights;
  uint8_t* out;
  float* out_topk_weights;
  int32_t dtype;
  int64_t row_bytes;
};

cudaError_t launch_dispatch(const Step& step, const Rings& rings, const Routing& h, const DispatchIo& io,
                            int32_t num_sms, cudaStream_t s);
cudaError_t launch_combine(const Step& step, const Rings& rings, const Routing& h, const CombineIo& io,
                           int32_t num_sms, cudaStream_t s);
// Combine kernels (ring, copy engine, all-to-all reduce) are specialised for R <= kFewRanks (a small local table of
// returned rows, within the default 1 KB stack) and for any R (a table of DEEPEP4J_MAX_RANKS rows, 1.5 KB or more).
constexpr int kFewRanks = 8;

// Worst-case sized dispatch: marks receive rows [M, worst) as padding (idx -1, weights 0, source -1); nothing when
// the step failed.
cudaError_t launch_pad_recv(const Step& step, const int64_t* num_recv, int64_t worst, int32_t num_topk,
                            const DispatchIo& io, cudaStream_t s);

// Copy-engine transfers: a step's rows between two ranks move in a few copy-engine copies, from the sender's local
// staging (dispatch) or straight from y (combine) into the receiver's landing zone for that sender (its region's ring
// area, zone_bytes per source), or straight into the receiver's recv_x. Chunk j carries the rows of the sender's
// channels [chunk_channel[j], chunk_channel[j+1]) (channels are contiguous token ranges, so every rank can tell a
// chunk's rows from the counts it has). A landed chunk is announced by the step's epoch in the receiver's
// arrivals(region, sender)[j]; slot kCeAllLanded announces a direct dispatch's rows and metadata all landed.
constexpr int kCeAllLanded = kMaxCeChunks - 1;
struct CePlan {
  int64_t zone_bytes;                    // landing zone per source in every region
  uint8_t* staging;                      // this rank's local staging (dispatch rows + metadata / combine scales)
  int64_t staging_off[DEEPEP4J_MAX_RANKS];  // where the part for peer d starts in staging
  int32_t out_rows[DEEPEP4J_MAX_RANKS];  // rows this rank sends to d in this step
  int32_t in_rows[DEEPEP4J_MAX_RANKS];   // rows it receives from s
  int64_t first_row[DEEPEP4J_MAX_RANKS];  // combine: the first row of y going back to d
  int32_t chunks;                        // <= kCeAllLanded
  int32_t chunk_channel[kMaxCeChunks + 1];
  uint32_t* packed;                      // device [kMaxCeChunks]: tokens of chunk j packed by the dispatch kernel
  uint32_t* epoch_word;                  // device: the step's epoch, copied into a peer's arrival word per chunk
  uint64_t direct_in;                    // dispatch: bit s set when s's rows go straight into recv_x
  int64_t largest_bytes;                 // host: the most bytes between this rank and one peer in this step
  // The landing zone for rows from `src` in `region` (a receiver's region as seen from here).
  DEEPEP4J_HD uint8_t* zone(uint8_t* region, int src) const { return region + kRings + src * zone_bytes; }
  DEEPEP4J_HD int chunk_of(int channel) const {
    int j = 0;
    while (j + 1 < chunks && channel >= chunk_channel[j + 1]) ++j;
    return j;
  }
};

// Combine landing zone: [rows][scales: float per row][returned weights: K floats per row], parts 16-byte aligned.
DEEPEP4J_HD inline int64_t ce_combine_meta_off(int64_t rows, int64_t row_bytes) {
  return DispatchSlot::align16(rows * row_bytes);
}
DEEPEP4J_HD inline int64_t ce_combine_meta_bytes(int64_t rows, int32_t k) {
  return DispatchSlot::align16(rows * 4) + DispatchSlot::align16(rows * 4 * int64_t(k));
}
// Dispatch staging and landing zone: [rows: row_bytes each][metadata: a DispatchSlot without its row, each]. Rows and
// metadata are apart so that rows can be copied straight into a receiver's recv_x.
DEEPEP4J_HD inline DispatchSlot ce_dispatch_meta(int32_t k, int32_t num_scales) {
  return DispatchSlot::make(0, k, num_scales);
}
DEEPEP4J_HD inline int64_t ce_dispatch_meta_off(int64_t rows, int64_t row_bytes) {
  return DispatchSlot::align16(rows * row_bytes);
}

// Dispatch: every warp takes tokens in order, reads each row once and writes it to every destination (peers' staging,
// or this rank's receive arrays), counting tokens per chunk in plan.packed; then the landed chunks are unpacked.
cudaError_t launch_ce_dispatch(const Step& step, const CePlan& plan, const Routing& h, const DispatchIo& io,
                               int32_t num_sms, cudaStream_t s);
// Combine, sending side: scales and returned weights of the rows going back to each peer, into staging.
cudaError_t launch_ce_combine_meta(const Step& step, const CePlan& plan, const Routing& h, const CombineIo& io,
                                   cudaStream_t s);
// Combine, receiving side: reduces every token in order, reading own rows from y and peers' rows as they land.
cudaError_t launch_ce_combine(const Step& step, const CePlan& plan, const Routing& h, const CombineIo& io,
                              int32_t num_sms, cudaStream_t s);

// All-to-all backend. Staging buffers hold slots in the dispatch / combine slot layout; `base[r]` is the first slot of
// rank r's block in a staging buffer.
struct RankBases {
  int64_t v[DEEPEP4J_MAX_RANKS];
};
// Packs every (token, destination) pair of the handle into send staging (blocks per destination, stream order).
cudaError_t launch_a2a_pack_dispatch(const Routing& h, int32_t num_ranks, const DispatchIo& io, const RankBases& dest,
                                     uint8_t* staging, int64_t slot_bytes, cudaStream_t s);
// Unpacks received slots (row m = slot m; source blocks start at src.v[r]) into the receive arrays.
cudaError_t launch_a2a_unpack_dispatch(const Routing& h, int32_t num_ranks, int64_t num_recv, const DispatchIo& io,
                                       const RankBases& src, const uint8_t* staging, int64_t slot_bytes,
                                       cudaStream_t s);
// Packs y (received rows, already grouped by source) as combine slots, slot m = row m.
cudaError_t launch_a2a_pack_combine(const Routing& h, int64_t num_recv, const CombineIo& io, uint8_t* staging,
                                    int64_t slot_bytes, cudaStream_t s);
// Reduces returned slots per original token (rank d's block starts at dest.v[d], in the order they were sent).
cudaError_t launch_a2a_reduce_combine(const Routing& h, int32_t num_ranks, const CombineIo& io, const RankBases& dest,
                                      const uint8_t* staging, int64_t slot_bytes, cudaStream_t s);

// Every kernel the engine may launch, loaded at create. Two launch-time operations wait for every kernel running on the
// device: loading a kernel's module (lazy loading, CUDA's default, loads it at its first launch) and growing local
// memory for a kernel whose per-thread stack (localSizeBytes) exceeds the device's cudaLimitStackSize (1 KB by
// default). With two ranks on one GPU the running kernel can be the other rank's, spinning until this rank's step
// arrives: a deadlock until timeout_ms. So a buffer (CudaBackend::init) and a MoE block (moe_ops_cuda.cu) load, at
// create and before any step, every kernel they may launch, and raise the stack limit once to the largest need.
// Each file that defines kernels lists them in its load_*_kernels function (a kernel left out is not covered:
// tests/gpu/test_gpu_stack_limit.cpp checks the lists on a GPU, and stack_frames.cmake fails the build when a kernel
// other than an any-R specialisation has a stack frame above the default 1 KB).
struct KernelSet {
  size_t stack_bytes = 0;  // the largest per-thread local memory (cudaFuncAttributes::localSizeBytes) added so far
  std::vector<const void*> entries;  // the kernels added
  // Loads each kernel (cudaFuncGetAttributes) and records its local memory.
  cudaError_t add(std::initializer_list<const void*> kernels);
};
// Raises the current device's cudaLimitStackSize to k.stack_bytes when it is lower (it is never lowered, so buffers
// of several ranks or configurations on one device each keep what they need).
cudaError_t cover_stack(const KernelSet& k);

cudaError_t load_control_kernels(KernelSet* k);                    // control.cu: layout, plan, barrier, notify
cudaError_t load_ring_dispatch_kernels(KernelSet* k);              // dispatch.cu
cudaError_t load_ring_combine_kernels(int32_t num_ranks, KernelSet* k);  // combine.cu
cudaError_t load_ce_kernels(int32_t num_ranks, KernelSet* k);      // copy_engine_kernels.cu
cudaError_t load_a2a_kernels(int32_t num_ranks, KernelSet* k);     // a2a_kernels.cu
// The MoE block's kernels: load_moe_kernels in moe/moe_kernels.h.

}  // namespace cuda
}  // namespace deepep4j
