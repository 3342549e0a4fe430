// deepep_backend.cu — the NVLink backend: each rank's region is device memory its peers map (peer access in one
// process, CUDA IPC across processes); notify, dispatch and combine move everything through it with the ring kernels.
#include <unistd.h>

#include <cinttypes>
#include <cstring>
#include <mutex>
#include <set>

#include "common/validate.h"
#include "cuda/copy_engine.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_util.h"
#include "cuda/ring_trace.h"

namespace deepep4j {
namespace cuda {

namespace {

// Peer access is per (device, peer) for the whole process; ranks of one process share it, so enable it once.
int enable_peer_access(int device, int peer) {
  static std::mutex mu;
  static std::set<std::pair<int, int>> enabled;
  std::lock_guard<std::mutex> lock(mu);
  if (enabled.count({device, peer})) return DEEPEP4J_OK;
  cudaError_t e = cudaDeviceEnablePeerAccess(peer, 0);
  if (e == cudaErrorPeerAccessAlreadyEnabled) e = cudaSuccess, cudaGetLastError();  // enabled outside deepep4j
  if (e != cudaSuccess) return cuda_status(e, "cudaDeviceEnablePeerAccess");
  enabled.insert({device, peer});
  return DEEPEP4J_OK;
}

class DeepepBackend : public CudaBackend {
 public:
  using CudaBackend::CudaBackend;
  ~DeepepBackend() override {
    if (use_device() != DEEPEP4J_OK) return;
    cudaStreamSynchronize(own_stream_);
    cudaStreamSynchronize(comm_stream_);
    for (void* p : opened_) cudaIpcCloseMemHandle(p);
    if (region_) cudaFree(region_);
    if (gathered_dev_) cudaFree(gathered_dev_);
  }

  int export_blob(void* blob, size_t capacity, size_t* len) override {
    if (capacity < sizeof(Blob))
      return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "capacity = %zu: the blob needs %zu bytes", capacity,
                       sizeof(Blob));
    Blob b = own_blob();
    b.region = reinterpret_cast<uint64_t>(region_);
    b.ipc = ipc_;
    std::memcpy(blob, &b, sizeof(b));
    *len = sizeof(b);
    return ok();
  }

  int connect(const void* const* blobs, const size_t* lens) override {
    if (int st = broken_check("deepep4j_buffer_connect")) return st;
    if (int st = use_device()) return st;
    std::vector<Blob> all;
    if (int st = read_blobs(blobs, lens, &all)) return fail_connect(st, std::string(last_error()).c_str());
    const Blob& me = all[size_t(rank_)];
    for (int r = 0; r < R_; ++r) {
      const Blob& b = all[size_t(r)];
      same_process_[r] = b.pid == me.pid && b.process_nonce == me.process_nonce;
      peer_device_[r] = b.device_id;
      if (r == rank_) {
        peers_.region[r] = region_;
      } else if (same_process_[r]) {
        if (b.device_id != cfg_.device_id) {
          int can = 0;
          DEEPEP4J_CUDA_TRY(cudaDeviceCanAccessPeer(&can, cfg_.device_id, b.device_id));
          if (!can)
            return set_error(DEEPEP4J_ERR_UNAVAILABLE, "device %d cannot access device %d (rank %d) as a peer",
                             cfg_.device_id, b.device_id, r);
          if (int st = enable_peer_access(cfg_.device_id, b.device_id)) return st;
        }
        peers_.region[r] = reinterpret_cast<uint8_t*>(b.region);
      } else {
        void* p = nullptr;
        DEEPEP4J_CUDA_TRY(cudaIpcOpenMemHandle(&p, b.ipc, cudaIpcMemLazyEnablePeerAccess));
        opened_.push_back(p);
        peers_.region[r] = static_cast<uint8_t*>(p);
      }
    }
    // Every rank mapped every region: meet once so no rank writes to a peer that is not listening yet.
    cudaStream_t s = own_stream_;
    DEEPEP4J_CUDA_TRY(launch_barrier(step(epoch_), 0, nullptr, s));
    if (int st = finish_step(s, "deepep4j_buffer_connect")) {
      broken_ = true;  // a connect that failed is not retried: recreate the buffers
      broken_reason_ = "connect failed";
      return st;
    }
    return ok();
  }

