// device_queue.cu — deepep4j_queue on a GPU: a non-blocking stream, device arrays from a pool of its own (stream
// ordered, kept cached between steps), and host arrays staged through pinned memory in chunks so the host copy of a
// chunk (by the queue's copy threads, HostCopier) overlaps the transfer of the one before. Nothing here waits for the whole device: on a GPU shared by ranks a
// device-wide wait (cudaFree, cudaDeviceSynchronize) could wait for a peer's kernel that spins until this rank comes.
#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstring>
#include <thread>
#include <vector>

#include "common/host_copy.h"
#include "common/queue.h"
#include "cuda_util.h"

namespace deepep4j {
namespace {

// staging chunk: small enough to overlap, large enough for full PCIe rate; times the copy threads, so each thread's
// share of a chunk stays >= 1 MiB
constexpr size_t kChunkPerThread = size_t(1) << 20;
constexpr size_t kMinChunk = size_t(4) << 20;
constexpr size_t kFirstBlock = size_t(16) << 20;

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

class DeviceQueue final : public Queue {
 public:
  DeviceQueue(int32_t rank, int32_t device, int32_t timeout_ms, int copy_threads)
      : rank_(rank), device_(device), timeout_ms_(timeout_ms), copier_(copy_threads),
        chunk_(std::max(kMinChunk, size_t(copier_.threads()) * kChunkPerThread)) {}

  ~DeviceQueue() override {
    cudaSetDevice(device_);
    if (stream_) wait_for([&] { return cudaStreamQuery(stream_); }, "deepep4j_queue_destroy");
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    if (stream_) cudaStreamDestroy(stream_);
    if (pool_) cudaMemPoolDestroy(pool_);  // deferred by CUDA until arrays still allocated from it are freed
    for (auto& b : blocks_) cudaFreeHost(b.first);
  }

  int init() {
    DEEPEP4J_CUDA_TRY(cudaSetDevice(device_));
    DEEPEP4J_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    cudaMemPoolProps props = {};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device_;
    DEEPEP4J_CUDA_TRY(cudaMemPoolCreate(&pool_, &props));
    uint64_t keep = UINT64_MAX;  // a step's arrays come back every step: keep them instead of returning them to the OS
    DEEPEP4J_CUDA_TRY(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep));
    return ok();
  }

  void* stream() const override { return stream_; }

  int alloc(int64_t bytes, void** out) override {
    DEEPEP4J_CUDA_TRY(cudaSetDevice(device_));
    cudaError_t e = cudaMallocFromPoolAsync(out, size_t(bytes), pool_, stream_);
    if (e == cudaErrorMemoryAllocation)
      return set_error(DEEPEP4J_ERR_OUT_OF_MEMORY, "deepep4j_device_alloc on rank %d (GPU %d): %" PRId64
                       " bytes not available on the device", rank_, device_, bytes);
    return cuda_status(e, "deepep4j_device_alloc: cudaMallocFromPoolAsync");
  }

  int release(void* device) override {
    DEEPEP4J_CUDA_TRY(cudaSetDevice(device_));
    return cuda_status(cudaFreeAsync(device, stream_), "deepep4j_device_free: cudaFreeAsync");
  }

  int to_device(void* device, const void* host, int64_t bytes) override {
    DEEPEP4J_CUDA_TRY(cudaSetDevice(device_));
    for (size_t off = 0; off < size_t(bytes); off += chunk_) {
      const size_t n = std::min(chunk_, size_t(bytes) - off);
      uint8_t* stage = nullptr;
      if (int st = take(n, &stage)) return st;
      copier_.copy(stage, static_cast<const uint8_t*>(host) + off, n);
      DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(static_cast<uint8_t*>(device) + off, stage, n, cudaMemcpyHostToDevice, stream_));
    }
    return ok();
  }

