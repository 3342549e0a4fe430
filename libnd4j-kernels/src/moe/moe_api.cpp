// moe_api.cpp — the C API of the MoE block: argument rules (each message names argument, value and rule), then the
// orchestration in moe_block.cpp. A rank whose arguments of a collective call are bad joins the peers' step with its
// error (deepep4j_fail_step), so every rank returns an error instead of some waiting; outputs stay untouched.
#include <cinttypes>
#include <cmath>
#include <cstring>
#include <new>
#include <vector>

#include "../common/backend.h"
#include "../common/dtype.h"
#include "../common/guarded.h"
#include "moe_block.h"

using namespace deepep4j;
using namespace deepep4j::moe;

namespace {

constexpr int E_ARG = DEEPEP4J_ERR_INVALID_ARGUMENT;

// Reports a local failure of a collective call to the peers too (they are waiting in the call's first step).
int fail_collective(deepep4j_buffer* buf, int status) {
  std::string msg = last_error();
  return deepep4j_fail_step(buf, status, msg.c_str());
}

int check_moe_config(const deepep4j_moe_config& c, int32_t num_ranks) {
  if (c.hidden <= 0) return set_error(E_ARG, "config.hidden = %" PRId64 ": must be > 0", c.hidden);
  if (c.ffn <= 0) return set_error(E_ARG, "config.ffn = %" PRId64 ": must be >= 1", c.ffn);
  if (c.dtype != DEEPEP4J_FLOAT32 && c.dtype != DEEPEP4J_BFLOAT16 && c.dtype != DEEPEP4J_FLOAT64)
    return set_error(E_ARG, "config.dtype = %d: the MoE block supports FLOAT32 (0), BFLOAT16 (1) and FLOAT64 (4)",
                     c.dtype);
  const int64_t row = c.hidden * int64_t(elem_bytes(c.dtype));
  if (row % 16 != 0)
    return set_error(E_ARG, "config.hidden = %" PRId64 ": hidden * %zu bytes (%s) must be a multiple of 16",
                     c.hidden, elem_bytes(c.dtype), dtype_name(c.dtype));
  if (c.hidden > (1 << 20)) return set_error(E_ARG, "config.hidden = %" PRId64 ": must be <= 1048576", c.hidden);
  if (c.num_experts <= 0 || c.num_experts % num_ranks != 0)
    return set_error(E_ARG, "config.num_experts = %d: must be > 0 and divisible by the buffer's %d ranks",
                     c.num_experts, num_ranks);
  if (c.num_experts / num_ranks > 1024)
    return set_error(E_ARG, "config.num_experts = %d: at most 1024 experts per rank (%d ranks)", c.num_experts,
                     num_ranks);
  if (c.num_topk < 1 || c.num_topk > DEEPEP4J_MAX_TOPK || c.num_topk > c.num_experts)
    return set_error(E_ARG, "config.num_topk = %d: must be in [1, min(num_experts = %d, %d)]", c.num_topk,
                     c.num_experts, DEEPEP4J_MAX_TOPK);
  if (c.score_function != DEEPEP4J_SCORE_SOFTMAX && c.score_function != DEEPEP4J_SCORE_SIGMOID)
    return set_error(E_ARG, "config.score_function = %d: must be SOFTMAX (0) or SIGMOID (1)", c.score_function);
  if (c.normalize_topk != 0 && c.normalize_topk != 1)
    return set_error(E_ARG, "config.normalize_topk = %d: must be 0 or 1", c.normalize_topk);
  if (c.gemm < DEEPEP4J_MOE_GEMM_AUTO || c.gemm > DEEPEP4J_MOE_GEMM_LOOP)
    return set_error(E_ARG, "config.gemm = %d: must be AUTO (0), GROUPED (1) or LOOP (2)", c.gemm);
  if (!(c.aux_loss_coef >= 0) || std::isinf(c.aux_loss_coef))
    return set_error(E_ARG, "config.aux_loss_coef = %g: must be finite and >= 0", c.aux_loss_coef);
  if (c.max_tokens < 1) return set_error(E_ARG, "config.max_tokens = %" PRId64 ": must be >= 1", c.max_tokens);
  return DEEPEP4J_OK;
}

int need_moe(const deepep4j_moe* m, const char* call) {
  if (m == nullptr) return set_error(E_ARG, "moe = NULL: %s needs a block from deepep4j_moe_create", call);
  return DEEPEP4J_OK;
}

int check_forward(const deepep4j_moe* m, int64_t n, const deepep4j_moe_forward_args* a) {
  const deepep4j_moe_config& c = m->cfg;
  if (a == nullptr) return set_error(E_ARG, "args = NULL: forward needs a deepep4j_moe_forward_args");
  if (n < 0 || n > c.max_tokens)
    return set_error(E_ARG, "num_tokens = %" PRId64 ": must be in [0, config.max_tokens = %" PRId64 "]", n,
                     c.max_tokens);
  if (a->memory != DEEPEP4J_MEMORY_DEVICE && a->memory != DEEPEP4J_MEMORY_HOST)
    return set_error(E_ARG, "args.memory = %d: must be DEVICE (0) or HOST (1)", a->memory);
  if (a->router_weight == nullptr) return set_error(E_ARG, "args.router_weight = NULL: the router needs [H, E] weights");
  if (n > 0 && a->x == nullptr) return set_error(E_ARG, "args.x = NULL: required when num_tokens = %" PRId64 " > 0", n);
  if (n > 0 && a->y == nullptr) return set_error(E_ARG, "args.y = NULL: required when num_tokens = %" PRId64 " > 0", n);
  if (a->async_combine != 0 && a->async_combine != 1)
    return set_error(E_ARG, "args.async_combine = %d: must be 0 or 1", a->async_combine);
  const bool host_values = a->memory == DEEPEP4J_MEMORY_HOST || !m->ops->on_device();
  if (a->replay_topk_idx != nullptr && host_values) {
    for (int64_t i = 0; i < n * c.num_topk; ++i) {
      const int64_t e = a->replay_topk_idx[i];
      if (e < 0 || e >= c.num_experts)
        return set_error(E_ARG,
                         "args.replay_topk_idx[%" PRId64 ",%" PRId64 "] = %" PRId64 ": must be in [0, num_experts = %d)",
                         i / c.num_topk, i % c.num_topk, e, c.num_experts);
      for (int64_t j = i - i % c.num_topk; j < i; ++j)
        if (a->replay_topk_idx[j] == e)
          return set_error(E_ARG, "args.replay_topk_idx[%" PRId64 "]: expert %" PRId64 " appears twice in one token",
                           i / c.num_topk, e);
    }
  }
  return DEEPEP4J_OK;
}

int check_backward(const deepep4j_moe* m, const deepep4j_moe_backward_args* a) {
  if (a == nullptr) return set_error(E_ARG, "args = NULL: backward needs a deepep4j_moe_backward_args");
  if (!m->has_forward)
    return set_error(DEEPEP4J_ERR_STATE, "deepep4j_moe_backward: no forward to differentiate (the last forward failed "
                                         "or none was made)");
  if (a->memory != DEEPEP4J_MEMORY_DEVICE && a->memory != DEEPEP4J_MEMORY_HOST)
    return set_error(E_ARG, "args.memory = %d: must be DEVICE (0) or HOST (1)", a->memory);
  if (m->n > 0 && (a->grad_y == nullptr || a->grad_x == nullptr))
    return set_error(E_ARG, "args.grad_y/grad_x = NULL: required when the forward had %" PRId64 " > 0 tokens", m->n);
  if (a->grad_router_weight == nullptr)
    return set_error(E_ARG, "args.grad_router_weight = NULL: backward writes the router's [H, E] gradient");
  if (a->accumulate != 0 && a->accumulate != 1)
    return set_error(E_ARG, "args.accumulate = %d: must be 0 or 1", a->accumulate);
  if (std::isnan(a->aux_loss_scale) || std::isinf(a->aux_loss_scale))
    return set_error(E_ARG, "args.aux_loss_scale = %g: must be finite", a->aux_loss_scale);
  return DEEPEP4J_OK;
}

int check_optimizer(const deepep4j_optimizer* o) {
  if (o == nullptr) return set_error(E_ARG, "opt = NULL: step needs a deepep4j_optimizer");
  if (o->kind < DEEPEP4J_OPT_SGD || o->kind > DEEPEP4J_OPT_ADAMW)
    return set_error(E_ARG, "opt.kind = %d: must be SGD (0), ADAM (1) or ADAMW (2)", o->kind);
  if (!(o->learning_rate >= 0) || std::isinf(o->learning_rate))
    return set_error(E_ARG, "opt.learning_rate = %g: must be finite and >= 0", o->learning_rate);
  if (!std::isfinite(o->grad_scale)) return set_error(E_ARG, "opt.grad_scale = %g: must be finite", o->grad_scale);
  if (o->kind != DEEPEP4J_OPT_SGD) {
    if (!(o->beta1 >= 0 && o->beta1 < 1)) return set_error(E_ARG, "opt.beta1 = %g: must be in [0, 1)", o->beta1);
    if (!(o->beta2 >= 0 && o->beta2 < 1)) return set_error(E_ARG, "opt.beta2 = %g: must be in [0, 1)", o->beta2);
    if (!(o->epsilon > 0) || std::isinf(o->epsilon))
      return set_error(E_ARG, "opt.epsilon = %g: must be finite and > 0", o->epsilon);
    if (o->iteration < 0) return set_error(E_ARG, "opt.iteration = %" PRId64 ": must be >= 0", o->iteration);
  }
  if (o->kind == DEEPEP4J_OPT_ADAMW && (!(o->weight_decay >= 0) || std::isinf(o->weight_decay)))
    return set_error(E_ARG, "opt.weight_decay = %g: must be finite and >= 0", o->weight_decay);
  return DEEPEP4J_OK;
}

void* tensor_of(deepep4j_moe* m, int32_t tensor) {
  switch (tensor) {
    case DEEPEP4J_MOE_PARAMS: return m->params;
    case DEEPEP4J_MOE_GRADS: return m->grads;
    case DEEPEP4J_MOE_STATE_M: return m->state_m;
    default: return m->state_v;
  }
}

int check_tensor_io(const deepep4j_moe* m, int32_t tensor, int32_t host_dtype, const void* host, int64_t count) {
  if (tensor < DEEPEP4J_MOE_PARAMS || tensor > DEEPEP4J_MOE_STATE_V)
    return set_error(E_ARG, "tensor = %d: must be PARAMS (0), GRADS (1), STATE_M (2) or STATE_V (3)", tensor);
  if (host_dtype != DEEPEP4J_FLOAT32 && host_dtype != DEEPEP4J_FLOAT64)
    return set_error(E_ARG, "host_dtype = %d: must be FLOAT32 (0) or FLOAT64 (4)", host_dtype);
  if (host == nullptr) return set_error(E_ARG, "host = NULL: nowhere to copy");
  if (count != m->tensor_count)
    return set_error(E_ARG, "count = %" PRId64 ": must be E/R * 3 * H * F = %" PRId64, count, m->tensor_count);
  return DEEPEP4J_OK;
}

// The element type of a tensor in the block: PARAMS in the block's dtype, the rest in its accumulation type.
int32_t stored_dtype(const deepep4j_moe* m, int32_t tensor) {
  return tensor == DEEPEP4J_MOE_PARAMS ? m->cfg.dtype : acc_dtype(m->cfg.dtype);
}

double load_as_double(const void* p, int32_t dtype, int64_t i) {
  if (dtype == DEEPEP4J_FLOAT64) return static_cast<const double*>(p)[i];
  if (dtype == DEEPEP4J_BFLOAT16) return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

void store_from_double(void* p, int32_t dtype, int64_t i, double v) {
  if (dtype == DEEPEP4J_FLOAT64)
    static_cast<double*>(p)[i] = v;
  else if (dtype == DEEPEP4J_BFLOAT16)
    static_cast<uint16_t*>(p)[i] = float_to_bf16(float(v));
  else
    static_cast<float*>(p)[i] = float(v);
}

}  // namespace

extern "C" {

void deepep4j_moe_config_init(deepep4j_moe_config* c) {
  if (c == nullptr) return;
  std::memset(c, 0, sizeof(*c));
  c->dtype = DEEPEP4J_FLOAT32;
  c->score_function = DEEPEP4J_SCORE_SOFTMAX;
  c->normalize_topk = 1;
  c->gemm = DEEPEP4J_MOE_GEMM_AUTO;
  c->aux_loss_coef = 0.0;
  c->max_tokens = 4096;
}

int deepep4j_moe_create(deepep4j_buffer* buf, const deepep4j_moe_config* config, deepep4j_moe** out) {
  if (buf == nullptr) return set_error(E_ARG, "buf = NULL: deepep4j_moe_create needs a connected buffer");
  if (!buf->connected)
    return set_error(DEEPEP4J_ERR_STATE, "deepep4j_moe_create on rank %d: buffer not connected", buf->rank);
  return guarded("deepep4j_moe_create", [&] {
    int st = DEEPEP4J_OK;
    if (out == nullptr) st = set_error(E_ARG, "out = NULL: nowhere to return the block");
    if (!st && config == nullptr) st = set_error(E_ARG, "config = NULL: pass a deepep4j_moe_config");
    if (!st) st = check_moe_config(*config, buf->num_ranks);
    if (st) return fail_collective(buf, st);
    std::unique_ptr<deepep4j_moe> m(new deepep4j_moe());
    m->buf = buf;
    m->cfg = *config;
    st = buf->config.device == DEEPEP4J_DEVICE_CUDA ? make_cuda_moe_ops(buf->config.device_id, &m->ops)
                                                    : make_cpu_moe_ops(&m->ops);
    if (st) return fail_collective(buf, st);
    m->copier = std::make_unique<HostCopier>(HostCopier::resolve(buf->config.host_copy_threads, buf->num_ranks));
    st = block_create(m.get());
    if (st) return st;
    *out = m.release();
    return ok();
  });
}

int deepep4j_moe_destroy(deepep4j_moe* moe) {
  delete moe;
  return ok();
}

int deepep4j_moe_read(deepep4j_moe* moe, int32_t tensor, int32_t host_dtype, void* host, int64_t count) {
  if (int st = need_moe(moe, "deepep4j_moe_read")) return st;
  if (int st = check_tensor_io(moe, tensor, host_dtype, host, count)) return st;
  return guarded("deepep4j_moe_read", [&] {
    const int32_t dt = stored_dtype(moe, tensor);
    const bool same = dt == host_dtype;  // same type: straight into the caller's memory, no temporary, no conversion
    std::vector<uint8_t> tmp(same ? 0 : size_t(count) * elem_bytes(dt));
    void* into = same ? host : tmp.data();
    int st = moe->ops->synchronize();  // the last call's stream
    moe->ops->set_stream(nullptr);
    if (!st) st = moe->ops->copy(into, tensor_of(moe, tensor), size_t(count) * elem_bytes(dt), Copy::kDeviceToHost);
    if (!st) st = moe->ops->synchronize();
    if (st) return st;
    if (!same)
      for (int64_t i = 0; i < count; ++i) store_from_double(host, host_dtype, i, load_as_double(tmp.data(), dt, i));
    return ok();
  });
}

int deepep4j_moe_write(deepep4j_moe* moe, int32_t tensor, int32_t host_dtype, const void* host, int64_t count) {
  if (int st = need_moe(moe, "deepep4j_moe_write")) return st;
  if (int st = check_tensor_io(moe, tensor, host_dtype, host, count)) return st;
  return guarded("deepep4j_moe_write", [&] {
    const int32_t dt = stored_dtype(moe, tensor);
    const bool same = dt == host_dtype;  // same type: straight from the caller's memory
    std::vector<uint8_t> tmp(same ? 0 : size_t(count) * elem_bytes(dt));
    if (!same)
      for (int64_t i = 0; i < count; ++i) store_from_double(tmp.data(), dt, i, load_as_double(host, host_dtype, i));
    int st = moe->ops->synchronize();  // queued work (on the last call's stream) may still read the tensor
    moe->ops->set_stream(nullptr);
    if (!st) st = moe->ops->copy(tensor_of(moe, tensor), same ? host : tmp.data(), size_t(count) * elem_bytes(dt),
                                 Copy::kHostToDevice);
    if (!st) st = moe->ops->synchronize();
    return st ? st : ok();
  });
}

int deepep4j_moe_forward(deepep4j_moe* moe, int64_t num_tokens, const deepep4j_moe_forward_args* args, void* stream) {
  if (int st = need_moe(moe, "deepep4j_moe_forward")) return st;
  return guarded("deepep4j_moe_forward", [&] {
    if (int st = check_forward(moe, num_tokens, args)) {
      moe->has_forward = false;
      return fail_collective(moe->buf, st);
    }
    moe->ops->set_stream(stream);
    int st = block_forward(moe, num_tokens, args);
    if (!st && stream == nullptr) st = moe->ops->synchronize();  // NULL stream: complete on return
    if (st != DEEPEP4J_OK) moe->has_forward = false;
    return st ? st : ok();
  });
}

int deepep4j_moe_wait(deepep4j_moe* moe) {
  if (int st = need_moe(moe, "deepep4j_moe_wait")) return st;
  return guarded("deepep4j_moe_wait", [&] {
    int st = block_wait(moe);
    return st ? st : ok();
  });
}

int deepep4j_moe_backward(deepep4j_moe* moe, const deepep4j_moe_backward_args* args, void* stream) {
  if (int st = need_moe(moe, "deepep4j_moe_backward")) return st;
  return guarded("deepep4j_moe_backward", [&] {
    if (int st = check_backward(moe, args)) return fail_collective(moe->buf, st);
    moe->ops->set_stream(stream);
    int st = block_backward(moe, args);
    if (!st && stream == nullptr) st = moe->ops->synchronize();
    return st ? st : ok();
  });
}

int deepep4j_moe_staging_stats(const deepep4j_moe* moe, deepep4j_moe_staging* out) {
  if (int st = need_moe(moe, "deepep4j_moe_staging_stats")) return st;
  if (out == nullptr) return set_error(E_ARG, "out = NULL: nowhere to write the staging totals");
  *out = moe->staging;
  return ok();
}

void deepep4j_optimizer_init(deepep4j_optimizer* o, int32_t kind) {
  if (o == nullptr) return;
  std::memset(o, 0, sizeof(*o));
  o->kind = kind;
  o->learning_rate = kind == DEEPEP4J_OPT_SGD ? 1e-3 : 1e-3;
  o->beta1 = 0.9;
  o->beta2 = 0.999;
  o->epsilon = 1e-8;
  o->weight_decay = 0.0;
  o->iteration = 0;
  o->grad_scale = 1.0;
}

int deepep4j_moe_step(deepep4j_moe* moe, const deepep4j_optimizer* opt, void* stream) {
  if (int st = need_moe(moe, "deepep4j_moe_step")) return st;
  if (int st = check_optimizer(opt)) return st;
  return guarded("deepep4j_moe_step", [&] {
    moe->ops->set_stream(stream);
    int st = block_step(moe, opt);
    if (!st && stream == nullptr) st = moe->ops->synchronize();
    return st ? st : ok();
  });
}

}  // extern "C"