  // A rank that fails before it could map its peers publishes its status in its own region (which they have mapped)
  // and raises its own flag of the connect barrier (epoch 1): the peers' barrier reads it there.
  int fail_connect(int32_t status, const char* message) override {
    if (int st = broken_check("deepep4j_buffer_connect")) return st;
    if (use_device() == DEEPEP4J_OK && region_ != nullptr) {
      PeerStatus ps{};
      ps.status = status;
      std::snprintf(ps.message, sizeof(ps.message), "%s", message);
      const uint32_t epoch = 1;
      if (cudaMemcpy(status_slot(region_, epoch, rank_), &ps, sizeof(ps), cudaMemcpyHostToDevice) == cudaSuccess)
        cudaMemcpy(flags(region_) + rank_, &epoch, sizeof(epoch), cudaMemcpyHostToDevice);
    }
    broken_ = true;
    broken_reason_ = "connect failed on this rank";
    return set_error(status, "%s", message);
  }

  // Joins the peers' step (notify, dispatch or combine: each starts with a barrier) with this rank's failure.
  int fail_step(int32_t status, const char* message) override {
    const char* call = "deepep4j_fail_step";
    if (int st = broken_check(call)) return st;
    if (int st = use_device()) return st;
    Check failure;
    failure.status = status;
    failure.message = message;
    return run_step(call, failure, false, nullptr, own_stream_, false, [](const Step&) { return int(DEEPEP4J_OK); },
                    [](const Step&) { return cudaSuccess; });
  }

  int dispatch(Handle* handle, int32_t dtype, const deepep4j_dispatch_args* a, void* stream) override {
    const char* call = "deepep4j_dispatch";
    if (int st = queued_error(call)) return st;
    StepStart<DispatchIo> b;
    if (int st = begin_dispatch(call, handle, dtype, a, stream, &b)) return st;
    CudaHandle* h = b.h;
    const DispatchIo& io = b.io;
    Rings rings{};
    if (b.check.ok()) b.check = rings_for(DispatchSlot::make(io.row_bytes, h->num_topk, io.num_scales).bytes, &rings);
    CePlan plan{};
    const DispatchSlot meta = ce_dispatch_meta(h->num_topk, io.num_scales);
    const bool ce_vote =
        b.check.ok() &&
        ce_wanted([&] { return ce_.plan_dispatch(*h, rank_, io.row_bytes, meta, zone_bytes(), &plan); }, plan, &b.check);
    DirectTargets direct = ce_vote ? publish_direct(*h, io, &plan) : DirectTargets{};
    int fin = run_step(
        call, b.check, ce_vote, &direct, b.s, stream == nullptr,
        [&](const Step& st) { return ce_.run_dispatch(st, plan, *h, io, meta.bytes, peer_direct_, cfg_.num_sms, b.s); },
        [&](const Step& st) {
          cudaError_t e = launch_dispatch(st, rings, h->r, io, cfg_.num_sms, b.s);
          if (e == cudaSuccess && h->queued) e = launch_pad_recv(st, h->num_recv_dev, h->num_recv_tokens, h->num_topk, io, b.s);
          return e;
        });
    if (fin != DEEPEP4J_OK) return fin;
    h->dispatched = true;
    return ok();
  }

  int combine(Handle* handle, int32_t dtype, const deepep4j_combine_args* a, void* stream) override {
    return combine_step("deepep4j_combine", handle, dtype, a, stream, stream == nullptr);
  }

  // The combine waits on the device for the caller's stream, then runs on the comm stream; the next step (any
  // stream) is ordered after it by step_done_, readers by deepep4j_comm_wait.
  int combine_async(Handle* handle, int32_t dtype, const deepep4j_combine_args* a, void* stream) override {
    const char* call = "deepep4j_combine_async";
    if (!so_)
      return set_error(DEEPEP4J_ERR_STATE, "%s: needs config.stream_ordered = 1 (a combine that returns before the "
                       "GPU is done)", call);
    if (stream == nullptr) return combine_step(call, handle, dtype, a, nullptr, true);
    if (int st = use_device()) return st;
    DEEPEP4J_CUDA_TRY(cudaEventRecord(caller_ready_, static_cast<cudaStream_t>(stream)));
    DEEPEP4J_CUDA_TRY(cudaStreamWaitEvent(comm_stream_, caller_ready_, 0));
    return combine_step(call, handle, dtype, a, comm_stream_, false);
  }

