// step_exchange.cpp — the start and the end of every collective step: each rank writes its verdict, shapes and counts
// (or, at the end, how its transfer went) into every peer's control area and waits for all peers', then every rank
// reaches the same verdict from the same data; one compare-and-swap settles whether the step completed or was
// abandoned after a timeout, so every rank ends it the same way.
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdlib>
#include <cstring>

#include "cpu_backend.h"

namespace deepep4j {
namespace cpu {

std::string t_fmt(const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

const char* step_name(int kind) {
  switch (kind) {
    case kStepNotify: return "notify_dispatch";
    case kStepDispatch: return "dispatch";
    case kStepCombine: return "combine";
    case kStepConnect: return "connect";
    default: return "unknown step";
  }
}

int CpuBackend::fail_step(int32_t status, const char* message) {
  if (broken_) return broken_error("deepep4j_fail_step");
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
  // Every rank reports how its transfer went, so a step that failed on one rank fails on all; a failed transfer
  // leaves rings half-read, so the buffer is then broken on every rank.
  Check c;
  if (st != DEEPEP4J_OK) {
    c.status = st;
    c.message = last_error();
  }
  StepData mine{};
  fill_header(&mine, c, kind, 0, 0, 0, 0, 0, 0, 0);
  std::vector<const StepData*> all;
  int e = exchange(mine, &all);
  if (e != DEEPEP4J_OK) return e;
  e = verdict(all, kind);
  if (e != DEEPEP4J_OK && !broken_) {
    broken_ = true;
    broken_reason_ = std::string(step_name(kind)) + " failed while moving rows";
  }
  return e;
}

Check CpuBackend::check_ring(int64_t slot_bytes, const char* what) const {
  int64_t slots = ring_slots(slot_bytes);
  if (slots < cfg_.max_send_tokens_per_chunk)
    return Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT,
                       "buffer_bytes = %" PRId64 ": each of the %d rings holds %zu bytes, less than one %s chunk of "
                       "%d rows x %" PRId64 " bytes; minimum is %" PRId64 " bytes (deepep4j_buffer_size_min)",
                       cfg_.buffer_bytes, R_ * C_, ring_bytes_, what, cfg_.max_send_tokens_per_chunk, slot_bytes,
                       buffer_bytes_for(slot_bytes, cfg_.max_send_tokens_per_chunk, R_, C_));
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

// The decision word (rank 0's region): bits 63..16 the step, bit 15 abandoned, bits 14..8 the rank that gave up,
// bits 7..0 the rank it waited for; or, at connect, bit 14 set in the low half: rank (bits 7..0) failed locally.
namespace {
constexpr uint64_t kAbandoned = 1u << 15;
constexpr uint64_t kPeerFailed = 1u << 14;
constexpr uint64_t kLate = 0x7f;  // "gave up" field when this rank found the group already past the step
}  // namespace

uint64_t CpuBackend::decide(uint64_t proposal) {
  std::atomic<uint64_t>& word = views_[0].control()->decision;
  const uint64_t mine = (step_ << 16) | proposal;
  uint64_t cur = word.load(std::memory_order_acquire);
  for (;;) {
    const uint64_t step = cur >> 16;
    if (step == step_) return cur;  // decided by another rank
    // The group has decided a later step: it went on without this rank, so this step was abandoned.
    if (step > step_) return (step_ << 16) | kAbandoned | (kLate << 8);
    if (word.compare_exchange_weak(cur, mine, std::memory_order_acq_rel, std::memory_order_acquire)) return mine;
  }
}

int CpuBackend::broken_error(const char* call) const {
  return set_error(DEEPEP4J_ERR_STATE, "%s on rank %d: the buffer is broken (%s): destroy and recreate the group's "
                   "buffers", call, rank_, broken_reason_.c_str());
}

int CpuBackend::exchange(const StepData& mine, std::vector<const StepData*>* all,
                         const std::function<void(int, StepData*)>& per_peer) {
  ++step_;
  const int parity = int(step_ & 1);
  // Data first, then the step numbers: a rank that sees this rank's step number anywhere may read its data
  // everywhere (release/acquire, and the decision word passes that on).
  for (int d = 0; d < R_; ++d) {
    StepSlot& slot = views_[d].control()->slots[parity][rank_];
    slot.data = mine;
    if (per_peer) per_peer(d, &slot.data);
  }
  for (int d = 0; d < R_; ++d) views_[d].control()->slots[parity][rank_].seq.store(step_, std::memory_order_release);
  Deadline deadline(cfg_.timeout_ms);
  Control* ctl = views_[rank_].control();
  int missing = -1, failed = -1;
  for (int s = 0; s < R_ && missing < 0 && failed < 0; ++s) {
    Backoff backoff;
    while (ctl->slots[parity][s].seq.load(std::memory_order_acquire) != step_) {
      if (mine.kind == kStepConnect && views_[s].control()->connect_failure.load(std::memory_order_acquire) != 0) {
        failed = s;  // the peer failed before it could reach anyone
        break;
      }
      if (deadline.passed()) {
        missing = s;
        break;
      }
      backoff.pause();
    }
  }
  const uint64_t d = decide(failed >= 0    ? kPeerFailed | uint64_t(failed)
                            : missing >= 0 ? kAbandoned | (uint64_t(rank_) << 8) | uint64_t(missing)
                                           : 0);
  const char* what = step_name(mine.kind);
  if (d & kPeerFailed) {
    const int f = int(d & 0xff);
    broken_ = true;
    broken_reason_ = t_fmt("rank %d failed in connect", f);
    char msg[kMessageBytes + 1] = {};
    std::memcpy(msg, views_[f].control()->connect_message, kMessageBytes);
    return set_error(DEEPEP4J_ERR_PEER_ERROR, "rank %d reported in connect: %s", f, msg);
  }
  if (d & kAbandoned) {
    const int gave_up = int((d >> 8) & 0x7f), waited_for = int(d & 0xff);
    broken_ = true;
    if (gave_up == int(kLate)) {
      broken_reason_ = t_fmt("rank %d arrived at %s after the others had abandoned it", rank_, what);
      return set_error(DEEPEP4J_ERR_TIMEOUT,
                       "rank %d: %s was abandoned by the other ranks before this rank arrived (they waited "
                       "timeout_ms = %d); the buffer is broken: destroy and recreate the group's buffers",
                       rank_, what, cfg_.timeout_ms);
    }
    broken_reason_ = t_fmt("%s timed out: rank %d waited for rank %d", what, gave_up, waited_for);
    if (gave_up == rank_)
      return set_error(DEEPEP4J_ERR_TIMEOUT,
                       "rank %d: timed out after %d ms in %s waiting for rank %d (the peer did not arrive or died); "
                       "the step is abandoned on every rank and the buffer is broken: destroy and recreate the "
                       "group's buffers",
                       rank_, cfg_.timeout_ms, what, waited_for);
    return set_error(DEEPEP4J_ERR_TIMEOUT,
                     "rank %d: %s abandoned: rank %d timed out after %d ms waiting for rank %d; the buffer is broken: "
                     "destroy and recreate the group's buffers",
                     rank_, what, gave_up, cfg_.timeout_ms, waited_for);
  }
  // Complete: every rank arrived, so every rank's data is here (see the order of the writes above).
  all->assign(R_, nullptr);
  for (int s = 0; s < R_; ++s) (*all)[s] = &ctl->slots[parity][s].data;
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
