// slot_ops.cuh — what a warp does with one token: copy a row, write a dispatch slot from the inputs, read a dispatch slot
// into the receive arrays, and reduce returned combine rows in fp32. Shared by the ring kernels and the all-to-all ones.
#pragma once

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/bulk_copy.cuh"
#include "cuda/cuda_util.h"
#include "cuda/kernels.h"

namespace deepep4j {
namespace cuda {

// Copies `bytes` (a multiple of 16) with one warp; eight 16-byte loads per lane in flight before their stores, so a
// few warps keep enough bytes moving to cover NVLink and HBM latency.
template <bool kSrcShared>
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane) {
  constexpr int kUnroll = 8;
  const int64_t n = bytes / 16;
  int4* d = reinterpret_cast<int4*>(dst);
  const int4* s = reinterpret_cast<const int4*>(src);
  int64_t i = lane;
  for (; i + 32 * (kUnroll - 1) < n; i += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = kSrcShared ? ld_cg16(s + i + 32 * u) : __ldg(s + i + 32 * u);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) d[i + 32 * u] = v[u];
  }
  for (; i < n; i += 32) d[i] = kSrcShared ? ld_cg16(s + i) : __ldg(s + i);
}

// A row copy: through the warp's bulk copies where the kernel has them (the ring kernels), else warp_copy.
template <bool kSrcShared>
__device__ __forceinline__ void copy_row(BulkWarp* bulk, uint8_t* dst, const uint8_t* src, int64_t bytes, int lane) {
  if (DEEPEP4J_BULK_COPY && bulk != nullptr) {
    bulk->copy(dst, src, bytes);
    __syncwarp();  // lane 0 issued the copy: the warp reconverges before any group barrier
  } else
    warp_copy<kSrcShared>(dst, src, bytes, lane);
}

// Writes token t's dispatch slot for destination rank `dest` (which owns experts [dest*L, dest*L+L)).
__device__ __forceinline__ void write_dispatch_slot(uint8_t* slot, const DispatchSlot& lay, const DispatchIo& io,
                                                    const Routing& h, int64_t t, int dest, int L, int lane,
                                                    BulkWarp* bulk = nullptr) {
  const int K = h.num_topk;
  if (lane == 0) *reinterpret_cast<int32_t*>(slot) = int32_t(t);
  for (int k = lane; k < K; k += 32) {
    int32_t e = h.topk[t * K + k];
    bool local = e >= 0 && e / L == dest;
    reinterpret_cast<int32_t*>(slot + lay.ids_off)[k] = local ? e - dest * L : -1;
    float w = (local && io.topk_weights != nullptr) ? io.topk_weights[t * K + k] : 0.0f;
    reinterpret_cast<float*>(slot + lay.weights_off)[k] = w;
  }
  for (int i = lane; i < io.num_scales; i += 32)
    reinterpret_cast<float*>(slot + lay.scales_off)[i] = io.x_scales[t * io.num_scales + i];
  copy_row<false>(bulk, slot + lay.row_off, io.x + t * io.row_bytes, io.row_bytes, lane);
}

// Reads a dispatch slot from source rank `src` into received row m; returns nothing, records the local-expert mask.
__device__ __forceinline__ void read_dispatch_slot(const uint8_t* slot, const DispatchSlot& lay, const DispatchIo& io,
                                                   const Routing& h, int64_t m, int src, int lane,
                                                   BulkWarp* bulk = nullptr) {
  const int K = h.num_topk;
  uint32_t local_bits = 0;
  for (int k = 0; k < K; ++k) {
    int32_t id = __ldcg(reinterpret_cast<const int32_t*>(slot + lay.ids_off) + k);
    if (id >= 0) local_bits |= 1u << k;
    if (k % 32 == lane) {
      if (io.recv_topk_idx) io.recv_topk_idx[m * K + k] = id;
      if (io.recv_topk_weights)
        io.recv_topk_weights[m * K + k] = __ldcg(reinterpret_cast<const float*>(slot + lay.weights_off) + k);
    }
  }
  if (lane == 0) {
    h.recv_local[m] = local_bits;
    if (io.recv_src_token) io.recv_src_token[m] = __ldcg(reinterpret_cast<const int32_t*>(slot));
    if (io.recv_src_rank) io.recv_src_rank[m] = src;
  }
  for (int i = lane; i < io.num_scales; i += 32)
    io.recv_x_scales[m * io.num_scales + i] = __ldcg(reinterpret_cast<const float*>(slot + lay.scales_off) + i);
  copy_row<true>(bulk, io.recv_x + m * io.row_bytes, slot + lay.row_off, io.row_bytes, lane);
}

