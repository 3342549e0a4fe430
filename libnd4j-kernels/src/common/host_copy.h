// host_copy.h — copies between a caller's host arrays and pinned staging with several threads
// (config.host_copy_threads). One thread's memcpy runs at ~6 GB/s on the GPU machines, far below what the host link
// carries (~50 GB/s pinned), so with one thread the memcpy, not the transfer, would set the speed of host-array
// staging (queues, the MoE block's HOST memory). Used by one caller thread at a time (the rank's).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "../cpu/worker_pool.h"

namespace deepep4j {

class HostCopier {
 public:
  // Below this many bytes per thread a copy is not split: waking a thread costs more than it saves.
  static constexpr size_t kMinSlice = size_t(256) << 10;

  explicit HostCopier(int threads) : threads_(std::max(1, threads)) {}

  // config.host_copy_threads: 0 = automatic, the cores shared by the process's ranks (at most 8 per rank).
  static int resolve(int32_t setting, int32_t num_ranks) {
    if (setting > 0) return setting;
    const int hw = int(std::max(1u, std::thread::hardware_concurrency()));
    return std::max(1, std::min(8, hw / std::max(1, int(num_ranks))));
  }

  int threads() const { return threads_; }

  // memcpy(dst, src, bytes) cut into up to threads() slices copied at once; returns when all are done.
  void copy(void* dst, const void* src, size_t bytes) {
    const size_t slices = std::min(size_t(threads_), bytes / kMinSlice);
    if (slices <= 1) {
      std::memcpy(dst, src, bytes);
      return;
    }
    if (!pool_) pool_ = std::make_unique<cpu::WorkerPool>(threads_);  // threads start at the first large copy
    const size_t per = ((bytes + slices - 1) / slices + 63) / 64 * 64;
    auto* d = static_cast<uint8_t*>(dst);
    auto* s = static_cast<const uint8_t*>(src);
    pool_->run([&](int t) {
      const size_t off = size_t(t) * per;
      if (off < bytes) std::memcpy(d + off, s + off, std::min(per, bytes - off));
    });
  }

 private:
  int threads_;
  std::unique_ptr<cpu::WorkerPool> pool_;
};

}  // namespace deepep4j
