// copy_engine.cu — the host side of copy-engine transfers: mode, plans, staging, and the copy stream's queue of
// wait / copy / signal per chunk (the SM side is in copy_engine_kernels.cu).
#include "cuda/copy_engine.h"

#include <cuda.h>

#include <algorithm>
#include <cinttypes>
#include <cstdlib>
#include <cstdio>
#include <cstring>

#include "cuda/cuda_util.h"

namespace deepep4j {
namespace cuda {

namespace {
using WaitValue32Fn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
using PointerGetAttributeFn = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);
}  // namespace

CopyTarget CopyEngine::copy_target(const void* p, int device) const {
  CopyTarget t;
  cudaPointerAttributes a{};
  if (p == nullptr || get_attribute_ == nullptr || cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return t;
  }
  if (a.type != cudaMemoryTypeDevice || a.device != device) return t;
  CUmemoryPool pool = nullptr;
  if (reinterpret_cast<PointerGetAttributeFn>(get_attribute_)(&pool, CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE,
                                                              CUdeviceptr(p)) != CUDA_SUCCESS)
    return t;
  t.device_memory = true;
  t.device = device;
  t.pool = reinterpret_cast<cudaMemPool_t>(pool);
  return t;
}

bool CopyTarget::reachable_from(int peer_device) const {
  if (!device_memory) return false;
  if (pool == nullptr || peer_device == device) return true;
  cudaMemLocation where{};
  where.type = cudaMemLocationTypeDevice;
  where.id = peer_device;
  cudaMemAccessFlags flags = cudaMemAccessFlagsProtNone;
  if (cudaMemPoolGetAccess(&flags, pool, &where) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return flags == cudaMemAccessFlagsProtReadWrite;
}

Transfer transfer_of(const deepep4j_config& cfg) {
  return cfg.cuda_transfer == DEEPEP4J_CUDA_TRANSFER_SM            ? Transfer::kSm
         : cfg.cuda_transfer == DEEPEP4J_CUDA_TRANSFER_COPY_ENGINE ? Transfer::kCopyEngine
                                                                   : Transfer::kAuto;
}

CopyEngine::~CopyEngine() {
  if (stream_ && staging_) cudaFreeAsync(staging_, stream_);
  if (stream_) cudaStreamSynchronize(stream_), cudaStreamDestroy(stream_);
  if (pool_) cudaMemPoolDestroy(pool_);
  if (reset_done_) cudaEventDestroy(reset_done_);
  for (cudaEvent_t e : {kernel_begin_, kernel_end_, copies_begin_})
    if (e) cudaEventDestroy(e);
  for (cudaEvent_t e : chunk_end_)
    if (e) cudaEventDestroy(e);
  if (packed_) cudaFree(packed_);
}

int CopyEngine::init(int32_t num_ranks, int32_t chunks, bool trace) {
  R_ = num_ranks;
  chunks_ = std::max(1, std::min(chunks, kMaxCeChunks));
  trace_ = trace;
  DEEPEP4J_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  int device = 0;
  DEEPEP4J_CUDA_TRY(cudaGetDevice(&device));
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device;
  DEEPEP4J_CUDA_TRY(cudaMemPoolCreate(&pool_, &props));
  DEEPEP4J_CUDA_TRY(cudaEventCreateWithFlags(&reset_done_, cudaEventDisableTiming));
  DEEPEP4J_CUDA_TRY(cudaMalloc(reinterpret_cast<void**>(&packed_), sizeof(uint32_t) * (kMaxCeChunks + 1)));
  DEEPEP4J_CUDA_TRY(cudaMemset(packed_, 0, sizeof(uint32_t) * (kMaxCeChunks + 1)));
  if (trace_) {
    for (cudaEvent_t* e : {&kernel_begin_, &kernel_end_, &copies_begin_}) DEEPEP4J_CUDA_TRY(cudaEventCreate(e));
    for (cudaEvent_t& e : chunk_end_) DEEPEP4J_CUDA_TRY(cudaEventCreate(&e));
  }

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
  // Stream-ordered on the (idle) copy stream, from a pool of our own: cudaMalloc/cudaFree may wait for the whole
  // device, and growing a pool that other devices may access (the default one can be) maps memory on them, which can
  // wait for a spinning kernel of another rank there, that waits for us.
  if (staging_) cudaFreeAsync(staging_, stream_), staging_ = nullptr, staging_bytes_ = 0;
  if (cudaMallocFromPoolAsync(reinterpret_cast<void**>(&staging_), size_t(bytes), pool_, stream_) != cudaSuccess) {
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

void CopyEngine::plan_chunks(const CudaHandle& h, CePlan* p) const {
  const int C = h.r.channels;
  p->chunks = std::max(1, std::min({C, chunks_, kCeAllLanded}));
  for (int j = 0; j <= p->chunks; ++j) p->chunk_channel[j] = int32_t(int64_t(j) * C / p->chunks);
}

CePlan CopyEngine::new_plan(const CudaHandle& h, int64_t zone_bytes) const {
  CePlan p{};
  p.zone_bytes = zone_bytes;
  p.packed = packed_;
  p.epoch_word = packed_ + kMaxCeChunks;
  plan_chunks(h, &p);
  return p;
}

Check CopyEngine::attach_staging(int64_t bytes, CePlan p, CePlan* out) {
  Check grown = grow_staging(std::max<int64_t>(bytes, 16));
  if (!grown.ok()) return grown;
  p.staging = staging_;
  *out = p;
  return Check{};
}

Check CopyEngine::plan_dispatch(const CudaHandle& h, int32_t me, int64_t row_bytes, const DispatchSlot& meta,
                                int64_t zone_bytes, CePlan* out) {
  CePlan p = new_plan(h, zone_bytes);
  const int C = h.r.channels;
  auto bytes_for = [&](int64_t n) { return ce_dispatch_meta_off(n, row_bytes) + n * meta.bytes; };
  int64_t staging = 0;
  for (int d = 0; d < R_; ++d) {
    p.out_rows[d] = int32_t(sent_to(h, d, C));
    p.in_rows[d] = h.recv_counts_per_rank[d];
    if (d == me) continue;
    if (bytes_for(p.out_rows[d]) > zone_bytes) return zone_fails(bytes_for(p.out_rows[d]), zone_bytes, d, "dispatch");
    if (bytes_for(p.in_rows[d]) > zone_bytes) return zone_fails(bytes_for(p.in_rows[d]), zone_bytes, d, "dispatch");
    p.staging_off[d] = staging;
    staging += DispatchSlot::align16(bytes_for(p.out_rows[d]));
    p.largest_bytes = std::max({p.largest_bytes, bytes_for(p.out_rows[d]), bytes_for(p.in_rows[d])});
  }
  return attach_staging(staging, p, out);
}

Check CopyEngine::plan_combine(const CudaHandle& h, int32_t me, int64_t row_bytes, int64_t zone_bytes, CePlan* out) {
  CePlan p = new_plan(h, zone_bytes);
  const int C = h.r.channels;
  int64_t staging = 0, first_row = 0;
  for (int d = 0; d < R_; ++d) {
    p.first_row[d] = first_row;
    first_row += h.recv_counts_per_rank[d];
    p.out_rows[d] = h.recv_counts_per_rank[d];  // combine sends back what dispatch received
    p.in_rows[d] = int32_t(sent_to(h, d, C));
    if (d == me) continue;
    for (int64_t n : {int64_t(p.out_rows[d]), int64_t(p.in_rows[d])}) {
      const int64_t need = ce_combine_meta_off(n, row_bytes) + ce_combine_meta_bytes(n, h.num_topk);
      if (need > zone_bytes) return zone_fails(need, zone_bytes, d, "combine");
      p.largest_bytes = std::max(p.largest_bytes, need);
    }
    p.staging_off[d] = staging;
    staging += ce_combine_meta_bytes(p.out_rows[d], h.num_topk);
  }
  return attach_staging(staging, p, out);
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
  DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(arrivals(st.peers.region[d], st.rank) + j, packed_ + kMaxCeChunks, 4,
                                    cudaMemcpyDeviceToDevice, stream_));
  return DEEPEP4J_OK;
}

namespace {
// Rows of chunk j among `counts` (a peer's rows per channel, channel order): [lo, hi).
void chunk_rows(const CePlan& p, const int32_t* counts, int j, int64_t* lo, int64_t* hi) {
  int64_t n = 0;
  for (int c = 0; c < p.chunk_channel[j + 1]; ++c) {
    if (c == p.chunk_channel[j]) *lo = n;
    n += counts[c];
  }
  *hi = n;
}
}  // namespace

int CopyEngine::run_dispatch(const Step& st, const CePlan& p, const CudaHandle& h, const DispatchIo& io,
                             int64_t meta_bytes, const uint64_t* direct, int32_t num_sms, cudaStream_t s) {
  const int me = st.rank, C = h.r.channels;
  // Counters back to zero before the kernel counts into them; the copy stream only reads them after this.
  DEEPEP4J_CUDA_TRY(cudaMemsetAsync(packed_, 0, sizeof(uint32_t) * kMaxCeChunks, stream_));
  DEEPEP4J_CUDA_TRY(cudaEventRecord(reset_done_, stream_));
  DEEPEP4J_CUDA_TRY(cudaStreamWaitEvent(s, reset_done_, 0));
  if (trace_) cudaEventRecord(kernel_begin_, s), cudaEventRecord(copies_begin_, stream_), traced_chunks_ = 0;
  DEEPEP4J_CUDA_TRY(launch_ce_dispatch(st, p, h.r, io, num_sms, s));
  if (trace_) cudaEventRecord(kernel_end_, s);
  const int64_t N = h.num_tokens, per_channel = h.r.tokens_per_channel;
  for (int j = 0; j < p.chunks; ++j) {
    const int64_t tokens = std::min(N, p.chunk_channel[j + 1] * per_channel) - std::min(N, p.chunk_channel[j] * per_channel);
    if (tokens == 0) continue;  // no rows for anyone
    if (int err = wait_packed(packed_ + j, uint32_t(tokens))) return err;
    int64_t bytes = 0;
    for (int d = 0; d < R_; ++d) {
      if (d == me) continue;
      int64_t lo = 0, hi = 0;
      chunk_rows(p, h.send_counts_host.data() + size_t(d) * C, j, &lo, &hi);
      if (hi == lo) continue;
      const uint8_t* src = p.staging + p.staging_off[d];
      uint8_t* zone = p.zone(st.peers.region[d], me);
      uint8_t* row_dst = direct[d] != 0 ? reinterpret_cast<uint8_t*>(direct[d]) : zone;
      DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(row_dst + lo * io.row_bytes, src + lo * io.row_bytes,
                                        size_t((hi - lo) * io.row_bytes), cudaMemcpyDeviceToDevice, stream_));
      bytes += (hi - lo) * io.row_bytes;
      if (direct[d] != 0) continue;  // its metadata goes once, after the last chunk
      const int64_t meta_off = ce_dispatch_meta_off(p.out_rows[d], io.row_bytes) + lo * meta_bytes;
      DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(zone + meta_off, src + meta_off, size_t((hi - lo) * meta_bytes),
                                        cudaMemcpyDeviceToDevice, stream_));
      if (int err = signal(st, d, j)) return err;
    }
    trace_chunk(bytes);
  }
  for (int d = 0; d < R_; ++d) {
    if (d == me || direct[d] == 0 || p.out_rows[d] == 0) continue;
    const int64_t meta_off = ce_dispatch_meta_off(p.out_rows[d], io.row_bytes);
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(p.zone(st.peers.region[d], me) + meta_off,
                                      p.staging + p.staging_off[d] + meta_off, size_t(p.out_rows[d] * meta_bytes),
                                      cudaMemcpyDeviceToDevice, stream_));
    if (int err = signal(st, d, kCeAllLanded)) return err;
  }
  return DEEPEP4J_OK;
}

