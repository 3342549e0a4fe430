// api.cpp — the C API: checks what needs no peer, then forwards to the buffer's backend (src/common/backend.h).
#include <cinttypes>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <new>

#include "common/backend.h"
#include "common/guarded.h"
#include "common/validate.h"
#include "deepep4j.h"

using namespace deepep4j;

#define DEEPEP4J_VERSION_STRING "0.1.0"

namespace {

// A decimal int, or -1 when `v` is not one.
int int_or_invalid(const char* v) {
  char* end = nullptr;
  long n = std::strtol(v, &end, 10);
  return (end == v || *end != 0 || n < 0 || n > INT32_MAX) ? -1 : int(n);
}

int fail(const Check& c) { return set_error(c.status, "%s", c.message.c_str()); }

int need_buffer(const deepep4j_buffer* buf, bool connected, const char* call) {
  if (buf == nullptr) return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "buf = NULL: %s needs a buffer", call);
  if (connected && !buf->connected)
    return set_error(DEEPEP4J_ERR_STATE, "%s on rank %d: buffer not connected (call deepep4j_buffer_connect first)", call,
                     buf->rank);
  return DEEPEP4J_OK;
}

// A bad handle is seen by this rank only, so the failure joins the peers' step (they fail with PEER_ERROR).
int need_handle(deepep4j_buffer* buf, const deepep4j_handle* h, const char* call) {
  Check c;
  if (h == nullptr) c = Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT, "handle = NULL: %s needs a dispatch handle", call);
  else if (h->owner != buf)
    c = Check::fail(DEEPEP4J_ERR_STATE, "handle: belongs to another buffer than the one %s was called on", call);
  if (c.ok()) return DEEPEP4J_OK;
  return guarded(call, [&] { return buf->backend->fail_step(c.status, c.message.c_str()); });
}

}  // namespace

extern "C" {

const char* deepep4j_version(void) { return DEEPEP4J_VERSION_STRING; }

int deepep4j_cuda_device_count(void) { return cuda_device_count(); }

int deepep4j_cuda_available(void) { return cuda_device_count() > 0 ? 1 : 0; }

void deepep4j_config_init(deepep4j_config* c) {
  if (c == nullptr) return;
  c->buffer_bytes = int64_t(256) << 20;
  c->num_sms = 20;
  c->max_send_tokens_per_chunk = 16;
  c->ring_tokens = 128;
  c->timeout_ms = 60000;
  c->device = DEEPEP4J_DEVICE_CPU;
  c->device_id = 0;
  c->backend = DEEPEP4J_BACKEND_DEEPEP;
  c->num_threads = 0;
  c->max_hidden_bytes = 0;
  c->host_copy_threads = 0;
  // Defaults from the environment (the only place the library reads it); a bad value is kept invalid for
  // buffer_create to name.
  const char* v = getenv("DEEPEP4J_CUDA_TRANSFER");
  c->cuda_transfer = v == nullptr || *v == 0 || std::strcmp(v, "auto") == 0 ? DEEPEP4J_CUDA_TRANSFER_AUTO
                     : std::strcmp(v, "sm") == 0                             ? DEEPEP4J_CUDA_TRANSFER_SM
                     : std::strcmp(v, "copy_engine") == 0                    ? DEEPEP4J_CUDA_TRANSFER_COPY_ENGINE
                                                                             : -1;
  v = getenv("DEEPEP4J_CE_CHUNKS");
  c->ce_chunks = v == nullptr || *v == 0 ? 4 : int_or_invalid(v);
  v = getenv("DEEPEP4J_CUDA_TRACE");
  c->cuda_trace = v != nullptr && std::strcmp(v, "1") == 0 ? 1 : 0;
  v = getenv("DEEPEP4J_CPU_DIRECT");
  c->cpu_direct = v != nullptr && std::strcmp(v, "0") == 0 ? 0 : 1;
  v = getenv("DEEPEP4J_STREAM_ORDERED");
  c->stream_ordered = v != nullptr && std::strcmp(v, "1") == 0 ? 1 : 0;
}

int deepep4j_buffer_size_hint(int64_t hidden, int32_t dtype, int32_t num_ranks, const deepep4j_config* config,
                              int64_t* out_bytes) {
  if (config == nullptr) return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "config = NULL: pass a deepep4j_config");
  if (out_bytes == nullptr) return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "out_bytes = NULL: nowhere to write");
  deepep4j_config c = *config;
  c.buffer_bytes = 1;  // the value being computed; not checked here
  Check k = check_config(0, num_ranks, c);
  if (!k.ok()) return fail(k);
  k = check_payload(hidden, dtype, true, "buffer_size_hint");
  if (!k.ok()) return fail(k);
  // R * channels rings, each of ring_tokens slots of the larger of the dispatch / combine slot for K = DEEPEP4J_MAX_TOPK.
  // Ring counters live outside buffer_bytes.
  *out_bytes = buffer_bytes_for(step_slot_bytes(hidden, dtype, DEEPEP4J_MAX_TOPK), c.ring_tokens, num_ranks,
                                num_channels(c));
  return ok();
}

