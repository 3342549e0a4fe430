// cuda_backend.h — what the two CUDA backends share: device, host-mapped mailbox, the step epoch, the routing plan and
// the notify step up to the count exchange, which each backend does its own way (peer memory or NCCL).
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "common/backend.h"
#include "common/validate.h"
#include "cuda/handle.h"
#include "cuda/kernels.h"

namespace deepep4j {
namespace cuda {

// What a rank exports: identity, config, where its region lives (pointer + IPC handle) and, from rank 0, the NCCL id.
struct Blob {
  uint32_t magic;
  uint32_t version;
  int32_t rank, num_ranks;
  int64_t pid;
  uint64_t process_nonce;  // tells two processes with the same pid (other pid namespaces) apart
  int32_t device_id, backend;
  int64_t buffer_bytes;
  int32_t num_sms, chunk, ring_tokens, timeout_ms;
  uint64_t region;
  cudaIpcMemHandle_t ipc;
  int32_t has_nccl_id, pad;
  uint8_t nccl_id[128];
  int32_t cuda_transfer, ce_chunks;
  int32_t stream_ordered, pad2;
};
static_assert(sizeof(Blob) <= DEEPEP4J_MAX_BLOB_BYTES, "blob too large");
constexpr uint32_t kBlobMagic = 0x64657034;  // "dep4"

uint64_t process_nonce();
// Milliseconds of a steady clock: the host side of every deadline; microseconds for step timing.
int64_t now_ms();
int64_t now_us();

class CudaBackend : public Backend {
 public:
  CudaBackend(int32_t rank, int32_t num_ranks, const deepep4j_config& cfg) : rank_(rank), R_(num_ranks), cfg_(cfg) {}
  ~CudaBackend() override;
  // Device, stream, mailbox; then the backend's own resources; then every kernel loaded and the stack limit raised.
  int init();

  int get_dispatch_layout(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int32_t* per_rank,
                          int32_t* per_expert, uint8_t* in_rank, void* stream) override;
  int notify_dispatch(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int64_t hidden, int32_t dtype,
                      Handle** out_handle, int64_t* num_recv, int32_t* per_local_expert, void* stream) override;
  int sync(void* stream) override;
  int comm_wait(void* stream) override;

 protected:
  virtual int init_backend() = 0;
  // Loads the kernels this backend's steps may launch (beside the control kernels every backend launches): init then
  // raises the stack limit to their largest need, before any step (kernels.h).
  virtual cudaError_t load_step_kernels(KernelSet* k) const = 0;

  // What every dispatch / combine of the CUDA backends starts with: the buffer is not broken, the device is current,
  // the stream is picked, the arguments are checked (check holds the local verdict, which the step then exchanges)
  // and the kernels' view of the arguments is filled (pointers only when the check passed).
  template <class Io>
  struct StepStart {
    CudaHandle* h = nullptr;
    cudaStream_t s = nullptr;
    Check check;
    Io io{};
  };
  int begin_dispatch(const char* call, Handle* handle, int32_t dtype, const deepep4j_dispatch_args* a, void* stream,
                     StepStart<DispatchIo>* out);
  int begin_combine(const char* call, Handle* handle, int32_t dtype, const deepep4j_combine_args* a, void* stream,
                    StepStart<CombineIo>* out);
  // Exchanges the notify slots: sends header + counts (from h, which is NULL when the local check failed) to every rank
  // and fills gathered[R * kNotifySlotBytes] (host) with every rank's slot addressed to this rank.
  virtual int exchange_counts(const NotifyHeader& header, const CudaHandle* h, int32_t local_experts,
                              uint8_t* gathered, cudaStream_t s) = 0;

  // The caller's stream, or for NULL our own non-blocking stream ordered after the legacy default stream's work (a
  // blocking stream would make every legacy-stream call of another rank on this device wait for our spinning kernels).
  cudaStream_t pick(void* stream);
  int use_device() const;
  // Waits for `s` until the deadline (the kernels stop themselves before it); then reads and resets the mailbox.
  int finish_step(cudaStream_t s, const char* call);
  int wait_stream(cudaStream_t s, int64_t deadline_ms, const char* call);
  // Turns the mailbox into this call's status (prefix goes before the reason; stream-ordered steps keep it).
  int read_mailbox(const char* call, const char* prefix);
  // Stream-ordered mode (so_): the error an earlier queued step left in the mailbox, checked without waiting.
  int queued_error(const char* call);
  // Orders a step queued on `s` after this buffer's previous step when that one went to another stream, and records
  // where this one ends. Both leave a capturing stream alone (a graph's steps follow each other on its stream).
  int order_step(cudaStream_t s);
  int step_queued(cudaStream_t s);
  // The device arrays of a handle's routing for n tokens (and its M), allocated on `s`.
  int alloc_routing(CudaHandle* h, int64_t n, int32_t k, int32_t e, cudaStream_t s);
  int broken_check(const char* call) const;
  int channels() const { return cfg_.num_sms / 2; }
  // This rank's blob without backend-specific parts (region, IPC handle, NCCL id).
  Blob own_blob() const;
  // Checks every rank's blob (length, identity, same config) and copies them to *all.
  int read_blobs(const void* const* blobs, const size_t* lens, std::vector<Blob>* all) const;

  int32_t rank_, R_;
  deepep4j_config cfg_;
  cudaStream_t own_stream_ = nullptr;
  cudaEvent_t legacy_done_ = nullptr;
  bool so_ = false;                      // stream-ordered steps (config.stream_ordered on the deepep backend)
  cudaStream_t comm_stream_ = nullptr;   // async combine runs here
  cudaEvent_t step_done_ = nullptr;      // end of the last step queued outside a graph capture
  cudaEvent_t caller_ready_ = nullptr;   // the caller's stream, before an async combine
  cudaEvent_t comm_done_ = nullptr;      // the comm stream, for deepep4j_comm_wait
  cudaStream_t last_stream_ = nullptr;   // where step_done_ was recorded
  Mailbox* mailbox_ = nullptr;        // host view
  Mailbox* mailbox_dev_ = nullptr;    // device view
  unsigned long long* scratch_ = nullptr;  // device: the plan's first bad topk_idx index
  uint8_t* gathered_host_ = nullptr;  // pinned [R * kNotifySlotBytes]
  // Pinned: the plan's first bad index (8 bytes), send counts [R*C] and expert counts [E] read back by notify (E is
  // at most R * kMaxNotifyInts by notify's check).
  uint8_t* plan_host_ = nullptr;
  size_t plan_host_bytes() const { return 8 + size_t(R_) * (size_t(kMaxChannels) + kMaxNotifyInts) * 4; }
  uint32_t epoch_ = 1;                // last barrier epoch used (connect uses 1)
  bool broken_ = false;               // a step timed out: rings are no longer consistent
  bool ce_veto_ = false;              // the last finished barrier had a rank voting against copy-engine transfers
  uint64_t peer_direct_[DEEPEP4J_MAX_RANKS] = {};  // PeerStatus::direct each rank published to us at that barrier
  std::string broken_reason_;
};

int make_deepep_backend(int32_t rank, int32_t num_ranks, const deepep4j_config& cfg, std::unique_ptr<Backend>* out);
int make_alltoall_backend(int32_t rank, int32_t num_ranks, const deepep4j_config& cfg, std::unique_ptr<Backend>* out);

}  // namespace cuda
}  // namespace deepep4j
