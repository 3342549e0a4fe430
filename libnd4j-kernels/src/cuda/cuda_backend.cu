// cuda_backend.cu — device set-up, layout and the notify step shared by the CUDA backends.
#include <sched.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cinttypes>
#include <climits>
#include <cstring>
#include <random>

#include "common/validate.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_util.h"

namespace deepep4j {
namespace cuda {

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

int64_t now_us() {
  return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

namespace {
size_t align256(size_t v) { return (v + 255) & ~size_t(255); }
}  // namespace

uint64_t process_nonce() {
  static const uint64_t nonce = std::random_device{}() * 0x9e3779b97f4a7c15ull ^ uint64_t(now_ms());
  return nonce;
}

CudaHandle::~CudaHandle() {
  int prev = 0;
  cudaGetDevice(&prev);
  cudaSetDevice(device);
  // Stream-ordered frees: a plain cudaFree would wait for the whole device, including the spinning kernels of other
  // ranks that share it, which may be waiting for this thread.
  if (arena) cudaFreeAsync(arena, cudaStreamLegacy);
  if (r.recv_local) cudaFreeAsync(r.recv_local, cudaStreamLegacy);
  cudaSetDevice(prev);
}

CudaBackend::~CudaBackend() {
  if (use_device() != DEEPEP4J_OK) return;
  if (own_stream_) cudaStreamDestroy(own_stream_);
  if (comm_stream_) cudaStreamDestroy(comm_stream_);
  for (cudaEvent_t e : {legacy_done_, step_done_, caller_ready_, comm_done_})
    if (e) cudaEventDestroy(e);
  if (mailbox_) cudaFreeHost(mailbox_);
  if (gathered_host_) cudaFreeHost(gathered_host_);
  if (plan_host_) cudaFreeHost(plan_host_);
  if (scratch_) cudaFree(scratch_);
}

cudaStream_t CudaBackend::pick(void* stream) {
  if (stream) return static_cast<cudaStream_t>(stream);
  // Errors here surface at the next checked call on the stream.
  if (cudaEventRecord(legacy_done_, cudaStreamLegacy) == cudaSuccess) cudaStreamWaitEvent(own_stream_, legacy_done_, 0);
  return own_stream_;
}

int CudaBackend::use_device() const { return cuda_status(cudaSetDevice(cfg_.device_id), "cudaSetDevice"); }

int CudaBackend::init() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0)
    return set_error(DEEPEP4J_ERR_UNAVAILABLE, "device = DEEPEP4J_DEVICE_CUDA: no CUDA device is visible");
  if (cfg_.device_id < 0 || cfg_.device_id >= count)
    return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "device_id = %d: must be in [0, %d) (visible CUDA devices)",
                     cfg_.device_id, count);
  DEEPEP4J_CUDA_TRY(cudaSetDevice(cfg_.device_id));
  int sms = 0;
  DEEPEP4J_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, cfg_.device_id));
  if (channels() > kMaxChannels || cfg_.num_sms > sms)
    return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT,
                     "num_sms = %d: must be <= %d on CUDA device %d (its SMs, and at most %d channels)", cfg_.num_sms,
                     std::min(sms, 2 * kMaxChannels), cfg_.device_id, kMaxChannels);
  DEEPEP4J_CUDA_TRY(cudaStreamCreateWithFlags(&own_stream_, cudaStreamNonBlocking));
  DEEPEP4J_CUDA_TRY(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
  for (cudaEvent_t* e : {&legacy_done_, &step_done_, &caller_ready_, &comm_done_})
    DEEPEP4J_CUDA_TRY(cudaEventCreateWithFlags(e, cudaEventDisableTiming));
  DEEPEP4J_CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&mailbox_), sizeof(Mailbox), cudaHostAllocMapped));
  std::memset(mailbox_, 0, sizeof(Mailbox));
  DEEPEP4J_CUDA_TRY(cudaHostGetDevicePointer(reinterpret_cast<void**>(&mailbox_dev_), mailbox_, 0));
  DEEPEP4J_CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&gathered_host_), size_t(R_) * kNotifySlotBytes,
                                  cudaHostAllocDefault));
  DEEPEP4J_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&scratch_), 256));
  DEEPEP4J_CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&plan_host_), plan_host_bytes(), cudaHostAllocDefault));
  if (int st = init_backend()) return st;
  // Before any step can spin: no launch of this buffer may load a module or grow local memory later (kernels.h).
  KernelSet kernels;
  DEEPEP4J_CUDA_TRY(load_control_kernels(&kernels));
  DEEPEP4J_CUDA_TRY(load_step_kernels(&kernels));
  DEEPEP4J_CUDA_TRY(cover_stack(kernels));
  return ok();
}

