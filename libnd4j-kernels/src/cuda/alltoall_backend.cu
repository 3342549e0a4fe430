// alltoall_backend.cu — the standard way, for comparison and as a switchable alternative: counts travel by NCCL,
// rows are packed per destination, moved with grouped ncclSend/ncclRecv, and unpacked (dispatch) or reduced (combine)
// by the same slot code as the ring kernels, so results are identical. NCCL is loaded at run time.
#include <chrono>
#include <cinttypes>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>

#include "common/validate.h"
#include "cuda/cuda_backend.h"
#include "cuda/cuda_util.h"
#include "cuda/nccl_api.h"

namespace deepep4j {
namespace cuda {

namespace {

// Outcome of ncclCommInitRank, which cannot be interrupted: it runs on its own thread and whoever finishes last
// (the waiter that gave up, or the thread) cleans up.
struct InitState {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false, abandoned = false;
  ncclResult_t result = 0;
  ncclComm_t comm = nullptr;
};

class AlltoallBackend : public CudaBackend {
 public:
  using CudaBackend::CudaBackend;
  ~AlltoallBackend() override {
    if (use_device() != DEEPEP4J_OK) return;
    cudaStreamSynchronize(own_stream_);
    // Abort rather than destroy: it never waits for peers, which may be gone.
    if (comm_) nccl_->CommAbort(comm_);
    if (send_stage_) cudaFreeAsync(send_stage_, own_stream_);
    if (recv_stage_) cudaFreeAsync(recv_stage_, own_stream_);
    cudaStreamSynchronize(own_stream_);
    cudaFree(small_dev_);
    if (small_host_) cudaFreeHost(small_host_);
  }

  int export_blob(void* blob, size_t capacity, size_t* len) override {
    if (capacity < sizeof(Blob))
      return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "capacity = %zu: the blob needs %zu bytes", capacity,
                       sizeof(Blob));
    Blob b = own_blob();
    if (rank_ == 0) {
      b.has_nccl_id = 1;
      std::memcpy(b.nccl_id, &id_, sizeof(id_));
    }
    std::memcpy(blob, &b, sizeof(b));
    *len = sizeof(b);
    return ok();
  }

  int connect(const void* const* blobs, const size_t* lens) override {
    std::vector<Blob> all;
    if (int st = read_blobs(blobs, lens, &all)) return st;
    if (!all[0].has_nccl_id)
      return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "blobs[0]: carries no NCCL id (rank 0 must use backend alltoall)");
    for (int a = 0; a < R_; ++a)
      for (int b = a + 1; b < R_; ++b)
        if (all[size_t(a)].pid == all[size_t(b)].pid && all[size_t(a)].process_nonce == all[size_t(b)].process_nonce &&
            all[size_t(a)].device_id == all[size_t(b)].device_id)
          return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT,
                           "device_id = %d: ranks %d and %d both use it; backend = alltoall (NCCL) needs one GPU per "
                           "rank (backend = deepep allows ranks to share a GPU)",
                           all[size_t(a)].device_id, a, b);
    ncclUniqueId id;
    std::memcpy(&id, all[0].nccl_id, sizeof(id));
    auto state = std::make_shared<InitState>();
    const Nccl* api = nccl_;
    int device = cfg_.device_id, rank = rank_, R = R_;
    std::thread([state, api, id, device, rank, R] {
      cudaSetDevice(device);
      ncclComm_t comm = nullptr;
      ncclResult_t res = api->CommInitRank(&comm, R, id, rank);
      std::lock_guard<std::mutex> lock(state->mu);
      if (state->abandoned) {
        if (res == 0) api->CommAbort(comm);
        return;
      }
      state->done = true, state->result = res, state->comm = comm;
      state->cv.notify_all();
    }).detach();
    std::unique_lock<std::mutex> lock(state->mu);
    if (!state->cv.wait_for(lock, std::chrono::milliseconds(cfg_.timeout_ms), [&] { return state->done; })) {
      state->abandoned = true;
      return set_error(DEEPEP4J_ERR_TIMEOUT,
                       "deepep4j_buffer_connect on rank %d: NCCL communicator not formed within timeout_ms = %d "
                       "(a rank did not connect)", rank_, cfg_.timeout_ms);
    }
    if (state->result != 0)
      return set_error(DEEPEP4J_ERR_INTERNAL, "deepep4j_buffer_connect: ncclCommInitRank: %s",
                       nccl_->GetErrorString(state->result));
    comm_ = state->comm;
    return ok();
  }

