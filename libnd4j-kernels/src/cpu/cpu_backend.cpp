// cpu_backend.cpp — the reference backend: ranks are threads or processes sharing POSIX shared memory.
//
// Every collective step starts with an exchange through the control areas (each rank writes its verdict, shapes and
// counts into every peer's region and waits for all peers'), so a bad argument on one rank becomes the same error on
// every rank before any data moves. Data then flows through per-(source, channel) rings in the receiver's region:
// senders copy rows in and publish the tail (release); the receiver copies rows out and publishes the head. This is
// the shared-memory analog of DeepEP's NVLink ring buffers.
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "../common/backend.h"
#include "../common/dtype.h"
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
namespace {

constexpr uint32_t kBlobVersion = 1;

// What a rank exports so peers can map its region.
struct Blob {
  uint64_t magic;
  uint32_t version;
  int32_t pid;
  int32_t rank;
  int32_t num_ranks;
  deepep4j_config config;
  uint64_t region_bytes;
  int32_t direct_copies;  // 1: rows between ranks of one process skip the rings (DEEPEP4J_CPU_DIRECT != 0)
  char name[64];
};
static_assert(sizeof(Blob) <= DEEPEP4J_MAX_BLOB_BYTES, "blob too large");

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

const char* step_name(int kind) {
  switch (kind) {
    case kStepNotify: return "notify_dispatch";
    case kStepDispatch: return "dispatch";
    case kStepCombine: return "combine";
    default: return "unknown step";
  }
}

// acc = scale * row (first contribution: saves zero-filling and re-reading acc) or acc += scale * row. One straight
// loop per (dtype, first) so the compiler vectorises it; the bf16 loops also get an AVX2 clone (chosen at load time),
// which has no FMA, so the sums round exactly as the reference does.
template <class Acc, class T, class ToFloat>
inline void add_row_of(Acc* acc, const T* r, int64_t h, Acc scale, bool first, ToFloat to_float) {
  if (first)
    for (int64_t i = 0; i < h; ++i) acc[i] = scale * to_float(r[i]);
  else
    for (int64_t i = 0; i < h; ++i) acc[i] += scale * to_float(r[i]);
}

__attribute__((target_clones("avx2", "default"))) void add_bf16_row(float* acc, const uint16_t* r, int64_t h,
                                                                    float scale, bool first) {
  add_row_of(acc, r, h, scale, first, [](uint16_t v) { return bf16_to_float(v); });
}

__attribute__((target_clones("avx2", "default"))) void store_bf16_row(uint16_t* o, const float* acc, int64_t h) {
  for (int64_t i = 0; i < h; ++i) o[i] = float_to_bf16(acc[i]);
}

void add_row(float* acc, const uint8_t* row, int32_t dtype, int64_t h, float scale, bool first) {
  if (dtype == DEEPEP4J_FLOAT32)
    add_row_of(acc, reinterpret_cast<const float*>(row), h, scale, first, [](float v) { return v; });
  else if (dtype == DEEPEP4J_BFLOAT16)
    add_bf16_row(acc, reinterpret_cast<const uint16_t*>(row), h, scale, first);
  else
    add_row_of(acc, reinterpret_cast<const uint16_t*>(row), h, scale, first,
               [](uint16_t v) { return fp16_to_float(v); });
}

// fp64 rows (the MoE block's gradient checks) are reduced in fp64, straight into out.
void add_f64_row(double* acc, const uint8_t* row, int64_t h, float scale, bool first) {
  add_row_of(acc, reinterpret_cast<const double*>(row), h, double(scale), first, [](double v) { return v; });
}

void store_row(uint8_t* out, const float* acc, int32_t dtype, int64_t h) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  if (dtype == DEEPEP4J_BFLOAT16) {
    store_bf16_row(o, acc, h);
  } else {
    for (int64_t i = 0; i < h; ++i) o[i] = float_to_fp16(acc[i]);
  }
}

class CpuBackend final : public Backend {
 public:
  CpuBackend(int rank, int num_ranks, const deepep4j_config& cfg)
      : rank_(rank), R_(num_ranks), C_(num_channels(cfg)), cfg_(cfg) {}