int CudaBackend::broken_check(const char* call) const {
  if (!broken_) return DEEPEP4J_OK;
  return set_error(DEEPEP4J_ERR_STATE, "%s on rank %d: the buffer is broken (%s): destroy and recreate the group's "
                   "buffers", call, rank_, broken_reason_.c_str());
}

int CudaBackend::begin_dispatch(const char* call, Handle* handle, int32_t dtype, const deepep4j_dispatch_args* a,
                                void* stream, StepStart<DispatchIo>* out) {
  if (int st = broken_check(call)) return st;
  if (int st = use_device()) return st;
  out->h = static_cast<CudaHandle*>(handle);
  out->s = pick(stream);
  out->check = check_dispatch_args(*out->h, dtype, a);
  DispatchIo& io = out->io;
  io.row_bytes = out->h->hidden * int64_t(dtype_size(dtype));
  io.num_scales = dtype == DEEPEP4J_FP8_E4M3 ? int32_t(out->h->hidden / DEEPEP4J_FP8_BLOCK) : 0;
  if (out->check.ok()) {
    io.x = static_cast<const uint8_t*>(a->x), io.x_scales = a->x_scales, io.topk_weights = a->topk_weights;
    io.recv_x = static_cast<uint8_t*>(a->recv_x), io.recv_x_scales = a->recv_x_scales;
    io.recv_topk_idx = a->recv_topk_idx, io.recv_topk_weights = a->recv_topk_weights;
    io.recv_src_token = a->recv_src_token, io.recv_src_rank = a->recv_src_rank;
  }
  return DEEPEP4J_OK;
}

int CudaBackend::begin_combine(const char* call, Handle* handle, int32_t dtype, const deepep4j_combine_args* a,
                               void* stream, StepStart<CombineIo>* out) {
  if (int st = broken_check(call)) return st;
  if (int st = use_device()) return st;
  out->h = static_cast<CudaHandle*>(handle);
  out->s = pick(stream);
  out->check = check_combine_args(*out->h, dtype, a);
  if (out->check.ok() && !out->h->dispatched)
    out->check = Check::fail(DEEPEP4J_ERR_STATE, "handle: combine needs a dispatch on this handle first");
  CombineIo& io = out->io;
  io.row_bytes = out->h->hidden * int64_t(dtype_size(dtype));
  io.dtype = dtype;
  if (out->check.ok()) {
    io.y = static_cast<const uint8_t*>(a->y), io.recv_topk_weights = a->recv_topk_weights;
    io.y_topk_weights = a->y_topk_weights, io.out = static_cast<uint8_t*>(a->out);
    io.out_topk_weights = a->out_topk_weights;
  }
  return DEEPEP4J_OK;
}

Blob CudaBackend::own_blob() const {
  Blob b{};
  b.magic = kBlobMagic, b.version = 1, b.rank = rank_, b.num_ranks = R_;
  b.pid = int64_t(getpid()), b.process_nonce = process_nonce();
  b.device_id = cfg_.device_id, b.backend = cfg_.backend, b.buffer_bytes = cfg_.buffer_bytes;
  b.num_sms = cfg_.num_sms, b.chunk = cfg_.max_send_tokens_per_chunk, b.ring_tokens = cfg_.ring_tokens;
  b.timeout_ms = cfg_.timeout_ms;
  b.cuda_transfer = cfg_.cuda_transfer, b.ce_chunks = cfg_.ce_chunks;
  b.stream_ordered = cfg_.stream_ordered;
  return b;
}

