// host_queue.cpp — deepep4j_queue on the CPU device: device memory is host memory and every copy is done before the
// call returns, so the queue API behaves as on a GPU minus the asynchrony (and is what CI tests it with).
#include <cinttypes>
#include <cstdlib>
#include <cstring>

#include "common/backend.h"
#include "common/queue.h"

namespace deepep4j {
namespace {

class HostQueue final : public Queue {
 public:
  explicit HostQueue(int32_t rank) : rank_(rank) {}
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
  int to_device(void* device, const void* host, int64_t bytes) override {
    std::memmove(device, host, size_t(bytes));
    return ok();
  }
  int to_host(void* host, const void* device, int64_t bytes) override {
    std::memmove(host, device, size_t(bytes));
    return ok();
  }
  int synchronize() override { return ok(); }

 private:
  int32_t rank_;
};

}  // namespace

int make_cpu_queue(int32_t rank, std::unique_ptr<Queue>* out) {
  out->reset(new HostQueue(rank));
  return ok();
}

}  // namespace deepep4j