int deepep4j_buffer_size_min(int64_t hidden, int32_t dtype, int32_t num_topk, int32_t num_ranks,
                             const deepep4j_config* config, int64_t* out_bytes) {
  if (config == nullptr) return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "config = NULL: pass a deepep4j_config");
  if (out_bytes == nullptr) return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "out_bytes = NULL: nowhere to write");
  if (num_topk < 1 || num_topk > DEEPEP4J_MAX_TOPK)
    return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "num_topk = %d: must be in [1, %d]", num_topk, DEEPEP4J_MAX_TOPK);
  deepep4j_config c = *config;
  c.buffer_bytes = 1;  // the value being computed; not checked here
  Check k = check_config(0, num_ranks, c);
  if (!k.ok()) return fail(k);
  k = check_payload(hidden, dtype, true, "buffer_size_min");
  if (!k.ok()) return fail(k);
  *out_bytes = min_buffer_bytes(hidden, dtype, num_topk, c.max_send_tokens_per_chunk, num_ranks, num_channels(c));
  return ok();
}

int deepep4j_buffer_create(int32_t rank, int32_t num_ranks, const deepep4j_config* config, deepep4j_buffer** out) {
  if (out == nullptr) return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "out = NULL: nowhere to return the buffer");
  if (config == nullptr) return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "config = NULL: pass a deepep4j_config");
  Check k = check_config(rank, num_ranks, *config);
  if (!k.ok()) return fail(k);
  return guarded("deepep4j_buffer_create", [&] {
    auto* b = new deepep4j_buffer();
    b->rank = rank;
    b->num_ranks = num_ranks;
    b->config = *config;
    int st = config->device == DEEPEP4J_DEVICE_CUDA ? make_cuda_backend(rank, num_ranks, *config, &b->backend)
                                                   : make_cpu_backend(rank, num_ranks, *config, &b->backend);
    if (st != DEEPEP4J_OK) {
      delete b;
      return st;  // the factory set the message
    }
    *out = b;
    return ok();
  });
}

int deepep4j_buffer_export(deepep4j_buffer* buf, void* blob, size_t capacity, size_t* len) {
  if (int st = need_buffer(buf, false, "deepep4j_buffer_export")) return st;
  if (blob == nullptr || len == nullptr)
    return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "blob/len = NULL: export needs somewhere to write");
  return guarded("deepep4j_buffer_export", [&] { return buf->backend->export_blob(blob, capacity, len); });
}

int deepep4j_buffer_connect(deepep4j_buffer* buf, const void* const* blobs, const size_t* lens) {
  if (int st = need_buffer(buf, false, "deepep4j_buffer_connect")) return st;
  if (buf->connected) return set_error(DEEPEP4J_ERR_STATE, "deepep4j_buffer_connect: rank %d is already connected", buf->rank);
  // Checks only this rank can see reach the peers through fail_connect (they would otherwise wait for this rank).
  Check c;
  if (blobs == nullptr || lens == nullptr)
    c = Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT, "blobs/lens = NULL: connect needs one blob per rank (%d)",
                    buf->num_ranks);
  for (int i = 0; c.ok() && i < buf->num_ranks; ++i)
    if (blobs[i] == nullptr || lens[i] == 0 || lens[i] > DEEPEP4J_MAX_BLOB_BYTES)
      c = Check::fail(DEEPEP4J_ERR_INVALID_ARGUMENT, "blobs[%d] (len %zu): must be a non-empty blob of at most %d bytes",
                      i, blobs[i] == nullptr ? size_t(0) : lens[i], DEEPEP4J_MAX_BLOB_BYTES);
  if (!c.ok())
    return guarded("deepep4j_buffer_connect", [&] { return buf->backend->fail_connect(c.status, c.message.c_str()); });
  return guarded("deepep4j_buffer_connect", [&] {
    int st = buf->backend->connect(blobs, lens);
    if (st == DEEPEP4J_OK) buf->connected = true;
    return st;
  });
}