int CudaBackend::read_blobs(const void* const* blobs, const size_t* lens, std::vector<Blob>* all) const {
  all->assign(static_cast<size_t>(R_), Blob{});
  for (int r = 0; r < R_; ++r) {
    if (lens[r] != sizeof(Blob))
      return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "blobs[%d]: length %zu, a CUDA blob has %zu bytes", r, lens[r],
                       sizeof(Blob));
    Blob& b = (*all)[size_t(r)];
    std::memcpy(&b, blobs[r], sizeof(Blob));
    if (b.magic != kBlobMagic || b.rank != r)
      return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "blobs[%d]: not the CUDA blob of rank %d", r, r);
    // Fields every rank must agree on, with both values in the message.
    struct Field {
      const char* name;
      int64_t mine, theirs;
    } fields[] = {{"num_ranks", R_, b.num_ranks},
                  {"backend", cfg_.backend, b.backend},
                  {"buffer_bytes", cfg_.buffer_bytes, b.buffer_bytes},
                  {"num_sms", cfg_.num_sms, b.num_sms},
                  {"max_send_tokens_per_chunk", cfg_.max_send_tokens_per_chunk, b.chunk},
                  {"ring_tokens", cfg_.ring_tokens, b.ring_tokens},
                  {"cuda_transfer", cfg_.cuda_transfer, b.cuda_transfer},
                  {"ce_chunks", cfg_.ce_chunks, b.ce_chunks},
                  {"stream_ordered", cfg_.stream_ordered, b.stream_ordered}};
    for (const Field& f : fields)
      if (f.mine != f.theirs)
        return set_error(DEEPEP4J_ERR_PEER_MISMATCH,
                         "ranks disagree on the config: %s = %" PRId64 " on rank %d but %" PRId64 " on rank %d; all "
                         "ranks must agree", f.name, f.mine, rank_, f.theirs, r);
  }
  return DEEPEP4J_OK;
}

int CudaBackend::wait_stream(cudaStream_t s, int64_t deadline_ms, const char* call) {
  for (int spins = 0;; ++spins) {
    cudaError_t e = cudaStreamQuery(s);
    if (e == cudaSuccess) return DEEPEP4J_OK;
    if (e != cudaErrorNotReady) return cuda_status(e, call);
    if (now_ms() > deadline_ms) {
      broken_ = true;
      broken_reason_ = "a device step did not finish in time";
      return set_error(DEEPEP4J_ERR_TIMEOUT, "%s on rank %d: the device did not finish within timeout_ms = %d", call,
                       rank_, cfg_.timeout_ms);
    }
    if (spins > 1000) sched_yield();
  }
}

int CudaBackend::finish_step(cudaStream_t s, const char* call) {
  // Kernels give up at timeout_ms on their own; the extra second covers launch and copy latency.
  int st = wait_stream(s, now_ms() + cfg_.timeout_ms + 1000, call);
  if (st != DEEPEP4J_OK) return st;
  return read_mailbox(call, "");
}

int CudaBackend::read_mailbox(const char* call, const char* prefix) {
  Mailbox mb;
  std::atomic_thread_fence(std::memory_order_acquire);
  std::memcpy(&mb, mailbox_, sizeof(Mailbox));
  // Stream-ordered steps keep the error word: it is how later queued steps' reports find it.
  if (!so_) std::memset(mailbox_, 0, sizeof(Mailbox));
  ce_veto_ = mb.ce_veto != 0;
  std::memcpy(peer_direct_, mb.direct, sizeof(peer_direct_));
  if (mb.status == DEEPEP4J_OK) return DEEPEP4J_OK;
  mb.message[sizeof(mb.message) - 1] = 0;
  if (so_) {  // peers may have queued later steps: the group cannot agree where to resume
    broken_ = true;
    broken_reason_ = std::string("a stream-ordered step failed: ") + mb.message;
  }
  if (mb.status != DEEPEP4J_ERR_TIMEOUT && mb.peer == rank_)  // this rank's own failure, found on the device
    return set_error(mb.status, "%s on rank %d: %s%s", call, rank_, prefix, mb.message);
  if (mb.status != DEEPEP4J_ERR_TIMEOUT)
    return set_error(DEEPEP4J_ERR_PEER_ERROR, "%s on rank %d: %srank %d reported: %s", call, rank_, prefix, mb.peer,
                     mb.message);
  static const char* kWhere[] = {"barrier", "dispatch send", "dispatch receive", "combine send", "combine receive"};
  const char* where = mb.where >= 0 && mb.where < 5 ? kWhere[mb.where] : "wait";
  broken_ = true;
  broken_reason_ = std::string(call) + " timed out";
  const int gave_up = mb.abandoned_by - 1;
  if (gave_up == int(kLateRank))
    return set_error(DEEPEP4J_ERR_TIMEOUT,
                     "%s on rank %d: %sthe other ranks abandoned this step (timeout_ms = %d) before this rank arrived; "
                     "the buffer is broken: destroy and recreate the group's buffers", call, rank_, prefix,
                     cfg_.timeout_ms);
  if (gave_up >= 0 && gave_up != rank_)
    return set_error(DEEPEP4J_ERR_TIMEOUT,
                     "%s on rank %d: %sstep abandoned: rank %d waited for rank %d longer than timeout_ms = %d; the "
                     "buffer is broken: destroy and recreate the group's buffers", call, rank_, prefix, gave_up,
                     mb.peer, cfg_.timeout_ms);
  return set_error(DEEPEP4J_ERR_TIMEOUT,
                   "%s on rank %d: %s%s waited for rank %d longer than timeout_ms = %d (peer gone or not calling); the "
                   "step is abandoned on every rank and the buffer is broken: destroy and recreate the group's buffers",
                   call, rank_, prefix, where, mb.peer, cfg_.timeout_ms);
}