int CopyEngine::run_combine(const Step& st, const CePlan& p, const CudaHandle& h, const CombineIo& io,
                            int32_t num_sms, cudaStream_t s) {
  const int me = st.rank, C = h.r.channels, K = h.num_topk;
  // y and the weights were ready when the step's barrier finished (the host waited for `s` there).
  if (trace_) cudaEventRecord(kernel_begin_, s), cudaEventRecord(copies_begin_, stream_), traced_chunks_ = 0;
  DEEPEP4J_CUDA_TRY(launch_ce_combine_meta(st, p, h.r, io, stream_));
  DEEPEP4J_CUDA_TRY(launch_ce_combine(st, p, h.r, io, num_sms, s));
  if (trace_) cudaEventRecord(kernel_end_, s);
  for (int d = 0; d < R_; ++d) {
    if (d == me || p.out_rows[d] == 0) continue;
    uint8_t* zone = p.zone(st.peers.region[d], me);
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(zone + ce_combine_meta_off(p.out_rows[d], io.row_bytes),
                                      p.staging + p.staging_off[d], size_t(ce_combine_meta_bytes(p.out_rows[d], K)),
                                      cudaMemcpyDeviceToDevice, stream_));
  }
  for (int j = 0; j < p.chunks; ++j) {
    int64_t bytes = 0;
    for (int d = 0; d < R_; ++d) {
      if (d == me) continue;
      int64_t lo = 0, hi = 0;  // rows going back to d = rows received from d, in d's channel order
      chunk_rows(p, h.recv_counts_host.data() + size_t(d) * C, j, &lo, &hi);
      if (hi == lo) continue;
      uint8_t* zone = p.zone(st.peers.region[d], me);
      DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(zone + lo * io.row_bytes, io.y + (p.first_row[d] + lo) * io.row_bytes,
                                        size_t((hi - lo) * io.row_bytes), cudaMemcpyDeviceToDevice, stream_));
      bytes += (hi - lo) * io.row_bytes;
      if (int err = signal(st, d, j)) return err;
    }
    trace_chunk(bytes);
  }
  return DEEPEP4J_OK;
}

