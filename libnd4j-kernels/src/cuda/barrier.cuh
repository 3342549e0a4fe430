// barrier.cuh — the barrier every step starts with (block-wide device code): shared by the control kernels and,
// for stream-ordered steps whose local checks passed, by the ring kernels that run it themselves (ring_common.cuh).
#pragma once

#include "cuda/cuda_util.h"
#include "cuda/kernels.h"

namespace deepep4j {
namespace cuda {

// Threads 0..R-1 each meet one rank: publish our status to it, then wait for its flag. Thread 0 then settles how the
// barrier ended with the other ranks (one compare-and-swap on rank 0's decision word): complete, or abandoned by the
// first rank that gave up, in which case every rank — one that arrives late included — reports the timeout. Returns
// in the mailbox the lowest rank that reported an error or the abandonment, and whether any rank voted against copy
// engines. At connect (epoch 1) a rank that failed before it could reach its peers publishes its status in its own
// region only, where the peers also look.
__device__ inline void barrier_body(const Step& st, int32_t status, const char* message, uint64_t deadline,
                                    int32_t ce_vote, const DirectTargets* direct) {
  __shared__ int s_failed_peer, s_timed_out, s_veto;
  __shared__ unsigned long long s_decision, s_alone;  // s_alone: bit r = rank r failed before reaching anyone
  if (threadIdx.x == 0) s_failed_peer = DEEPEP4J_MAX_RANKS, s_timed_out = DEEPEP4J_MAX_RANKS, s_veto = 0, s_alone = 0;
  __syncthreads();
  const int r = threadIdx.x;
  bool arrived = true, alone = false;
  const uint32_t* flag = flags(st.peers.region[st.rank]) + r;
  if (r < st.num_ranks) {
    PeerStatus* out = status_slot(st.peers.region[r], st.epoch, st.rank);
    out->status = status;
    out->ce_vote = ce_vote;
    out->direct = direct != nullptr ? direct->v[r] : 0;
    if (status != 0)
      for (int i = 0; i < int(sizeof(out->message)); ++i) out->message[i] = message[i];
    st_release_sys(flags(st.peers.region[r]) + st.rank, st.epoch);  // release: status lands before the flag
    const uint32_t* own_flag = flags(st.peers.region[r]) + r;
    const uint32_t* own_status = reinterpret_cast<const uint32_t*>(status_slot(st.peers.region[r], st.epoch, r));
    while (int32_t(ld_acquire_sys(flag) - st.epoch) < 0) {
      if (st.epoch == 1 && r != st.rank && int32_t(ld_acquire_sys(own_flag) - st.epoch) >= 0 &&
          ld_acquire_sys(own_status) != 0) {
        alone = true;
        break;
      }
      if (global_ns() > deadline) {
        arrived = false;
        break;
      }
    }
    if (!arrived) atomicMin(&s_timed_out, r);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned long long epoch = st.epoch;
    const unsigned long long mine =
        (epoch << 32) | (s_timed_out < DEEPEP4J_MAX_RANKS ? kAbandoned | (unsigned long long)(st.rank) << 8 |
                                                              (unsigned long long)(s_timed_out)
                                                        : 0ull);
    unsigned long long* word = decision(st.peers.region[0]);
    unsigned long long cur = ld_acquire_sys64(word);
    for (;;) {
      const int32_t ahead = int32_t(uint32_t(cur >> 32) - st.epoch);
      if (ahead == 0) break;  // settled by another rank
      if (ahead > 0) {        // the group went on without us: this barrier was abandoned
        cur = (epoch << 32) | kAbandoned | (kLateRank << 8);
        break;
      }
      const unsigned long long prev = atomicCAS_system(word, cur, mine);
      if (prev == cur) {
        cur = mine;
        break;
      }
      cur = prev;
    }
    s_decision = cur;
  }
  __syncthreads();
  const bool abandoned = (s_decision & kAbandoned) != 0;
  if (r < st.num_ranks && !abandoned) {
    // Complete: every rank reached the barrier somewhere, so a flag we gave up on is about to land.
    const uint64_t grace = global_ns() + st.timeout_ns;
    while (!arrived && !alone && int32_t(ld_acquire_sys(flag) - st.epoch) < 0)
      if (global_ns() > grace) break;
    if (alone) {
      atomicOr(&s_alone, 1ull << r);
      atomicMin(&s_failed_peer, r);
    } else if (int32_t(ld_acquire_sys(flag) - st.epoch) >= 0) {
      const PeerStatus* in = status_slot(st.peers.region[st.rank], st.epoch, r);
      if (in->status != 0) atomicMin(&s_failed_peer, r);
      if (in->ce_vote == 0) atomicOr(&s_veto, 1);
      st.mailbox->direct[r] = in->direct;
    }
  }
  if (threadIdx.x == 0) s_timed_out = DEEPEP4J_MAX_RANKS;
  __syncthreads();
  if (r < st.num_ranks && !abandoned && int32_t(ld_acquire_sys(flag) - st.epoch) < 0 && !(s_alone >> r & 1ull))
    atomicMin(&s_timed_out, r);  // a rank died inside the barrier
  __syncthreads();
  const bool failed = abandoned || s_failed_peer < DEEPEP4J_MAX_RANKS || s_timed_out < DEEPEP4J_MAX_RANKS;
  if (threadIdx.x == 0 && s_veto) st.mailbox->ce_veto = 1;
  if (threadIdx.x == 0) *step_failed(st.peers.region[st.rank]) = failed ? 1 : 0;
  if (threadIdx.x == 0 && failed) {
    Mailbox* mb = st.mailbox;
    if (abandoned) {
      mb->status = DEEPEP4J_ERR_TIMEOUT;
      mb->peer = int32_t(s_decision & 0xff);
      mb->abandoned_by = 1 + int32_t((s_decision >> 8) & 0x7f);
      mb->where = 0;
    } else if (s_failed_peer < DEEPEP4J_MAX_RANKS) {
      const int f = s_failed_peer;
      const PeerStatus* ps = status_slot(st.peers.region[(s_alone >> f & 1ull) ? f : st.rank], st.epoch, f);
      // This rank's own failure (found on the device: a queued notify's check) keeps its status.
      mb->status = f == st.rank ? ps->status : DEEPEP4J_ERR_PEER_ERROR;
      mb->peer = f;
      for (int i = 0; i < int(sizeof(ps->message)); ++i) mb->message[i] = ps->message[i];
    } else {
      mb->status = DEEPEP4J_ERR_TIMEOUT;
      mb->peer = s_timed_out;
      mb->where = 0;
    }
    __threadfence_system();
  }
  __syncthreads();
}

// The start of every step's control kernel (one block). Stream-ordered steps (st.sticky) are skipped entirely after
// an earlier failure of this rank, take their epoch from the region's counter, and publish a failure left pending on
// this device as this rank's status. Returns false when the step is skipped; *st gets the step's epoch.
__device__ inline bool begin_step(Step* st, int32_t* status, const char** message) {
  __shared__ int s_skip;
  __shared__ uint32_t s_epoch;
  uint8_t* own = st->peers.region[st->rank];
  if (threadIdx.x == 0) {
    s_skip = st->sticky && *reinterpret_cast<volatile int32_t*>(step_failed(own)) != 0;
    s_epoch = st->epoch != 0 ? st->epoch : *reinterpret_cast<volatile uint32_t*>(epoch_word(own)) + 1u;
  }
  __syncthreads();
  st->epoch = s_epoch;
  if (s_skip) return false;
  const PeerStatus* p = pending(own);
  if (st->sticky && *status == 0 && p->status != 0) *status = p->status, *message = p->message;
  return true;
}

// The end of a step's control kernel: the counter the next stream-ordered step numbers itself from.
__device__ inline void end_step(const Step& st) {
  if (threadIdx.x == 0) *epoch_word(st.peers.region[st.rank]) = st.epoch;
}

}  // namespace cuda
}  // namespace deepep4j
