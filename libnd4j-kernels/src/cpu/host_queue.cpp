// host_queue.cpp — deepep4j_queue on the CPU device: device memory is host memory and every copy is done before the
// call returns, so the queue API behaves as on a GPU minus the asynchrony (and is what CI tests it with).
#include <cinttypes>
#include <cstdlib>
#include <cstring>

#include "common/backend.h"
#include "common/host_copy.h"
#include "common/queue.h"

namespace deepep4j {
namespace {

class HostQueue final : public Queue {
 public:
  HostQueue(int32_t rank, int copy_threads) : rank_(rank), copier_(copy_threads) {}
  void* stream() const override { return nullptr; }

  int alloc(int64_t bytes, void** out) override {
    // aligned_alloc needs a size that is a multiple of the alignment
    void* p = std::aligned_alloc(256, size_t((bytes + 255) / 256 * 256));
    if (p == nullptr)
      return set_error(DEEPEP4J_ERR_OUT_OF_MEMORY, "deepep4j_device_alloc on rank %d (CPU): %" PRId64 " bytes not available",
                       rank_, bytes);
    *out = p;
    return ok();
  }
  int release(void* device) override {
    std::free(device);
    return ok();
  }
  int to_device(void* device, const void* host, int64_t bytes) override { return copy(device, host, bytes); }
  int to_host(void* host, const void* device, int64_t bytes) override { return copy(host, device, bytes); }
  int synchronize() override { return ok(); }

 private:
  // Overlapping arrays (a caller's choice on the CPU device, where both sides are host memory) keep memmove's rule.
  int copy(void* dst, const void* src, int64_t bytes) {
    const auto* d = static_cast<const uint8_t*>(dst);
    const auto* s = static_cast<const uint8_t*>(src);
    if (d < s + bytes && s < d + bytes) std::memmove(dst, src, size_t(bytes));
    else copier_.copy(dst, src, size_t(bytes));
    return ok();
  }

  int32_t rank_;
  HostCopier copier_;
};

}  // namespace

int make_cpu_queue(int32_t rank, int copy_threads, std::unique_ptr<Queue>* out) {
  out->reset(new HostQueue(rank, copy_threads));
  return ok();
}

}  // namespace deepep4j