// A token this rank sends to itself skips the ring: row t of x goes straight to received row m.
__device__ __forceinline__ void copy_own_token(const DispatchIo& io, const Routing& h, int64_t t, int64_t m, int me,
                                               int L, int lane, BulkWarp* bulk = nullptr) {
  const int K = h.num_topk;
  uint32_t local_bits = 0;
  for (int k = 0; k < K; ++k) {
    const int32_t e = h.topk[t * K + k];
    const bool local = e >= 0 && e / L == me;
    if (local) local_bits |= 1u << k;
    if (k % 32 == lane) {
      if (io.recv_topk_idx) io.recv_topk_idx[m * K + k] = local ? e - me * L : -1;
      if (io.recv_topk_weights)
        io.recv_topk_weights[m * K + k] = (local && io.topk_weights != nullptr) ? io.topk_weights[t * K + k] : 0.0f;
    }
  }
  if (lane == 0) {
    h.recv_local[m] = local_bits;
    if (io.recv_src_token) io.recv_src_token[m] = t;
    if (io.recv_src_rank) io.recv_src_rank[m] = me;
  }
  for (int i = lane; i < io.num_scales; i += 32)
    io.recv_x_scales[m * io.num_scales + i] = io.x_scales[t * io.num_scales + i];
  copy_row<false>(bulk, io.recv_x + m * io.row_bytes, io.x + t * io.row_bytes, io.row_bytes, lane);
}

// The combine scale of received row m: the sum of its weights for this rank's experts (1 without weights).
__device__ __forceinline__ float row_scale(const CombineIo& io, const Routing& h, int64_t m) {
  if (io.recv_topk_weights == nullptr) return 1.0f;
  float scale = 0.0f;
  const uint32_t bits = h.recv_local[m];
  for (int k = 0; k < h.num_topk; ++k)
    if (bits >> k & 1u) scale += io.recv_topk_weights[m * h.num_topk + k];
  return scale;
}

// Writes received row m as a combine slot: the row, the returned weights and the row's scale.
__device__ __forceinline__ void write_combine_slot(uint8_t* slot, const CombineSlot& lay, const CombineIo& io,
                                                   const Routing& h, int64_t m, int lane, BulkWarp* bulk = nullptr) {
  const int K = h.num_topk;
  if (lane == 0) *reinterpret_cast<float*>(slot + lay.scale_off) = row_scale(io, h, m);
  if (io.y_topk_weights != nullptr)
    for (int k = lane; k < K; k += 32)
      reinterpret_cast<float*>(slot + lay.weights_off)[k] = io.y_topk_weights[m * K + k];
  copy_row<false>(bulk, slot, io.y + m * io.row_bytes, io.row_bytes, lane);
}

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ double to_f(double v) { return v; }
template <class T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
// Accumulator of a payload type: fp32, or fp64 for fp64 rows (the MoE block's gradient checks).
template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// One rank's returned row for a token: where the row is, its combine scale and its K returned weights (or NULL).
struct ReturnedRow {
  const uint8_t* row;  // NULL where the token did not visit the rank
  float scale;
  const float* weights;
};

