// moe_block.h — the MoE block of one rank (the C API's opaque deepep4j_moe): its expert state, workspaces and the
// routing of the last forward kept for backward. The orchestration (moe_block.cpp) is written once against MoeOps and
// the buffer's dispatch / combine, so the CPU reference and the GPU path are the same sequence of steps.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "../common/backend.h"
#include "../common/host_copy.h"
#include "moe_ops.h"

namespace deepep4j {
namespace moe {

// A grow-only device array (plus, for host-memory arguments on a GPU, its pinned staging twin).
struct Workspace {
  void* ptr = nullptr;
  size_t bytes = 0;
  void* host = nullptr;
  size_t host_bytes = 0;
};

}  // namespace moe
}  // namespace deepep4j

struct deepep4j_moe {
  deepep4j_buffer* buf = nullptr;
  deepep4j_moe_config cfg{};
  std::unique_ptr<deepep4j::moe::MoeOps> ops;
  int32_t rank = 0, num_ranks = 1, num_local = 0;
  int64_t row_width = 0;   // elements of a dispatched row: H, or for fp64 H + the routing weights (padded to 16 bytes)
  int64_t tensor_count = 0;  // E/R * 3 * H * F

  // Expert state: PARAMS in the block's dtype; GRADS, STATE_M, STATE_V in its accumulation type.
  void* params = nullptr;
  void* grads = nullptr;
  void* state_m = nullptr;
  void* state_v = nullptr;

  // The last forward, kept for backward.
  bool has_forward = false;
  int64_t n = 0, m = 0, assignments = 0;
  deepep4j_handle* handle = nullptr;
  std::vector<int64_t> offsets;  // [L+1] first assignment of each local expert
  std::vector<int32_t> counts;   // [L]
  int pending_status = DEEPEP4J_OK;  // error of an async forward, reported by wait
  std::vector<std::pair<void*, std::pair<const void*, size_t>>> pending_copies;  // host outputs to finish at wait

  // Host-array staging (HOST memory on a GPU): the copy threads and what they did since create.
  std::unique_ptr<deepep4j::HostCopier> copier;
  deepep4j_moe_staging staging{};

  // Workspaces, by name (see moe_block.cpp).
  deepep4j::moe::Workspace x, wr, bias, replay, scores, topk_idx, gate, weights, weights_f32, gate_sum, load, prob_sum,
      xw, recv_x, recv_idx, recv_w, assign_row, assign_slot, pos, assign_w, xe, act_a, act_b, act_h, ye, y_recv, y_out,
      gy, g_recv, gw_assign, ge, gh, ga, gb, gxe, g_recv_x, g_recv_w, g_out, out_topk_w, g_weights, g_logits, grad_x,
      grad_wr, cfg_rows, cfg_recv, cfg_idx, y_stage, idx_stage, w_stage;

  ~deepep4j_moe();
};

namespace deepep4j {
namespace moe {

// The steps of the C API calls (arguments already checked by moe_api.cpp where no peer is needed).
int block_create(deepep4j_moe* moe);  // collective: allocates state, checks every rank has the same config
int block_forward(deepep4j_moe* moe, int64_t n, const deepep4j_moe_forward_args* a);
int block_backward(deepep4j_moe* moe, const deepep4j_moe_backward_args* a);
int block_step(deepep4j_moe* moe, const deepep4j_optimizer* opt);
int block_wait(deepep4j_moe* moe);

}  // namespace moe
}  // namespace deepep4j
