// ring_common.cuh — the pieces every ring kernel shares: block roles, warp groups, and waits that end at a deadline.
#pragma once

#include "cuda/bulk_copy.cuh"
#include "cuda/cuda_util.h"
#include "cuda/kernels.h"

namespace deepep4j {
namespace cuda {

constexpr int kRingThreads = 768;
constexpr int kRingWarps = kRingThreads / 32;
constexpr int kMaxGroups = 15;  // named barriers 1..15
constexpr int kRingSmemBytes = bulk_smem_bytes(kRingWarps);  // dynamic shared memory of the ring dispatch: bulk staging
static_assert(kRingWarps * 16 <= kBulkBarBytes, "two mbarriers per warp");

// The ring dispatch's dynamic shared memory on the current device: the bulk staging on sm_90 and later, none before
// (that variant copies with warp_copy, and 192 KB is more than an sm_80 block may have).
inline int ring_smem_bytes() {
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  return major >= 9 ? kRingSmemBytes : 0;
}

// Lets the ring dispatch kernel launch with ring_smem_bytes() of dynamic shared memory (above the default 48 KB).
inline cudaError_t allow_ring_smem(const void* kernel) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, ring_smem_bytes());
}

// The ring dispatch kernel's dynamic shared memory (the bulk staging of its warps).
__device__ __forceinline__ uint8_t* ring_smem() {
  extern __shared__ __align__(128) uint8_t ring_dyn_smem[];
  return ring_dyn_smem;
}

// Records the first timeout of a step in the mailbox (which wait, which peer); later ones keep the first.
__device__ __forceinline__ void record_timeout(const Step& st, int where, int peer) {
  if (atomicCAS(&st.mailbox->status, 0, DEEPEP4J_ERR_TIMEOUT) == 0) {
    st.mailbox->where = where;
    st.mailbox->peer = peer;
    __threadfence_system();
  }
  if (st.sticky) *step_failed(st.peers.region[st.rank]) = 1;  // later queued steps move nothing
}

// Whether the barrier before this step failed (the host reports why): then the step's kernels move no data.
// Block-wide; it ends with __syncthreads, so shared memory set before it is visible after it.
__device__ __forceinline__ bool step_skipped(const Step& st) {
  __shared__ int s_skip;
  if (threadIdx.x == 0) s_skip = *reinterpret_cast<volatile int32_t*>(step_failed(st.peers.region[st.rank])) != 0;
  __syncthreads();
  return s_skip != 0;
}

// Spins until counter - target >= 0 (wrap-safe); false at the deadline.
__device__ __forceinline__ bool wait_reach(const uint32_t* counter, uint32_t target, uint64_t deadline) {
  while (int32_t(ld_acquire_sys(counter) - target) < 0)
    if (global_ns() > deadline) return false;
  return true;
}

// config.cuda_trace (kernels.h: TraceWord); each is a no-op in an untraced step.
__device__ __forceinline__ unsigned long long* trace_word(const Step& st, int word) {
  return reinterpret_cast<unsigned long long*>(st.trace + blockIdx.x * kTraceWords + word);
}
__device__ __forceinline__ void trace_start(const Step& st, uint64_t now) {
  if (st.trace && threadIdx.x == 0) *trace_word(st, kTraceStart) = now;
}
// Called by every warp: the word keeps the last warp's time.
__device__ __forceinline__ void trace_mark(const Step& st, int word) {
  if (st.trace && threadIdx.x % 32 == 0) atomicMax(trace_word(st, word), (unsigned long long)global_ns());
}
__device__ __forceinline__ void trace_waited(const Step& st, uint64_t since) {
  if (st.trace) atomicAdd(trace_word(st, kTraceWait), (unsigned long long)(global_ns() - since));
}
// wait_reach, its time added to the block's wait word when traced.
__device__ __forceinline__ bool traced_wait(const Step& st, const uint32_t* counter, uint32_t target,
                                            uint64_t deadline) {
  const uint64_t t0 = st.trace ? global_ns() : 0;
  const bool reached = wait_reach(counter, target, deadline);
  trace_waited(st, t0);
  return reached;
}

// Warps of a block split into groups, one per peer at a time (peer = group, group + groups, ...).
struct Groups {
  int groups, warps_per_group, group, warp_in_group, lane;
  __device__ bool active() const { return group < groups; }
  __device__ bool leader() const { return warp_in_group == 0 && lane == 0; }
  __device__ void sync() const { group_sync(group + 1, warps_per_group * 32); }
  __device__ static Groups make(int num_ranks) {
    Groups g;
    g.groups = min(num_ranks, kMaxGroups);
    g.warps_per_group = kRingWarps / g.groups;
    const int warp = threadIdx.x / 32;
    g.group = warp / g.warps_per_group;
    g.warp_in_group = warp % g.warps_per_group;
    g.lane = threadIdx.x % 32;
    return g;
  }
};

// A sender streams n items into ring (c, me) of rank `dest`, `chunk` at a time: wait for room, fill, publish the tail.
// write(i, slot) fills item i of the stream (called by warp `warp_in_group`, items strided by warps_per_group); where it
// copies rows through `bulk` (dispatch; NULL for combine), those stores are flushed before the tail that publishes them.
template <class Write>
__device__ __forceinline__ bool send_stream(const Step& st, const Rings& rg, const Groups& g, int c, int dest, int n,
                                            int where, uint64_t deadline, uint32_t* s_word, int* s_abort,
                                            BulkWarp* bulk, Write&& write) {
  uint8_t* region = st.peers.region[dest];
  uint32_t* tail = tails(region) + c * st.num_ranks + st.rank;
  const uint32_t* head = heads(region) + c * st.num_ranks + st.rank;
  if (g.leader()) *s_word = ld_acquire_sys(tail);  // our own count from earlier steps
  g.sync();
  const uint32_t base = *s_word;
  uint32_t seen_head = base;  // leader only: the last head read; the remote read is repeated only when short of room
  for (int start = 0; start < n; start += rg.chunk) {
    const int end = min(n, start + rg.chunk);
    const uint32_t need = base + uint32_t(end) - uint32_t(rg.slots);
    if (g.leader() && int32_t(seen_head - need) < 0) {
      if (!traced_wait(st, head, need, deadline)) {
        record_timeout(st, where, dest);
        *s_abort = 1;
      }
      seen_head = ld_acquire_sys(head);
    }
    g.sync();
    if (*s_abort) return false;
    for (int i = start + g.warp_in_group; i < end; i += g.warps_per_group)
      write(i, rg.slot(region, c, st.rank, st.num_ranks, base + uint32_t(i)));
    if (bulk != nullptr) bulk->flush();
    g.sync();
    // The release store is cumulative: the group's slot writes, ordered before it by the barrier, become visible first.
    if (g.leader()) st_release_sys(tail, base + uint32_t(end));
  }
  g.sync();
  return true;
}

}  // namespace cuda
}  // namespace deepep4j
