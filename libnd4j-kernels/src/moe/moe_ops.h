// moe_ops.h — the per-device compute the MoE block (moe_block.cpp) is written against: memory, GEMMs and the few
// kernels cuBLAS does not provide. The CPU implementation (src/cpu/moe_ops_cpu.cpp) is the reference: plain loops,
// fp32 accumulation for fp32/bf16, fp64 for fp64. The CUDA one (src/cuda/moe_ops_cuda.cu) queues everything on the
// stream set by set_stream. Matrices are row-major. "acc" arrays are fp32, or fp64 when the block's dtype is FLOAT64.
// Every method returns a deepep4j_status and has set the error message on failure.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

#include "deepep4j.h"

namespace deepep4j {
namespace moe {

// One product of a (grouped) GEMM: C[m,n] = alpha * op(A) op(B) + beta * C.
struct GemmGroup {
  int64_t m, n, k;
  const void* a;
  const void* b;
  void* c;
};

// What the groups of one call share. op(A) is [m,k]: A is stored [m,k] (lda >= k) or, trans_a, [k,m] (lda >= m);
// likewise B. ab_dtype is the block's dtype; c_dtype the block's dtype or the acc type.
struct GemmDesc {
  bool trans_a = false, trans_b = false;
  int32_t ab_dtype = DEEPEP4J_FLOAT32, c_dtype = DEEPEP4J_FLOAT32;
  int64_t lda = 0, ldb = 0, ldc = 0;
  double alpha = 1.0, beta = 0.0;
};

struct RouterForward {
  int64_t n;
  int32_t e, k;
  int32_t score_function;
  int32_t normalize;
  void* scores;                   // [N,E] acc: logits in, scores out
  const float* bias;              // [E] or NULL
  const int64_t* replay;          // [N,K] or NULL
  int64_t* topk_idx;              // [N,K]
  void* gate;                     // [N,K] acc: chosen scores
  void* weights;                  // [N,K] acc
  float* weights_f32;             // [N,K] fp32 copy for dispatch
  void* gate_sum;                 // [N] acc
  int32_t* load;                  // [E] assignments per expert
  void* prob_sum;                 // [E] acc: sum over tokens of scores
};

struct RouterBackward {
  int64_t n;
  int32_t e, k;
  int32_t score_function;
  int32_t normalize;
  const void* scores;     // [N,E] acc
  const int64_t* topk_idx;
  const void* weights;    // [N,K] acc
  const void* gate_sum;   // [N] acc
  const void* grad_weights;  // [N,K] acc
  const int32_t* load;    // [E]
  double aux_factor;      // aux_scale * coef * E / (N * K * N); 0 = no aux loss
  void* grad_logits;      // [N,E] block dtype
};

// Assignments of received rows to local experts, expert-major, inside an expert in (row, slot) order. An expert's
// segment may end in padding (see MoeOps::padded_rows): assignments that belong to no (row, slot), row and slot -1.
struct Permutation {
  int64_t m;
  int32_t k, num_local;
  const int64_t* recv_topk_idx;  // [M,K] local ids or -1
  const int64_t* offsets;        // [L+1] host: first assignment of each local expert (offsets[L] = A)
  int32_t* assign_row;           // [A] received row, or -1 (padding)
  int32_t* assign_slot;          // [A] row * K + slot, or -1 (padding)
  int32_t* pos;                  // [M*K] assignment of (row, slot), or -1
};

enum class Copy { kHostToDevice, kDeviceToHost, kDeviceToDevice };

class MoeOps {
 public:
  virtual ~MoeOps() = default;
  virtual bool on_device() const = 0;  // pointers are device memory (CUDA)
  virtual void set_stream(void* stream) = 0;
  virtual void* stream() const = 0;

  virtual int alloc(size_t bytes, void** out) = 0;       // device memory, zero-filled
  virtual void release(void* p) = 0;
  virtual int alloc_host(size_t bytes, void** out) = 0;  // staging memory (pinned on CUDA)
  virtual void release_host(void* p) = 0;
  virtual int copy(void* dst, const void* src, size_t bytes, Copy kind) = 0;
  // rows x row_bytes from src (row stride src_pitch bytes) to dst (dst_pitch bytes), device to device.
  virtual int copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
                      int64_t rows) = 0;
  virtual int zero(void* p, size_t bytes) = 0;
  virtual int synchronize() = 0;  // waits for the stream

  // gemm_mode: deepep4j_moe_gemm (AUTO, GROUPED, LOOP); groups with m, n or k == 0 are skipped (C scaled by beta
  // when k == 0).
  virtual int gemm(const GemmDesc& d, const GemmGroup* groups, int32_t count, int32_t gemm_mode) = 0;

