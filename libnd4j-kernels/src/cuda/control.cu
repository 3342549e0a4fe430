// control.cu — the kernels around the data path: layout, the per-step routing plan, barriers and the notify exchange.
#include <cub/block/block_scan.cuh>

#include "cuda/cuda_util.h"
#include "cuda/kernels.h"

namespace deepep4j {
namespace cuda {

namespace {

__global__ void layout_kernel(const int64_t* topk_idx, int64_t n, int k, int e, int r, int32_t* per_rank,
                              int32_t* per_expert, uint8_t* in_rank) {
  const int L = e / r;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < n; t += int64_t(gridDim.x) * blockDim.x) {
    uint64_t mask = 0;
    for (int j = 0; j < k; ++j) {
      int64_t x = topk_idx[t * k + j];
      if (x < 0 || x >= e) continue;
      mask |= 1ull << (x / L);
      if (per_expert) atomicAdd(per_expert + x, 1);
    }
    for (int d = 0; d < r; ++d) {
      int in = int(mask >> d & 1ull);
      if (in_rank) in_rank[t * r + d] = uint8_t(in);
      if (per_rank && in) atomicAdd(per_rank + d, 1);
    }
  }
}

constexpr int kPlanThreads = 256;

// One block per channel: masks and expert counts of its tokens, then per destination a block-wide scan that gives
// every token its position in the (channel, destination) stream.
__global__ void __launch_bounds__(kPlanThreads) plan_kernel(const int64_t* topk_idx, Routing h, int r,
                                                            unsigned long long* bad) {
  using Scan = cub::BlockScan<int, kPlanThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int c = blockIdx.x, K = h.num_topk, E = h.num_experts, L = E / r, C = h.channels;
  const int64_t N = h.num_tokens;
  const int64_t t0 = min(N, c * h.tokens_per_channel), t1 = min(N, t0 + h.tokens_per_channel);
  for (int64_t t = t0 + threadIdx.x; t < t1; t += blockDim.x) {
    uint64_t mask = 0;
    for (int j = 0; j < K; ++j) {
      int64_t x = topk_idx[t * K + j];
      if (x < -1 || x >= E) {
        atomicMin(bad, (unsigned long long)(t * K + j));
        x = -1;
      }
      h.topk[t * K + j] = int32_t(x);
      if (x < 0) continue;
      mask |= 1ull << (x / L);
      atomicAdd(h.expert_counts + x, 1);
    }
    h.token_mask[t] = mask;
  }
  __syncthreads();
  for (int d = 0; d < r; ++d) {
    int running = 0;
    for (int64_t base = t0; base < t1; base += kPlanThreads) {
      const int64_t t = base + threadIdx.x;
      const int flag = t < t1 ? int(h.token_mask[t] >> d & 1ull) : 0;
      int pos = 0, total = 0;
      Scan(temp).ExclusiveSum(flag, pos, total);
      if (t < t1) {
        h.send_pos[t * r + d] = flag ? running + pos : -1;
        if (flag) h.send_list[d * N + t0 + running + pos] = int32_t(t);
      }
      running += total;
      __syncthreads();
    }
    if (threadIdx.x == 0) h.send_counts[d * C + c] = running;
  }
}

// Threads 0..R-1 each meet one rank: publish our status to it, then wait for its flag. Thread 0 then settles how the
// barrier ended with the other ranks (one compare-and-swap on rank 0's decision word): complete, or abandoned by the
// first rank that gave up, in which case every rank — one that arrives late included — reports the timeout. Returns
// in the mailbox the lowest rank that reported an error or the abandonment, and whether any rank voted against copy
// engines. At connect (epoch 1) a rank that failed before it could reach its peers publishes its status in its own
// region only, where the peers also look.
__device__ void barrier_body(const Step& st, int32_t status, const char* message, uint64_t deadline,
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

struct BarrierMessage {
  char text[sizeof(PeerStatus::message)];
};

// The start of every step's control kernel (one block). Stream-ordered steps (st.sticky) are skipped entirely after
// an earlier failure of this rank, take their epoch from the region's counter, and publish a failure left pending on
// this device as this rank's status. Returns false when the step is skipped; *st gets the step's epoch.
__device__ bool begin_step(Step* st, int32_t* status, const char** message) {
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
__device__ void end_step(const Step& st) {
  if (threadIdx.x == 0) *epoch_word(st.peers.region[st.rank]) = st.epoch;
}

__global__ void barrier_kernel(Step st, int32_t status, BarrierMessage msg, int32_t ce_vote, DirectTargets direct) {
  const uint64_t deadline = global_ns() + st.timeout_ns;
  const char* text = msg.text;
  if (!begin_step(&st, &status, &text)) return;
  barrier_body(st, status, text, deadline, ce_vote, &direct);
  end_step(st);
}

// Small device-side message writer for failures found on the device (a queued notify's checks).
struct DevText {
  char* out;
  int cap, len = 0;
  __device__ DevText(char* o, int c) : out(o), cap(c) { out[0] = 0; }
  __device__ DevText& s(const char* v) {
    while (*v && len + 1 < cap) out[len++] = *v++;
    out[len] = 0;
    return *this;
  }
  __device__ DevText& i(long long v) {
    char digits[24];
    int n = 0;
    const bool neg = v < 0;
    unsigned long long u = neg ? 0ull - (unsigned long long)v : (unsigned long long)v;
    do digits[n++] = char('0' + u % 10); while ((u /= 10) != 0);
    if (neg && len + 1 < cap) out[len++] = '-';
    while (n > 0 && len + 1 < cap) out[len++] = digits[--n];
    out[len] = 0;
    return *this;
  }
};

// Receive offsets, M and per-expert counts of a queued notify from the gathered slots (block-wide).
__device__ void finish_queued(const Step& st, const NotifyHeader& mine, const uint8_t* gathered, int64_t slot_bytes,
                              int local_experts, const QueuedNotify& q) {
  const int R = st.num_ranks, C = mine.num_channels;
  if (threadIdx.x == 0) {
    int mismatch = -1;
    int64_t m = 0;
    for (int s = 0; s < R; ++s) {
      const NotifyHeader* o = reinterpret_cast<const NotifyHeader*>(gathered + s * slot_bytes);
      if (o->num_topk != mine.num_topk || o->num_experts != mine.num_experts || o->dtype != mine.dtype ||
          o->hidden != mine.hidden)
        mismatch = mismatch < 0 ? s : mismatch;
      const int32_t* ints = reinterpret_cast<const int32_t*>(o + 1);
      for (int c = 0; c < C; ++c) {
        q.recv_offset[s * C + c] = int32_t(m);
        q.recv_counts[s * C + c] = ints[c];
        m += ints[c];
      }
    }
    *q.num_recv = m;
    if (q.num_recv_out) *q.num_recv_out = m;
    // A local finding after the exchange: the next barrier publishes it, so every rank fails that step.
    PeerStatus* p = pending(st.peers.region[st.rank]);
    if (mismatch >= 0) {
      DevText(p->message, int(sizeof(p->message)))
          .s("deepep4j_notify_dispatch_queued: rank ").i(st.rank).s(" and rank ").i(mismatch)
          .s(" disagree on (num_topk, num_experts, dtype, hidden): all ranks of a step must agree");
      p->status = DEEPEP4J_ERR_PEER_MISMATCH;
    } else if (m > q.worst) {
      DevText(p->message, int(sizeof(p->message)))
          .s("num_worst_tokens = ").i(q.worst).s(": rank ").i(st.rank).s(" receives ").i(m)
          .s(" rows in this step; the handle must be created with at least that many");
      p->status = DEEPEP4J_ERR_INVALID_ARGUMENT;
    }
  }
  if (q.per_expert_out)
    for (int j = threadIdx.x; j < local_experts; j += blockDim.x) {
      int32_t sum = 0;
      for (int s = 0; s < R; ++s)
        sum += reinterpret_cast<const int32_t*>(gathered + s * slot_bytes + sizeof(NotifyHeader))[C + j];
      q.per_expert_out[j] = sum;
    }
}

__global__ void notify_kernel(Step st, NotifyHeader header, const int32_t* send_counts, const int32_t* expert_counts,
                              int local_experts, uint8_t* gathered, int64_t slot_bytes, QueuedNotify q) {
  const uint64_t deadline = global_ns() + st.timeout_ns;
  const int C = header.num_channels;
  const bool queued = q.recv_offset != nullptr;
  __shared__ NotifyHeader s_header;
  __shared__ char s_text[sizeof(PeerStatus::message)];  // what barrier_body publishes: a whole PeerStatus message
  if (threadIdx.x == 0) {
    s_header = header;
    if (queued && s_header.status == 0 && *q.bad != ~0ull) {  // the plan found a bad topk_idx entry
      const unsigned long long b = *q.bad;
      const long long k = header.num_topk;
      s_header.status = DEEPEP4J_ERR_INVALID_ARGUMENT;
      DevText(s_header.message, int(sizeof(s_header.message)))
          .s("topk_idx[").i((long long)(b / k)).s("][").i((long long)(b % k)).s("] = ").i(q.topk_idx[b])
          .s(": must be in [-1, num_experts = ").i(header.num_experts).s(")");
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < int(sizeof(s_text)); i += blockDim.x)
    s_text[i] = i < int(sizeof(s_header.message)) ? s_header.message[i] : 0;
  __syncthreads();
  int32_t status = queued ? s_header.status : 0;
  const char* text = s_text;
  if (!begin_step(&st, &status, &text)) return;
  const uint32_t parity = st.epoch;
  for (int d = 0; d < st.num_ranks; ++d) {
    uint8_t* slot = notify_slot(st.peers.region[d], parity, st.rank);
    for (int i = threadIdx.x; i < int(sizeof(NotifyHeader)) / 4; i += blockDim.x)
      reinterpret_cast<int32_t*>(slot)[i] = reinterpret_cast<const int32_t*>(&s_header)[i];
    int32_t* ints = reinterpret_cast<int32_t*>(slot + sizeof(NotifyHeader));
    for (int i = threadIdx.x; i < C + local_experts; i += blockDim.x) {
      int32_t v = 0;
      if (s_header.status == 0)
        v = i < C ? send_counts[d * C + i] : expert_counts[d * local_experts + (i - C)];
      ints[i] = v;
    }
  }
  __syncthreads();
  // Host-driven notify (status 0) checks the gathered headers itself; a queued one fails the barrier with its status.
  barrier_body(st, status, text, deadline, 0, nullptr);
  end_step(st);
  if (*step_failed(st.peers.region[st.rank]) != 0) return;
  // Only the slot's used part: the header and C + L ints.
  const int64_t used = int64_t(sizeof(NotifyHeader)) + 4 * int64_t(C + local_experts);
  for (int s = 0; s < st.num_ranks; ++s) {
    const int32_t* src = reinterpret_cast<const int32_t*>(notify_slot(st.peers.region[st.rank], parity, s));
    int32_t* dst = reinterpret_cast<int32_t*>(gathered + s * slot_bytes);
    for (int64_t i = threadIdx.x; i < used / 4; i += blockDim.x) dst[i] = src[i];
  }
  if (!queued) return;
  __syncthreads();
  finish_queued(st, s_header, gathered, slot_bytes, local_experts, q);
}

}  // namespace

cudaError_t launch_layout(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int32_t r, int32_t* per_rank,
                          int32_t* per_expert, uint8_t* in_rank, cudaStream_t s) {
  if (per_rank) cudaMemsetAsync(per_rank, 0, sizeof(int32_t) * r, s);
  if (per_expert) cudaMemsetAsync(per_expert, 0, sizeof(int32_t) * e, s);
  if (n == 0) return cudaGetLastError();
  int blocks = int(std::min<int64_t>((n + 255) / 256, 1024));
  layout_kernel<<<blocks, 256, 0, s>>>(topk_idx, n, k, e, r, per_rank, per_expert, in_rank);
  return cudaGetLastError();
}

cudaError_t launch_plan(const int64_t* topk_idx, const Routing& h, int32_t num_ranks, unsigned long long* bad,
                        cudaStream_t s) {
  cudaMemsetAsync(h.expert_counts, 0, sizeof(int32_t) * h.num_experts, s);
  plan_kernel<<<h.channels, kPlanThreads, 0, s>>>(topk_idx, h, num_ranks, bad);
  return cudaGetLastError();
}

cudaError_t launch_barrier(const Step& step, int32_t status, const char* message, cudaStream_t s, int32_t ce_vote,
                           const DirectTargets* direct) {
  BarrierMessage m{};
  if (message) {
    size_t i = 0;
    for (; i + 1 < sizeof(m.text) && message[i]; ++i) m.text[i] = message[i];
    m.text[i] = 0;
  }
  DirectTargets d{};
  if (direct) d = *direct;
  barrier_kernel<<<1, 64, 0, s>>>(step, status, m, ce_vote, d);
  return cudaGetLastError();
}

cudaError_t launch_notify(const Step& step, const NotifyHeader& header, const Routing* h, int32_t local_experts,
                          uint8_t* gathered, int64_t slot_bytes, cudaStream_t s) {
  notify_kernel<<<1, 256, 0, s>>>(step, header, h ? h->send_counts : nullptr, h ? h->expert_counts : nullptr,
                                  local_experts, gathered, slot_bytes, QueuedNotify{});
  return cudaGetLastError();
}

cudaError_t launch_notify_queued(const Step& step, const NotifyHeader& header, const Routing& h, int32_t local_experts,
                                 uint8_t* gathered, int64_t slot_bytes, const QueuedNotify& q, cudaStream_t s) {
  notify_kernel<<<1, 256, 0, s>>>(step, header, h.send_counts, h.expert_counts, local_experts, gathered, slot_bytes, q);
  return cudaGetLastError();
}

cudaError_t load_control_kernels(KernelSet* k) {
  return k->add({reinterpret_cast<const void*>(layout_kernel), reinterpret_cast<const void*>(plan_kernel),
                 reinterpret_cast<const void*>(barrier_kernel), reinterpret_cast<const void*>(notify_kernel)});
}

}  // namespace cuda
}  // namespace deepep4j
