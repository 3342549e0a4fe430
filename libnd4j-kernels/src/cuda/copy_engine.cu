// copy_engine.cu — the host side of copy-engine transfers: mode, plans, staging, and the copy stream's queue of
// wait / copy / signal per chunk (the SM side is in copy_engine_kernels.cu).
#include "cuda/copy_engine.h"

#include <cuda.h>

#include <algorithm>
#include <cinttypes>
#include <cstdlib>
#include <cstring>

#include "cuda/cuda_util.h"

namespace deepep4j {
namespace cuda {

namespace {
using WaitValue32Fn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using PointerGetAttributeFn = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);
}  // namespace

bool CopyEngine::peer_copyable(const void* p, int device, int peer_device) const {
  cudaPointerAttributes a{};
  if (p == nullptr || get_attribute_ == nullptr || cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (a.type != cudaMemoryTypeDevice || a.device != device) return false;
  // Stream-ordered pools are not reachable from other devices unless their owner granted it (cudaMemPoolSetAccess).
  CUmemoryPool pool = nullptr;
  CUresult r = reinterpret_cast<PointerGetAttributeFn>(get_attribute_)(&pool, CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE,
                                                                      CUdeviceptr(p));
  if (r != CUDA_SUCCESS) return false;
  if (pool == nullptr || peer_device == device) return true;
  cudaMemLocation where{};
  where.type = cudaMemLocationTypeDevice;
  where.id = peer_device;
  cudaMemAccessFlags flags = cudaMemAccessFlagsProtNone;
  if (cudaMemPoolGetAccess(&flags, reinterpret_cast<cudaMemPool_t>(pool), &where) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return flags == cudaMemAccessFlagsProtReadWrite;
}

Check transfer_from_env(Transfer* out) {
  const char* v = std::getenv("DEEPEP4J_CUDA_TRANSFER");
  if (v == nullptr || *v == 0 || std::strcmp(v, "auto") == 0) *out = Transfer::kAuto;
  else if (std::strcmp(v, "sm") == 0) *out = Transfer::kSm;
  else if (std::strcmp(v, "copy_engine") == 0) *out = Transfer::kCopyEngine;
  else
    return Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT,
                       "DEEPEP4J_CUDA_TRANSFER = \"%s\": must be auto, sm or copy_engine", v);
  return Check{};
}

const char* transfer_name(Transfer t) {
  return t == Transfer::kSm ? "sm" : t == Transfer::kCopyEngine ? "copy_engine" : "auto";
}

CopyEngine::~CopyEngine() {
  if (stream_) cudaStreamSynchronize(stream_), cudaStreamDestroy(stream_);
  if (reset_done_) cudaEventDestroy(reset_done_);
  if (packed_) cudaFree(packed_);
  if (staging_) cudaFree(staging_);
}

int CopyEngine::init(int32_t num_ranks) {
  R_ = num_ranks;
  DEEPEP4J_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  DEEPEP4J_CUDA_TRY(cudaEventCreateWithFlags(&reset_done_, cudaEventDisableTiming));
  DEEPEP4J_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&packed_), sizeof(uint32_t) * (kMaxCeChunks * size_t(R_) + 1)));
  DEEPEP4J_CUDA_TRY(cudaMemset(packed_, 0, sizeof(uint32_t) * (kMaxCeChunks * size_t(R_) + 1)));
  DEEPEP4J_CUDA_TRY(preload_ce_kernels());
  if (const char* v = std::getenv("DEEPEP4J_CE_CHUNK_MB")) chunk_bytes_ = std::max<int64_t>(1, std::atoll(v)) << 20;

  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found{};
  cudaError_t e = cudaGetDriverEntryPointByVersion("cuStreamWaitValue32", &fn, 12000, cudaEnableDefault, &found);
  if (e != cudaSuccess || found != cudaDriverEntryPointSuccess || fn == nullptr) {
    cudaGetLastError();
    unavailable_ = "the driver has no cuStreamWaitValue32";
    return DEEPEP4J_OK;
  }
  // One wait that is already satisfied: stream memory operations can be switched off on some systems.
  CUresult r = reinterpret_cast<WaitValue32Fn>(fn)(stream_, CUdeviceptr(packed_), 0, CU_STREAM_WAIT_VALUE_GEQ);
  if (r != CUDA_SUCCESS || cudaStreamSynchronize(stream_) != cudaSuccess) {
    cudaGetLastError();
    unavailable_ = "stream memory waits (cuStreamWaitValue32) are not supported here";
    return DEEPEP4J_OK;
  }
  wait_value32_ = fn;
  void* get = nullptr;
  if (cudaGetDriverEntryPointByVersion("cuPointerGetAttribute", &get, 12000, cudaEnableDefault, &found) == cudaSuccess &&
      found == cudaDriverEntryPointSuccess)
    get_attribute_ = get;
  cudaGetLastError();
  return DEEPEP4J_OK;
}

