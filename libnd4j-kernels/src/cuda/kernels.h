// kernels.h — launchers of the CUDA kernels (layout, plan, notify/barrier, dispatch, combine, all-to-all pack/unpack).
// Each queues work on `stream` and returns the launch's cudaError_t; kernels that wait on peers stop at their deadline
// and record DEEPEP4J_ERR_TIMEOUT in the mailbox instead of hanging.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/handle.h"
#include "cuda/region.h"

namespace deepep4j {
namespace cuda {

// Host-mapped result of one step's kernels: 0 or a deepep4j_status, and which peer it concerns.
struct Mailbox {
  int32_t status;
  int32_t peer;
  int32_t where;  // which wait gave up (for the message)
  int32_t pad;
  char message[kStatusBytes];
};

// Where waits stop: every kernel's deadline is its start time plus timeout_ns.
struct Step {
  Peers peers;
  int32_t rank, num_ranks;
  uint32_t epoch;
  uint64_t timeout_ns;
  Mailbox* mailbox;  // device view of the host-mapped mailbox
};

cudaError_t launch_layout(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int32_t r, int32_t* per_rank,
                          int32_t* per_expert, uint8_t* in_rank, cudaStream_t s);

// Fills the handle's token_mask, topk, send_pos, send_list, send_counts, expert_counts; *bad gets the smallest flat
// index of an out-of-range topk_idx entry (left untouched when all are valid).
cudaError_t launch_plan(const int64_t* topk_idx, const Routing& h, int32_t num_ranks,
                        unsigned long long* bad, cudaStream_t s);

// Publishes this rank's status and message, waits for every rank (barrier `step.epoch`), and records in the mailbox
// the first peer that failed or never came.
cudaError_t launch_barrier(const Step& step, int32_t status, const char* message, cudaStream_t s);

// Notify: writes header + counts to every peer's notify slot, barrier, copies every received slot to `gathered`
// ([R] slots of `slot_bytes`).
cudaError_t launch_notify(const Step& step, const NotifyHeader& header, const Routing* h, int32_t local_experts,
                          uint8_t* gathered, int64_t slot_bytes, cudaStream_t s);

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

}  // namespace cuda
}  // namespace deepep4j
