// ring_trace.h — config.cuda_trace for the SM ring kernels: each block of a traced dispatch / combine notes its start,
// end, time spent waiting for peers and (dispatch) when its own rows were copied (kernels.h: TraceWord); after the
// step has finished, one line on stderr says where the kernel's time went, by role.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace deepep4j {
namespace cuda {

class RingTrace {
 public:
  RingTrace() = default;
  RingTrace(const RingTrace&) = delete;
  RingTrace& operator=(const RingTrace&) = delete;
  ~RingTrace();

  // Room for `num_sms` blocks (device words and their pinned host copy). A deepep4j status.
  int init(int32_t num_sms);
  bool on() const { return dev_ != nullptr; }
  uint64_t* words() const { return dev_; }
  // Before a traced ring kernel on `s`.
  cudaError_t clear(cudaStream_t s) const;
  // After that kernel has finished: reads the words (waiting for `s`) and prints one line; channels = sender blocks.
  void print(const char* call, int32_t rank, int32_t channels, cudaStream_t s) const;

 private:
  int32_t blocks_ = 0;
  uint64_t* dev_ = nullptr;
  uint64_t* host_ = nullptr;
};

}  // namespace cuda
}  // namespace deepep4j
