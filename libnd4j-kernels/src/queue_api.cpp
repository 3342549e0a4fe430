// queue_api.cpp — the C API of queues (device arrays and host staging): argument rules, then the buffer device's
// Queue (src/cpu/host_queue.cpp, src/cuda/device_queue.cu).
#include <cinttypes>

#include "common/backend.h"
#include "common/guarded.h"
#include "common/host_copy.h"
#include "common/queue.h"
#include "deepep4j.h"

using namespace deepep4j;

namespace {

constexpr int E_ARG = DEEPEP4J_ERR_INVALID_ARGUMENT;

int need_queue(const deepep4j_queue* q, const char* call) {
  if (q == nullptr) return set_error(E_ARG, "queue = NULL: %s needs a queue of deepep4j_queue_create", call);
  return DEEPEP4J_OK;
}

// bytes >= 0, and both pointers set when there is something to copy.
int check_copy(const char* call, const void* device, const void* host, int64_t bytes) {
  if (bytes < 0) return set_error(E_ARG, "bytes = %" PRId64 ": %s needs bytes >= 0", bytes, call);
  if (bytes > 0 && device == nullptr) return set_error(E_ARG, "device = NULL: %s of %" PRId64 " bytes", call, bytes);
  if (bytes > 0 && host == nullptr) return set_error(E_ARG, "host = NULL: %s of %" PRId64 " bytes", call, bytes);
  return DEEPEP4J_OK;
}

}  // namespace

extern "C" {

int deepep4j_queue_create(deepep4j_buffer* buf, deepep4j_queue** out) {
  if (buf == nullptr) return set_error(E_ARG, "buf = NULL: deepep4j_queue_create needs a buffer");
  if (out == nullptr) return set_error(E_ARG, "out = NULL: nowhere to return the queue");
  return guarded("deepep4j_queue_create", [&] {
    auto q = std::make_unique<deepep4j_queue>();
    q->owner = buf;
    const deepep4j_config& c = buf->config;
    const int threads = HostCopier::resolve(c.host_copy_threads, buf->num_ranks);
    int st = c.device == DEEPEP4J_DEVICE_CUDA ? make_cuda_queue(buf->rank, c.device_id, c.timeout_ms, threads, &q->impl)
                                              : make_cpu_queue(buf->rank, threads, &q->impl);
    if (st != DEEPEP4J_OK) return st;
    *out = q.release();
    return ok();
  });
}

int deepep4j_queue_destroy(deepep4j_queue* q) {
  delete q;
  return ok();
}

void* deepep4j_queue_stream(const deepep4j_queue* q) { return q == nullptr ? nullptr : q->impl->stream(); }

int deepep4j_device_alloc(deepep4j_queue* q, int64_t bytes, void** out) {
  if (int st = need_queue(q, "deepep4j_device_alloc")) return st;
  if (out == nullptr) return set_error(E_ARG, "out = NULL: nowhere to return the device array");
  if (bytes < 0) return set_error(E_ARG, "bytes = %" PRId64 ": deepep4j_device_alloc needs bytes >= 0", bytes);
  *out = nullptr;
  if (bytes == 0) return ok();
  return guarded("deepep4j_device_alloc", [&] { return q->impl->alloc(bytes, out); });
}

int deepep4j_device_free(deepep4j_queue* q, void* device) {
  if (int st = need_queue(q, "deepep4j_device_free")) return st;
  if (device == nullptr) return ok();
  return guarded("deepep4j_device_free", [&] { return q->impl->release(device); });
}

int deepep4j_copy_to_device(deepep4j_queue* q, void* device, const void* host, int64_t bytes) {
  if (int st = need_queue(q, "deepep4j_copy_to_device")) return st;
  if (int st = check_copy("deepep4j_copy_to_device", device, host, bytes)) return st;
  if (bytes == 0) return ok();
  return guarded("deepep4j_copy_to_device", [&] { return q->impl->to_device(device, host, bytes); });
}

int deepep4j_copy_to_host(deepep4j_queue* q, void* host, const void* device, int64_t bytes) {
  if (int st = need_queue(q, "deepep4j_copy_to_host")) return st;
  if (int st = check_copy("deepep4j_copy_to_host", device, host, bytes)) return st;
  if (bytes == 0) return ok();
  return guarded("deepep4j_copy_to_host", [&] { return q->impl->to_host(host, device, bytes); });
}

int deepep4j_queue_synchronize(deepep4j_queue* q) {
  if (int st = need_queue(q, "deepep4j_queue_synchronize")) return st;
  return guarded("deepep4j_queue_synchronize", [&] { return q->impl->synchronize(); });
}

}  // extern "C"