void CopyEngine::trace_chunk(int64_t bytes) {
  if (!trace_ || bytes == 0) return;
  cudaEventRecord(chunk_end_[traced_chunks_], stream_);
  chunk_bytes_[traced_chunks_++] = bytes;
}

void CopyEngine::print_trace(const char* call, int32_t rank, double barrier_us, double enqueue_us, double total_us) {
  if (!trace_) return;
  auto since = [&](cudaEvent_t a, cudaEvent_t b) {
    float ms = 0;
    return cudaEventElapsedTime(&ms, a, b) == cudaSuccess ? double(ms) * 1e3 : -1.0;
  };
  char line[1024];
  int n = std::snprintf(line, sizeof(line),
                        "deepep4j trace: %s rank %d copy_engine: call %.1f us = barrier+sync %.1f, enqueue %.1f, "
                        "rest %.1f; kernel %.1f us; copies (end after kernel start, MB, GB/s):",
                        call, rank, total_us, barrier_us, enqueue_us, total_us - barrier_us - enqueue_us,
                        since(kernel_begin_, kernel_end_));
  double prev = since(kernel_begin_, copies_begin_);
  for (int j = 0; j < traced_chunks_ && n < int(sizeof(line)) - 64; ++j) {
    const double end = since(kernel_begin_, chunk_end_[j]);
    n += std::snprintf(line + n, sizeof(line) - size_t(n), " %.1f (%.1f, %.0f)", end, double(chunk_bytes_[j]) / 1e6,
                       double(chunk_bytes_[j]) / ((end - prev) * 1e3));
    prev = end;
  }
  std::fprintf(stderr, "%s\n", line);
}

}  // namespace cuda
}  // namespace deepep4j
