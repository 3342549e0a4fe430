// cublas_api.h — the part of cuBLAS the MoE block calls, resolved at run time from libcublas.so (like NCCL in
// nccl_api.h), so the library loads where cuBLAS is missing; the block then fails with UNAVAILABLE naming what was
// looked for. Types and enum values are those of cuBLAS 12/13 (cublas_api.h, library_types.h).
#pragma once

#include <cuda_runtime.h>

namespace deepep4j {
namespace cuda {

struct cublasContext;
typedef cublasContext* cublasHandle_t;
typedef int cublasStatus_t;  // 0 = CUBLAS_STATUS_SUCCESS
enum cublasOp : int { kCublasOpN = 0, kCublasOpT = 1 };
enum cublasDataType : int { kCudaR32F = 0, kCudaR64F = 1, kCudaR16BF = 14 };
enum cublasCompute : int { kCublasCompute32F = 68, kCublasCompute64F = 70 };
constexpr int kCublasGemmDefault = -1;

struct Cublas {
  cublasStatus_t (*Create)(cublasHandle_t*);
  cublasStatus_t (*Destroy)(cublasHandle_t);
  cublasStatus_t (*SetStream)(cublasHandle_t, cudaStream_t);
  cublasStatus_t (*SetWorkspace)(cublasHandle_t, void*, size_t);
  cublasStatus_t (*GetVersion)(cublasHandle_t, int*);
  cublasStatus_t (*GemmEx)(cublasHandle_t, int transa, int transb, int m, int n, int k, const void* alpha,
                           const void* a, int atype, int lda, const void* b, int btype, int ldb, const void* beta,
                           void* c, int ctype, int ldc, int compute, int algo);
  // NULL where the library predates it (cuBLAS < 12.5).
  cublasStatus_t (*GemmGroupedBatchedEx)(cublasHandle_t, const int* transa, const int* transb, const int* m,
                                         const int* n, const int* k, const void* alpha, const void* const* a,
                                         int atype, const int* lda, const void* const* b, int btype, const int* ldb,
                                         const void* beta, void* const* c, int ctype, const int* ldc, int group_count,
                                         const int* group_size, int compute);
  const char* library;  // the file that was loaded
};

// The loaded API, or NULL with *why saying which libraries were tried and what failed.
const Cublas* load_cublas(const char** why);

}  // namespace cuda
}  // namespace deepep4j
