// region_layout.h — what one rank's shared-memory region holds: a control area through which peers exchange each
// step's verdict and counts, then R x C rings (one per source rank and channel) that peers write token rows into.
//
//   [Control][RingHeader x R*C][ring data: R*C x ring_bytes]
//
// A peer writes only its own StepSlot, the decision word of rank 0's region (by compare-and-swap), and the tails of
// its own rings; the owner writes the heads and its own connect failure.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "../common/slot_layout.h"
#include "deepep4j.h"

namespace deepep4j {
namespace cpu {

constexpr int kMaxChannels = 128;         // num_sms <= 256
constexpr int kMaxLocalExperts = 1024;    // num_experts / num_ranks
constexpr int kMessageBytes = 480;
constexpr uint64_t kRegionMagic = 0x3450454445455044ull;  // "DEEPEP4\0"-ish tag

constexpr int32_t kFlagKnown1 = 1 << 8;
constexpr int32_t kFlagKnown2 = 2 << 8;

enum StepKind : int32_t { kStepNotify = 1, kStepDispatch = 2, kStepCombine = 3, kStepConnect = 4 };

// One rank's contribution to a collective step, written into every peer's region.
struct StepData {
  int32_t status;             // the writer's local verdict (deepep4j_status)
  int32_t kind;               // StepKind
  int64_t num_tokens;
  int64_t hidden;
  int64_t handle_seq;         // dispatch/combine: the notify step that made the handle (ranks must use the same one)
  int32_t num_topk;
  int32_t num_experts;
  int32_t dtype;
  int32_t flags;                               // dispatch: 1 = weights sent; combine: 1 = weighted, 2 = topk returned;
                                               // kFlagKnown1/2: bit 1/2 counts (the rank has rows it applies to)
  int64_t pid;                                 // writer's process: ranks of one process copy rows directly
  uint64_t ptrs[8];                            // dispatch: the writer's outputs; combine: its inputs (same process)
  int64_t row_offsets[kMaxChannels];           // dispatch/combine: first row, in the writer's receive order, of the
                                               // reader's rows on each channel
  int32_t rows_per_channel[kMaxChannels];      // notify: rows the writer sends the reader, per channel
  int32_t rows_per_expert[kMaxLocalExperts];   // notify: (token, k) entries for each of the reader's local experts
  char message[kMessageBytes];
};

struct alignas(64) StepSlot {
  std::atomic<uint64_t> seq;  // the step `data` describes; stored after data (release)
  StepData data;
};

struct alignas(64) Control {
  uint64_t magic;
  int32_t owner_rank;
  int32_t num_ranks;
  // Rank 0's region only: the outcome of the group's latest decided step (step_exchange.cpp), so that every rank of
  // a step, late ones included, ends it the same way: complete, or abandoned after a timeout.
  alignas(64) std::atomic<uint64_t> decision;
  // The owner's own failure in connect before it could reach its peers (e.g. blobs = NULL): peers read it here.
  alignas(64) std::atomic<int32_t> connect_failure;
  char connect_message[kMessageBytes];
  StepSlot slots[2][DEEPEP4J_MAX_RANKS];  // [step parity][writer rank]
};

struct alignas(64) RingHeader {
  alignas(64) std::atomic<uint64_t> tail;  // rows published by the sender (written remotely)
  alignas(64) std::atomic<uint64_t> head;  // rows consumed by the owner
};

inline size_t region_bytes(int64_t buffer_bytes, int num_ranks, int channels) {
  return sizeof(Control) + sizeof(RingHeader) * size_t(num_ranks) * channels +
         size_t(ring_bytes_of(buffer_bytes, num_ranks, channels)) * size_t(num_ranks) * channels;
}

// Views of one mapped region.
struct RegionView {
  uint8_t* base = nullptr;
  int num_ranks = 0;
  int channels = 0;
  size_t ring_bytes = 0;

  Control* control() const { return reinterpret_cast<Control*>(base); }
  RingHeader* ring_header(int source, int channel) const {
    return reinterpret_cast<RingHeader*>(base + sizeof(Control)) + (size_t(source) * channels + channel);
  }
  uint8_t* ring_data(int source, int channel) const {
    return base + sizeof(Control) + sizeof(RingHeader) * size_t(num_ranks) * channels +
           ring_bytes * (size_t(source) * channels + channel);
  }
};

}  // namespace cpu
}  // namespace deepep4j
