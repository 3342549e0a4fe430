// cuda_util.h — CUDA error checks that become deepep4j statuses, and the few PTX memory operations the rings rely on.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "common/backend.h"

namespace deepep4j {

// Turns a CUDA error into DEEPEP4J_ERR_INTERNAL (or OUT_OF_MEMORY) naming the call.
inline int cuda_status(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return DEEPEP4J_OK;
  if (e == cudaErrorMemoryAllocation)
    return set_error(DEEPEP4J_ERR_OUT_OF_MEMORY, "%s: device allocation failed (%s); use a smaller buffer_bytes", what,
                     cudaGetErrorString(e));
  return set_error(DEEPEP4J_ERR_INTERNAL, "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

#define DEEPEP4J_CUDA_TRY(call)                                       \
  do {                                                                \
    int st_ = ::deepep4j::cuda_status((call), #call);                 \
    if (st_ != DEEPEP4J_OK) return st_;                               \
  } while (0)

#ifdef __CUDACC__
// System-scope acquire load / release store: counters and flags are read and written across GPUs.
__device__ __forceinline__ uint32_t ld_acquire_sys(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ unsigned long long ld_acquire_sys64(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
// Nanoseconds of the GPU's global timer: every spinning wait compares it with its deadline.
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
// Named barrier for a group of warps inside a block (ids 1..15; 0 is __syncthreads).
__device__ __forceinline__ void group_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// 16-byte load that skips L1: ring slots are rewritten by peers, so L1 copies could be stale.
__device__ __forceinline__ int4 ld_cg16(const void* p) { return __ldcg(reinterpret_cast<const int4*>(p)); }
#endif

}  // namespace deepep4j