  int dispatch(Handle* handle, int32_t dtype, const deepep4j_dispatch_args* a, void* stream) override {
    const char* call = "deepep4j_dispatch";
    StepStart<DispatchIo> b;
    if (int st = begin_dispatch(call, handle, dtype, a, stream, &b)) return st;
    CudaHandle* h = b.h;
    const DispatchIo& io = b.io;
    cudaStream_t s = b.s;
    const int64_t slot = DispatchSlot::make(io.row_bytes, h->num_topk, io.num_scales).bytes;
    RankBases to{}, from{};
    int64_t sent = 0, recvd = 0;
    blocks(*h, &to, &sent, &from, &recvd);
    if (int st = reserve(sent * slot, recvd * slot, s)) return st;
    if (b.check.ok()) DEEPEP4J_CUDA_TRY(launch_a2a_pack_dispatch(h->r, R_, io, to, send_stage_, slot, s));
    auto count_to = [&](int d) { return (d + 1 < R_ ? to.v[d + 1] : sent) - to.v[d]; };
    auto count_from = [&](int r) { return (r + 1 < R_ ? from.v[r + 1] : recvd) - from.v[r]; };
    if (int st = exchange(b.check, slot, to, count_to, from, count_from, s, call)) return st;
    if (!b.check.ok()) return set_error(b.check.status, "%s", b.check.message.c_str());
    if (int st = peer_verdict(call)) return st;
    DEEPEP4J_CUDA_TRY(launch_a2a_unpack_dispatch(h->r, R_, recvd, io, from, recv_stage_, slot, s));
    if (int st = wait(s, call)) return st;
    h->dispatched = true;
    return ok();
  }

  int combine(Handle* handle, int32_t dtype, const deepep4j_combine_args* a, void* stream) override {
    const char* call = "deepep4j_combine";
    StepStart<CombineIo> b;
    if (int st = begin_combine(call, handle, dtype, a, stream, &b)) return st;
    CudaHandle* h = b.h;
    const CombineIo& io = b.io;
    cudaStream_t s = b.s;
    const int64_t slot = CombineSlot::make(io.row_bytes, h->num_topk).bytes;
    // Combine runs the dispatch's blocks backwards: rows go back to their sources, tokens come home from the ranks.
    RankBases to{}, from{};
    int64_t sent = 0, recvd = 0;
    blocks(*h, &from, &recvd, &to, &sent);
    if (int st = reserve(sent * slot, recvd * slot, s)) return st;
    if (b.check.ok()) DEEPEP4J_CUDA_TRY(launch_a2a_pack_combine(h->r, sent, io, send_stage_, slot, s));
    auto count_to = [&](int d) { return (d + 1 < R_ ? to.v[d + 1] : sent) - to.v[d]; };
    auto count_from = [&](int r) { return (r + 1 < R_ ? from.v[r + 1] : recvd) - from.v[r]; };
    if (int st = exchange(b.check, slot, to, count_to, from, count_from, s, call)) return st;
    if (!b.check.ok()) return set_error(b.check.status, "%s", b.check.message.c_str());
    if (int st = peer_verdict(call)) return st;
    DEEPEP4J_CUDA_TRY(launch_a2a_reduce_combine(h->r, R_, io, from, recv_stage_, slot, s));
    return wait(s, call) == DEEPEP4J_OK ? ok() : DEEPEP4J_ERR_TIMEOUT;
  }

