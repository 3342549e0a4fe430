// slot_layout.h — the one definition of a ring slot (what one token row occupies in a peer's ring) and of the ring
// geometry derived from buffer_bytes, shared by the CPU backend, the CUDA backends and deepep4j_buffer_size_hint /
// deepep4j_buffer_size_min, so a size the hint gives is the size every backend accepts.
#pragma once

#include <cstdint>

#include "deepep4j.h"

#ifndef DEEPEP4J_HD
#ifdef __CUDACC__
#define DEEPEP4J_HD __host__ __device__
#else
#define DEEPEP4J_HD
#endif
#endif

namespace deepep4j {

DEEPEP4J_HD inline int64_t align16(int64_t v) { return (v + 15) & ~int64_t(15); }

// A dispatch slot: [int32 source token, K int32 local expert ids, K fp32 weights] [row] [fp8 scales], 16-byte aligned.
struct DispatchSlot {
  int64_t ids_off, weights_off, row_off, scales_off, bytes;
  DEEPEP4J_HD static int64_t align16(int64_t v) { return ::deepep4j::align16(v); }
  // row_bytes must be a multiple of 16 (the payload rule), num_scales the fp32 scales per row (0 unless fp8).
  DEEPEP4J_HD static DispatchSlot make(int64_t row_bytes, int32_t k, int32_t num_scales) {
    DispatchSlot s;
    s.ids_off = 4;
    s.weights_off = 4 + 4 * int64_t(k);
    s.row_off = ::deepep4j::align16(4 + 8 * int64_t(k));
    s.scales_off = s.row_off + row_bytes;
    s.bytes = s.scales_off + ::deepep4j::align16(4 * int64_t(num_scales));
    return s;
  }
};

// A combine slot: [row] [K returned fp32 weights, then the row's fp32 combine scale].
struct CombineSlot {
  int64_t weights_off, scale_off, bytes;
  DEEPEP4J_HD static CombineSlot make(int64_t row_bytes, int32_t k) {
    CombineSlot s;
    s.weights_off = row_bytes;
    s.scale_off = row_bytes + 4 * int64_t(k);
    s.bytes = row_bytes + ::deepep4j::align16(4 * (int64_t(k) + 1));
    return s;
  }
};

// Bytes per element (fp8 = 1; 0 for an unknown dtype), usable on host and device.
DEEPEP4J_HD inline int64_t slot_elem_bytes(int32_t dtype) {
  return dtype == DEEPEP4J_FLOAT32 ? 4 : dtype == DEEPEP4J_FP8_E4M3 ? 1
         : (dtype == DEEPEP4J_BFLOAT16 || dtype == DEEPEP4J_FLOAT16) ? 2 : dtype == DEEPEP4J_FLOAT64 ? 8 : 0;
}

// Slot of a dispatch of rows of `hidden` elements of `dtype` with K = num_topk.
inline int64_t dispatch_slot_bytes(int64_t hidden, int32_t dtype, int32_t num_topk) {
  const int32_t scales = dtype == DEEPEP4J_FP8_E4M3 ? int32_t(hidden / DEEPEP4J_FP8_BLOCK) : 0;
  return DispatchSlot::make(hidden * slot_elem_bytes(dtype), num_topk, scales).bytes;
}
// Slot of a combine of rows of `hidden` elements of `dtype` with K = num_topk.
inline int64_t combine_slot_bytes(int64_t hidden, int32_t dtype, int32_t num_topk) {
  return CombineSlot::make(hidden * slot_elem_bytes(dtype), num_topk).bytes;
}
// The larger of a step's dispatch slot and its combine slot (fp8 rows are combined in bf16).
inline int64_t step_slot_bytes(int64_t hidden, int32_t dtype, int32_t num_topk) {
  const int64_t d = dispatch_slot_bytes(hidden, dtype, num_topk);
  const int64_t c = combine_slot_bytes(hidden, dtype == DEEPEP4J_FP8_E4M3 ? DEEPEP4J_BFLOAT16 : dtype, num_topk);
  return d > c ? d : c;
}

// Ring geometry: buffer_bytes is split into num_ranks x channels rings, each rounded down to 64 bytes.
inline int64_t ring_bytes_of(int64_t buffer_bytes, int32_t num_ranks, int32_t channels) {
  return (buffer_bytes / (int64_t(num_ranks) * channels)) & ~int64_t(63);
}
// Smallest buffer_bytes whose every ring holds `slots` slots of `slot_bytes`.
inline int64_t buffer_bytes_for(int64_t slot_bytes, int64_t slots, int32_t num_ranks, int32_t channels) {
  return int64_t(num_ranks) * channels * ((slot_bytes * slots + 63) & ~int64_t(63));
}

// deepep4j_buffer_size_min: one chunk per ring for a step's dispatch and its combine.
inline int64_t min_buffer_bytes(int64_t hidden, int32_t dtype, int32_t num_topk, int32_t chunk, int32_t num_ranks,
                                int32_t channels) {
  return buffer_bytes_for(step_slot_bytes(hidden, dtype, num_topk), chunk, num_ranks, channels);
}

}  // namespace deepep4j
