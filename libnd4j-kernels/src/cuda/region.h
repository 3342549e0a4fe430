// region.h — layout of one rank's device region (peers write into it over NVLink) and of the messages kept there.
//
//   [0, 256)                 barrier flags: uint32 per source rank, the last barrier epoch that source reached
//   [kStepFailed, +4)        nonzero when this rank's last barrier failed (read by the step's kernels; device-local)
//   [kDecision, +8)          rank 0's region only: how the group's latest barrier ended (epoch << 32 | outcome),
//                            settled by compare-and-swap so every rank, a late one included, ends it the same way
//   [kStatus, +2*64*256)     per (epoch parity, source rank): the status + message a source published at its barrier
//   [kCounters, ...)         ring counters per (channel, source): tail (written by the source), head (by this rank)
//   [kNotify, ...)           per (notify parity, source rank): the counts of a notify step (NotifySlot)
//   [kEpoch, +4)             the epoch of the last barrier this rank reached (stream-ordered steps number theirs from it)
//   [kArrivals, ...)         copy-engine mode: per (source, chunk) the epoch of the step whose chunk has landed
//   [kPending, +256)         stream-ordered mode: a failure found on this device after a barrier (a queued notify's
//                            bad topk_idx or overflow), published by this rank's next barrier (PeerStatus layout)
//   [kRings, +buffer_bytes)  channels x sources rings of slots; a slot carries one token row and its metadata.
//                            In copy-engine mode the same bytes are R landing zones, one per source, each holding the
//                            whole step's rows from that source.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/slot_layout.h"
#include "deepep4j.h"


namespace deepep4j {
namespace cuda {

constexpr int kMaxChannels = 64;  // num_sms / 2 on CUDA
constexpr size_t kFlags = 0;
constexpr size_t kStatus = 512;
constexpr size_t kStepFailed = 256;
constexpr size_t kDecision = 264;
constexpr size_t kEpoch = 272;
// Outcome bits of the decision word: the barrier was abandoned by rank (bits 14..8; kLateRank: this rank found the
// group past it) after waiting for rank (bits 7..0).
constexpr unsigned long long kAbandoned = 1ull << 15;
constexpr unsigned long long kLateRank = 0x7f;
constexpr size_t kStatusBytes = 256;
constexpr size_t kCounters = kStatus + 2 * DEEPEP4J_MAX_RANKS * kStatusBytes;
constexpr size_t kCounterBytes = 2 * kMaxChannels * DEEPEP4J_MAX_RANKS * sizeof(uint32_t);
constexpr size_t kNotify = kCounters + kCounterBytes;
constexpr size_t kNotifySlotBytes = 16384;
constexpr int kMaxCeChunks = 16;  // copy-engine transfers per (source, destination) and step
constexpr size_t kArrivals = kNotify + 2 * DEEPEP4J_MAX_RANKS * kNotifySlotBytes;
constexpr size_t kPending = kArrivals + DEEPEP4J_MAX_RANKS * kMaxCeChunks * sizeof(uint32_t);
constexpr size_t kRings = kPending + kStatusBytes;

// Status a rank publishes at a barrier: 0, or the deepep4j_status of its local check and its message; and its vote
// for copy-engine transfers in the step that follows (they are used only when every rank votes 1).
// In a copy-engine dispatch a receiver also tells each source of the same process where that source's rows go in
// its recv_x (`direct`, 0 for none): the source's copy engine then writes them there and only metadata lands.
struct PeerStatus {
  int32_t status;
  int32_t ce_vote;
  uint64_t direct;
  char message[kStatusBytes - 16];
};

// What a source rank tells one destination at notify: its step parameters and the counts bound for that destination.
struct NotifyHeader {
  int32_t status;  // the source's local verdict (a deepep4j_status)
  int32_t num_topk;
  int32_t num_experts;
  int32_t dtype;
  int64_t hidden;
  int64_t num_tokens;
  int32_t num_channels;
  int32_t pad[7];
  char message[192];
};
static_assert(sizeof(NotifyHeader) == 256, "NotifyHeader is one 256-byte block");
// After the header: int32 tokens per channel [num_channels], then int32 top-k entries per local expert [E/R].
constexpr size_t kMaxNotifyInts = (kNotifySlotBytes - sizeof(NotifyHeader)) / 4;

DEEPEP4J_HD inline uint32_t* flags(uint8_t* region) { return reinterpret_cast<uint32_t*>(region + kFlags); }
DEEPEP4J_HD inline PeerStatus* status_slot(uint8_t* region, uint32_t epoch, int src) {
  return reinterpret_cast<PeerStatus*>(region + kStatus + ((epoch & 1) * DEEPEP4J_MAX_RANKS + src) * kStatusBytes);
}
DEEPEP4J_HD inline int32_t* step_failed(uint8_t* region) { return reinterpret_cast<int32_t*>(region + kStepFailed); }
DEEPEP4J_HD inline unsigned long long* decision(uint8_t* region) {
  return reinterpret_cast<unsigned long long*>(region + kDecision);
}
DEEPEP4J_HD inline uint32_t* epoch_word(uint8_t* region) { return reinterpret_cast<uint32_t*>(region + kEpoch); }
DEEPEP4J_HD inline PeerStatus* pending(uint8_t* region) { return reinterpret_cast<PeerStatus*>(region + kPending); }
DEEPEP4J_HD inline uint32_t* tails(uint8_t* region) { return reinterpret_cast<uint32_t*>(region + kCounters); }
DEEPEP4J_HD inline uint32_t* heads(uint8_t* region) {
  return reinterpret_cast<uint32_t*>(region + kCounters) + kMaxChannels * DEEPEP4J_MAX_RANKS;
}
DEEPEP4J_HD inline uint8_t* notify_slot(uint8_t* region, uint32_t parity, int src) {
  return region + kNotify + ((parity & 1) * DEEPEP4J_MAX_RANKS + src) * kNotifySlotBytes;
}

DEEPEP4J_HD inline uint32_t* arrivals(uint8_t* region, int src) {
  return reinterpret_cast<uint32_t*>(region + kArrivals) + src * kMaxCeChunks;
}

// Every rank's region as seen from this rank's device (its own included).
struct Peers {
  uint8_t* region[DEEPEP4J_MAX_RANKS];
};

// Ring geometry of one step: the same on every rank because it derives from the step's agreed shape.
struct Rings {
  int32_t channels;     // C
  int32_t slots;        // S slots per ring
  int32_t chunk;        // tokens a sender publishes at a time (<= S)
  int64_t ring_bytes;   // bytes per ring (16-byte multiple)
  int64_t slot_bytes;   // bytes per slot (16-byte multiple)
  DEEPEP4J_HD uint8_t* slot(uint8_t* region, int c, int src, int num_ranks, uint32_t pos) const {
    return region + kRings + (int64_t(c) * num_ranks + src) * ring_bytes + int64_t(pos % uint32_t(slots)) * slot_bytes;
  }
};

// Dispatch and combine slots: DispatchSlot / CombineSlot of common/slot_layout.h.

}  // namespace cuda
}  // namespace deepep4j
