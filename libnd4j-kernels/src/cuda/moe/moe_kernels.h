// moe_kernels.h — launchers of the MoE block's hand-written kernels (what cuBLAS does not do). Each queues its work on
// `s` and returns the launch error; arguments mean what the matching MoeOps method of src/moe/moe_ops.h says.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "moe/moe_ops.h"

namespace deepep4j {
namespace cuda {
namespace moe {

using deepep4j::moe::Permutation;
using deepep4j::moe::RouterBackward;
using deepep4j::moe::RouterForward;

// moe_router.cu
cudaError_t launch_router_forward(int32_t dtype, const RouterForward& r, cudaStream_t s);
cudaError_t launch_router_backward(int32_t dtype, const RouterBackward& r, cudaStream_t s);
// moe_permute.cu (offsets: device copy of Permutation::offsets)
cudaError_t launch_permutation(const Permutation& p, const int64_t* offsets_dev, cudaStream_t s);
// moe_rows.cu
cudaError_t launch_gather_rows(int32_t dtype, int64_t count, int64_t h, const void* src, int64_t src_stride,
                               const int32_t* row, const void* scale, void* dst, cudaStream_t s);
cudaError_t launch_scatter_rows(int32_t dtype, int64_t m, int32_t k, int64_t h, const int32_t* pos, const void* src,
                                const void* scale, void* out, int64_t out_stride, cudaStream_t s);
cudaError_t launch_row_dots(int32_t dtype, int64_t count, int64_t h, const void* rows, int64_t stride,
                            const int32_t* row, const void* src, void* out, cudaStream_t s);
cudaError_t launch_gather_slots(int32_t dtype, int64_t count, int32_t k, const int32_t* slot, const void* values,
                                int32_t values_dtype, int64_t stride, int64_t offset, void* out, cudaStream_t s);
cudaError_t launch_scatter_slots(int32_t dtype, int64_t m, int32_t k, const int32_t* pos, const void* src,
                                 void* values, int32_t values_dtype, int64_t stride, int64_t offset, cudaStream_t s);
cudaError_t launch_columns(bool pack, int32_t dtype, int64_t rows, int32_t k, const void* in, int32_t other_dtype,
                           int64_t stride, int64_t offset, void* out, cudaStream_t s);
// moe_accumulate.cu: c[r * ldc + j] = beta * c + alpha * product[r * n + j] for each group (fp32 C, bf16 products;
// m * n < 2^31). wide: every group passes accumulate_can_widen (8 elements per access).
struct AccumulateGroup {
  float* c;
  const __nv_bfloat16* product;
  int64_t m, n, ldc;
};
bool accumulate_can_widen(const AccumulateGroup& g);
cudaError_t launch_accumulate_groups(const AccumulateGroup* groups, int32_t count, bool wide, float alpha, float beta,
                                     cudaStream_t s);
// moe_swiglu.cu
cudaError_t launch_swiglu_forward(int32_t dtype, int64_t count, const void* a, const void* b, void* h, cudaStream_t s);
cudaError_t launch_swiglu_backward(int32_t dtype, int64_t count, const void* a, const void* b, const void* gh, void* ga,
                                   void* gb, cudaStream_t s);
// moe_optimizer.cu
cudaError_t launch_optimizer_step(int32_t dtype, int64_t count, const deepep4j_optimizer& opt, void* params,
                                  const void* grads, void* m, void* v, cudaStream_t s);

// Each file's kernels, loaded now for every dtype. With lazy module loading (CUDA's default) a kernel's first launch
// loads it and may wait for the whole device, where another rank's spinning dispatch/combine kernel may be waiting for
// this rank: so the block loads every kernel at deepep4j_moe_create, before any collective step.
cudaError_t preload_accumulate_kernels();
cudaError_t preload_optimizer_kernels();
cudaError_t preload_permute_kernels();
cudaError_t preload_router_kernels();
cudaError_t preload_rows_kernels();
cudaError_t preload_swiglu_kernels();
inline cudaError_t preload_moe_kernels() {
  for (auto f : {preload_accumulate_kernels, preload_optimizer_kernels, preload_permute_kernels, preload_router_kernels,
                 preload_rows_kernels, preload_swiglu_kernels})
    if (cudaError_t e = f()) return e;
  return cudaSuccess;
}

}  // namespace moe
}  // namespace cuda
}  // namespace deepep4j