// The returned row of a combine slot.
__device__ __forceinline__ ReturnedRow slot_row(const uint8_t* slot, const CombineSlot& lay) {
  if (slot == nullptr) return ReturnedRow{nullptr, 0.0f, nullptr};
  return ReturnedRow{slot, __ldcg(reinterpret_cast<const float*>(slot + lay.scale_off)),
                     reinterpret_cast<const float*>(slot + lay.weights_off)};
}

// A rank's own returned row: received row m of y itself (m < 0: the token did not visit this rank).
__device__ __forceinline__ ReturnedRow own_row(const CombineIo& io, const Routing& h, int64_t m) {
  if (m < 0) return ReturnedRow{nullptr, 0.0f, nullptr};
  return ReturnedRow{io.y + m * io.row_bytes, row_scale(io, h, m),
                     io.y_topk_weights != nullptr ? io.y_topk_weights + m * h.num_topk : nullptr};
}

// out[t] = sum over ranks d (ascending) of scale_d * row_d, in fp32.
template <class T>
__device__ __forceinline__ void reduce_token(const ReturnedRow* rows, int num_ranks, const CombineIo& io, int64_t t,
                                             int K, int lane) {
  constexpr int kPer = 16 / sizeof(T);
  const int64_t n = io.row_bytes / 16;
  int4* out = reinterpret_cast<int4*>(io.out + t * io.row_bytes);
  constexpr int kUnroll = 4;  // four vectors per lane in flight from every rank: the reduce is latency-bound
  for (int64_t i0 = lane; i0 < n; i0 += 32 * kUnroll) {
    using Acc = typename AccOf<T>::type;
    Acc acc[kUnroll][kPer];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int j = 0; j < kPer; ++j) acc[u][j] = Acc(0);
    // Two ranks' rows at a time: both loads are in flight before either is summed (ranks still add in order).
    for (int d0 = 0; d0 < num_ranks; d0 += 2) {
      int4 v[2][kUnroll];
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int d = d0 + p;
        const uint8_t* row = d < num_ranks ? rows[d].row : nullptr;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
          v[p][u] = (row != nullptr && i0 + u * 32 < n) ? ld_cg16(row + (i0 + u * 32) * 16) : make_int4(0, 0, 0, 0);
      }
#pragma unroll
      for (int p = 0; p < 2; ++p) {
        const int d = d0 + p;
        if (d >= num_ranks || rows[d].row == nullptr) continue;
        const float sc = rows[d].scale;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const T* e = reinterpret_cast<const T*>(&v[p][u]);
#pragma unroll
          for (int j = 0; j < kPer; ++j) acc[u][j] += Acc(sc) * to_f(e[j]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u * 32 >= n) break;
      int4 r;
      T* o = reinterpret_cast<T*>(&r);
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        if constexpr (std::is_same_v<T, double>)
          o[j] = acc[u][j];
        else
          o[j] = from_f<T>(acc[u][j]);
      }
      out[i0 + u * 32] = r;
    }
  }
  if (io.out_topk_weights != nullptr)
    for (int k = lane; k < K; k += 32) {
      float w = 0.0f;
      for (int d = 0; d < num_ranks; ++d)
        if (rows[d].row != nullptr && rows[d].weights != nullptr) w += __ldcg(rows[d].weights + k);
      io.out_topk_weights[t * K + k] = w;
    }
}

// Dispatches reduce_token on the payload dtype.
__device__ __forceinline__ void reduce_token_any(const ReturnedRow* rows, int num_ranks, const CombineIo& io,
                                                 int64_t t, int K, int lane) {
  if (io.dtype == DEEPEP4J_FLOAT32)
    reduce_token<float>(rows, num_ranks, io, t, K, lane);
  else if (io.dtype == DEEPEP4J_BFLOAT16)
    reduce_token<__nv_bfloat16>(rows, num_ranks, io, t, K, lane);
  else if (io.dtype == DEEPEP4J_FLOAT64)
    reduce_token<double>(rows, num_ranks, io, t, K, lane);
  else
    reduce_token<__half>(rows, num_ranks, io, t, K, lane);
}

}  // namespace cuda
}  // namespace deepep4j
