// nccl_api.h — the part of NCCL's C API the all-to-all backend calls, resolved at run time from libnccl.so.2 so the
// library loads (and the deepep backend works) on machines without NCCL.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace deepep4j {
namespace cuda {

struct ncclComm;
typedef ncclComm* ncclComm_t;
struct ncclUniqueId {
  char internal[128];
};
typedef int ncclResult_t;  // 0 = ncclSuccess
constexpr int kNcclUint8 = 1;
constexpr int kNcclInt32 = 2;

struct Nccl {
  ncclResult_t (*GetUniqueId)(ncclUniqueId*);
  ncclResult_t (*CommInitRank)(ncclComm_t*, int, ncclUniqueId, int);
  ncclResult_t (*CommDestroy)(ncclComm_t);
  ncclResult_t (*CommAbort)(ncclComm_t);
  ncclResult_t (*Send)(const void*, size_t, int, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*Recv)(void*, size_t, int, int, ncclComm_t, cudaStream_t);
  ncclResult_t (*GroupStart)();
  ncclResult_t (*GroupEnd)();
  const char* (*GetErrorString)(ncclResult_t);
};

// The loaded API, or NULL with *why saying what failed (dlopen / dlsym message).
const Nccl* load_nccl(const char** why);

}  // namespace cuda
}  // namespace deepep4j
