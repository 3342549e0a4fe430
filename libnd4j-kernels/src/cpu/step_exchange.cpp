// step_exchange.cpp — the start (and, for direct copies, the end) of every collective step: each rank writes its
// verdict, shapes and counts into every peer's control area and waits for all peers', then every rank reaches the
// same verdict from the same data.
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdlib>
#include <cstring>

#include "../common/dtype.h"
#include "cpu_backend.h"

namespace deepep4j {
namespace cpu {

const char* step_name(int kind) {
  switch (kind) {
    case kStepNotify: return "notify_dispatch";
    case kStepDispatch: return "dispatch";
    case kStepCombine: return "combine";
    default: return "unknown step";
  }
}

// acc = scale * row (first contribution: saves zero-filling and re-reading acc) or acc += scale * row. One straight

int CpuBackend::fail_step(int32_t status, const char* message) {
  StepData mine{};
  Check c;
  c.status = status;
  c.message = message;
  fill_header(&mine, c, kStepNotify, 0, 0, 0, 0, 0, 0, 0);
  std::vector<const StepData*> all;
  int st = exchange(mine, &all);
  if (st != DEEPEP4J_OK) return st;
  return verdict(all, kStepNotify);  // this rank's own failure unless a lower rank failed too
}

void CpuBackend::publish(StepData* d, std::initializer_list<const void*> ptrs) const {
  d->pid = getpid();
  int i = 0;
  for (const void* p : ptrs) d->ptrs[i++] = reinterpret_cast<uint64_t>(p);
}

void CpuBackend::publish_offsets(const CpuHandle* h, int d, StepData* s) const {
  if (d < (int)h->recv_begin.size())
    for (int c = 0; c < C_; ++c) s->row_offsets[c] = h->recv_begin[d][c];
}

int CpuBackend::finish_step(int st, int kind) {
  if (!direct_ || st != DEEPEP4J_OK) return st;
  StepData mine{};
  fill_header(&mine, Check{}, kind, 0, 0, 0, 0, 0, 0, 0);
  std::vector<const StepData*> all;
  int e = exchange(mine, &all);
  if (e != DEEPEP4J_OK) return e;
  return verdict(all, kind);
}

Check CpuBackend::check_ring(int64_t slot_bytes, const char* what) const {
  int64_t slots = ring_slots(slot_bytes);
  if (slots < cfg_.max_send_tokens_per_chunk)
    return Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT,
                       "buffer_bytes = %" PRId64 ": each of the %d rings holds %zu bytes, less than one %s chunk of "
                       "%d rows x %" PRId64 " bytes; minimum is %" PRId64 " bytes (deepep4j_buffer_size_hint)",
                       cfg_.buffer_bytes, R_ * C_, ring_bytes_, what, cfg_.max_send_tokens_per_chunk, slot_bytes,
                       slot_bytes * cfg_.max_send_tokens_per_chunk * R_ * C_);
  return Check{};
}

int64_t CpuBackend::ring_slots(int64_t slot_bytes) const {
  return std::min<int64_t>(cfg_.ring_tokens, int64_t(ring_bytes_) / slot_bytes);
}

void CpuBackend::fill_header(StepData* d, const Check& c, int kind, int64_t n, int64_t hidden, int32_t k, int32_t e,
                        int32_t dtype, int32_t flags, int64_t handle_seq) {
  d->status = c.status;
  d->kind = kind;
  d->num_tokens = n;
  d->hidden = hidden;
  d->num_topk = k;
  d->num_experts = e;
  d->dtype = dtype;
  d->flags = flags;
  d->handle_seq = handle_seq;
  snprintf(d->message, sizeof(d->message), "%s", c.message.c_str());
}

int CpuBackend::exchange(const StepData& mine, std::vector<const StepData*>* all,
                         const std::function<void(int, StepData*)>& per_peer) {
  ++step_;
  const int parity = int(step_ & 1);
  for (int d = 0; d < R_; ++d) {
    StepSlot& slot = views_[d].control()->slots[parity][rank_];
    slot.data = mine;
    if (per_peer) per_peer(d, &slot.data);
    slot.seq.store(step_, std::memory_order_release);
  }
  Deadline deadline(cfg_.timeout_ms);
  Control* ctl = views_[rank_].control();
  all->assign(R_, nullptr);
  for (int s = 0; s < R_; ++s) {
    Backoff backoff;
    while (ctl->slots[parity][s].seq.load(std::memory_order_acquire) != step_) {
      if (deadline.passed())
        return set_error(DEEPEP4J_ERR_TIMEOUT,
                         "rank %d: timed out after %d ms in %s waiting for rank %d (the peer did not arrive or died)",
                         rank_, cfg_.timeout_ms, step_name(mine.kind), s);
      backoff.pause();
    }
    (*all)[s] = &ctl->slots[parity][s].data;
  }
  return DEEPEP4J_OK;
}

int CpuBackend::verdict(const std::vector<const StepData*>& all, int kind) const {
  for (int s = 0; s < R_; ++s) {
    if (all[s]->status == DEEPEP4J_OK) continue;
    if (s == rank_) return set_error(all[s]->status, "%s", all[s]->message);
    return set_error(DEEPEP4J_ERR_PEER_ERROR, "rank %d reported in %s: %s", s, step_name(kind), all[s]->message);
  }
  const StepData& a = *all[0];
  for (int s = 1; s < R_; ++s) {
    const StepData& b = *all[s];
    if (a.kind != b.kind)
      return set_error(DEEPEP4J_ERR_PEER_MISMATCH, "ranks disagree on the step: rank 0 calls %s but rank %d calls %s",
                       step_name(a.kind), s, step_name(b.kind));
    if (a.hidden != b.hidden || a.num_topk != b.num_topk || a.num_experts != b.num_experts || a.dtype != b.dtype)
      return set_error(DEEPEP4J_ERR_PEER_MISMATCH,
                       "ranks disagree on %s: rank 0 has hidden = %" PRId64 ", num_topk = %d, num_experts = %d, "
                       "dtype = %s; rank %d has hidden = %" PRId64 ", num_topk = %d, num_experts = %d, dtype = %s",
                       step_name(kind), a.hidden, a.num_topk, a.num_experts, dtype_name(a.dtype), s, b.hidden,
                       b.num_topk, b.num_experts, dtype_name(b.dtype));
    if (a.handle_seq != b.handle_seq)
      return set_error(DEEPEP4J_ERR_PEER_MISMATCH,
                       "ranks disagree on %s: rank 0 uses the handle of step %" PRId64 ", rank %d that of step %" PRId64,
                       step_name(kind), a.handle_seq, s, b.handle_seq);
  }
  // Optional arguments: every pair of ranks for which a flag bit counts must agree on it.
  for (int s = 0; s < R_; ++s) {
    for (int q = s + 1; q < R_; ++q) {
      const StepData& a = *all[s];
      const StepData& b = *all[q];
      int known = (a.flags >> 8) & (b.flags >> 8);
      if (((a.flags ^ b.flags) & known) == 0) continue;
      return set_error(DEEPEP4J_ERR_PEER_MISMATCH,
                       "ranks disagree on %s: optional arguments differ (rank %d flags %d, rank %d flags %d: "
                       "topk_weights / recv_topk_weights / y_topk_weights must be given on all ranks or none)",
                       step_name(kind), s, a.flags & 0xff, q, b.flags & 0xff);
    }
  }
  return DEEPEP4J_OK;
}

}  // namespace cpu
}  // namespace deepep4j
