// handle.h — the routing of one CUDA dispatch, kept on the device for dispatch, combine and their cached re-use.
#pragma once

#include <cstdint>
#include <vector>

#include "common/backend.h"

namespace deepep4j {
namespace cuda {

// Plain device view of a handle's routing, passed to kernels by value.
struct Routing {
  int64_t num_tokens = 0;           // N
  int32_t num_topk = 0;             // K
  int32_t num_experts = 0;          // E
  int32_t channels = 0;             // C: tokens are split into C contiguous ranges, one per channel
  int64_t tokens_per_channel = 0;   // ceil(N / C)
  uint64_t* token_mask = nullptr;   // [N] bit d set when the token goes to rank d
  int32_t* topk = nullptr;          // [N*K] global expert ids (or -1), copied at notify
  int32_t* send_pos = nullptr;      // [N*R] position of token t in the stream (its channel, d), or -1
  int32_t* send_list = nullptr;     // [R*N] tokens of stream (c, d) from d*N + c*tokens_per_channel, in order
  int32_t* send_counts = nullptr;   // [R*C] tokens in stream (c, d)
  int32_t* expert_counts = nullptr; // [E] top-k entries per expert (global ids)
  int32_t* recv_offset = nullptr;   // [R*C] first received row of (source s, channel c)
  int32_t* recv_counts = nullptr;   // [R*C] rows received from (source s, channel c)
  int32_t* send_prefix = nullptr;   // [R*C] index of stream (c, d) inside everything sent to d (all-to-all)
  uint32_t* recv_local = nullptr;   // [M] bit k set where the row's k-th expert is local (written by dispatch)
};

struct CudaHandle : ::deepep4j_handle {
  int device = 0;
  void* arena = nullptr;  // one device allocation holding every array of `r`
  Routing r;
  std::vector<int32_t> send_counts_host, recv_counts_host;  // [R*C] each
  std::vector<int32_t> expert_counts_host;                  // [E]
  bool dispatched = false;  // r.recv_local is valid once a dispatch has run
  int64_t* num_recv_dev = nullptr;  // device M (in the arena): written by a queued notify
  ~CudaHandle() override;
};

}  // namespace cuda
}  // namespace deepep4j
