// factory.cu — the CUDA entry points of the backend seam: device count and the backend a config asks for.
#include "cuda/cuda_backend.h"

namespace deepep4j {

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

int make_cuda_backend(int32_t rank, int32_t num_ranks, const deepep4j_config& cfg, std::unique_ptr<Backend>* out) {
  if (cuda_device_count() == 0)
    return set_error(DEEPEP4J_ERR_UNAVAILABLE,
                     "device = DEEPEP4J_DEVICE_CUDA: no CUDA device is visible (driver missing or no GPU); use "
                     "DEEPEP4J_DEVICE_CPU");
  if (cfg.backend == DEEPEP4J_BACKEND_ALLTOALL) return cuda::make_alltoall_backend(rank, num_ranks, cfg, out);
  return cuda::make_deepep_backend(rank, num_ranks, cfg, out);
}

}  // namespace deepep4j