Check CopyEngine::grow_staging(int64_t bytes) {
  if (bytes <= staging_bytes_) return Check{};
  // Stream-ordered on the (idle) copy stream: cudaMalloc/cudaFree may wait for the whole device, including the
  // spinning barrier of another rank on the same GPU that waits for us.
  if (staging_) cudaFreeAsync(staging_, stream_), staging_ = nullptr, staging_bytes_ = 0;
  if (cudaMallocAsync(reinterpret_cast<void**>(&staging_), size_t(bytes), stream_) != cudaSuccess) {
    cudaGetLastError();
    staging_ = nullptr;
    return Check::fail(DEEPEP4J_ERR_OUT_OF_MEMORY,
                       "copy-engine staging of %" PRId64 " bytes could not be allocated; set "
                       "DEEPEP4J_CUDA_TRANSFER=sm",
                       bytes);
  }
  staging_bytes_ = bytes;
  return Check{};
}

namespace {
int64_t sent_to(const CudaHandle& h, int d, int C) {
  int64_t n = 0;
  for (int c = 0; c < C; ++c) n += h.send_counts_host[size_t(d) * C + c];
  return n;
}
Check zone_fails(int64_t need, int64_t zone_bytes, int peer, const char* what) {
  return Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT,
                     "buffer_bytes: a copy-engine %s needs a %" PRId64 "-byte landing zone for rank %d, but "
                     "buffer_bytes / num_ranks gives %" PRId64 "; raise buffer_bytes or set DEEPEP4J_CUDA_TRANSFER "
                     "to auto or sm",
                     what, need, peer, zone_bytes);
}
}  // namespace

Check CopyEngine::plan_dispatch(const CudaHandle& h, int32_t me, int64_t row_bytes, const DispatchSlot& meta,
                                int64_t zone_bytes, CePlan* out) {
  CePlan p{};
  p.zone_bytes = zone_bytes;
  p.packed = packed_;
  p.epoch_word = packed_ + kMaxCeChunks * R_;
  const int C = h.r.channels;
  auto bytes_for = [&](int64_t n) { return ce_dispatch_meta_off(n, row_bytes) + n * meta.bytes; };
  int64_t staging = 0;
  for (int d = 0; d < R_; ++d) {
    p.out_rows[d] = int32_t(sent_to(h, d, C));
    p.in_rows[d] = h.recv_counts_per_rank[d];
    p.out_chunk[d] = ce_chunk_rows(p.out_rows[d], row_bytes + meta.bytes, chunk_bytes_);
    p.in_chunk[d] = ce_chunk_rows(p.in_rows[d], row_bytes + meta.bytes, chunk_bytes_);
    if (d == me) continue;
    if (bytes_for(p.out_rows[d]) > zone_bytes) return zone_fails(bytes_for(p.out_rows[d]), zone_bytes, d, "dispatch");
    if (bytes_for(p.in_rows[d]) > zone_bytes) return zone_fails(bytes_for(p.in_rows[d]), zone_bytes, d, "dispatch");
    p.staging_off[d] = staging;
    staging += DispatchSlot::align16(bytes_for(p.out_rows[d]));
    p.largest_bytes = std::max({p.largest_bytes, bytes_for(p.out_rows[d]), bytes_for(p.in_rows[d])});
  }
  Check grown = grow_staging(std::max<int64_t>(staging, 16));
  if (!grown.ok()) return grown;
  p.staging = staging_;
  *out = p;
  return Check{};
}

Check CopyEngine::plan_combine(const CudaHandle& h, int32_t me, int64_t row_bytes, int64_t zone_bytes, CePlan* out) {
  CePlan p{};
  p.zone_bytes = zone_bytes;
  p.packed = packed_;
  p.epoch_word = packed_ + kMaxCeChunks * R_;
  const int C = h.r.channels;
  int64_t staging = 0, first_row = 0;
  for (int d = 0; d < R_; ++d) {
    p.first_row[d] = first_row;
    first_row += h.recv_counts_per_rank[d];
    p.out_rows[d] = h.recv_counts_per_rank[d];  // combine sends back what dispatch received
    p.in_rows[d] = int32_t(sent_to(h, d, C));
    p.out_chunk[d] = ce_chunk_rows(p.out_rows[d], row_bytes, chunk_bytes_);
    p.in_chunk[d] = ce_chunk_rows(p.in_rows[d], row_bytes, chunk_bytes_);
    if (d == me) continue;
    for (int64_t n : {int64_t(p.out_rows[d]), int64_t(p.in_rows[d])}) {
      const int64_t need = ce_combine_meta_off(n, row_bytes) + ce_combine_meta_bytes(n, h.num_topk);
      if (need > zone_bytes) return zone_fails(need, zone_bytes, d, "combine");
      p.largest_bytes = std::max(p.largest_bytes, need);
    }
    p.staging_off[d] = staging;
    staging += ce_combine_meta_bytes(p.out_rows[d], h.num_topk);
  }
  Check grown = grow_staging(std::max<int64_t>(staging, 16));
  if (!grown.ok()) return grown;
  p.staging = staging_;
  *out = p;
  return Check{};
}

