// backend.h — the internal seam between the C API (src/api.cpp) and the device backends.
//
// api.cpp owns argument checking that needs no peer (config fields, pointers, N/K/E/H rules, dtype) and the
// thread-local error; a Backend owns memory, peers, collectives and the data path. Each method returns a
// deepep4j_status and, on failure, has already called set_error(...) with a message naming argument, value and rule.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "deepep4j.h"

struct deepep4j_handle;

namespace deepep4j {

// Sets the calling thread's last error and returns `status` (printf-style message).
int set_error(int status, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
// Clears the calling thread's last error and returns DEEPEP4J_OK.
int ok();
const char* last_error();

// Bytes per element of a dtype (fp8 = 1); 0 for an unknown dtype.
size_t dtype_size(int32_t dtype);
const char* dtype_name(int32_t dtype);

// Routing state of one dispatch: the C API's opaque deepep4j_handle (defined below the namespace).
using Handle = ::deepep4j_handle;

class Backend {
 public:
  virtual ~Backend() = default;
  virtual int export_blob(void* blob, size_t capacity, size_t* len) = 0;
  virtual int connect(const void* const* blobs, const size_t* lens) = 0;
  virtual int get_dispatch_layout(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int32_t* per_rank,
                                  int32_t* per_expert, uint8_t* in_rank, void* stream) = 0;
  virtual int notify_dispatch(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int64_t hidden, int32_t dtype,
                              Handle** out_handle, int64_t* num_recv, int32_t* per_local_expert, void* stream) = 0;
  virtual int dispatch(Handle* h, int32_t dtype, const deepep4j_dispatch_args* a, void* stream) = 0;
  virtual int combine(Handle* h, int32_t dtype, const deepep4j_combine_args* a, void* stream) = 0;
  // Joins the peers' current collective step with a local failure (deepep4j_fail_step). A backend without a
  // step exchange reports the failure locally only.
  virtual int fail_step(int32_t status, const char* message) { return set_error(status, "%s", message); }
  // Stream-ordered mode (deepep4j.h). Backends whose calls complete on return (CPU) keep these defaults: nothing is
  // ever pending, so sync and comm_wait have nothing to wait for and the async combine is a plain one.
  virtual int sync(void* stream) {
    (void)stream;
    return ok();
  }
  virtual int combine_async(Handle* h, int32_t dtype, const deepep4j_combine_args* a, void* stream) {
    return combine(h, dtype, a, stream);
  }
  virtual int comm_wait(void* stream) {
    (void)stream;
    return ok();
  }
  // Worst-case sized handles re-routed on the device (deepep4j_notify_dispatch_queued).
  virtual int create_queued_handle(int64_t n, int32_t k, int32_t e, int64_t hidden, int32_t dtype, int64_t worst,
                                   Handle** out) {
    (void)n, (void)k, (void)e, (void)hidden, (void)dtype, (void)worst, (void)out;
    return set_error(DEEPEP4J_ERR_UNAVAILABLE,
                     "deepep4j_handle_create_queued: needs the CUDA deepep backend with stream_ordered = 1");
  }
  virtual int notify_dispatch_queued(Handle* h, const int64_t* topk_idx, int64_t* num_recv, int32_t* per_local_expert,
                                     void* stream) {
    (void)h, (void)topk_idx, (void)num_recv, (void)per_local_expert, (void)stream;
    return set_error(DEEPEP4J_ERR_UNAVAILABLE,
                     "deepep4j_notify_dispatch_queued: needs the CUDA deepep backend with stream_ordered = 1");
  }
  // A local failure in connect before this rank could reach its peers (bad or missing blobs): published where the
  // peers, which map this rank's region, see it, so they fail with PEER_ERROR instead of waiting for this rank.
  virtual int fail_connect(int32_t status, const char* message) { return set_error(status, "%s", message); }
};

// Factories. The CUDA one lives in src/cuda/ (or src/cuda_unavailable.cpp when the library is built without CUDA,
// where it returns DEEPEP4J_ERR_UNAVAILABLE with a message saying the build has no CUDA backend).
int make_cpu_backend(int32_t rank, int32_t num_ranks, const deepep4j_config& cfg, std::unique_ptr<Backend>* out);
int make_cuda_backend(int32_t rank, int32_t num_ranks, const deepep4j_config& cfg, std::unique_ptr<Backend>* out);
int cuda_device_count();  // 0 without CUDA

}  // namespace deepep4j

// The opaque buffer of the C API.
struct deepep4j_buffer {
  int32_t rank = 0;
  int32_t num_ranks = 0;
  deepep4j_config config{};
  bool connected = false;
  std::unique_ptr<deepep4j::Backend> backend;
};

// Routing state of one dispatch, shared by dispatch, combine and their cached (backward) re-use.
// Each backend subclasses it with what it keeps (host or device arrays).
struct deepep4j_handle {
  virtual ~deepep4j_handle() = default;
  const deepep4j_buffer* owner = nullptr;  // the buffer that created it (checked on use)
  int64_t num_tokens = 0;                   // N
  int64_t num_recv_tokens = 0;              // M
  int32_t num_topk = 0;                     // K
  int32_t num_experts = 0;                  // E
  int64_t hidden = 0;                       // H
  int32_t dtype = 0;                        // dtype of the notify call
  int32_t num_ranks = 0;
  int32_t recv_counts_per_rank[DEEPEP4J_MAX_RANKS] = {};
  bool queued = false;  // worst-case sized, routed on the device: M and the per-rank counts live there
};

