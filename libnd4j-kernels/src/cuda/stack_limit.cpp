// stack_limit.cpp — loading kernels at create and raising the device's stack limit to their largest need (kernels.h).
#include <algorithm>
#include <mutex>

#include "cuda/kernels.h"

namespace deepep4j {
namespace cuda {

cudaError_t KernelSet::add(std::initializer_list<const void*> kernels) {
  for (const void* f : kernels) {
    cudaFuncAttributes a{};
    if (cudaError_t e = cudaFuncGetAttributes(&a, f)) return e;
    stack_bytes = std::max(stack_bytes, a.localSizeBytes);
    entries.push_back(f);
  }
  return cudaSuccess;
}

cudaError_t cover_stack(const KernelSet& k) {
  // Ranks of one process create their buffers on threads: read and raise under one lock, so that a lower need read
  // before a higher one was set cannot lower the limit again.
  static std::mutex m;
  std::lock_guard<std::mutex> lock(m);
  size_t limit = 0;
  if (cudaError_t e = cudaDeviceGetLimit(&limit, cudaLimitStackSize)) return e;
  return k.stack_bytes > limit ? cudaDeviceSetLimit(cudaLimitStackSize, k.stack_bytes) : cudaSuccess;
}

}  // namespace cuda
}  // namespace deepep4j