  int create_queued_handle(int64_t n, int32_t k, int32_t e, int64_t hidden, int32_t dtype, int64_t worst,
                           Handle** out) override {
    const char* call = "deepep4j_handle_create_queued";
    if (!so_)
      return set_error(DEEPEP4J_ERR_UNAVAILABLE, "%s: needs config.stream_ordered = 1 on the CUDA deepep backend",
                       call);
    if (int st = broken_check(call)) return st;
    if (int st = use_device()) return st;
    Check c = n < 0 ? Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT, "num_tokens = %" PRId64 ": must be >= 0", n)
                    : check_routing(nullptr, 0, k, e, R_, false);  // K / E / R rules; topk_idx comes with each notify
    if (c.ok()) c = check_payload(hidden, dtype, true, "handle_create_queued");
    if (c.ok() && e / R_ + channels() > int64_t(kMaxNotifyInts))
      c = Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT, "num_experts = %d: at most %d experts per rank on CUDA", e,
                      int(kMaxNotifyInts) - channels());
    if (!c.ok()) return set_error(c.status, "%s", c.message.c_str());
    auto h = std::make_unique<CudaHandle>();
    h->device = cfg_.device_id;
    if (int st = alloc_routing(h.get(), n, k, e, own_stream_)) return st;
    if (worst > 0)
      DEEPEP4J_CUDA_TRY(cudaMallocAsync(reinterpret_cast<void**>(&h->r.recv_local), size_t(worst) * 4, own_stream_));
    DEEPEP4J_CUDA_TRY(cudaMemsetAsync(h->num_recv_dev, 0, 8, own_stream_));
    if (int st = wait_stream(own_stream_, now_ms() + cfg_.timeout_ms, call)) return st;
    h->num_tokens = n, h->num_recv_tokens = worst, h->num_topk = k, h->num_experts = e, h->hidden = hidden;
    h->dtype = dtype, h->num_ranks = R_;
    *out = h.release();
    return ok();
  }

  // The whole notify on `stream`: plan, the count exchange and the receive offsets, no host wait (capturable).
  int notify_dispatch_queued(Handle* handle, const int64_t* topk_idx, int64_t* num_recv, int32_t* per_local_expert,
                             void* stream) override {
    const char* call = "deepep4j_notify_dispatch_queued";
    if (int st = broken_check(call)) return st;
    if (int st = use_device()) return st;
    if (int st = queued_error(call)) return st;
    CudaHandle* h = static_cast<CudaHandle*>(handle);
    cudaStream_t s = pick(stream);
    Check check = check_routing(topk_idx, h->num_tokens, h->num_topk, h->num_experts, R_, false);
    const int L = h->num_experts / R_;
    if (int st = order_step(s)) return st;
    NotifyHeader header{};
    header.status = check.status;
    header.num_topk = h->num_topk, header.num_experts = h->num_experts, header.dtype = h->dtype;
    header.hidden = h->hidden, header.num_tokens = h->num_tokens, header.num_channels = channels();
    std::snprintf(header.message, sizeof(header.message), "%s", check.message.c_str());
    if (check.ok()) {
      DEEPEP4J_CUDA_TRY(cudaMemsetAsync(scratch_, 0xff, 8, s));
      DEEPEP4J_CUDA_TRY(launch_plan(topk_idx, h->r, R_, scratch_, s));
    }
    QueuedNotify q{};
    q.topk_idx = topk_idx, q.bad = scratch_, q.recv_offset = h->r.recv_offset, q.recv_counts = h->r.recv_counts;
    q.num_recv = h->num_recv_dev, q.num_recv_out = num_recv, q.per_expert_out = per_local_expert;
    q.worst = h->num_recv_tokens;
    DEEPEP4J_CUDA_TRY(launch_notify_queued(step(++epoch_), header, h->r, check.ok() ? L : 0, gathered_dev_,
                                           int64_t(kNotifySlotBytes), q, s));
    if (int st = step_queued(s)) return st;
    h->dispatched = false;
    if (!check.ok()) {
      broken_ = true;
      broken_reason_ = std::string(call) + " failed on rank " + std::to_string(rank_);
      return set_error(check.status, "%s", check.message.c_str());
    }
    if (stream == nullptr) return finish_step(s, call);
    return ok();
  }