int deepep4j_buffer_destroy(deepep4j_buffer* buf) {
  if (buf == nullptr) return ok();
  delete buf;
  return ok();
}

int deepep4j_buffer_rank(const deepep4j_buffer* buf) { return buf ? buf->rank : -1; }
int deepep4j_buffer_num_ranks(const deepep4j_buffer* buf) { return buf ? buf->num_ranks : -1; }

int deepep4j_buffer_config(const deepep4j_buffer* buf, deepep4j_config* out) {
  if (int st = need_buffer(buf, false, "deepep4j_buffer_config")) return st;
  if (out == nullptr) return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "out = NULL: nowhere to write the config");
  *out = buf->config;
  return ok();
}

int deepep4j_get_dispatch_layout(deepep4j_buffer* buf, const int64_t* topk_idx, int64_t num_tokens, int32_t num_topk,
                                 int32_t num_experts, int32_t* per_rank, int32_t* per_expert, uint8_t* in_rank,
                                 void* stream) {
  if (int st = need_buffer(buf, false, "deepep4j_get_dispatch_layout")) return st;
  return guarded("deepep4j_get_dispatch_layout", [&] {
    return buf->backend->get_dispatch_layout(topk_idx, num_tokens, num_topk, num_experts, per_rank, per_expert, in_rank,
                                             stream);
  });
}

int deepep4j_notify_dispatch(deepep4j_buffer* buf, const int64_t* topk_idx, int64_t num_tokens, int32_t num_topk,
                             int32_t num_experts, int64_t hidden, int32_t dtype, deepep4j_handle** out_handle,
                             int64_t* num_recv_tokens, int32_t* per_local_expert, void* stream) {
  if (int st = need_buffer(buf, true, "deepep4j_notify_dispatch")) return st;
  if (out_handle == nullptr || num_recv_tokens == nullptr)  // the peers learn of it: the step fails on every rank
    return guarded("deepep4j_notify_dispatch", [&] {
      return buf->backend->fail_step(DEEPEP4J_ERR_INVALID_ARGUMENT,
                                     "out_handle/num_recv_tokens = NULL: notify_dispatch must return both");
    });
  // Argument rules are checked inside the backend, after which every rank learns every rank's verdict.
  return guarded("deepep4j_notify_dispatch", [&] {
    Handle* h = nullptr;
    int st = buf->backend->notify_dispatch(topk_idx, num_tokens, num_topk, num_experts, hidden, dtype, &h,
                                           num_recv_tokens, per_local_expert, stream);
    if (st != DEEPEP4J_OK) return st;
    h->owner = buf;
    *out_handle = h;
    return ok();
  });
}

int deepep4j_dispatch(deepep4j_buffer* buf, deepep4j_handle* handle, int32_t dtype, const deepep4j_dispatch_args* args,
                      void* stream) {
  if (int st = need_buffer(buf, true, "deepep4j_dispatch")) return st;
  if (int st = need_handle(buf, handle, "deepep4j_dispatch")) return st;
  if (dtype == -1) dtype = handle->dtype;
  return guarded("deepep4j_dispatch", [&] { return buf->backend->dispatch(handle, dtype, args, stream); });
}

int deepep4j_combine(deepep4j_buffer* buf, deepep4j_handle* handle, int32_t dtype, const deepep4j_combine_args* args,
                     void* stream) {
  if (int st = need_buffer(buf, true, "deepep4j_combine")) return st;
  if (int st = need_handle(buf, handle, "deepep4j_combine")) return st;
  return guarded("deepep4j_combine", [&] { return buf->backend->combine(handle, dtype, args, stream); });
}