  int init() {
    ring_bytes_ = ring_bytes_of(cfg_.buffer_bytes, R_, C_);
    if (cfg_.max_hidden_bytes > 0) {
      const int64_t mhb = cfg_.max_hidden_bytes;  // 64-bit: INT32_MAX + 15 must not overflow
      // A row of up to max_hidden_bytes with K = DEEPEP4J_MAX_TOPK; fp8 scales (dtype unknown here) are checked when
      // a step names its dtype, so every minimum this message gives is accepted.
      int64_t slot = 16 * ((8 + 12 * DEEPEP4J_MAX_TOPK + 15) / 16) + 16 * ((mhb + 15) / 16);
      // Rings are rounded down to 64 bytes, so the minimum rounds each ring's chunk up to 64.
      int64_t need = ((slot * cfg_.max_send_tokens_per_chunk + 63) & ~int64_t(63)) * int64_t(R_) * C_;
      if ((int64_t)ring_bytes_ < slot * cfg_.max_send_tokens_per_chunk)
        return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT,
                         "buffer_bytes = %" PRId64 ": too small for one chunk (max_send_tokens_per_chunk = %d rows of "
                         "up to %" PRId64 " bytes) in each of %d rings (%d ranks x %d channels); minimum is %" PRId64
                         " bytes",
                         cfg_.buffer_bytes, cfg_.max_send_tokens_per_chunk, slot, R_ * C_, R_, C_, need);
    }
    size_t bytes = region_bytes(cfg_.buffer_bytes, R_, C_);
    int e = own_.create(bytes, rank_);
    if (e != 0)
      return set_error(e == ENOMEM || e == ENOSPC ? DEEPEP4J_ERR_OUT_OF_MEMORY : DEEPEP4J_ERR_INTERNAL,
                       "rank %d: could not allocate %zu bytes of shared memory (%s); use a smaller buffer_bytes "
                       "(deepep4j_buffer_size_hint gives the size a step needs)",
                       rank_, bytes, strerror(e));
    Control* ctl = static_cast<Control*>(own_.data());
    ctl->magic = kRegionMagic;
    ctl->owner_rank = rank_;
    ctl->num_ranks = R_;
    int threads = cfg_.num_threads;
    if (threads == 0) {
      unsigned hw = std::max(1u, std::thread::hardware_concurrency());
      threads = std::max(1, int(hw) / R_);
    }
    pool_ = std::make_unique<WorkerPool>(std::min(threads, C_));
    const char* direct = getenv("DEEPEP4J_CPU_DIRECT");
    direct_wanted_ = !(direct && std::strcmp(direct, "0") == 0);
    return ok();
  }

  int export_blob(void* out, size_t capacity, size_t* len) override {
    if (capacity < sizeof(Blob))
      return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "capacity = %zu: the blob needs %zu bytes", capacity,
                       sizeof(Blob));
    Blob b{};
    b.magic = kRegionMagic;
    b.version = kBlobVersion;
    b.pid = (int32_t)getpid();
    b.rank = rank_;
    b.num_ranks = R_;
    b.config = cfg_;
    b.region_bytes = own_.size();
    b.direct_copies = direct_wanted_ ? 1 : 0;
    snprintf(b.name, sizeof(b.name), "%s", own_.name().c_str());
    std::memcpy(out, &b, sizeof(b));
    *len = sizeof(b);
    return ok();
  }

  int connect(const void* const* blobs, const size_t* lens) override {
    std::vector<Blob> all(R_);
    for (int r = 0; r < R_; ++r) {
      if (lens[r] != sizeof(Blob))
        return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "blobs[%d]: length %zu is not a CPU-backend blob (%zu bytes)", r,
                         lens[r], sizeof(Blob));
      std::memcpy(&all[r], blobs[r], sizeof(Blob));
      if (all[r].magic != kRegionMagic || all[r].version != kBlobVersion)
        return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "blobs[%d]: not a deepep4j CPU blob of version %u", r,
                         kBlobVersion);
      if (all[r].rank != r || all[r].num_ranks != R_)
        return set_error(DEEPEP4J_ERR_PEER_MISMATCH,
                         "blobs[%d]: comes from rank %d of %d ranks; expected rank %d of %d (blobs must be in rank "
                         "order)",
                         r, all[r].rank, all[r].num_ranks, r, R_);
    }
    // Every rank sees every blob, so every rank reaches the same verdict without another exchange.
    for (int r = 1; r < R_; ++r) {
      const deepep4j_config &a = all[0].config, &b = all[r].config;
#define DEEPEP4J_SAME(field, fmt)                                                                                     \
  if (a.field != b.field)                                                                                            \
    return set_error(DEEPEP4J_ERR_PEER_MISMATCH, "ranks disagree on the config: " #field " = " fmt " on rank 0 but " \
                     fmt " on rank %d", a.field, b.field, r);
      DEEPEP4J_SAME(buffer_bytes, "%" PRId64)
      DEEPEP4J_SAME(num_sms, "%d")
      DEEPEP4J_SAME(max_send_tokens_per_chunk, "%d")
      DEEPEP4J_SAME(ring_tokens, "%d")
      DEEPEP4J_SAME(timeout_ms, "%d")
      DEEPEP4J_SAME(device, "%d")
      DEEPEP4J_SAME(backend, "%d")
      DEEPEP4J_SAME(max_hidden_bytes, "%d")
#undef DEEPEP4J_SAME
    }
    // Ranks of one process copy rows straight between their arrays (one copy instead of two through a ring),
    // when every rank wants it; rows between processes always go through the rings.
    direct_ = true;
    for (int r = 0; r < R_; ++r) direct_ = direct_ && all[r].direct_copies == 1;
    peer_direct_.assign(R_, false);
    for (int r = 0; r < R_; ++r) peer_direct_[r] = r == rank_ || (direct_ && all[r].pid == (int32_t)getpid());
    views_.assign(R_, RegionView{});
    peers_.clear();
    peers_.resize(R_);
    for (int r = 0; r < R_; ++r) {
      uint8_t* base;
      if (r == rank_) {
        base = static_cast<uint8_t*>(own_.data());
      } else {
        peers_[r] = std::make_unique<ShmRegion>();
        int e = peers_[r]->open(all[r].name, all[r].region_bytes);
        if (e != 0)
          return set_error(DEEPEP4J_ERR_PEER_ERROR,
                           "rank %d: cannot map the shared memory %s of rank %d (%s); has rank %d exited?", rank_,
                           all[r].name, r, strerror(e), r);
        base = static_cast<uint8_t*>(peers_[r]->data());
      }
      views_[r] = RegionView{base, R_, C_, ring_bytes_};
    }
    for (int r = 0; r < R_; ++r) views_[r].control()->connected[rank_].store(1, std::memory_order_release);
    Deadline deadline(cfg_.timeout_ms);
    Control* mine = views_[rank_].control();
    for (int r = 0; r < R_; ++r) {
      Backoff backoff;
      while (mine->connected[r].load(std::memory_order_acquire) == 0) {
        if (deadline.passed())
          return set_error(DEEPEP4J_ERR_TIMEOUT,
                           "rank %d: timed out after %d ms in connect waiting for rank %d (the peer did not arrive or "
                           "died)",
                           rank_, cfg_.timeout_ms, r);
        backoff.pause();
      }
    }
    own_.unlink();  // every peer has mapped this region: no name is left behind if a process dies
    return ok();
  }

  int get_dispatch_layout(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int32_t* per_rank,
                          int32_t* per_expert, uint8_t* in_rank, void*) override {
    Check c = check_routing(topk_idx, n, k, e, R_, true);
    if (!c.ok()) return set_error(c.status, "%s", c.message.c_str());
    std::vector<int32_t> pr(R_, 0), pe(e, 0);
    std::vector<uint8_t> mask(size_t(n) * R_, 0);
    const int32_t experts_per_rank = e / R_;
    for (int64_t t = 0; t < n; ++t) {
      uint8_t* m = &mask[size_t(t) * R_];
      for (int j = 0; j < k; ++j) {
        int64_t x = topk_idx[t * k + j];
        if (x < 0) continue;
        pe[x]++;
        m[x / experts_per_rank] = 1;
      }
      for (int r = 0; r < R_; ++r) pr[r] += m[r];
    }
    if (per_rank) std::copy(pr.begin(), pr.end(), per_rank);
    if (per_expert) std::copy(pe.begin(), pe.end(), per_expert);
    if (in_rank) std::copy(mask.begin(), mask.end(), in_rank);
    return ok();
  }

  int notify_dispatch(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int64_t hidden, int32_t dtype,
                      Handle** out_handle, int64_t* num_recv, int32_t* per_local_expert, void*) override {
    Check c = check_routing(topk_idx, n, k, e, R_, true);
    if (c.ok()) c = check_payload(hidden, dtype, true, "notify_dispatch");
    if (c.ok()) c = check_ring(dispatch_slot_bytes(hidden, dtype, k), "dispatch");
    if (!c.ok()) n = 0;  // nothing below reads topk_idx after a failed check

    auto h = std::make_unique<CpuHandle>();
    h->num_tokens = n;
    h->num_topk = k;
    h->num_experts = e;
    h->hidden = hidden;
    h->dtype = dtype;
    h->num_ranks = R_;
    h->channels = C_;
    h->send_tokens.assign(R_, {});
    h->send_begin.assign(R_, std::vector<int64_t>(C_ + 1, 0));
    // rows_to[d][c] and experts_to[d][j]: what this rank sends rank d.
    std::vector<std::vector<int32_t>> rows_to(R_, std::vector<int32_t>(C_, 0));
    const int32_t epr = c.ok() ? e / R_ : 1;
    std::vector<std::vector<int32_t>> experts_to(R_, std::vector<int32_t>(c.ok() ? epr : 0, 0));
    std::vector<uint8_t> hit(R_);
    for (int ch = 0; ch < C_; ++ch) {
      int64_t lo = n * ch / C_, hi = n * (ch + 1) / C_;
      for (int64_t t = lo; t < hi; ++t) {
        std::fill(hit.begin(), hit.end(), 0);
        for (int j = 0; j < k; ++j) {
          int64_t x = topk_idx[t * k + j];
          if (x < 0) continue;
          int d = int(x / epr);
          experts_to[d][x % epr]++;
          hit[d] = 1;
        }
        for (int d = 0; d < R_; ++d)
          if (hit[d]) {
            h->send_tokens[d].push_back(int32_t(t));
            rows_to[d][ch]++;
          }
      }
      for (int d = 0; d < R_; ++d) h->send_begin[d][ch + 1] = (int64_t)h->send_tokens[d].size();
    }

    StepData mine{};
    fill_header(&mine, c, kStepNotify, n, hidden, k, e, dtype, 0, 0);
    std::vector<const StepData*> all;
    int st = exchange(mine, &all, [&](int d, StepData* s) {
      std::copy(rows_to[d].begin(), rows_to[d].end(), s->rows_per_channel);
      if (c.ok()) std::copy(experts_to[d].begin(), experts_to[d].end(), s->rows_per_expert);
    });
    if (st != DEEPEP4J_OK) return st;
    if ((st = verdict(all, kStepNotify)) != DEEPEP4J_OK) return st;

    h->seq = int64_t(step_);
    h->topk_idx.assign(topk_idx, topk_idx + n * k);
    h->recv_begin.assign(R_, std::vector<int64_t>(C_ + 1, 0));
    int64_t m = 0;
    std::vector<int32_t> per_expert(epr, 0);
    for (int s = 0; s < R_; ++s) {
      int64_t from_s = 0;
      for (int ch = 0; ch < C_; ++ch) {
        h->recv_begin[s][ch] = m;
        m += all[s]->rows_per_channel[ch];
        from_s += all[s]->rows_per_channel[ch];
      }
      h->recv_begin[s][C_] = m;
      h->recv_counts_per_rank[s] = int32_t(from_s);
      for (int j = 0; j < epr; ++j) per_expert[j] += all[s]->rows_per_expert[j];
    }
    h->num_recv_tokens = m;
    *num_recv = m;
    if (per_local_expert) std::copy(per_expert.begin(), per_expert.end(), per_local_expert);
    *out_handle = h.release();
    return ok();
  }

  int dispatch(Handle* handle, int32_t dtype, const deepep4j_dispatch_args* a, void*) override {
    auto* h = static_cast<CpuHandle*>(handle);
    Check c = check_dispatch_args(*h, dtype, a);
    const int64_t slot = dispatch_slot_bytes(h->hidden, dtype, h->num_topk);
    if (c.ok()) c = check_ring(slot, "dispatch");
    // A rank with no tokens has no weights to give (an empty array may well be NULL): its choice does not count.
    int flags = (c.ok() && h->num_tokens > 0) ? (kFlagKnown1 | (a->topk_weights != nullptr ? 1 : 0)) : 0;
    if (!h->has_recv_local_idx) h->recv_local_idx.assign(size_t(h->num_recv_tokens) * h->num_topk, -1);
    StepData mine{};
    fill_header(&mine, c, kStepDispatch, h->num_tokens, h->hidden, h->num_topk, h->num_experts, dtype, flags, h->seq);
    if (c.ok())
      publish(&mine, {a->recv_x, a->recv_topk_idx, a->recv_topk_weights, a->recv_src_token, a->recv_src_rank,
                      a->recv_x_scales, h->recv_local_idx.data()});
    std::vector<const StepData*> all;
    int st = exchange(mine, &all, [&](int d, StepData* s) { publish_offsets(h, d, s); });
    if (st != DEEPEP4J_OK) return st;
    if ((st = verdict(all, kStepDispatch)) != DEEPEP4J_OK) return st;

    Transfer tr = dispatch_transfer(h, dtype, a, slot, all);
    st = finish_step(run_transfer(tr), kStepDispatch);
    if (st == DEEPEP4J_OK) h->has_recv_local_idx = true;
    return st;
  }

  int combine(Handle* handle, int32_t dtype, const deepep4j_combine_args* a, void*) override {
    auto* h = static_cast<CpuHandle*>(handle);
    Check c = check_combine_args(*h, dtype, a);
    if (c.ok() && a->recv_topk_weights != nullptr && !h->has_recv_local_idx)
      c = Check::fail(DEEPEP4J_ERR_STATE,
                      "recv_topk_weights given but this handle has not dispatched yet: a weighted combine needs the "
                      "local expert ids of a dispatch");
    const int64_t slot = combine_slot_bytes(h->hidden, dtype, h->num_topk);
    if (c.ok()) c = check_ring(slot, "combine");
    // Bits count only where the rank has rows for them: recv/y weights need M > 0; out_topk_weights needs N > 0.
    int flags = 0;
    if (c.ok() && h->num_recv_tokens > 0)
      flags = kFlagKnown1 | kFlagKnown2 | (a->recv_topk_weights ? 1 : 0) | (a->y_topk_weights ? 2 : 0);
    else if (c.ok() && h->num_tokens > 0)
      flags = kFlagKnown2 | (a->out_topk_weights ? 2 : 0);
    StepData mine{};
    fill_header(&mine, c, kStepCombine, h->num_tokens, h->hidden, h->num_topk, h->num_experts, dtype, flags, h->seq);
    if (c.ok())
      publish(&mine, {a->y, a->recv_topk_weights, a->y_topk_weights,
                      h->has_recv_local_idx ? h->recv_local_idx.data() : nullptr});
    std::vector<const StepData*> all;
    int st = exchange(mine, &all, [&](int d, StepData* s) { publish_offsets(h, d, s); });
    if (st != DEEPEP4J_OK) return st;
    if ((st = verdict(all, kStepCombine)) != DEEPEP4J_OK) return st;
    // Accumulators live in the backend and only grow, so a fresh handle per step costs no page faults.
    if (dtype != DEEPEP4J_FLOAT32 && dtype != DEEPEP4J_FLOAT64 && scratch_.size() < size_t(h->num_tokens) * h->hidden)
      scratch_.resize(size_t(h->num_tokens) * h->hidden);
    if (touched_.size() < size_t(h->num_tokens)) touched_.resize(size_t(h->num_tokens));
    Transfer tr = combine_transfer(h, dtype, a, slot, all);
    return finish_step(run_transfer(tr), kStepCombine);
  }

  int fail_step(int32_t status, const char* message) override {
    StepData mine{};
    Check c;
    c.status = status;
    c.message = message;
    fill_header(&mine, c, kStepNotify, 0, 0, 0, 0, 0, 0, 0);
    std::vector<const StepData*> all;
    int st = exchange(mine, &all, nullptr);
    if (st != DEEPEP4J_OK) return st;
    return verdict(all, kStepNotify);  // this rank's own failure unless a lower rank failed too
  }

 private:
  // ------------------------------------------------------------------------------------------------ direct copies
  // Addresses a rank of the same process reads or writes during this step (dispatch: outputs; combine: inputs).
  void publish(StepData* d, std::initializer_list<const void*> ptrs) const {
    d->pid = getpid();
    int i = 0;
    for (const void* p : ptrs) d->ptrs[i++] = reinterpret_cast<uint64_t>(p);
  }
  // Where rows exchanged with reader d start in this rank's receive order, per channel.
  void publish_offsets(const CpuHandle* h, int d, StepData* s) const {
    if (d < (int)h->recv_begin.size())
      for (int c = 0; c < C_; ++c) s->row_offsets[c] = h->recv_begin[d][c];
  }
  // Ranks of one process touch each other's arrays during a step, so none returns before all are done.
  int finish_step(int st, int kind) {
    if (!direct_ || st != DEEPEP4J_OK) return st;
    StepData mine{};
    fill_header(&mine, Check{}, kind, 0, 0, 0, 0, 0, 0, 0);
    std::vector<const StepData*> all;
    int e = exchange(mine, &all, nullptr);
    if (e != DEEPEP4J_OK) return e;
    return verdict(all, kind);
  }

  // ------------------------------------------------------------------------------------------------ step exchange
  Check check_ring(int64_t slot_bytes, const char* what) const {
    int64_t slots = ring_slots(slot_bytes);
    if (slots < cfg_.max_send_tokens_per_chunk)
      return Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT,
                         "buffer_bytes = %" PRId64 ": each of the %d rings holds %zu bytes, less than one %s chunk of "
                         "%d rows x %" PRId64 " bytes; minimum is %" PRId64 " bytes (deepep4j_buffer_size_hint)",
                         cfg_.buffer_bytes, R_ * C_, ring_bytes_, what, cfg_.max_send_tokens_per_chunk, slot_bytes,
                         slot_bytes * cfg_.max_send_tokens_per_chunk * R_ * C_);
    return Check{};
  }

  int64_t ring_slots(int64_t slot_bytes) const {
    return std::min<int64_t>(cfg_.ring_tokens, int64_t(ring_bytes_) / slot_bytes);
  }

  static void fill_header(StepData* d, const Check& c, int kind, int64_t n, int64_t hidden, int32_t k, int32_t e,
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

  // Writes this rank's StepData (customised per reader by `per_peer`) into every region, then waits for every
  // peer's. `all[s]` points at rank s's data in this rank's own region.
  template <class F>
  int exchange(const StepData& mine, std::vector<const StepData*>* all, F&& per_peer) {
    ++step_;
    const int parity = int(step_ & 1);
    for (int d = 0; d < R_; ++d) {
      StepSlot& slot = views_[d].control()->slots[parity][rank_];
      slot.data = mine;
      if constexpr (!std::is_same_v<std::decay_t<F>, std::nullptr_t>) per_peer(d, &slot.data);
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
  int exchange(const StepData& mine, std::vector<const StepData*>* all, std::nullptr_t) {
    return exchange<std::nullptr_t>(mine, all, nullptr);
  }

  // The same verdict on every rank: the lowest failing rank's error, else a disagreement on the step's shapes.
  int verdict(const std::vector<const StepData*>& all, int kind) const {
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

  Transfer dispatch_transfer(CpuHandle* h, int32_t dtype, const deepep4j_dispatch_args* a, int64_t slot,
                             const std::vector<const StepData*>& all) {
    Transfer t;
    t.kind = kStepDispatch;
    t.slot_bytes = slot;
    t.slots = ring_slots(slot);
    const int64_t H = h->hidden;
    const int32_t K = h->num_topk;
    const int64_t row = H * int64_t(dtype_size(dtype));
    const int64_t meta = 16 * ((8 + 12 * int64_t(K) + 15) / 16);
    const int64_t row_pad = 16 * ((row + 15) / 16);
    const bool fp8 = dtype == DEEPEP4J_FP8_E4M3;
    const int64_t nscales = fp8 ? H / DEEPEP4J_FP8_BLOCK : 0;
    const int32_t epr = h->num_experts / R_;
    const uint8_t* x = static_cast<const uint8_t*>(a->x);

    // Every direct peer's outputs as it published them (this rank's from its own arguments).
    auto outs = std::make_shared<std::vector<DispatchOut>>(R_);
    for (int p = 0; p < R_; ++p) {
      if (!peer_direct_[p]) continue;
      const uint64_t* q = all[p]->ptrs;
      (*outs)[p] = DispatchOut{reinterpret_cast<uint8_t*>(q[0]), reinterpret_cast<int64_t*>(q[1]),
                               reinterpret_cast<float*>(q[2]), reinterpret_cast<int64_t*>(q[3]),
                               reinterpret_cast<int32_t*>(q[4]), reinterpret_cast<float*>(q[5]),
                               reinterpret_cast<int64_t*>(q[6]), all[p]->row_offsets};
    }
    // Writes row `m` of rank `o`'s receive side from a token's data (rings, self and direct copies alike).
    auto deliver = [=](const DispatchOut& o, int s, int64_t m, int64_t src_token, const int64_t* local_idx,
                       const float* weights, const uint8_t* xrow, const float* scales) {
      std::memcpy(o.recv_x + m * row, xrow, size_t(row));
      if (o.recv_topk_idx) std::memcpy(o.recv_topk_idx + m * K, local_idx, sizeof(int64_t) * K);
      std::memcpy(o.local_idx + m * K, local_idx, sizeof(int64_t) * K);
      if (o.recv_topk_weights) std::memcpy(o.recv_topk_weights + m * K, weights, sizeof(float) * K);
      if (o.recv_src_token) o.recv_src_token[m] = src_token;
      if (o.recv_src_rank) o.recv_src_rank[m] = s;
      if (fp8) std::memcpy(o.recv_x_scales + m * nscales, scales, sizeof(float) * nscales);
    };
    // Local expert ids and weights of token t as seen by rank d.
    auto route = [=](int d, int64_t t, int64_t* local_idx, float* weights) {
      for (int j = 0; j < K; ++j) {
        int64_t x_e = h->topk_idx[t * K + j];
        bool local = x_e >= 0 && x_e / epr == d;
        local_idx[j] = local ? x_e - int64_t(d) * epr : -1;
        weights[j] = (local && a->topk_weights) ? a->topk_weights[t * K + j] : 0.0f;
      }
    };
    const DispatchOut self{static_cast<uint8_t*>(a->recv_x), a->recv_topk_idx, a->recv_topk_weights, a->recv_src_token,
                           a->recv_src_rank, a->recv_x_scales, h->recv_local_idx.data(), nullptr};
    t.send_count = [=](int d, int c) { return h->send_begin[d][c + 1] - h->send_begin[d][c]; };
    t.pack = [=](int d, int c, int64_t i, uint8_t* s) {
      int64_t tok = h->send_tokens[d][h->send_begin[d][c] + i];
      *reinterpret_cast<int64_t*>(s) = tok;
      route(d, tok, reinterpret_cast<int64_t*>(s + 8), reinterpret_cast<float*>(s + 8 + 8 * K));
      std::memcpy(s + meta, x + tok * row, size_t(row));
      if (fp8) std::memcpy(s + meta + row_pad, a->x_scales + tok * nscales, sizeof(float) * nscales);
    };
    t.recv_count = [=](int s, int c) { return h->recv_begin[s][c + 1] - h->recv_begin[s][c]; };
    t.unpack = [=](int s, int c, int64_t i, const uint8_t* sl) {
      deliver(self, s, h->recv_begin[s][c] + i, *reinterpret_cast<const int64_t*>(sl),
              reinterpret_cast<const int64_t*>(sl + 8), reinterpret_cast<const float*>(sl + 8 + 8 * K), sl + meta,
              reinterpret_cast<const float*>(sl + meta + row_pad));
    };
    // Pushes row i of channel c straight into rank d's outputs (d = this rank included).
    t.direct_copy = [=](int d, int c, int64_t i) {
      int64_t tok = h->send_tokens[d][h->send_begin[d][c] + i];
      int64_t local_idx[DEEPEP4J_MAX_TOPK];
      float weights[DEEPEP4J_MAX_TOPK];
      route(d, tok, local_idx, weights);
      int64_t m = d == rank_ ? h->recv_begin[rank_][c] + i : (*outs)[d].row_offsets[c] + i;
      deliver(d == rank_ ? self : (*outs)[d], rank_, m, tok, local_idx, weights, x + tok * row,
              fp8 ? a->x_scales + tok * nscales : nullptr);
    };
    return t;
  }

  // What combine reads from a rank: its rows y, the weights of a weighted combine, the returned top-k values, its
  // local expert ids, and where this rank's rows start in its receive order (per channel).
  struct CombineIn {
    const uint8_t* y;
    const float* recv_topk_weights;
    const float* y_topk_weights;
    const int64_t* local_idx;
    const int64_t* row_offsets;
  };

  Transfer combine_transfer(CpuHandle* h, int32_t dtype, const deepep4j_combine_args* a, int64_t slot,
                            const std::vector<const StepData*>& all) {
    Transfer t;
    t.kind = kStepCombine;
    t.slot_bytes = slot;
    t.slots = ring_slots(slot);
    t.ordered_sources = true;
    const int64_t H = h->hidden;
    const int32_t K = h->num_topk;
    const int64_t row = H * int64_t(dtype_size(dtype));
    const int64_t row_pad = 16 * ((row + 15) / 16);
    const uint8_t* y = static_cast<const uint8_t*>(a->y);
    uint8_t* out = static_cast<uint8_t*>(a->out);
    const bool f32 = dtype == DEEPEP4J_FLOAT32;
    const bool f64 = dtype == DEEPEP4J_FLOAT64;
    float* acc_base = f32 ? reinterpret_cast<float*>(out) : scratch_.data();
    double* acc64 = reinterpret_cast<double*>(out);
    uint8_t* touched = touched_.data();

    auto ins = std::make_shared<std::vector<CombineIn>>(R_);
    for (int p = 0; p < R_; ++p) {
      if (p == rank_) {
        (*ins)[p] = CombineIn{y, a->recv_topk_weights, a->y_topk_weights, h->recv_local_idx.data(), nullptr};
      } else if (peer_direct_[p]) {
        const uint64_t* q = all[p]->ptrs;
        (*ins)[p] = CombineIn{reinterpret_cast<const uint8_t*>(q[0]), reinterpret_cast<const float*>(q[1]),
                              reinterpret_cast<const float*>(q[2]), reinterpret_cast<const int64_t*>(q[3]),
                              all[p]->row_offsets};
      }
    }
    // The combine scale of row m of rank `in`: 1, or the sum of its weights on that rank's local experts.
    auto scale_of = [=](const CombineIn& in, int64_t m) {
      if (!in.recv_topk_weights) return 1.0f;
      float s = 0.0f;
      for (int j = 0; j < K; ++j)
        if (in.local_idx[m * K + j] >= 0) s += in.recv_topk_weights[m * K + j];
      return s;
    };
    // Adds one returned row to its token's accumulator (sources arrive in rank order).
    auto accumulate = [=](int d, int c, int64_t i, const uint8_t* yrow, const float* ytopk, float scale) {
      int64_t tok = h->send_tokens[d][h->send_begin[d][c] + i];
      if (f64)
        add_f64_row(acc64 + tok * H, yrow, H, scale, !touched[tok]);
      else
        add_row(acc_base + tok * H, yrow, dtype, H, scale, !touched[tok]);
      touched[tok] = 1;
      if (a->out_topk_weights)
        for (int j = 0; j < K; ++j) a->out_topk_weights[tok * K + j] += ytopk[j];
    };
    // This rank returns rows it received from rank s (send side of combine = receive side of dispatch).
    t.send_count = [=](int s, int c) { return h->recv_begin[s][c + 1] - h->recv_begin[s][c]; };
    t.pack = [=](int s, int c, int64_t i, uint8_t* sl) {
      int64_t m = h->recv_begin[s][c] + i;
      std::memcpy(sl, y + m * row, size_t(row));
      float* tail = reinterpret_cast<float*>(sl + row_pad);
      if (a->y_topk_weights)
        std::memcpy(tail, a->y_topk_weights + m * K, sizeof(float) * K);
      else
        std::memset(tail, 0, sizeof(float) * K);
      tail[K] = scale_of((*ins)[rank_], m);
    };
    t.recv_count = [=](int d, int c) { return h->send_begin[d][c + 1] - h->send_begin[d][c]; };
    t.unpack = [=](int d, int c, int64_t i, const uint8_t* sl) {
      const float* tail = reinterpret_cast<const float*>(sl + row_pad);
      accumulate(d, c, i, sl, tail, tail[K]);
    };
    t.token_of = [=](int d, int c, int64_t i) { return int64_t(h->send_tokens[d][h->send_begin[d][c] + i]); };
    // Pulls row i of channel c straight from rank d's y (d = this rank included), at d's turn.
    t.direct_copy = [=](int d, int c, int64_t i) {
      const CombineIn& in = (*ins)[d];
      int64_t m = (d == rank_ ? h->recv_begin[rank_][c] : in.row_offsets[c]) + i;
      float zeros[DEEPEP4J_MAX_TOPK] = {};
      accumulate(d, c, i, in.y + m * row, in.y_topk_weights ? in.y_topk_weights + m * K : zeros, scale_of(in, m));
    };
    t.channel_begin = [=](int c) {
      int64_t lo = h->num_tokens * c / h->channels, hi = h->num_tokens * (c + 1) / h->channels;
      std::fill(touched + lo, touched + hi, 0);
      if (a->out_topk_weights) std::fill(a->out_topk_weights + lo * K, a->out_topk_weights + hi * K, 0.0f);
    };
    // bf16/fp16: a token whose rows are all added is stored at once, while its fp32 accumulator is still in cache.
    constexpr uint8_t kStored = 2;
    t.token_done = [=](int64_t tok) {
      if (f32 || f64) return;
      store_row(out + tok * row, acc_base + tok * H, dtype, H);
      touched[tok] = kStored;
    };
    t.channel_end = [=](int c) {
      int64_t lo = h->num_tokens * c / h->channels, hi = h->num_tokens * (c + 1) / h->channels;
      for (int64_t tok = lo; tok < hi; ++tok) {
        if (touched[tok] == kStored) continue;
        if (!touched[tok] && f64) std::fill(acc64 + tok * H, acc64 + (tok + 1) * H, 0.0);  // visited no rank
        if (f64) continue;
        if (!touched[tok]) std::fill(acc_base + tok * H, acc_base + (tok + 1) * H, 0.0f);  // visited no rank
        if (!f32) store_row(out + tok * row, acc_base + tok * H, dtype, H);
      }
    };
    return t;
  }

  // Runs one transfer on the rank's threads: thread w drives channels w, w + T, ... all at once.
  int run_transfer(Transfer& tr) {
    std::atomic<int> status{DEEPEP4J_OK};
    std::mutex err_mu;
    std::string err;
    pool_->run([&](int w) {
      int st = drive_channels(tr, w, pool_->size(), status, &err, err_mu);
      if (st != DEEPEP4J_OK) {
        int expected = DEEPEP4J_OK;
        status.compare_exchange_strong(expected, st);
      }
    });
    if (status.load() != DEEPEP4J_OK) return set_error(status.load(), "%s", err.c_str());
    return ok();
  }

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
                     std::mutex& err_mu) {
    std::vector<SendState> sends;
    std::vector<std::vector<RecvState>> recvs;  // per channel, in source order
    std::vector<int> channels;
    for (int c = w; c < C_; c += threads) channels.push_back(c);
    for (int c : channels) {
      if (tr.channel_begin) tr.channel_begin(c);
      std::vector<RecvState> rc;
      for (int p = 0; p < R_; ++p) {
        int64_t ns = tr.send_count(p, c);
        if (peer_direct_[p] && !tr.ordered_sources) {  // pushed straight into p's arrays, before any ring work
          for (int64_t i = 0; i < ns; ++i) tr.direct_copy(p, c, i);
        } else if (!peer_direct_[p] && ns > 0) {
          RingHeader* hdr = views_[p].ring_header(rank_, c);
          uint64_t tail = hdr->tail.load(std::memory_order_relaxed);  // only this rank writes it
          sends.push_back(SendState{p, c, 0, ns, hdr, views_[p].ring_data(rank_, c), tail, tail});
        }
        int64_t nr = tr.recv_count(p, c);
        if (nr > 0 && !(peer_direct_[p] && !tr.ordered_sources)) {  // pushed rows need no receive step
          RingHeader* hdr = views_[rank_].ring_header(p, c);
          uint64_t head = hdr->head.load(std::memory_order_relaxed);
          rc.push_back(RecvState{p, c, 0, nr, hdr, views_[rank_].ring_data(p, c), head, head});
        }
      }
      recvs.push_back(std::move(rc));
    }
    // Ordered transfer whose sources are all direct: walk the channel token by token, adding each token's rows in
    // source order while its accumulator is still in cache (same sums, same order, one pass over the output).
    if (tr.ordered_sources)
      for (auto& rc : recvs) {
        bool all_direct = !rc.empty();
        for (auto& r : rc) all_direct = all_direct && peer_direct_[r.peer];
        if (!all_direct) continue;
        for (;;) {
          int64_t tok = INT64_MAX;
          for (auto& r : rc)
            if (r.done < r.count) tok = std::min(tok, tr.token_of(r.peer, r.channel, r.done));
          if (tok == INT64_MAX) break;
          for (auto& r : rc)
            if (r.done < r.count && tr.token_of(r.peer, r.channel, r.done) == tok) tr.direct_copy(r.peer, r.channel, r.done++);
          if (tr.token_done) tr.token_done(tok);
        }
      }

    std::vector<size_t> cursor(channels.size(), 0);  // ordered: the source each channel consumes now
    Deadline deadline(cfg_.timeout_ms);
    Backoff backoff;
    const uint64_t slots = uint64_t(tr.slots);
    const int64_t chunk = cfg_.max_send_tokens_per_chunk;
    for (;;) {
      bool progress = false, pending = false;
      for (auto& s : sends) {
        if (s.done == s.count) continue;
        pending = true;
        uint64_t head = s.hdr->head.load(std::memory_order_acquire);
        if (head < s.base) continue;  // the previous step's rows are still being read (other slot geometry)
        int64_t space = int64_t(slots - (s.tail - head));
        int64_t nrows = std::min({space, chunk, s.count - s.done});
        if (nrows <= 0) continue;
        for (int64_t i = 0; i < nrows; ++i)
          tr.pack(s.peer, s.channel, s.done + i, s.data + ((s.tail - s.base + i) % slots) * tr.slot_bytes);
        s.tail += nrows;
        s.done += nrows;
        s.hdr->tail.store(s.tail, std::memory_order_release);
        progress = true;
      }
      for (size_t ci = 0; ci < channels.size(); ++ci) {
        auto& rc = recvs[ci];
        for (size_t k = (tr.ordered_sources ? cursor[ci] : 0); k < rc.size(); ++k) {
          RecvState& r = rc[k];
          if (r.done == r.count) {
            if (tr.ordered_sources && k == cursor[ci]) ++cursor[ci];
            continue;
          }
          pending = true;
          if (peer_direct_[r.peer]) {  // ordered transfer: pulled from a direct peer, at its turn
            for (int64_t i = 0; i < r.count; ++i) tr.direct_copy(r.peer, r.channel, i);
            r.done = r.count;
            progress = true;
          } else {
            uint64_t tail = r.hdr->tail.load(std::memory_order_acquire);
            int64_t avail = int64_t(tail - r.head);
            for (int64_t i = 0; i < avail; ++i)
              tr.unpack(r.peer, r.channel, r.done + i, r.data + ((r.head - r.base + i) % slots) * tr.slot_bytes);
            if (avail > 0) {
              r.head += avail;
              r.done += avail;
              r.hdr->head.store(r.head, std::memory_order_release);
              progress = true;
            }
          }
          if (tr.ordered_sources) {
            if (r.done == r.count) {
              ++cursor[ci];
              continue;
            }
            break;  // later sources wait their turn
          }
        }
      }
      if (!pending) break;
      if (progress) {
        backoff.reset();
        continue;
      }
      if (status.load(std::memory_order_relaxed) != DEEPEP4J_OK) return status.load();
      if (deadline.passed()) {
        int peer = -1;
        for (auto& s : sends)
          if (s.done < s.count) peer = s.peer;
        for (auto& rc : recvs)
          for (auto& r : rc)
            if (r.done < r.count && peer < 0) peer = r.peer;
        std::lock_guard<std::mutex> g(err_mu);
        char buf[256];
        snprintf(buf, sizeof(buf),
                 "rank %d: timed out after %d ms in %s waiting for rank %d (the peer did not arrive or died)", rank_,
                 cfg_.timeout_ms, step_name(tr.kind), peer);
        *err = buf;
        return DEEPEP4J_ERR_TIMEOUT;
      }
      backoff.pause();
    }
    for (int c : channels)
      if (tr.channel_end) tr.channel_end(c);
    return DEEPEP4J_OK;
  }

  int rank_, R_, C_;
  deepep4j_config cfg_;
  size_t ring_bytes_ = 0;
  uint64_t step_ = 0;
  ShmRegion own_;
  std::vector<std::unique_ptr<ShmRegion>> peers_;
  std::vector<RegionView> views_;
  std::unique_ptr<WorkerPool> pool_;
  bool direct_wanted_ = true;       // this rank allows direct copies (DEEPEP4J_CPU_DIRECT != 0)
  bool direct_ = false;             // every rank allows them
  std::vector<bool> peer_direct_;   // [R] rows to/from this rank skip the rings (self; same process when direct_)
  std::vector<float> scratch_;   // combine: fp32 accumulators for bf16/fp16 outputs
  std::vector<uint8_t> touched_;  // combine: token has received its first row
};

}  // namespace
}  // namespace cpu

int make_cpu_backend(int32_t rank, int32_t num_ranks, const deepep4j_config& cfg, std::unique_ptr<Backend>* out) {
  if (cfg.backend != DEEPEP4J_BACKEND_DEEPEP)  // never fall back silently from alltoall to the ring backend
    return set_error(DEEPEP4J_ERR_UNAVAILABLE,
                     "backend = %d (alltoall): the NCCL all-to-all backend needs DEEPEP4J_DEVICE_CUDA; the CPU device "
                     "runs DEEPEP4J_BACKEND_DEEPEP only",
                     cfg.backend);
  auto b = std::make_unique<cpu::CpuBackend>(rank, num_ranks, cfg);
  int st = b->init();
  if (st != DEEPEP4J_OK) return st;
  *out = std::move(b);
  return DEEPEP4J_OK;
}

}  // namespace deepep4j
