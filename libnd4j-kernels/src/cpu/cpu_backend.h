// cpu_backend.h — the reference backend: ranks are threads or processes sharing POSIX shared memory.
//
// Every collective step starts with an exchange through the control areas (each rank writes its verdict, shapes and
// counts into every peer's region and waits for all peers'), so a bad argument on one rank becomes the same error on
// every rank before any data moves (step_exchange.cpp). Data then flows through per-(source, channel) rings in the
// receiver's region: senders copy rows in and publish the tail (release); the receiver copies rows out and publishes
// the head (rings.cpp) — the shared-memory analog of DeepEP's NVLink ring buffers. dispatch.cpp and combine.cpp say
// what each step moves; this file's companion cpu_backend.cpp owns the region, the blob and connect.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../common/backend.h"
#include "../common/validate.h"
#include "region_layout.h"
#include "shm_region.h"
#include "worker_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define DEEPEP4J_CPU_RELAX() _mm_pause()
#else
#define DEEPEP4J_CPU_RELAX() ((void)0)
#endif

namespace deepep4j {
namespace cpu {

// Routing of one notify step, kept for dispatch, combine and their cached re-use.
struct CpuHandle : deepep4j_handle {
  int64_t seq = 0;                                 // notify step number (same on every rank)
  int channels = 0;
  std::vector<std::vector<int32_t>> send_tokens;   // [R] token ids sent to each rank, ascending
  std::vector<std::vector<int64_t>> send_begin;    // [R][C+1] start of each channel in send_tokens[d]
  std::vector<std::vector<int64_t>> recv_begin;    // [R][C+1] first receive row of each (source, channel)
  std::vector<int64_t> topk_idx;                   // [N*K] copy of the notify's routing (callers may free theirs)
  std::vector<int64_t> recv_local_idx;             // [M*K] local expert ids, filled by the first dispatch
  bool has_recv_local_idx = false;
};

// Spin, then yield, then sleep: ranks may outnumber cores.
struct Backoff {
  int spins = 0;
  void pause() {
    ++spins;
    if (spins < 64) {
      DEEPEP4J_CPU_RELAX();
    } else if (spins < 1024) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  void reset() { spins = 0; }
};

struct Deadline {
  std::chrono::steady_clock::time_point end;
  explicit Deadline(int timeout_ms) : end(std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms)) {}
  bool passed() const { return std::chrono::steady_clock::now() > end; }
};

const char* step_name(int kind);
std::string t_fmt(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

class CpuBackend final : public Backend {
 public:
  CpuBackend(int rank, int num_ranks, const deepep4j_config& cfg)
      : rank_(rank), R_(num_ranks), C_(num_channels(cfg)), cfg_(cfg) {}

  int init();
  int export_blob(void* out, size_t capacity, size_t* len) override;
  int connect(const void* const* blobs, const size_t* lens) override;
  int get_dispatch_layout(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int32_t* per_rank,
                          int32_t* per_expert, uint8_t* in_rank, void*) override;
  int notify_dispatch(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int64_t hidden, int32_t dtype,
                      Handle** out_handle, int64_t* num_recv, int32_t* per_local_expert, void*) override;
  int dispatch(Handle* handle, int32_t dtype, const deepep4j_dispatch_args* a, void*) override;
  int combine(Handle* handle, int32_t dtype, const deepep4j_combine_args* a, void*) override;
  int fail_step(int32_t status, const char* message) override;
  int fail_connect(int32_t status, const char* message) override;

 private:
  // ------------------------------------------------------------------------------------------------ step exchange
  // Addresses a rank of the same process reads or writes during this step (dispatch: outputs; combine: inputs).
  void publish(StepData* d, std::initializer_list<const void*> ptrs) const;
  // Where rows exchanged with reader d start in this rank's receive order, per channel.
  void publish_offsets(const CpuHandle* h, int d, StepData* s) const;
  // The end of dispatch and combine: every rank reports its transfer's status `st` and all return the same verdict
  // (ranks of one process also touch each other's arrays, so none may return before all are done).
  int finish_step(int st, int kind);
  // Agrees with the peers on how step step_ ended: `proposal` is this rank's view (0 = everyone arrived). Returns the
  // decision word (see step_exchange.cpp).
  uint64_t decide(uint64_t proposal);
  // DEEPEP4J_ERR_STATE naming the failure that broke the buffer.
  int broken_error(const char* call) const;
  Check check_ring(int64_t slot_bytes, const char* what) const;
  int64_t ring_slots(int64_t slot_bytes) const;
  static void fill_header(StepData* d, const Check& c, int kind, int64_t n, int64_t hidden, int32_t k, int32_t e,
                          int32_t dtype, int32_t flags, int64_t handle_seq);
  // Writes this rank's StepData (customised per reader by `per_peer`, which may be empty) into every region, then
  // waits for every peer's. `all[s]` points at rank s's data in this rank's own region.
  int exchange(const StepData& mine, std::vector<const StepData*>* all,
               const std::function<void(int, StepData*)>& per_peer = {});
  // The same verdict on every rank: the lowest failing rank's error, else a disagreement on the step's shapes.
  int verdict(const std::vector<const StepData*>& all, int kind) const;

  // ------------------------------------------------------------------------------------------------ data movement
  // One direction of one step, described by callbacks so dispatch and combine share the ring protocol.
  struct Transfer {
    int64_t slot_bytes = 0;
    int64_t slots = 0;
    // rows this rank sends rank d on channel c, and writes row i of them into `slot`
    std::function<int64_t(int d, int c)> send_count;
    std::function<void(int d, int c, int64_t i, uint8_t* slot)> pack;
    // rows this rank receives from rank s on channel c, and consumes row i of them from `slot`
    std::function<int64_t(int s, int c)> recv_count;
    std::function<void(int s, int c, int64_t i, const uint8_t* slot)> unpack;
    // rows exchanged with a direct peer (this rank, or one of its process) skip the rings: row i of channel c is
    // pushed to peer p by the sender (unordered transfers) or pulled from p by the receiver at p's turn (ordered)
    std::function<void(int p, int c, int64_t i)> direct_copy;
    bool ordered_sources = false;                // combine: consume sources in rank order (deterministic sums)
    std::function<int64_t(int p, int c, int64_t i)> token_of;  // combine: the token row i of (p, c) belongs to
    std::function<void(int64_t tok)> token_done;  // combine, one-pass walk: every row of token `tok` was added
    std::function<void(int c)> channel_begin;    // before a channel moves data
    std::function<void(int c)> channel_end;      // after a channel received everything
    int kind = 0;
  };

  // Where dispatch writes a received row: this rank's own outputs, or (direct copies) those of a rank of its process.
  struct DispatchOut {
    uint8_t* recv_x;
    int64_t* recv_topk_idx;
    float* recv_topk_weights;
    int64_t* recv_src_token;
    int32_t* recv_src_rank;
    float* recv_x_scales;
    int64_t* local_idx;
    const int64_t* row_offsets;  // first row of this rank's rows per channel, in the owner's receive order
  };

  // What combine reads from a rank: its rows y, the weights of a weighted combine, the returned top-k values, its
  // local expert ids, and where this rank's rows start in its receive order (per channel).
  struct CombineIn {
    const uint8_t* y;
    const float* recv_topk_weights;
    const float* y_topk_weights;
    const int64_t* local_idx;
    const int64_t* row_offsets;
  };

  Transfer dispatch_transfer(CpuHandle* h, int32_t dtype, const deepep4j_dispatch_args* a, int64_t slot,
                             const std::vector<const StepData*>& all);
  Transfer combine_transfer(CpuHandle* h, int32_t dtype, const deepep4j_combine_args* a, int64_t slot,
                            const std::vector<const StepData*>& all);

  // Runs one transfer on the rank's threads: thread w drives channels w, w + T, ... all at once.
  int run_transfer(Transfer& tr);

  struct SendState {
    int peer, channel;
    int64_t done, count;
    RingHeader* hdr;
    uint8_t* data;
    uint64_t base, tail;
  };
  struct RecvState {
    int peer, channel;
    int64_t done, count;
    RingHeader* hdr;
    const uint8_t* data;
    uint64_t base, head;
  };
  int drive_channels(Transfer& tr, int w, int threads, std::atomic<int>& status, std::string* err,
                     std::mutex& err_mu);

  int rank_, R_, C_;
  deepep4j_config cfg_;
  size_t ring_bytes_ = 0;
  uint64_t step_ = 0;
  // After a timeout (or a connect that failed) the group's steps can no longer be trusted: every later collective
  // call refuses with DEEPEP4J_ERR_STATE. Every rank of the step that failed reaches this state.
  bool broken_ = false;
  std::string broken_reason_;
  ShmRegion own_;
  std::vector<std::unique_ptr<ShmRegion>> peers_;
  std::vector<RegionView> views_;
  std::unique_ptr<WorkerPool> pool_;
  bool direct_wanted_ = true;       // this rank allows direct copies (config.cpu_direct)
  bool direct_ = false;             // every rank allows them
  std::vector<bool> peer_direct_;   // [R] rows to/from this rank skip the rings (self; same process when direct_)
  std::vector<float> scratch_;   // combine: fp32 accumulators for bf16/fp16 outputs
  std::vector<uint8_t> touched_;  // combine: token has received its first row
};

}  // namespace cpu
}  // namespace deepep4j