 protected:
  int init_backend() override {
    const char* why = "";
    nccl_ = load_nccl(&why);
    if (nccl_ == nullptr)
      return set_error(DEEPEP4J_ERR_UNAVAILABLE,
                       "backend = alltoall: NCCL is not available (%s); install NCCL 2 (libnccl.so.2) or use "
                       "backend = deepep",
                       why);
    if (rank_ == 0) {
      ncclResult_t r = nccl_->GetUniqueId(&id_);
      if (r != 0) return set_error(DEEPEP4J_ERR_INTERNAL, "ncclGetUniqueId: %s", nccl_->GetErrorString(r));
    }
    // Small exchange area: [R] status words out and in, then [R] notify slots out and in.
    small_bytes_ = 2 * size_t(R_) * (4 + kNotifySlotBytes);
    DEEPEP4J_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&small_dev_), small_bytes_));
    DEEPEP4J_CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&small_host_), small_bytes_, cudaHostAllocDefault));
    return ok();
  }

  cudaError_t load_step_kernels(KernelSet* k) const override { return load_a2a_kernels(R_, k); }

  int exchange_counts(const NotifyHeader& header, const CudaHandle* h, int32_t L, uint8_t* gathered,
                      cudaStream_t s) override {
    const char* call = "deepep4j_notify_dispatch";
    uint8_t* out_host = small_host_;
    const int C = channels();
    std::memset(out_host, 0, size_t(R_) * kNotifySlotBytes);
    for (int d = 0; d < R_; ++d) {
      uint8_t* slot = out_host + size_t(d) * kNotifySlotBytes;
      std::memcpy(slot, &header, sizeof(header));
      int32_t* ints = reinterpret_cast<int32_t*>(slot + sizeof(NotifyHeader));
      if (h == nullptr) continue;
      for (int c = 0; c < C; ++c) ints[c] = h->send_counts_host[size_t(d) * C + c];
      for (int j = 0; j < L; ++j) ints[C + j] = h->expert_counts_host[size_t(d) * L + j];
    }
    uint8_t* out_dev = small_dev_;
    uint8_t* in_dev = small_dev_ + size_t(R_) * kNotifySlotBytes;
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(out_dev, out_host, size_t(R_) * kNotifySlotBytes, cudaMemcpyHostToDevice, s));
    if (int st = nccl_check(nccl_->GroupStart(), "ncclGroupStart")) return st;
    for (int r = 0; r < R_; ++r) {
      if (int st = nccl_check(nccl_->Send(out_dev + size_t(r) * kNotifySlotBytes, kNotifySlotBytes, kNcclUint8, r,
                                          comm_, s), "ncclSend"))
        return st;
      if (int st = nccl_check(nccl_->Recv(in_dev + size_t(r) * kNotifySlotBytes, kNotifySlotBytes, kNcclUint8, r,
                                          comm_, s), "ncclRecv"))
        return st;
    }
    if (int st = nccl_check(nccl_->GroupEnd(), "ncclGroupEnd")) return st;
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(gathered, in_dev, size_t(R_) * kNotifySlotBytes, cudaMemcpyDeviceToHost, s));
    return wait(s, call);
  }

 private:
  int nccl_check(ncclResult_t r, const char* what) {
    if (r == 0) return DEEPEP4J_OK;
    return set_error(DEEPEP4J_ERR_INTERNAL, "%s: %s", what, nccl_->GetErrorString(r));
  }

  // NCCL kernels never give up by themselves: past the deadline the communicator is aborted, which ends them.
  int wait(cudaStream_t s, const char* call) {
    int st = wait_stream(s, now_ms() + cfg_.timeout_ms, call);
    if (st == DEEPEP4J_ERR_TIMEOUT && comm_) {
      std::string msg = last_error();
      nccl_->CommAbort(comm_);
      comm_ = nullptr;
      return set_error(DEEPEP4J_ERR_TIMEOUT, "%s (NCCL all-to-all: a peer did not take part; communicator aborted)",
                       msg.c_str());
    }
    return st;
  }

  // Slot blocks of a dispatch: what this rank sends to each d (stream order) and receives from each source.
  void blocks(const CudaHandle& h, RankBases* to, int64_t* sent, RankBases* from, int64_t* recvd) const {
    const int C = channels();
    *sent = 0, *recvd = 0;
    for (int d = 0; d < R_; ++d) {
      to->v[d] = *sent;
      for (int c = 0; c < C; ++c) *sent += h.send_counts_host[size_t(d) * C + c];
      from->v[d] = *recvd;
      *recvd += h.recv_counts_per_rank[d];
    }
  }

  // Grows the staging buffers, stream-ordered (no device-wide sync that could wait on another rank's kernels).
  int reserve(int64_t send_bytes, int64_t recv_bytes, cudaStream_t s) {
    if (send_bytes > send_cap_) {
      if (send_stage_) cudaFreeAsync(send_stage_, s);
      send_stage_ = nullptr, send_cap_ = 0;
      DEEPEP4J_CUDA_TRY(cudaMallocAsync(reinterpret_cast<void**>(&send_stage_), size_t(send_bytes), s));
      send_cap_ = send_bytes;
    }
    if (recv_bytes > recv_cap_) {
      if (recv_stage_) cudaFreeAsync(recv_stage_, s);
      recv_stage_ = nullptr, recv_cap_ = 0;
      DEEPEP4J_CUDA_TRY(cudaMallocAsync(reinterpret_cast<void**>(&recv_stage_), size_t(recv_bytes), s));
      recv_cap_ = recv_bytes;
    }
    return DEEPEP4J_OK;
  }

  // One NCCL group: every rank's status word plus its blocks. A rank whose local check failed still sends (unpacked)
  // blocks of the agreed sizes so nobody waits; the statuses then say who failed before any output is written.
  template <class To, class From>
  int exchange(const Check& check, int64_t slot, const RankBases& to, To count_to, const RankBases& from,
               From count_from, cudaStream_t s, const char* call) {
    int32_t* status_host = reinterpret_cast<int32_t*>(small_host_);
    int32_t* status_out = reinterpret_cast<int32_t*>(small_dev_ + 2 * size_t(R_) * kNotifySlotBytes);
    int32_t* status_in = status_out + R_;
    for (int r = 0; r < R_; ++r) status_host[r] = check.status;
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(status_out, status_host, size_t(R_) * 4, cudaMemcpyHostToDevice, s));
    if (int st = nccl_check(nccl_->GroupStart(), "ncclGroupStart")) return st;
    for (int r = 0; r < R_; ++r) {
      if (int st = nccl_check(nccl_->Send(status_out + r, 1, kNcclInt32, r, comm_, s), "ncclSend")) return st;
      if (int st = nccl_check(nccl_->Recv(status_in + r, 1, kNcclInt32, r, comm_, s), "ncclRecv")) return st;
      if (count_to(r) > 0)
        if (int st = nccl_check(nccl_->Send(send_stage_ + to.v[r] * slot, size_t(count_to(r) * slot), kNcclUint8, r,
                                            comm_, s), "ncclSend"))
          return st;
      if (count_from(r) > 0)
        if (int st = nccl_check(nccl_->Recv(recv_stage_ + from.v[r] * slot, size_t(count_from(r) * slot),
                                            kNcclUint8, r, comm_, s), "ncclRecv"))
          return st;
    }
    if (int st = nccl_check(nccl_->GroupEnd(), "ncclGroupEnd")) return st;
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(status_host + R_, status_in, size_t(R_) * 4, cudaMemcpyDeviceToHost, s));
    return wait(s, call);
  }

  int peer_verdict(const char* call) const {
    const int32_t* in = reinterpret_cast<const int32_t*>(small_host_) + R_;
    for (int r = 0; r < R_; ++r)
      if (in[r] != 0)
        return set_error(DEEPEP4J_ERR_PEER_ERROR, "%s on rank %d: rank %d reported %s", call, rank_, r,
                         deepep4j_status_name(in[r]));
    return DEEPEP4J_OK;
  }

  const Nccl* nccl_ = nullptr;
  ncclUniqueId id_{};
  ncclComm_t comm_ = nullptr;
  uint8_t* send_stage_ = nullptr;
  uint8_t* recv_stage_ = nullptr;
  int64_t send_cap_ = 0, recv_cap_ = 0;
  uint8_t* small_dev_ = nullptr;
  uint8_t* small_host_ = nullptr;
  size_t small_bytes_ = 0;
};

}  // namespace

int make_alltoall_backend(int32_t rank, int32_t num_ranks, const deepep4j_config& cfg, std::unique_ptr<Backend>* out) {
  auto b = std::make_unique<AlltoallBackend>(rank, num_ranks, cfg);
  if (int st = b->init()) return st;
  *out = std::move(b);
  return ok();
}

}  // namespace cuda
}  // namespace deepep4j