int deepep4j_fail_step(deepep4j_buffer* buf, int32_t status, const char* message) {
  if (int st = need_buffer(buf, true, "deepep4j_fail_step")) return st;
  if (status == DEEPEP4J_OK)
    return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "status = DEEPEP4J_OK: fail_step needs a failure status");
  const char* msg = message ? message : "(no message)";
  return guarded("deepep4j_fail_step", [&] { return buf->backend->fail_step(status, msg); });
}

int deepep4j_buffer_sync(deepep4j_buffer* buf, void* stream) {
  if (int st = need_buffer(buf, false, "deepep4j_buffer_sync")) return st;
  return guarded("deepep4j_buffer_sync", [&] { return buf->backend->sync(stream); });
}

int deepep4j_combine_async(deepep4j_buffer* buf, deepep4j_handle* handle, int32_t dtype,
                           const deepep4j_combine_args* args, void* stream) {
  if (int st = need_buffer(buf, true, "deepep4j_combine_async")) return st;
  if (int st = need_handle(buf, handle, "deepep4j_combine_async")) return st;
  return guarded("deepep4j_combine_async", [&] { return buf->backend->combine_async(handle, dtype, args, stream); });
}

int deepep4j_comm_wait(deepep4j_buffer* buf, void* stream) {
  if (int st = need_buffer(buf, false, "deepep4j_comm_wait")) return st;
  return guarded("deepep4j_comm_wait", [&] { return buf->backend->comm_wait(stream); });
}

int deepep4j_handle_create_queued(deepep4j_buffer* buf, int64_t num_tokens, int32_t num_topk, int32_t num_experts,
                                  int64_t hidden, int32_t dtype, int64_t num_worst_tokens,
                                  deepep4j_handle** out_handle) {
  if (int st = need_buffer(buf, true, "deepep4j_handle_create_queued")) return st;
  if (out_handle == nullptr)
    return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "out_handle = NULL: nowhere to return the handle");
  if (num_worst_tokens < 0)
    return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "num_worst_tokens = %" PRId64 ": must be >= 0", num_worst_tokens);
  return guarded("deepep4j_handle_create_queued", [&] {
    Handle* h = nullptr;
    int st = buf->backend->create_queued_handle(num_tokens, num_topk, num_experts, hidden, dtype, num_worst_tokens, &h);
    if (st != DEEPEP4J_OK) return st;
    h->owner = buf;
    h->queued = true;
    *out_handle = h;
    return ok();
  });
}

int deepep4j_notify_dispatch_queued(deepep4j_buffer* buf, deepep4j_handle* handle, const int64_t* topk_idx,
                                    int64_t* num_recv_tokens, int32_t* per_local_expert, void* stream) {
  if (int st = need_buffer(buf, true, "deepep4j_notify_dispatch_queued")) return st;
  if (int st = need_handle(buf, handle, "deepep4j_notify_dispatch_queued")) return st;
  if (!handle->queued)
    return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT,
                     "handle: notify_dispatch_queued needs a handle of deepep4j_handle_create_queued");
  return guarded("deepep4j_notify_dispatch_queued", [&] {
    return buf->backend->notify_dispatch_queued(handle, topk_idx, num_recv_tokens, per_local_expert, stream);
  });
}

int64_t deepep4j_handle_num_tokens(const deepep4j_handle* h) { return h ? h->num_tokens : -1; }
int64_t deepep4j_handle_num_recv_tokens(const deepep4j_handle* h) { return h ? h->num_recv_tokens : -1; }
int32_t deepep4j_handle_num_topk(const deepep4j_handle* h) { return h ? h->num_topk : -1; }
int64_t deepep4j_handle_hidden(const deepep4j_handle* h) { return h ? h->hidden : -1; }
int32_t deepep4j_handle_num_experts(const deepep4j_handle* h) { return h ? h->num_experts : -1; }

int deepep4j_handle_recv_counts_per_rank(const deepep4j_handle* h, int32_t* out) {
  if (h == nullptr || out == nullptr)
    return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "handle/out = NULL: need a handle and an int32[num_ranks]");
  if (h->queued)
    return set_error(DEEPEP4J_ERR_STATE, "handle: a queued handle's per-rank counts live on the device (its notify "
                     "writes num_recv_tokens there)");
  for (int i = 0; i < h->num_ranks; ++i) out[i] = h->recv_counts_per_rank[i];
  return ok();
}

int deepep4j_handle_destroy(deepep4j_handle* h) {
  delete h;
  return ok();
}

}  // extern "C"
