// ring_trace.cu — config.cuda_trace for the ring kernels (ring_trace.h).
#include "cuda/ring_trace.h"

#include <algorithm>
#include <cstdio>

#include "cuda/cuda_util.h"
#include "cuda/kernels.h"

namespace deepep4j {
namespace cuda {

RingTrace::~RingTrace() {
  if (dev_) cudaFree(dev_);
  if (host_) cudaFreeHost(host_);
}

int RingTrace::init(int32_t num_sms) {
  blocks_ = num_sms;
  const size_t bytes = size_t(num_sms) * kTraceWords * sizeof(uint64_t);
  DEEPEP4J_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&dev_), bytes));
  DEEPEP4J_CUDA_TRY(cudaHostAlloc(reinterpret_cast<void**>(&host_), bytes, cudaHostAllocDefault));
  return DEEPEP4J_OK;
}

cudaError_t RingTrace::clear(cudaStream_t s) const {
  return cudaMemsetAsync(dev_, 0, size_t(blocks_) * kTraceWords * sizeof(uint64_t), s);
}

namespace {

// Mean over the blocks of one role that ran to their end: busy = end - start, their waits, own rows' end - start.
struct Role {
  int blocks = 0;
  double busy_us = 0, wait_us = 0, own_us = 0;
  int own_blocks = 0;
  void add(const uint64_t* w) {
    if (w[kTraceEnd] == 0 || w[kTraceStart] == 0) return;  // idle block (no peer of its role) or cut short
    ++blocks;
    busy_us += double(w[kTraceEnd] - w[kTraceStart]) / 1e3;
    wait_us += double(w[kTraceWait]) / 1e3;
    if (w[kTraceOwnEnd] != 0) ++own_blocks, own_us += double(w[kTraceOwnEnd] - w[kTraceStart]) / 1e3;
  }
  void mean() {
    if (blocks) busy_us /= blocks, wait_us /= blocks;
    if (own_blocks) own_us /= own_blocks;
  }
};

}  // namespace

void RingTrace::print(const char* call, int32_t rank, int32_t channels, cudaStream_t s) const {
  const size_t bytes = size_t(blocks_) * kTraceWords * sizeof(uint64_t);
  if (cudaMemcpyAsync(host_, dev_, bytes, cudaMemcpyDeviceToHost, s) != cudaSuccess ||
      cudaStreamSynchronize(s) != cudaSuccess) {
    cudaGetLastError();
    return;  // a trace never turns a finished step into an error
  }
  uint64_t first = UINT64_MAX, last_start = 0, end = 0;
  Role send, recv;
  for (int b = 0; b < blocks_; ++b) {
    const uint64_t* w = host_ + size_t(b) * kTraceWords;
    if (w[kTraceStart] == 0) continue;
    first = std::min(first, w[kTraceStart]);
    last_start = std::max(last_start, w[kTraceStart]);
    end = std::max(end, w[kTraceEnd]);
    (b < channels ? send : recv).add(w);
  }
  if (first == UINT64_MAX) return;
  send.mean(), recv.mean();
  char send_own[64] = "", recv_own[64] = "";
  if (send.own_blocks) std::snprintf(send_own, sizeof(send_own), ", their own rows copied by %.1f", send.own_us);
  if (recv.own_blocks) std::snprintf(recv_own, sizeof(recv_own), ", their own rows copied by %.1f", recv.own_us);
  std::fprintf(stderr,
               "deepep4j trace: %s rank %d rings: kernel %.1f us (last block started +%.1f us); %d senders busy "
               "%.1f us, %.1f of it waiting for ring room%s; %d receivers busy %.1f us, %.1f of it waiting for "
               "rows%s\n",
               call, rank, end > first ? double(end - first) / 1e3 : 0.0, double(last_start - first) / 1e3,
               send.blocks, send.busy_us, send.wait_us, send_own, recv.blocks, recv.busy_us, recv.wait_us, recv_own);
}

}  // namespace cuda
}  // namespace deepep4j
