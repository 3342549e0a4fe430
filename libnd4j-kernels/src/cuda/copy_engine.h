// copy_engine.h — copy-engine transfers for the NVLink backend. Each step's rows between two GPUs move in a few large
// cudaMemcpyAsync copies on a copy stream of this rank, into the receiver's landing zone; stream memory waits
// (cuStreamWaitValue32) start each copy as soon as the packing kernel has counted its chunk, and a 4-byte copy of the
// step's epoch after each chunk tells the receiver (a one-thread kernel or cuStreamWriteValue32 there were slower). SMs only pack, unpack and reduce in local memory, so few SMs reach NVLink speed.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common/validate.h"
#include "cuda/handle.h"
#include "cuda/kernels.h"

namespace deepep4j {
namespace cuda {

// config.cuda_transfer: how the NVLink backend moves rows.
enum class Transfer {
  kAuto,        // copy engines when every rank's step fits its landing zones, else the SM rings
  kSm,          // always the SM ring kernels (chunked through rings of ring_tokens slots)
  kCopyEngine,  // copy engines; a step that does not fit fails instead of using the rings
};
// The mode of a config (checked by check_config).
Transfer transfer_of(const deepep4j_config& cfg);

// Memory a peer's copy engine may be asked to write into: plain device memory of `device`, or memory of a
// stream-ordered pool, which other devices reach only where its owner granted them access (cudaMemPoolSetAccess).
struct CopyTarget {
  bool device_memory = false;
  int device = -1;
  cudaMemPool_t pool = nullptr;  // null for plain device memory
  bool reachable_from(int peer_device) const;
};

class CopyEngine {
 public:
  ~CopyEngine();
  // Copy stream, event and counters on the current device; finds cuStreamWaitValue32. Without it (old driver) the
  // engine is unavailable and says why, which is not an error of init.
  // chunks: config.ce_chunks (copies per peer and step); trace: config.cuda_trace.
  int init(int32_t num_ranks, int32_t chunks, bool trace);
  bool available() const { return wait_value32_ != nullptr; }
  const std::string& unavailable_reason() const { return unavailable_; }
  cudaStream_t stream() const { return stream_; }
  // What `p` is, as a target for peers' copy engines (not device memory of `device`: reachable from no one).
  CopyTarget copy_target(const void* p, int device) const;

  // Plans a step for rank `me`: rows and chunks per peer, staging grown to fit. Fails (naming buffer_bytes) when a
  // peer's rows do not fit the landing zone of zone_bytes, or when staging cannot be allocated.
  Check plan_dispatch(const CudaHandle& h, int32_t me, int64_t row_bytes, const DispatchSlot& meta, int64_t zone_bytes,
                      CePlan* out);
  Check plan_combine(const CudaHandle& h, int32_t me, int64_t row_bytes, int64_t zone_bytes, CePlan* out);

  // Queue a planned step: kernels on `s`, copies and arrival signals on the copy stream. The caller then waits for
  // both streams.
  // direct[d]: where d's recv_x takes this rank's rows (0: its landing zone), as d published at the barrier.
  int run_dispatch(const Step& st, const CePlan& plan, const CudaHandle& h, const DispatchIo& io, int64_t meta_bytes,
                   const uint64_t* direct, int32_t num_sms, cudaStream_t s);
  int run_combine(const Step& st, const CePlan& plan, const CudaHandle& h, const CombineIo& io, int32_t num_sms,
                  cudaStream_t s);

  // config.cuda_trace = 1: after a finished step, one line on stderr with where its time went (host phases given by
  // the caller; kernel and every copy-engine chunk from CUDA events), so a slow step shows what bounds it.
  void print_trace(const char* call, int32_t rank, double barrier_us, double enqueue_us, double total_us);

 private:
  Check grow_staging(int64_t bytes);
  void plan_chunks(const CudaHandle& h, CePlan* p) const;
  // A plan's step-independent parts; then its staging of `bytes`, and the finished plan into *out.
  CePlan new_plan(const CudaHandle& h, int64_t zone_bytes) const;
  Check attach_staging(int64_t bytes, CePlan p, CePlan* out);
  int wait_packed(uint32_t* counter, uint32_t count);
  // Queues the arrival word of chunk j for peer d (after the chunk's copy on the copy stream).
  int signal(const Step& st, int d, int j);

  int32_t R_ = 0;
  cudaStream_t stream_ = nullptr;
  cudaEvent_t reset_done_ = nullptr;
  uint32_t* packed_ = nullptr;  // device [kMaxCeChunks] token counts, then the epoch word
  int chunks_ = 4;  // config.ce_chunks: copies per peer and step (channel groups); ~16 MiB each at 4096 tokens
  cudaMemPool_t pool_ = nullptr;  // staging only: no other device maps it
  uint8_t* staging_ = nullptr;
  int64_t staging_bytes_ = 0;
  void* wait_value32_ = nullptr;  // the driver's cuStreamWaitValue32
  void* get_attribute_ = nullptr;  // the driver's cuPointerGetAttribute
  std::string unavailable_;
  void trace_chunk(int64_t bytes);  // after chunk copies are queued (tracing only)
  bool trace_ = false;
  cudaEvent_t kernel_begin_ = nullptr, kernel_end_ = nullptr, copies_begin_ = nullptr;
  cudaEvent_t chunk_end_[kMaxCeChunks + 1] = {};
  int64_t chunk_bytes_[kMaxCeChunks + 1] = {};
  int traced_chunks_ = 0;
};

}  // namespace cuda
}  // namespace deepep4j