int CopyEngine::wait_packed(uint32_t* counter, uint32_t count) {
  CUresult r = reinterpret_cast<WaitValue32Fn>(wait_value32_)(stream_, CUdeviceptr(counter), count,
                                                              CU_STREAM_WAIT_VALUE_GEQ);
  if (r != CUDA_SUCCESS)
    return set_error(DEEPEP4J_ERR_INTERNAL, "cuStreamWaitValue32 on the copy stream failed (CUresult %d)", int(r));
  return DEEPEP4J_OK;
}

int CopyEngine::signal(const Step& st, int d, int j) {
  // Stream order puts this copy after the chunk's: the arrival word lands once the chunk has.
  DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(arrivals(st.peers.region[d], st.rank) + j, packed_ + kMaxCeChunks * R_, 4,
                                    cudaMemcpyDeviceToDevice, stream_));
  return DEEPEP4J_OK;
}

int CopyEngine::run_dispatch(const Step& st, const CePlan& p, const Routing& h, const DispatchIo& io,
                             int64_t meta_bytes, const uint64_t* direct, int32_t num_sms, cudaStream_t s) {
  const int me = st.rank;
  // Counters back to zero before the kernel counts into them; the copy stream only reads them after this.
  DEEPEP4J_CUDA_TRY(cudaMemsetAsync(packed_, 0, sizeof(uint32_t) * kMaxCeChunks * size_t(R_), stream_));
  DEEPEP4J_CUDA_TRY(cudaEventRecord(reset_done_, stream_));
  DEEPEP4J_CUDA_TRY(cudaStreamWaitEvent(s, reset_done_, 0));
  DEEPEP4J_CUDA_TRY(launch_ce_dispatch(st, p, h, io, num_sms, s));
  int max_chunks = 0;
  for (int d = 0; d < R_; ++d)
    if (d != me) max_chunks = std::max(max_chunks, ce_chunks(p.out_rows[d], p.out_chunk[d]));
  for (int j = 0; j < max_chunks; ++j)
    for (int d = 0; d < R_; ++d) {
      if (d == me || j >= ce_chunks(p.out_rows[d], p.out_chunk[d])) continue;
      const int64_t n = p.out_rows[d], lo = int64_t(j) * p.out_chunk[d];
      const int64_t rows = std::min<int64_t>(n - lo, p.out_chunk[d]);
      if (int err = wait_packed(packed_ + d * kMaxCeChunks + j, uint32_t(num_sms))) return err;
      const uint8_t* src = p.staging + p.staging_off[d];
      uint8_t* zone = st.peers.region[d] + kRings + me * p.zone_bytes;
      uint8_t* row_dst = direct[d] != 0 ? reinterpret_cast<uint8_t*>(direct[d]) : zone;
      DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(row_dst + lo * io.row_bytes, src + lo * io.row_bytes,
                                        size_t(rows * io.row_bytes), cudaMemcpyDeviceToDevice, stream_));
      const int64_t meta_off = ce_dispatch_meta_off(n, io.row_bytes) + lo * meta_bytes;
      DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(zone + meta_off, src + meta_off, size_t(rows * meta_bytes),
                                        cudaMemcpyDeviceToDevice, stream_));
      if (int err = signal(st, d, j)) return err;
    }
  return DEEPEP4J_OK;
}

int CopyEngine::run_combine(const Step& st, const CePlan& p, const Routing& h, const CombineIo& io, int32_t num_sms,
                            cudaStream_t s) {
  const int me = st.rank;
  // y and the weights were ready when the step's barrier finished (the host waited for `s` there).
  DEEPEP4J_CUDA_TRY(launch_ce_combine_meta(st, p, h, io, stream_));
  DEEPEP4J_CUDA_TRY(launch_ce_combine(st, p, h, io, num_sms, s));
  const int K = h.num_topk;
  for (int d = 0; d < R_; ++d) {
    if (d == me || p.out_rows[d] == 0) continue;
    uint8_t* zone = st.peers.region[d] + kRings + me * p.zone_bytes;
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(zone + ce_combine_meta_off(p.out_rows[d], io.row_bytes),
                                      p.staging + p.staging_off[d], size_t(ce_combine_meta_bytes(p.out_rows[d], K)),
                                      cudaMemcpyDeviceToDevice, stream_));
  }
  int max_chunks = 0;
  for (int d = 0; d < R_; ++d)
    if (d != me) max_chunks = std::max(max_chunks, ce_chunks(p.out_rows[d], p.out_chunk[d]));
  for (int j = 0; j < max_chunks; ++j)
    for (int d = 0; d < R_; ++d) {
      if (d == me || j >= ce_chunks(p.out_rows[d], p.out_chunk[d])) continue;
      const int64_t lo = int64_t(j) * p.out_chunk[d];
      const int64_t rows = std::min<int64_t>(p.out_rows[d] - lo, p.out_chunk[d]);
      uint8_t* zone = st.peers.region[d] + kRings + me * p.zone_bytes;
      DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(zone + lo * io.row_bytes, io.y + (p.first_row[d] + lo) * io.row_bytes,
                                        size_t(rows * io.row_bytes), cudaMemcpyDeviceToDevice, stream_));
      if (int err = signal(st, d, j)) return err;
    }
  return DEEPEP4J_OK;
}

}  // namespace cuda
}  // namespace deepep4j