  int to_host(void* host, const void* device, int64_t bytes) override {
    DEEPEP4J_CUDA_TRY(cudaSetDevice(device_));
    for (size_t off = 0; off < size_t(bytes); off += chunk_) {
      const size_t n = std::min(chunk_, size_t(bytes) - off);
      uint8_t* stage = nullptr;
      if (int st = take(n, &stage)) return st;
      DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(stage, static_cast<const uint8_t*>(device) + off, n, cudaMemcpyDeviceToHost,
                                        stream_));
      cudaEvent_t done = nullptr;
      if (int st = next_event(&done)) return st;
      DEEPEP4J_CUDA_TRY(cudaEventRecord(done, stream_));
      pending_.push_back({static_cast<uint8_t*>(host) + off, stage, n, done});
    }
    return ok();
  }

  int synchronize() override {
    DEEPEP4J_CUDA_TRY(cudaSetDevice(device_));
    int st = DEEPEP4J_OK;
    // Chunk by chunk: the host copy of one overlaps the transfer of the next.
    for (const Pending& p : pending_) {
      st = wait_for([&] { return cudaEventQuery(p.done); }, "deepep4j_queue_synchronize");
      if (st != DEEPEP4J_OK) break;
      copier_.copy(p.host, p.stage, p.bytes);
    }
    if (st == DEEPEP4J_OK) st = wait_for([&] { return cudaStreamQuery(stream_); }, "deepep4j_queue_synchronize");
    pending_.clear();
    used_events_ = 0;
    block_ = 0;
    block_used_ = 0;
    return st;
  }

 private:
  struct Pending {
    uint8_t* host;
    const uint8_t* stage;
    size_t bytes;
    cudaEvent_t done;
  };

  // Pinned staging for `bytes`, valid until the next synchronize (regions are never reused before it). Blocks grow
  // geometrically and are kept: cudaFreeHost may wait for the whole device.
  int take(size_t bytes, uint8_t** out) {
    bytes = (bytes + 255) / 256 * 256;
    while (block_ < blocks_.size() && block_used_ + bytes > blocks_[block_].second) ++block_, block_used_ = 0;
    if (block_ == blocks_.size()) {
      size_t size = std::max(bytes, blocks_.empty() ? kFirstBlock : 2 * blocks_.back().second);
      void* p = nullptr;
      cudaError_t e = cudaHostAlloc(&p, size, cudaHostAllocDefault);
      if (e != cudaSuccess)
        return set_error(DEEPEP4J_ERR_OUT_OF_MEMORY, "deepep4j_queue of rank %d (GPU %d): %zu bytes of pinned host "
                         "staging not available (%s)", rank_, device_, size, cudaGetErrorString(e));
      blocks_.push_back({static_cast<uint8_t*>(p), size});
      block_used_ = 0;
    }
    *out = blocks_[block_].first + block_used_;
    block_used_ += bytes;
    return ok();
  }

  int next_event(cudaEvent_t* out) {
    if (used_events_ == events_.size()) {
      cudaEvent_t e = nullptr;
      DEEPEP4J_CUDA_TRY(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
      events_.push_back(e);
    }
    *out = events_[used_events_++];
    return ok();
  }

  // Polls `query` until it is no longer cudaErrorNotReady or the buffer's timeout has passed.
  template <class Query>
  int wait_for(Query query, const char* call) {
    const int64_t deadline = now_ms() + timeout_ms_;
    for (int spins = 0;; ++spins) {
      cudaError_t e = query();
      if (e != cudaErrorNotReady) return cuda_status(e, call);
      if (now_ms() > deadline)
        return set_error(DEEPEP4J_ERR_TIMEOUT, "%s on rank %d (GPU %d): the queue's work did not finish within "
                         "timeout_ms = %d", call, rank_, device_, timeout_ms_);
      if (spins > 1000) std::this_thread::sleep_for(std::chrono::microseconds(20));
      else std::this_thread::yield();
    }
  }

  int32_t rank_, device_, timeout_ms_;
  HostCopier copier_;
  size_t chunk_;
  cudaStream_t stream_ = nullptr;
  cudaMemPool_t pool_ = nullptr;
  std::vector<std::pair<uint8_t*, size_t>> blocks_;
  size_t block_ = 0, block_used_ = 0;
  std::vector<cudaEvent_t> events_;
  size_t used_events_ = 0;
  std::vector<Pending> pending_;
};

}  // namespace

int make_cuda_queue(int32_t rank, int32_t device_id, int32_t timeout_ms, int copy_threads,
                    std::unique_ptr<Queue>* out) {
  auto q = std::make_unique<DeviceQueue>(rank, device_id, timeout_ms, copy_threads);
  if (int st = q->init()) return st;
  *out = std::move(q);
  return ok();
}

}  // namespace deepep4j
