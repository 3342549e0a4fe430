// validate.cpp — argument rules shared by every backend.
#include "validate.h"

#include <cinttypes>
#include <cstdarg>
#include <cstdio>

namespace deepep4j {

Check Check::fail(int status, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  Check c;
  c.status = status;
  c.message = buf;
  return c;
}

static const int E_ARG = DEEPEP4J_ERR_INVALID_ARGUMENT;

Check check_config(int32_t rank, int32_t num_ranks, const deepep4j_config& c) {
  if (num_ranks < 1 || num_ranks > DEEPEP4J_MAX_RANKS)
    return Check::fail(E_ARG, "num_ranks = %d: must be in [1, %d]", num_ranks, DEEPEP4J_MAX_RANKS);
  if (rank < 0 || rank >= num_ranks)
    return Check::fail(E_ARG, "rank = %d: must be in [0, num_ranks = %d)", rank, num_ranks);
  if (c.num_sms < 2 || c.num_sms % 2 != 0)
    return Check::fail(E_ARG, "num_sms = %d: must be even and >= 2 (each channel is a sender SM and a receiver SM)",
                       c.num_sms);
  if (c.num_sms > 256) return Check::fail(E_ARG, "num_sms = %d: must be <= 256", c.num_sms);
  if (c.max_send_tokens_per_chunk < 1)
    return Check::fail(E_ARG, "max_send_tokens_per_chunk = %d: must be >= 1", c.max_send_tokens_per_chunk);
  if (c.ring_tokens < c.max_send_tokens_per_chunk)
    return Check::fail(E_ARG, "ring_tokens = %d: must be >= max_send_tokens_per_chunk = %d", c.ring_tokens,
                       c.max_send_tokens_per_chunk);
  if (c.timeout_ms <= 0) return Check::fail(E_ARG, "timeout_ms = %d: must be > 0", c.timeout_ms);
  if (c.device != DEEPEP4J_DEVICE_CPU && c.device != DEEPEP4J_DEVICE_CUDA)
    return Check::fail(E_ARG, "device = %d: must be DEEPEP4J_DEVICE_CPU (0) or DEEPEP4J_DEVICE_CUDA (1)", c.device);
  if (c.backend != DEEPEP4J_BACKEND_DEEPEP && c.backend != DEEPEP4J_BACKEND_ALLTOALL)
    return Check::fail(E_ARG, "backend = %d: must be DEEPEP4J_BACKEND_DEEPEP (0) or DEEPEP4J_BACKEND_ALLTOALL (1)",
                       c.backend);
  if (c.num_threads < 0 || c.num_threads > 64)
    return Check::fail(E_ARG, "num_threads = %d: must be in [0, 64] (0 = automatic)", c.num_threads);
  if (c.host_copy_threads < 0 || c.host_copy_threads > 64)
    return Check::fail(E_ARG, "host_copy_threads = %d: must be in [0, 64] (0 = automatic)", c.host_copy_threads);
  if (c.max_hidden_bytes < 0)
    return Check::fail(E_ARG, "max_hidden_bytes = %d: must be >= 0 (0 = checked at dispatch)", c.max_hidden_bytes);
  if (c.cuda_transfer != DEEPEP4J_CUDA_TRANSFER_AUTO && c.cuda_transfer != DEEPEP4J_CUDA_TRANSFER_SM &&
      c.cuda_transfer != DEEPEP4J_CUDA_TRANSFER_COPY_ENGINE)
    return Check::fail(E_ARG, "cuda_transfer = %d: must be 0 (auto), 1 (sm) or 2 (copy_engine); the default comes from "
                       "DEEPEP4J_CUDA_TRANSFER = auto | sm | copy_engine", c.cuda_transfer);
  if (c.ce_chunks < 1 || c.ce_chunks > 16)
    return Check::fail(E_ARG, "ce_chunks = %d: must be in [1, 16]; the default comes from DEEPEP4J_CE_CHUNKS",
                       c.ce_chunks);
  if (c.cuda_trace != 0 && c.cuda_trace != 1)
    return Check::fail(E_ARG, "cuda_trace = %d: must be 0 or 1", c.cuda_trace);
  if (c.cpu_direct != 0 && c.cpu_direct != 1)
    return Check::fail(E_ARG, "cpu_direct = %d: must be 0 or 1", c.cpu_direct);
  if (c.stream_ordered != 0 && c.stream_ordered != 1)
    return Check::fail(E_ARG, "stream_ordered = %d: must be 0 or 1", c.stream_ordered);
  // Copy-engine copies are queued by the host once the step's barrier has told it every rank's vote.
  if (c.stream_ordered == 1 && c.device == DEEPEP4J_DEVICE_CUDA && c.cuda_transfer == DEEPEP4J_CUDA_TRANSFER_COPY_ENGINE)
    return Check::fail(E_ARG, "stream_ordered = 1 with cuda_transfer = copy_engine: stream-ordered steps use the SM "
                       "ring kernels (set cuda_transfer to sm or auto)");
  if (c.buffer_bytes <= 0)
    return Check::fail(E_ARG, "buffer_bytes = %" PRId64 ": must be > 0", c.buffer_bytes);
  return Check{};
}

Check check_routing(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int32_t r, bool host_values) {
  if (n < 0) return Check::fail(E_ARG, "num_tokens = %" PRId64 ": must be >= 0", n);
  if (k < 1 || k > DEEPEP4J_MAX_TOPK)
    return Check::fail(E_ARG, "num_topk = %d: must be in [1, %d]", k, DEEPEP4J_MAX_TOPK);
  if (e < 1) return Check::fail(E_ARG, "num_experts = %d: must be >= 1", e);
  if (e % r != 0)
    return Check::fail(E_ARG, "num_experts = %d: must be divisible by num_ranks = %d (experts are split evenly)", e, r);
  if (e / r > 1024)
    return Check::fail(E_ARG, "num_experts = %d: at most 1024 experts per rank (num_ranks = %d)", e, r);
  if (n > 0 && topk_idx == nullptr)
    return Check::fail(E_ARG, "topk_idx = NULL: required when num_tokens = %" PRId64 " > 0", n);
  if (host_values) {
    for (int64_t i = 0; i < n * k; ++i) {
      int64_t v = topk_idx[i];
      if (v < -1 || v >= e)
        return Check::fail(E_ARG, "topk_idx[%" PRId64 ",%" PRId64 "] = %" PRId64 ": must be in [-1, num_experts = %d)",
                           i / k, i % k, v, e);
    }
  }
  return Check{};
}

Check check_payload(int64_t hidden, int32_t dtype, bool allow_fp8, const char* what) {
  size_t es = dtype_size(dtype);
  if (es == 0) return Check::fail(E_ARG, "dtype = %d: unknown (0 float32, 1 bfloat16, 2 float16, 3 fp8_e4m3, 4 float64)", dtype);
  if (dtype == DEEPEP4J_FP8_E4M3 && !allow_fp8)
    return Check::fail(E_ARG, "dtype = fp8_e4m3: %s supports float32, bfloat16, float16 and float64 only", what);
  if (hidden <= 0) return Check::fail(E_ARG, "hidden = %" PRId64 ": must be > 0", hidden);
  if ((hidden * (int64_t)es) % 16 != 0)
    return Check::fail(E_ARG,
                        "hidden = %" PRId64 ": hidden * %zu bytes (%s) must be a multiple of 16 (rows move as 16-byte "
                        "vectors), i.e. hidden %% %zu == 0",
                        hidden, es, dtype_name(dtype), 16 / es);
  if (dtype == DEEPEP4J_FP8_E4M3 && hidden % DEEPEP4J_FP8_BLOCK != 0)
    return Check::fail(E_ARG, "hidden = %" PRId64 ": must be a multiple of %d for fp8 (one fp32 scale per %d channels)",
                       hidden, DEEPEP4J_FP8_BLOCK, DEEPEP4J_FP8_BLOCK);
  if (hidden > (1 << 20)) return Check::fail(E_ARG, "hidden = %" PRId64 ": must be <= 1048576", hidden);
  return Check{};
}

Check check_dispatch_args(const deepep4j_handle& h, int32_t dtype, const deepep4j_dispatch_args* a) {
  if (a == nullptr) return Check::fail(E_ARG, "args = NULL: dispatch needs a deepep4j_dispatch_args");
  Check p = check_payload(h.hidden, dtype, true, "dispatch");
  if (!p.ok()) return p;
  if (h.num_tokens > 0 && a->x == nullptr)
    return Check::fail(E_ARG, "x = NULL: required when num_tokens = %" PRId64 " > 0", h.num_tokens);
  if (h.num_recv_tokens > 0 && a->recv_x == nullptr)
    return Check::fail(E_ARG, "recv_x = NULL: required when num_recv_tokens = %" PRId64 " > 0", h.num_recv_tokens);
  bool fp8 = dtype == DEEPEP4J_FP8_E4M3;
  if (fp8 && h.num_tokens > 0 && a->x_scales == nullptr)
    return Check::fail(E_ARG, "x_scales = NULL: fp8_e4m3 dispatch needs fp32 scales [N, hidden/128]");
  if (fp8 && h.num_recv_tokens > 0 && a->recv_x_scales == nullptr)
    return Check::fail(E_ARG, "recv_x_scales = NULL: fp8_e4m3 dispatch needs recv scales [M, hidden/128]");
  if (!fp8 && (a->x_scales != nullptr || a->recv_x_scales != nullptr))
    return Check::fail(E_ARG, "x_scales/recv_x_scales given with dtype = %s: scales belong to fp8_e4m3 only",
                       dtype_name(dtype));
  if (a->recv_topk_weights != nullptr && a->topk_weights == nullptr && h.num_tokens > 0)
    return Check::fail(E_ARG, "recv_topk_weights given but topk_weights = NULL: nothing to send");
  return Check{};
}

Check check_combine_args(const deepep4j_handle& h, int32_t dtype, const deepep4j_combine_args* a) {
  if (a == nullptr) return Check::fail(E_ARG, "args = NULL: combine needs a deepep4j_combine_args");
  Check p = check_payload(h.hidden, dtype, false, "combine");
  if (!p.ok()) return p;
  if (h.num_recv_tokens > 0 && a->y == nullptr)
    return Check::fail(E_ARG, "y = NULL: required when num_recv_tokens = %" PRId64 " > 0", h.num_recv_tokens);
  if (h.num_tokens > 0 && a->out == nullptr)
    return Check::fail(E_ARG, "out = NULL: required when num_tokens = %" PRId64 " > 0", h.num_tokens);
  // An empty array may be NULL, so the pairing is checked only where both sides have rows.
  if (h.num_recv_tokens > 0 && h.num_tokens > 0 && (a->y_topk_weights == nullptr) != (a->out_topk_weights == nullptr))
    return Check::fail(E_ARG, "y_topk_weights and out_topk_weights: give both or neither");
  return Check{};
}

}  // namespace deepep4j
