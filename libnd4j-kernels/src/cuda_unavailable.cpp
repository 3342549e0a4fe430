// cuda_unavailable.cpp — the CUDA factory of a build without nvcc: asking for a GPU is a clear error, never a fallback.
#include "common/backend.h"
#include "common/queue.h"
#include "moe/moe_ops.h"

namespace deepep4j {

int make_cuda_backend(int32_t, int32_t, const deepep4j_config&, std::unique_ptr<Backend>*) {
  return set_error(DEEPEP4J_ERR_UNAVAILABLE,
                   "device = DEEPEP4J_DEVICE_CUDA: this build of deepep4j has no CUDA backend (built without nvcc); "
                   "use DEEPEP4J_DEVICE_CPU or rebuild with nvcc on the PATH");
}

int cuda_device_count() { return 0; }

int make_cuda_queue(int32_t, int32_t, int32_t, int, std::unique_ptr<Queue>*) {
  return set_error(DEEPEP4J_ERR_UNAVAILABLE,
                   "deepep4j_queue on DEEPEP4J_DEVICE_CUDA: this build of deepep4j has no CUDA backend (built without nvcc)");
}

namespace moe {
int make_cuda_moe_ops(int32_t, std::unique_ptr<MoeOps>*) {
  return set_error(DEEPEP4J_ERR_UNAVAILABLE,
                   "MoE block on DEEPEP4J_DEVICE_CUDA: this build of deepep4j has no CUDA backend (built without nvcc)");
}
}  // namespace moe

}  // namespace deepep4j
