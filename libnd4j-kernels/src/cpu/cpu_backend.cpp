// cpu_backend.cpp — the CPU backend's region, blob and connect (see cpu_backend.h for the whole backend).
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdlib>
#include <cstring>

#include "../common/dtype.h"
#include "cpu_backend.h"

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

}  // namespace

int CpuBackend::init() {
  ring_bytes_ = size_t(ring_bytes_of(cfg_.buffer_bytes, R_, C_));
  if (cfg_.max_hidden_bytes > 0) {
    const int64_t mhb = cfg_.max_hidden_bytes;  // 64-bit: INT32_MAX + 15 must not overflow
    // A row of up to max_hidden_bytes with K = DEEPEP4J_MAX_TOPK; fp8 scales (dtype unknown here) are checked when
    // a step names its dtype, so every minimum this message gives is accepted.
    int64_t slot = DispatchSlot::make(align16(mhb), DEEPEP4J_MAX_TOPK, 0).bytes;
    int64_t need = buffer_bytes_for(slot, cfg_.max_send_tokens_per_chunk, R_, C_);
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
  direct_wanted_ = cfg_.cpu_direct != 0;
  return ok();
}

int CpuBackend::export_blob(void* out, size_t capacity, size_t* len) {
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

int CpuBackend::connect(const void* const* blobs, const size_t* lens) {
  if (broken_) return broken_error("deepep4j_buffer_connect");
  std::vector<Blob> all(R_);
  for (int r = 0; r < R_; ++r) {
    if (lens[r] != sizeof(Blob))
      return fail_connect(DEEPEP4J_ERR_INVALID_ARGUMENT,
                          t_fmt("blobs[%d]: length %zu is not a CPU-backend blob (%zu bytes)", r, lens[r],
                                sizeof(Blob)).c_str());
    std::memcpy(&all[r], blobs[r], sizeof(Blob));
    if (all[r].magic != kRegionMagic || all[r].version != kBlobVersion)
      return fail_connect(DEEPEP4J_ERR_INVALID_ARGUMENT,
                          t_fmt("blobs[%d]: not a deepep4j CPU blob of version %u", r, kBlobVersion).c_str());
    if (all[r].rank != r || all[r].num_ranks != R_)
      return fail_connect(DEEPEP4J_ERR_PEER_MISMATCH,
                          t_fmt("blobs[%d]: comes from rank %d of %d ranks; expected rank %d of %d (blobs must be in "
                                "rank order)", r, all[r].rank, all[r].num_ranks, r, R_).c_str());
  }
  // Every rank sees every blob, so every rank reaches the same verdict without another exchange.
  for (int r = 1; r < R_; ++r) {
    const deepep4j_config &a = all[0].config, &b = all[r].config;
#define DEEPEP4J_SAME(field, fmt)                                                                       \
  if (a.field != b.field)                                                                              \
    return fail_connect(DEEPEP4J_ERR_PEER_MISMATCH,                                                    \
                        t_fmt("ranks disagree on the config: " #field " = " fmt " on rank 0 but " fmt " on rank %d", \
                              a.field, b.field, r).c_str());
    DEEPEP4J_SAME(buffer_bytes, "%" PRId64)
    DEEPEP4J_SAME(num_sms, "%d")
    DEEPEP4J_SAME(max_send_tokens_per_chunk, "%d")
    DEEPEP4J_SAME(ring_tokens, "%d")
    DEEPEP4J_SAME(timeout_ms, "%d")
    DEEPEP4J_SAME(device, "%d")
    DEEPEP4J_SAME(backend, "%d")
    DEEPEP4J_SAME(max_hidden_bytes, "%d")
    DEEPEP4J_SAME(cuda_transfer, "%d")
    DEEPEP4J_SAME(ce_chunks, "%d")
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
        return fail_connect(DEEPEP4J_ERR_PEER_ERROR,
                            t_fmt("rank %d: cannot map the shared memory %s of rank %d (%s); has rank %d exited?",
                                  rank_, all[r].name, r, strerror(e), r).c_str());
      base = static_cast<uint8_t*>(peers_[r]->data());
    }
    views_[r] = RegionView{base, R_, C_, ring_bytes_};
  }
  // Meet every peer once (the group's first step) so no rank writes to a peer that has not mapped it yet.
  StepData mine{};
  fill_header(&mine, Check{}, kStepConnect, 0, 0, 0, 0, 0, 0, 0);
  std::vector<const StepData*> met;
  if (int st = exchange(mine, &met)) return st;
  own_.unlink();  // every peer has mapped this region: no name is left behind if a process dies
  return ok();
}

int CpuBackend::fail_connect(int32_t status, const char* message) {
  if (broken_) return broken_error("deepep4j_buffer_connect");
  Control* ctl = static_cast<Control*>(own_.data());
  snprintf(ctl->connect_message, sizeof(ctl->connect_message), "%s", message);
  ctl->connect_failure.store(status, std::memory_order_release);
  broken_ = true;
  broken_reason_ = "connect failed on this rank";
  return set_error(status, "%s", message);
}

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