int CudaBackend::queued_error(const char* call) {
  if (int st = broken_check(call)) return st;  // reported once; from then on the buffer refuses steps
  if (!so_ || *reinterpret_cast<volatile int32_t*>(&mailbox_->status) == DEEPEP4J_OK) return DEEPEP4J_OK;
  return read_mailbox(call, "a queued step failed: ");
}

namespace {
bool capturing(cudaStream_t s) {
  cudaStreamCaptureStatus c = cudaStreamCaptureStatusNone;
  return cudaStreamIsCapturing(s, &c) == cudaSuccess && c != cudaStreamCaptureStatusNone;
}
}  // namespace

int CudaBackend::order_step(cudaStream_t s) {
  if (!so_ || last_stream_ == nullptr || last_stream_ == s || capturing(s)) return DEEPEP4J_OK;
  return cuda_status(cudaStreamWaitEvent(s, step_done_, 0), "cudaStreamWaitEvent");
}

int CudaBackend::step_queued(cudaStream_t s) {
  if (!so_ || capturing(s)) return DEEPEP4J_OK;
  last_stream_ = s;
  return cuda_status(cudaEventRecord(step_done_, s), "cudaEventRecord");
}

int CudaBackend::sync(void* stream) {
  const char* call = "deepep4j_buffer_sync";
  if (int st = use_device()) return st;
  const int64_t deadline = now_ms() + cfg_.timeout_ms + 1000;
  for (cudaStream_t s : {static_cast<cudaStream_t>(stream), comm_stream_, own_stream_})
    if (s != nullptr)
      if (int st = wait_stream(s, deadline, call)) return st;
  if (last_stream_ != nullptr)
    for (int spins = 0;; ++spins) {  // the last step may have gone to a stream the caller did not name
      cudaError_t e = cudaEventQuery(step_done_);
      if (e == cudaSuccess) break;
      if (e != cudaErrorNotReady) return cuda_status(e, call);
      if (now_ms() > deadline)
        return wait_stream(last_stream_, deadline, call);  // reports the timeout and breaks the buffer
      if (spins > 1000) sched_yield();
    }
  return so_ ? read_mailbox(call, "a queued step failed: ") : ok();
}

int CudaBackend::comm_wait(void* stream) {
  if (int st = use_device()) return st;
  if (stream == nullptr) {  // nothing to order on the device: wait here
    if (int st = wait_stream(comm_stream_, now_ms() + cfg_.timeout_ms + 1000, "deepep4j_comm_wait")) return st;
    if (int st = queued_error("deepep4j_comm_wait")) return st;
    return ok();
  }
  DEEPEP4J_CUDA_TRY(cudaEventRecord(comm_done_, comm_stream_));
  DEEPEP4J_CUDA_TRY(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), comm_done_, 0));
  return ok();
}