  int combine_step(const char* call, Handle* handle, int32_t dtype, const deepep4j_combine_args* a, void* stream,
                   bool complete) {
    if (int st = queued_error(call)) return st;
    StepStart<CombineIo> b;
    if (int st = begin_combine(call, handle, dtype, a, stream, &b)) return st;
    CudaHandle* h = b.h;
    const CombineIo& io = b.io;
    Rings rings{};
    if (b.check.ok()) b.check = rings_for(CombineSlot::make(io.row_bytes, h->num_topk).bytes, &rings);
    CePlan plan{};
    const bool ce_vote =
        b.check.ok() &&
        ce_wanted([&] { return ce_.plan_combine(*h, rank_, io.row_bytes, zone_bytes(), &plan); }, plan, &b.check);
    int fin = run_step(
        call, b.check, ce_vote, nullptr, b.s, complete,
        [&](const Step& st) { return ce_.run_combine(st, plan, *h, io, cfg_.num_sms, b.s); },
        [&](const Step& st) { return launch_combine(st, rings, h->r, io, cfg_.num_sms, b.s); });
    return fin == DEEPEP4J_OK ? ok() : fin;
  }

 protected:
  int init_backend() override {
    so_ = cfg_.stream_ordered == 1;
    transfer_ = so_ ? Transfer::kSm : transfer_of(cfg_);  // stream-ordered steps never wait for the host's copies
    if (transfer_ != Transfer::kSm) {
      if (int st = ce_.init(R_, cfg_.ce_chunks, cfg_.cuda_trace == 1)) return st;
      if (transfer_ == Transfer::kCopyEngine && !ce_.available())
        return set_error(DEEPEP4J_ERR_UNAVAILABLE, "cuda_transfer = copy_engine: %s",
                         ce_.unavailable_reason().c_str());
    }
    // Ring steps are traced where calls wait for them; a queued step's kernels are not waited for.
    if (cfg_.cuda_trace == 1 && !so_)
      if (int st = trace_.init(cfg_.num_sms)) return st;
    const size_t bytes = kRings + size_t(cfg_.buffer_bytes);
    DEEPEP4J_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&region_), bytes));
    DEEPEP4J_CUDA_TRY(cudaMemset(region_, 0, kRings));
    DEEPEP4J_CUDA_TRY(cudaIpcGetMemHandle(&ipc_, region_));
    DEEPEP4J_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&gathered_dev_), size_t(R_) * kNotifySlotBytes));
    DEEPEP4J_CUDA_TRY(cudaDeviceSynchronize());
    return ok();
  }

  cudaError_t load_step_kernels(KernelSet* k) const override {
    if (cudaError_t e = load_ring_dispatch_kernels(k)) return e;
    if (cudaError_t e = load_ring_combine_kernels(R_, k)) return e;
    return transfer_ == Transfer::kSm ? cudaSuccess : load_ce_kernels(R_, k);
  }

  int exchange_counts(const NotifyHeader& header, const CudaHandle* h, int32_t local_experts, uint8_t* gathered,
                      cudaStream_t s) override {
    Step st = step(++epoch_);
    // Nothing is queued behind a kernel that spins for peers until it has finished. Ranks of one process that share
    // a GPU share its hardware work queues; an operation waiting for our spinning kernel at the head of such a queue
    // would hold back the other rank's launches, so that rank could not reach the barrier we wait in (a hang until
    // timeout_ms, seen with two ranks per GPU).
    DEEPEP4J_CUDA_TRY(launch_notify(st, header, h ? &h->r : nullptr, local_experts, gathered_dev_,
                                    int64_t(kNotifySlotBytes), s));
    if (int fin = finish_step(s, "deepep4j_notify_dispatch")) return fin;
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(gathered, gathered_dev_, size_t(R_) * kNotifySlotBytes,
                                      cudaMemcpyDeviceToHost, s));
    return finish_step(s, "deepep4j_notify_dispatch");
  }

 private:
  Step step(uint32_t epoch) const {
    Step st{};
    st.peers = peers_;
    st.rank = rank_, st.num_ranks = R_, st.epoch = epoch;
    st.timeout_ns = uint64_t(cfg_.timeout_ms) * 1000000ull;
    st.mailbox = mailbox_dev_;
    if (so_) st.epoch = 0, st.sticky = 1;  // the device numbers the step (kernels.h: Step)
    return st;
  }

  // This rank's vote for copy-engine transfers in the coming step: yes when the mode allows them and `plan` fits.
  // In copy_engine mode a plan that does not fit becomes the step's error (*check), reported on every rank.
  // In auto mode small steps keep the SM rings: below ~8 MiB per peer a copy-engine step costs more than it saves
  // (512 tokens x 7168 bf16 = 7.3 MiB: 101 us vs 86 us for the rings; 4096 tokens: 272 us vs 351 us).
  template <class Make>
  bool ce_wanted(Make&& make, const CePlan& plan, Check* check) {
    if (transfer_ == Transfer::kSm || !ce_.available()) return false;
    Check fit = make();
    if (fit.ok()) return transfer_ == Transfer::kCopyEngine || plan.largest_bytes >= kAutoCopyEngineBytes;
    if (transfer_ == Transfer::kCopyEngine) *check = fit;
    return false;
  }
  static constexpr int64_t kAutoCopyEngineBytes = int64_t(8) << 20;

  // The step after this rank's own checks: the barrier (with its status, vote and direct targets), then the
  // copy-engine kernels and copies when every rank voted for them, else the ring kernel. Errors of the local checks
  // win over the step's, as every rank reports its own first.
  // Stream-ordered (so_): the barrier and the ring kernel are queued behind the previous step and the call returns
  // (`complete`: after waiting, for a NULL stream); a local failure still joins the step, then breaks the buffer.
  template <class RunCopyEngine, class LaunchRings>
  int run_step(const char* call, const Check& check, bool ce_vote, const DirectTargets* direct, cudaStream_t s,
               bool complete, RunCopyEngine&& run_ce, LaunchRings&& launch_rings) {
    if (so_) {
      Step st = step(++epoch_);
      if (int e = order_step(s)) return e;
      DEEPEP4J_CUDA_TRY(launch_barrier(st, check.status, check.message.c_str(), s));
      if (check.ok()) DEEPEP4J_CUDA_TRY(launch_rings(st));
      if (int e = step_queued(s)) return e;
      if (!check.ok()) {
        broken_ = true;
        broken_reason_ = std::string(call) + " failed on rank " + std::to_string(rank_);
        return set_error(check.status, "%s", check.message.c_str());
      }
      return complete ? finish_step(s, call) : ok();
    }
    (void)complete;
    Step st = step(++epoch_);
    const int64_t t0 = now_us();
    // The barrier finishes before the data kernels are queued: see exchange_counts.
    DEEPEP4J_CUDA_TRY(launch_barrier(st, check.status, check.message.c_str(), s, ce_vote ? 1 : 0, direct));
    int fin = finish_step(s, call);
    if (check.ok() && fin == DEEPEP4J_OK) {
      if (ce_vote && !ce_veto_) {
        const int64_t t1 = now_us();
        fin = run_ce(st);
        const int64_t t2 = now_us();
        fin = finish_ce(s, fin, call);
        if (fin == DEEPEP4J_OK) ce_.print_trace(call, rank_, double(t1 - t0), double(t2 - t1), double(now_us() - t0));
      } else {
        Step traced = st;
        if (trace_.on()) {
          DEEPEP4J_CUDA_TRY(trace_.clear(s));
          traced.trace = trace_.words();
        }
        DEEPEP4J_CUDA_TRY(launch_rings(traced));
        fin = finish_step(s, call);
        if (fin == DEEPEP4J_OK && trace_.on()) trace_.print(call, rank_, channels(), s);
      }
    }
    if (!check.ok()) return set_error(check.status, "%s", check.message.c_str());
    return fin;
  }

  // Sources in this process may copy their rows straight into our recv_x, where their copy engine reaches it: the
  // address of each one's first row, published at the barrier (0 for the others).
  DirectTargets publish_direct(const CudaHandle& h, const DispatchIo& io, CePlan* plan) const {
    DirectTargets direct{};
    const CopyTarget target = ce_.copy_target(io.recv_x, cfg_.device_id);
    int64_t row = 0;
    for (int src = 0; src < R_; ++src) {
      if (src != rank_ && same_process_[src] && h.recv_counts_per_rank[src] > 0 &&
          target.reachable_from(peer_device_[src])) {
        direct.v[src] = reinterpret_cast<uint64_t>(io.recv_x + row * io.row_bytes);
        plan->direct_in |= 1ull << src;
      }
      row += h.recv_counts_per_rank[src];
    }
    return direct;
  }

  // Every source's landing zone in a region's ring area.
  int64_t zone_bytes() const { return (cfg_.buffer_bytes / R_) & ~int64_t(15); }

  // Waits for a copy-engine step: the kernels on `s`, then the copy stream (whose waits need only our own kernel).
  int finish_ce(cudaStream_t s, int queued, const char* call) {
    const std::string why = queued == DEEPEP4J_OK ? std::string() : std::string(last_error());
    int fin = finish_step(s, call);
    int copies = wait_stream(ce_.stream(), now_ms() + cfg_.timeout_ms + 1000, call);
    if (queued != DEEPEP4J_OK) {
      broken_ = true;  // peers may wait for chunks that were never queued
      broken_reason_ = std::string(call) + " could not queue its copies";
      return set_error(queued, "%s", why.c_str());
    }
    return fin != DEEPEP4J_OK ? fin : copies;
  }

  // Ring geometry for slots of `slot_bytes`: as many slots as fit (at most ring_tokens); chunks shrink to fit.
  Check rings_for(int64_t slot_bytes, Rings* out) const {
    const int C = channels();
    Rings r{};
    r.channels = C;
    r.ring_bytes = ring_bytes_of(cfg_.buffer_bytes, R_, C);  // common/slot_layout.h
    r.slot_bytes = slot_bytes;
    int64_t fit = r.ring_bytes / slot_bytes;
    if (fit < 1)
      return Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT,
                         "buffer_bytes = %" PRId64 ": too small for one %" PRId64 "-byte slot in each of %d rings; "
                         "minimum is %" PRId64 " bytes (deepep4j_buffer_size_min gives the size for full chunks)",
                         cfg_.buffer_bytes, slot_bytes, C * R_, buffer_bytes_for(slot_bytes, 1, R_, C));
    r.slots = int32_t(std::min<int64_t>(fit, cfg_.ring_tokens));
    r.chunk = std::min(r.slots, cfg_.max_send_tokens_per_chunk);
    *out = r;
    return Check{};
  }

  Transfer transfer_ = Transfer::kAuto;
  CopyEngine ce_;
  RingTrace trace_;  // config.cuda_trace for the ring kernels
  uint8_t* region_ = nullptr;
  uint8_t* gathered_dev_ = nullptr;
  cudaIpcMemHandle_t ipc_{};
  Peers peers_{};
  std::vector<void*> opened_;
  bool same_process_[DEEPEP4J_MAX_RANKS] = {};
  int32_t peer_device_[DEEPEP4J_MAX_RANKS] = {};  // device ordinals of ranks in this process
};

}  // namespace

int make_deepep_backend(int32_t rank, int32_t num_ranks, const deepep4j_config& cfg, std::unique_ptr<Backend>* out) {
  auto b = std::make_unique<DeepepBackend>(rank, num_ranks, cfg);
  if (int st = b->init()) return st;
  *out = std::move(b);
  return ok();
}

}  // namespace cuda
}  // namespace deepep4j
