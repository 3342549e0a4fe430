// queue.h — the internal side of deepep4j_queue (device arrays and host staging, see the header): one interface,
// a CPU implementation (src/cpu/host_queue.cpp: host memory, copies done at once) and a CUDA one
// (src/cuda/device_queue.cu: a non-blocking stream, stream-ordered allocations, chunked pinned staging).
#pragma once

#include <cstdint>
#include <memory>

#include "deepep4j.h"

namespace deepep4j {

class Queue {
 public:
  virtual ~Queue() = default;
  virtual void* stream() const = 0;  // cudaStream_t, or NULL on CPU
  virtual int alloc(int64_t bytes, void** out) = 0;
  virtual int release(void* device) = 0;
  virtual int to_device(void* device, const void* host, int64_t bytes) = 0;
  virtual int to_host(void* host, const void* device, int64_t bytes) = 0;
  virtual int synchronize() = 0;
};

// rank and timeout_ms name the queue in errors and bound its waits; copy_threads copy host arrays (HostCopier).
int make_cpu_queue(int32_t rank, int copy_threads, std::unique_ptr<Queue>* out);
int make_cuda_queue(int32_t rank, int32_t device_id, int32_t timeout_ms, int copy_threads, std::unique_ptr<Queue>* out);

}  // namespace deepep4j

// The opaque queue of the C API.
struct deepep4j_queue {
  const deepep4j_buffer* owner = nullptr;
  std::unique_ptr<deepep4j::Queue> impl;
};