int CudaBackend::alloc_routing(CudaHandle* h, int64_t n, int32_t k, int32_t e, cudaStream_t s) {
  Routing& r = h->r;
  const int C = channels();
  r.num_tokens = n, r.num_topk = k, r.num_experts = e, r.channels = C;
  r.tokens_per_channel = (n + C - 1) / C;
  const size_t RC = size_t(R_) * C, N = size_t(n);
  size_t sizes[] = {N * 8, N * k * 4, N * R_ * 4, N * R_ * 4, RC * 4, size_t(e) * 4, RC * 4, RC * 4, RC * 4, 8};
  size_t total = 0;
  for (size_t v : sizes) total += align256(v);
  DEEPEP4J_CUDA_TRY(cudaMallocAsync(&h->arena, total, s));
  uint8_t* p = static_cast<uint8_t*>(h->arena);
  void** ptrs[] = {(void**)&r.token_mask,  (void**)&r.topk,         (void**)&r.send_pos,    (void**)&r.send_list,
                   (void**)&r.send_counts, (void**)&r.expert_counts, (void**)&r.recv_offset, (void**)&r.recv_counts,
                   (void**)&r.send_prefix, (void**)&h->num_recv_dev};
  for (int i = 0; i < 10; ++i) {
    *ptrs[i] = p;
    p += align256(sizes[i]);
  }
  return DEEPEP4J_OK;
}

int CudaBackend::get_dispatch_layout(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int32_t* per_rank,
                                     int32_t* per_expert, uint8_t* in_rank, void* stream) {
  Check c = check_routing(topk_idx, n, k, e, R_, false);
  if (!c.ok()) return set_error(c.status, "%s", c.message.c_str());
  if (int st = use_device()) return st;
  cudaStream_t s = pick(stream);
  DEEPEP4J_CUDA_TRY(launch_layout(topk_idx, n, k, e, R_, per_rank, per_expert, in_rank, s));
  if (stream == nullptr) {  // the caller reads the results in NULL-stream order
    DEEPEP4J_CUDA_TRY(cudaEventRecord(legacy_done_, s));
    DEEPEP4J_CUDA_TRY(cudaStreamWaitEvent(cudaStreamLegacy, legacy_done_, 0));
  }
  return ok();
}