  virtual int router_forward(int32_t dtype, const RouterForward& r) = 0;
  virtual int router_backward(int32_t dtype, const RouterBackward& r) = 0;
  virtual int permutation(const Permutation& p) = 0;

  // The rows an expert's segment takes for `rows` assignments (>= rows; padding rows are zero). The GPU rounds up to a
  // fixed set of sizes, so that every GEMM shape a step can run was run once at create (see warm_gemms in
  // moe_block.cpp); the CPU takes rows as they are.
  virtual int64_t padded_rows(int64_t rows) const { return rows; }

  // dst[a, 0:h] = scale[a] * src[row[a], 0:h] (scale NULL = 1), or 0 where row[a] < 0; src rows src_stride apart.
  virtual int gather_rows(int32_t dtype, int64_t count, int64_t h, const void* src, int64_t src_stride,
                          const int32_t* row, const void* scale, void* dst) = 0;
  // out[m, 0:h] = sum over slots k with pos[m,k] >= 0 of scale[pos] * src[pos, 0:h] (acc; scale NULL = 1); out rows
  // out_stride elements apart.
  virtual int scatter_rows(int32_t dtype, int64_t m, int32_t k, int64_t h, const int32_t* pos, const void* src,
                           const void* scale, void* out, int64_t out_stride) = 0;
  // out[a] = dot(rows[row[a], 0:h], src[a, 0:h]) in acc (0 where row[a] < 0).
  virtual int row_dots(int32_t dtype, int64_t count, int64_t h, const void* rows, int64_t stride,
                       const int32_t* row, const void* src, void* out) = 0;
  // out[a] = values[slot[a]] (values: fp32 or fp64 array, entry s at (s / k) * stride + offset + s % k) into acc, or
  // 0 where slot[a] < 0.
  virtual int gather_slots(int32_t dtype, int64_t count, int32_t k, const int32_t* slot, const void* values,
                           int32_t values_dtype, int64_t stride, int64_t offset, void* out) = 0;
  // values[(s / k) * stride + offset + s % k] = pos[s] >= 0 ? src[pos[s]] : 0 for s < m * k (fp32 or fp64 values).
  virtual int scatter_slots(int32_t dtype, int64_t m, int32_t k, const int32_t* pos, const void* src, void* values,
                            int32_t values_dtype, int64_t stride, int64_t offset) = 0;
  // out[r, j] = in[r * stride + offset + j] (in: fp32 or fp64) into acc [rows, k], and back.
  virtual int unpack_columns(int32_t dtype, int64_t rows, int32_t k, const void* in, int32_t in_dtype, int64_t stride,
                             int64_t offset, void* out) = 0;
  virtual int pack_columns(int32_t dtype, int64_t rows, int32_t k, const void* in, void* out, int32_t out_dtype,
                           int64_t stride, int64_t offset) = 0;

  // h = silu(a) * b, elementwise over count entries.
  virtual int swiglu_forward(int32_t dtype, int64_t count, const void* a, const void* b, void* h) = 0;
  // ga = gh * b * silu'(a), gb = gh * silu(a).
  virtual int swiglu_backward(int32_t dtype, int64_t count, const void* a, const void* b, const void* gh, void* ga,
                              void* gb) = 0;
  // One update of `count` parameters (block dtype) from grads, m, v (acc), as described in moe_block.cpp.
  virtual int optimizer_step(int32_t dtype, int64_t count, const deepep4j_optimizer& opt, void* params,
                             const void* grads, void* m, void* v) = 0;
};

int make_cpu_moe_ops(std::unique_ptr<MoeOps>* out);
// CUDA: device_id of the buffer; UNAVAILABLE without CUDA or cuBLAS (the message names the library and version).
int make_cuda_moe_ops(int32_t device_id, std::unique_ptr<MoeOps>* out);

// Bytes of one element of the block's dtype, and of its accumulation type.
inline size_t elem_bytes(int32_t dtype) { return dtype == DEEPEP4J_FLOAT64 ? 8 : dtype == DEEPEP4J_BFLOAT16 ? 2 : 4; }
inline int32_t acc_dtype(int32_t dtype) { return dtype == DEEPEP4J_FLOAT64 ? DEEPEP4J_FLOAT64 : DEEPEP4J_FLOAT32; }
inline size_t acc_bytes(int32_t dtype) { return dtype == DEEPEP4J_FLOAT64 ? 8 : 4; }

}  // namespace moe
}  // namespace deepep4j
