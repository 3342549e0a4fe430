// bulk_copy.cuh — a warp's row copies through Hopper bulk copies (cp.async.bulk, global -> shared -> global): one
// lane issues them, the copy engine of the SM streams pieces of kBulkPiece bytes through two staging halves in shared
// memory, so a warp keeps up to two pieces in flight without holding them in registers.
#pragma once

#include <cstdint>

namespace deepep4j {
namespace cuda {

constexpr int kBulkPiece = 4096;  // bytes per staging half; a warp owns two
constexpr int kBulkBarBytes = 512;  // room for two 8-byte mbarriers per warp (<= 32 warps), before the staging halves
__host__ __device__ constexpr int bulk_smem_bytes(int warps) { return kBulkBarBytes + warps * 2 * kBulkPiece; }

// Bulk copies exist from sm_90 on; an older architecture's variant of a kernel copies rows with warp_copy and
// launches without the staging (ring_smem_bytes).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
#define DEEPEP4J_BULK_COPY 1
#else
#define DEEPEP4J_BULK_COPY 0
#endif

#ifdef __CUDACC__
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// One warp's staging: lane 0 (the issuer) owns two halves and their mbarriers; the other lanes' calls do nothing.
// Its destructor waits until the warp's bulk stores are done, so no copy outlives the block's shared memory.
struct BulkWarp {
  uint8_t* buf;
  uint64_t* bar;
  uint32_t parity;  // bit b: the phase the next wait on half b waits for
  bool issuer;

  // smem: the block's dynamic shared memory of bulk_smem_bytes(warps); warp: this warp's index in the block.
  __device__ BulkWarp(uint8_t* smem, int warp, int lane)
      : buf(smem + kBulkBarBytes + warp * 2 * kBulkPiece), bar(reinterpret_cast<uint64_t*>(smem) + 2 * warp),
        parity(0), issuer(lane == 0) {
#if DEEPEP4J_BULK_COPY
    if (!issuer) return;
    for (int b = 0; b < 2; ++b) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_u32(bar + b)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
  }
  BulkWarp(const BulkWarp&) = delete;
  __device__ ~BulkWarp() { flush(); }

  // Copies `bytes` (a multiple of 16, both addresses 16-byte aligned) from src to dst; src and dst global (peer
  // memory included). When it returns, src has been read (a ring slot may be released); dst is written by flush().
  __device__ __forceinline__ void copy(uint8_t* dst, const uint8_t* src, int64_t bytes) {
#if DEEPEP4J_BULK_COPY
    if (!issuer || bytes <= 0) return;
    // Generic-proxy writes and acquires before this call are ordered before the bulk copy's reads.
    asm volatile("fence.proxy.async.global;" ::: "memory");
    const int n = int((bytes + kBulkPiece - 1) / kBulkPiece);
    load(0, src, bytes);
    for (int p = 0; p < n; ++p) {
      if (p + 1 < n) load(p + 1, src, bytes);
      const int b = p & 1;
      asm volatile(
          "{\n .reg .pred done;\n WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
          " @!done bra WAIT;\n}" ::"r"(smem_u32(bar + b)),
          "r"((parity >> b) & 1u)
          : "memory");
      parity ^= 1u << b;
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst + int64_t(p) * kBulkPiece),
                   "r"(smem_u32(buf + b * kBulkPiece)), "r"(piece(p, bytes))
                   : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
#endif
  }

  // Waits until every bulk store of this warp is written, and orders those writes before later generic-proxy
  // accesses (a release that publishes them, a peer's plain loads).
  __device__ __forceinline__ void flush() {
#if DEEPEP4J_BULK_COPY
    if (!issuer) return;
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
#endif
  }

 private:
  __device__ static __forceinline__ uint32_t piece(int p, int64_t bytes) {
    const int64_t left = bytes - int64_t(p) * kBulkPiece;
    return uint32_t(left < kBulkPiece ? left : kBulkPiece);
  }
  // Loads piece p into half p & 1, once the store that last read that half has read it.
  __device__ __forceinline__ void load(int p, const uint8_t* src, int64_t bytes) {
#if DEEPEP4J_BULK_COPY
    const int b = p & 1;
    const uint32_t n = piece(p, bytes);
    asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar + b)), "r"(n) : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            smem_u32(buf + b * kBulkPiece)),
        "l"(src + int64_t(p) * kBulkPiece), "r"(n), "r"(smem_u32(bar + b))
        : "memory");
#endif
  }
};
#endif

}  // namespace cuda
}  // namespace deepep4j