int CudaBackend::notify_dispatch(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int64_t hidden,
                                 int32_t dtype, Handle** out_handle, int64_t* num_recv, int32_t* per_local_expert,
                                 void* stream) {
  const char* call = "deepep4j_notify_dispatch";
  if (int st = broken_check(call)) return st;
  if (int st = use_device()) return st;
  if (int st = queued_error(call)) return st;
  cudaStream_t s = pick(stream);
  if (int st = order_step(s)) return st;
  const int C = channels();
  Check check = check_routing(topk_idx, n, k, e, R_, false);
  if (check.ok()) check = check_payload(hidden, dtype, true, "notify_dispatch");
  if (check.ok() && e / R_ + C > int64_t(kMaxNotifyInts))
    check = Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT, "num_experts = %d: at most %d experts per rank on CUDA", e,
                        int(kMaxNotifyInts) - C);
  const int L = check.ok() ? e / R_ : 0;
  auto h = std::make_unique<CudaHandle>();
  h->device = cfg_.device_id;
  if (check.ok()) {
    Routing& r = h->r;
    const size_t RC = size_t(R_) * C;
    if (int st = alloc_routing(h.get(), n, k, e, s)) return st;
    DEEPEP4J_CUDA_TRY(cudaMemsetAsync(scratch_, 0xff, 8, s));
    DEEPEP4J_CUDA_TRY(launch_plan(topk_idx, r, R_, scratch_, s));
    // Into pinned memory, then waited for by polling: a copy to pageable memory would wait for the stream inside the
    // CUDA call, which stalls other ranks' threads of this process meanwhile (deepep4j.h, stream-ordered mode).
    unsigned long long bad = 0;
    int32_t* counts = reinterpret_cast<int32_t*>(plan_host_ + 8);
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(plan_host_, scratch_, 8, cudaMemcpyDeviceToHost, s));
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(counts, r.send_counts, RC * 4, cudaMemcpyDeviceToHost, s));
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(counts + RC, r.expert_counts, size_t(e) * 4, cudaMemcpyDeviceToHost, s));
    if (int st = wait_stream(s, now_ms() + cfg_.timeout_ms, call)) return st;
    std::memcpy(&bad, plan_host_, 8);
    h->send_counts_host.assign(counts, counts + RC);
    h->expert_counts_host.assign(counts + RC, counts + RC + e);
    if (bad != ULLONG_MAX) {
      int64_t value = 0;
      DEEPEP4J_CUDA_TRY(cudaMemcpy(&value, topk_idx + bad, 8, cudaMemcpyDeviceToHost));
      check = Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT,
                          "topk_idx[%" PRId64 "][%d] = %" PRId64 ": must be in [-1, num_experts = %d)",
                          int64_t(bad / uint64_t(k)), int(bad % uint64_t(k)), value, e);
    }
  }
  NotifyHeader header{};
  header.status = check.status;
  header.num_topk = k, header.num_experts = e, header.dtype = dtype, header.hidden = hidden, header.num_tokens = n;
  header.num_channels = C;
  std::snprintf(header.message, sizeof(header.message), "%s", check.message.c_str());
  if (int st = exchange_counts(header, check.ok() ? h.get() : nullptr, L, gathered_host_, s)) return st;
  if (!check.ok()) return set_error(check.status, "%s", check.message.c_str());

  auto slot_of = [&](int r) { return reinterpret_cast<const NotifyHeader*>(gathered_host_ + size_t(r) * kNotifySlotBytes); };
  for (int r = 0; r < R_; ++r)
    if (slot_of(r)->status != 0) {
      char m[sizeof(NotifyHeader::message) + 1] = {};
      std::memcpy(m, slot_of(r)->message, sizeof(NotifyHeader::message));
      return set_error(DEEPEP4J_ERR_PEER_ERROR, "%s on rank %d: rank %d reported: %s", call, rank_, r, m);
    }
  for (int r = 0; r < R_; ++r) {
    const NotifyHeader* o = slot_of(r);
    const char* field = o->num_topk != k ? "num_topk" : o->num_experts != e ? "num_experts" : o->dtype != dtype ? "dtype"
                        : o->hidden != hidden ? "hidden" : nullptr;
    if (field) {
      int64_t mine = o->num_topk != k ? k : o->num_experts != e ? e : o->dtype != dtype ? dtype : hidden;
      int64_t theirs = o->num_topk != k ? o->num_topk : o->num_experts != e ? o->num_experts
                       : o->dtype != dtype ? o->dtype : o->hidden;
      return set_error(DEEPEP4J_ERR_PEER_MISMATCH,
                       "%s: rank %d has %s = %" PRId64 ", rank %d has %" PRId64 ": all ranks of a step must agree",
                       call, rank_, field, mine, r, theirs);
    }
  }
  const size_t RC = size_t(R_) * C;
  std::vector<int32_t> recv_offset(RC), send_prefix(RC);
  h->recv_counts_host.resize(RC);
  std::vector<int32_t> per_expert(size_t(L), 0);
  int64_t M = 0;
  for (int s_ = 0; s_ < R_; ++s_) {
    const int32_t* ints = reinterpret_cast<const int32_t*>(gathered_host_ + size_t(s_) * kNotifySlotBytes +
                                                           sizeof(NotifyHeader));
    int64_t from_rank = 0;
    for (int c = 0; c < C; ++c) {
      recv_offset[size_t(s_) * C + c] = int32_t(M + from_rank);
      h->recv_counts_host[size_t(s_) * C + c] = ints[c];
      from_rank += ints[c];
    }
    for (int j = 0; j < L; ++j) per_expert[size_t(j)] += ints[C + j];
    h->recv_counts_per_rank[s_] = int32_t(from_rank);
    M += from_rank;
  }
  for (int d = 0; d < R_; ++d) {
    int32_t run = 0;
    for (int c = 0; c < C; ++c) {
      send_prefix[size_t(d) * C + c] = run;
      run += h->send_counts_host[size_t(d) * C + c];
    }
  }
  DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(h->r.recv_offset, recv_offset.data(), RC * 4, cudaMemcpyHostToDevice, s));
  DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(h->r.recv_counts, h->recv_counts_host.data(), RC * 4, cudaMemcpyHostToDevice, s));
  DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(h->r.send_prefix, send_prefix.data(), RC * 4, cudaMemcpyHostToDevice, s));
  if (M > 0) DEEPEP4J_CUDA_TRY(cudaMallocAsync(reinterpret_cast<void**>(&h->r.recv_local), size_t(M) * 4, s));
  if (int st = step_queued(s)) return st;
  if (int st = wait_stream(s, now_ms() + cfg_.timeout_ms, call)) return st;
  h->num_tokens = n, h->num_recv_tokens = M, h->num_topk = k, h->num_experts = e, h->hidden = hidden;
  h->dtype = dtype, h->num_ranks = R_;
  if (per_local_expert) std::memcpy(per_local_expert, per_expert.data(), size_t(L) * 4);
  *num_recv = M;
  *out_handle = h.release();
  return ok();
}

}  // namespace cuda
}  // namespace deepep4j
