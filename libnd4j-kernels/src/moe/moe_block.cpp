// moe_block.cpp — the MoE block's orchestration, written once for every device (see moe_ops.h for the compute).
//
// forward:  logits = x Wr -> scores, top-k, weights (router_forward) -> notify_dispatch -> dispatch of x (and, for
//           fp64, the routing weights in each row's tail) -> assignments grouped by local expert (permutation) ->
//           gather rows -> a = xe W1, b = xe W3 (grouped GEMM) -> h = silu(a) b -> ye = h W2 -> y_recv[m] = sum over
//           the row's slots of weight * ye (scatter) -> unweighted combine -> y.
// backward: cached dispatch of grad_y -> per assignment gw = <g, ye> (gradient of its routing weight) and
//           ge = weight * g -> gW2 += h^T ge, gh = ge W2^T -> SwiGLU backward -> gW1 += xe^T ga, gW3 += xe^T gb,
//           gxe = ga W1^T + gb W3^T -> g_recv_x[m] = sum of its slots' gxe -> combine of g_recv_x with the gw values
//           (y_topk_weights; fp64: in each row's tail) -> grad of the routing weights -> router backward (renormalisation,
//           aux loss, softmax / sigmoid) -> grad_x += g_logits Wr^T, grad_Wr = x^T g_logits.
//           (accumulate = 0: the gW GEMMs write GRADS, beta 0, instead of adding.)
// Each local expert's assignments take a segment of ops.padded_rows(count) rows (zero rows after the real ones), so the
// GEMMs of a step only have shapes that warm_gemms ran at create.
// Rows travel by the buffer's dispatch / combine, which reduce in fp32 (fp64 for fp64). Any local failure before or
// between the collective calls is passed to the peers with deepep4j_fail_step, so they end with PEER_ERROR instead of
// waiting for this rank.
#include "moe_block.h"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

namespace deepep4j {
namespace moe {
namespace {

int ensure(deepep4j_moe* b, Workspace& w, size_t bytes) {
  if (bytes == 0) bytes = 16;
  if (w.bytes >= bytes) return DEEPEP4J_OK;
  if (w.ptr) b->ops->release(w.ptr);
  w.ptr = nullptr;
  w.bytes = 0;
  if (int st = b->ops->alloc(bytes, &w.ptr)) return st;
  w.bytes = bytes;
  return DEEPEP4J_OK;
}

int ensure_host(deepep4j_moe* b, Workspace& w, size_t bytes) {
  if (bytes == 0) bytes = 16;
  if (w.host_bytes >= bytes) return DEEPEP4J_OK;
  if (w.host) b->ops->release_host(w.host);
  w.host = nullptr;
  w.host_bytes = 0;
  if (int st = b->ops->alloc_host(bytes, &w.host)) return st;
  w.host_bytes = bytes;
  return DEEPEP4J_OK;
}

void free_workspace(deepep4j_moe* b, Workspace& w) {
  if (w.ptr) b->ops->release(w.ptr);
  if (w.host) b->ops->release_host(w.host);
  w = Workspace{};
}

bool staged(const deepep4j_moe* b, int32_t memory) { return memory == DEEPEP4J_MEMORY_HOST && b->ops->on_device(); }

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A host input into the device array of `w` through its pinned twin, chunk by chunk: the copy threads fill chunk i+1
// while chunk i travels (the transfers are queued on the block's stream).
int copy_in_chunks(deepep4j_moe* b, Workspace& w, const void* user, size_t bytes) {
  const size_t chunk = std::max(size_t(4) << 20, size_t(b->copier->threads()) << 20);
  const int64_t t0 = now_ns();
  for (size_t off = 0; off < bytes; off += chunk) {
    const size_t n = std::min(chunk, bytes - off);
    uint8_t* host = static_cast<uint8_t*>(w.host) + off;
    b->copier->copy(host, static_cast<const uint8_t*>(user) + off, n);
    if (int st = b->ops->copy(static_cast<uint8_t*>(w.ptr) + off, host, n, Copy::kHostToDevice)) return st;
  }
  b->staging.bytes_in += int64_t(bytes);
  b->staging.host_copy_ns += now_ns() - t0;
  return DEEPEP4J_OK;
}

// A device copy of a host-memory input (through pinned staging on a GPU); device memory is used as is.
int stage_in(deepep4j_moe* b, int32_t memory, const void* user, size_t bytes, Workspace& w, const void** out) {
  if (user == nullptr || !staged(b, memory)) {
    *out = user;
    return DEEPEP4J_OK;
  }
  if (int st = ensure(b, w, bytes)) return st;
  if (int st = ensure_host(b, w, bytes)) return st;
  if (int st = copy_in_chunks(b, w, user, bytes)) return st;
  *out = w.ptr;
  return DEEPEP4J_OK;
}

// A copy the block keeps (backward needs the forward's x and router weights): through pinned staging from host
// memory on a GPU, else a device (or host) copy.
int keep_in(deepep4j_moe* b, int32_t memory, const void* user, size_t bytes, Workspace& w, const void** out) {
  if (int st = ensure(b, w, bytes)) return st;
  *out = w.ptr;
  if (bytes == 0) return DEEPEP4J_OK;
  if (!staged(b, memory)) return b->ops->copy(w.ptr, user, bytes, Copy::kDeviceToDevice);
  if (int st = ensure_host(b, w, bytes)) return st;
  return copy_in_chunks(b, w, user, bytes);
}

// Queues a device-to-host copy of a block array into the pinned staging of `w`, finished at finish_outputs.
int queue_copy_out(deepep4j_moe* b, void* user, const void* src, size_t bytes, Workspace& w) {
  if (int st = ensure_host(b, w, bytes)) return st;
  if (int st = b->ops->copy(w.host, src, bytes, Copy::kDeviceToHost)) return st;
  b->pending_copies.push_back({user, {w.host, bytes}});
  return DEEPEP4J_OK;
}

// Where an output is computed: the caller's array, or (host memory on a GPU) a device array copied back later.
int stage_out(deepep4j_moe* b, int32_t memory, void* user, size_t bytes, Workspace& w, void** out) {
  if (user == nullptr || !staged(b, memory)) {
    *out = user;
    return DEEPEP4J_OK;
  }
  if (int st = ensure(b, w, bytes)) return st;
  if (int st = ensure_host(b, w, bytes)) return st;
  *out = w.ptr;
  return DEEPEP4J_OK;
}

// Queues the copy of a staged output to pinned memory; the caller's array is filled at finish_outputs.
int queue_out(deepep4j_moe* b, int32_t memory, void* user, size_t bytes, Workspace& w) {
  if (user == nullptr || !staged(b, memory)) return DEEPEP4J_OK;
  if (int st = b->ops->copy(w.host, w.ptr, bytes, Copy::kDeviceToHost)) return st;
  b->pending_copies.push_back({user, {w.host, bytes}});
  return DEEPEP4J_OK;
}

int finish_outputs(deepep4j_moe* b) {
  if (b->pending_copies.empty()) return DEEPEP4J_OK;
  int st = b->ops->synchronize();
  if (st == DEEPEP4J_OK) {
    const int64_t t0 = now_ns();
    for (auto& c : b->pending_copies) {
      b->copier->copy(c.first, c.second.first, c.second.second);
      b->staging.bytes_out += int64_t(c.second.second);
    }
    b->staging.host_copy_ns += now_ns() - t0;
  }
  b->pending_copies.clear();
  return st;
}

// Tells the peers (waiting in this step's next collective) that this rank failed, and returns its error.
int fail_peers(deepep4j_moe* b, int st) {
  std::string msg = last_error();
  return deepep4j_fail_step(b->buf, st, msg.c_str());
}

void release_handle(deepep4j_moe* b) {
  if (b->handle) deepep4j_handle_destroy(b->handle);
  b->handle = nullptr;
  b->has_forward = false;
}

// What every rank must agree on, as one 64-byte row.
struct Fingerprint {
  int64_t hidden, ffn, max_tokens;
  int32_t num_experts, num_topk, dtype, score_function, normalize_topk, gemm;
  double aux_loss_coef;
  int64_t pad;
};
static_assert(sizeof(Fingerprint) == 64, "one 64-byte row");

Fingerprint fingerprint(const deepep4j_moe_config& c) {
  Fingerprint f{};
  f.hidden = c.hidden;
  f.ffn = c.ffn;
  f.max_tokens = c.max_tokens;
  f.num_experts = c.num_experts;
  f.num_topk = c.num_topk;
  f.dtype = c.dtype;
  f.score_function = c.score_function;
  f.normalize_topk = c.normalize_topk;
  f.gemm = c.gemm;
  f.aux_loss_coef = c.aux_loss_coef;
  return f;
}

// The first field two fingerprints differ in, or NULL.
const char* differing_field(const Fingerprint& a, const Fingerprint& b, std::string* va, std::string* vb) {
  auto num = [](double v) {
    char s[64];
    snprintf(s, sizeof(s), "%.17g", v);
    return std::string(s);
  };
#define DEEPEP4J_FIELD(name)                                            \
  if (std::memcmp(&a.name, &b.name, sizeof(a.name)) != 0) {             \
    *va = num(double(a.name));                                          \
    *vb = num(double(b.name));                                          \
    return #name;                                                       \
  }
  DEEPEP4J_FIELD(hidden)
  DEEPEP4J_FIELD(ffn)
  DEEPEP4J_FIELD(num_experts)
  DEEPEP4J_FIELD(num_topk)
  DEEPEP4J_FIELD(dtype)
  DEEPEP4J_FIELD(score_function)
  DEEPEP4J_FIELD(normalize_topk)
  DEEPEP4J_FIELD(gemm)
  DEEPEP4J_FIELD(aux_loss_coef)
  DEEPEP4J_FIELD(max_tokens)
#undef DEEPEP4J_FIELD
  return nullptr;
}

// Every rank sends its fingerprint to every rank (one token per rank through notify + dispatch), so each sees all R
// and reaches the same verdict without another exchange.
int agree_on_config(deepep4j_moe* b) {
  const int32_t R = b->num_ranks;
  MoeOps& ops = *b->ops;
  Fingerprint mine = fingerprint(b->cfg);
  std::vector<Fingerprint> rows(size_t(R), mine);
  std::vector<int64_t> idx(static_cast<size_t>(R));
  for (int32_t d = 0; d < R; ++d) idx[size_t(d)] = d;
  const size_t row_bytes = sizeof(Fingerprint);
  int st = ensure(b, b->cfg_rows, R * row_bytes);
  if (!st) st = ensure(b, b->cfg_recv, R * row_bytes);
  if (!st) st = ensure(b, b->cfg_idx, R * sizeof(int64_t));
  if (!st) st = ops.copy(b->cfg_rows.ptr, rows.data(), R * row_bytes, Copy::kHostToDevice);
  if (!st) st = ops.copy(b->cfg_idx.ptr, idx.data(), R * sizeof(int64_t), Copy::kHostToDevice);
  if (st) return fail_peers(b, st);
  deepep4j_handle* h = nullptr;
  int64_t m = 0;
  const int64_t hidden = int64_t(row_bytes / sizeof(float));
  st = deepep4j_notify_dispatch(b->buf, static_cast<int64_t*>(b->cfg_idx.ptr), R, 1, R, hidden, DEEPEP4J_FLOAT32, &h,
                                &m, nullptr, ops.stream());
  if (st) return st;
  deepep4j_dispatch_args a{};
  a.x = b->cfg_rows.ptr;
  a.recv_x = b->cfg_recv.ptr;
  st = deepep4j_dispatch(b->buf, h, -1, &a, ops.stream());
  deepep4j_handle_destroy(h);
  if (st) return st;
  if (m != R) return set_error(DEEPEP4J_ERR_INTERNAL, "MoE block create: received %" PRId64 " configs from %d ranks", m, R);
  if ((st = ops.copy(rows.data(), b->cfg_recv.ptr, R * row_bytes, Copy::kDeviceToHost)) ||
      (st = ops.synchronize()))
    return st;
  for (int32_t s = 1; s < R; ++s) {
    std::string va, vb;
    if (const char* f = differing_field(rows[0], rows[size_t(s)], &va, &vb))
      return set_error(DEEPEP4J_ERR_PEER_MISMATCH,
                       "deepep4j_moe_create: ranks disagree on the MoE config: rank 0 has %s = %s, rank %d has %s = %s",
                       f, va.c_str(), s, f, vb.c_str());
  }
  return DEEPEP4J_OK;
}

// The three weights of local expert j inside a tensor of `elem` bytes per element.
struct ExpertWeights {
  const uint8_t* w1;
  const uint8_t* w3;
  const uint8_t* w2;
};
ExpertWeights expert(const deepep4j_moe* b, const void* tensor, int32_t j, size_t elem) {
  const int64_t hf = b->cfg.hidden * b->cfg.ffn;
  const uint8_t* base = static_cast<const uint8_t*>(tensor) + size_t(j) * 3 * hf * elem;
  return ExpertWeights{base, base + hf * elem, base + 2 * hf * elem};
}

// The workspaces whose size depends only on the config and max_tokens, allocated at create: inside a step, an
// allocation (device or pinned) risks waiting for the device while a peer's kernel on the same GPU spins for this
// rank. Those that depend on the routing (received rows, assignments) grow once, from the block's pool.
int presize(deepep4j_moe* b) {
  const deepep4j_moe_config& c = b->cfg;
  const int64_t N = c.max_tokens, H = c.hidden, E = c.num_experts, K = c.num_topk, W = b->row_width;
  const size_t es = elem_bytes(c.dtype), as = acc_bytes(c.dtype);
  const std::pair<Workspace*, size_t> device[] = {
      {&b->x, size_t(N * H) * es},       {&b->wr, size_t(H * E) * es},       {&b->scores, size_t(N * E) * as},
      {&b->topk_idx, size_t(N * K) * 8}, {&b->gate, size_t(N * K) * as},     {&b->weights, size_t(N * K) * as},
      {&b->weights_f32, size_t(N * K) * 4}, {&b->gate_sum, size_t(N) * as},  {&b->load, size_t(E) * 4},
      {&b->prob_sum, size_t(E) * as},    {&b->g_weights, size_t(N * K) * as}, {&b->g_logits, size_t(N * E) * es},
      {&b->out_topk_w, size_t(N * K) * 4}, {&b->xw, c.dtype == DEEPEP4J_FLOAT64 ? size_t(N * W) * es : 0}};
  for (const auto& w : device)
    if (int st = ensure(b, *w.first, w.second)) return st;
  if (int st = ensure_host(b, b->load, size_t(E) * 4)) return st;
  return ensure_host(b, b->prob_sum, size_t(E) * as);
}

// The block's GEMMs, each described once for the steps and for warm_gemms. Expert GEMMs run per local expert on
// `rows` = its padded assignments; "acc" GEMMs write the weight gradients (GRADS, accumulation type).
enum class ExpertGemm {
  kUp,        // a = xe W1, b = xe W3:  [rows, H] x [H, F]
  kDown,      // ye = h W2:             [rows, F] x [F, H]
  kGradDown,  // gW2 = h^T ge:          [F, rows] x [rows, H] -> acc
  kGradH,     // gh = ge W2^T:          [rows, H] x [H, F]
  kGradUp,    // gW1 = xe^T ga (gW3):   [H, rows] x [rows, F] -> acc
  kGradX,     // gxe = ga W1^T (+ gb W3^T): [rows, F] x [F, H]
};
constexpr ExpertGemm kExpertGemms[] = {ExpertGemm::kUp,     ExpertGemm::kDown,   ExpertGemm::kGradDown,
                                       ExpertGemm::kGradH,  ExpertGemm::kGradUp, ExpertGemm::kGradX};

GemmDesc expert_desc(const deepep4j_moe* b, ExpertGemm kind, double beta) {
  const int64_t H = b->cfg.hidden, F = b->cfg.ffn;
  GemmDesc g;
  g.ab_dtype = g.c_dtype = b->cfg.dtype;
  g.beta = beta;
  switch (kind) {
    case ExpertGemm::kUp: g.lda = H, g.ldb = F, g.ldc = F; break;
    case ExpertGemm::kDown: g.lda = F, g.ldb = H, g.ldc = H; break;
    case ExpertGemm::kGradDown: g.trans_a = true, g.lda = F, g.ldb = H, g.ldc = H; break;
    case ExpertGemm::kGradH: g.trans_b = true, g.lda = H, g.ldb = H, g.ldc = F; break;
    case ExpertGemm::kGradUp: g.trans_a = true, g.lda = H, g.ldb = F, g.ldc = F; break;
    case ExpertGemm::kGradX: g.trans_b = true, g.lda = F, g.ldb = F, g.ldc = H; break;
  }
  if (kind == ExpertGemm::kGradDown || kind == ExpertGemm::kGradUp) g.c_dtype = acc_dtype(b->cfg.dtype);
  return g;
}

GemmGroup expert_group(const deepep4j_moe* b, ExpertGemm kind, int64_t rows, const void* a, const void* w, void* c) {
  const int64_t H = b->cfg.hidden, F = b->cfg.ffn;
  switch (kind) {
    case ExpertGemm::kUp: return {rows, F, H, a, w, c};
    case ExpertGemm::kDown: return {rows, H, F, a, w, c};
    case ExpertGemm::kGradDown: return {F, H, rows, a, w, c};
    case ExpertGemm::kGradH: return {rows, F, H, a, w, c};
    case ExpertGemm::kGradUp: return {H, F, rows, a, w, c};
    case ExpertGemm::kGradX: return {rows, H, F, a, w, c};
  }
  return {};
}

// Rows of local expert j's segment in the last forward (its assignments and padding).
int64_t rows_of(const deepep4j_moe* b, int32_t j) { return b->offsets[size_t(j) + 1] - b->offsets[size_t(j)]; }

// The router's GEMMs over the N tokens of a step.
enum class RouterGemm {
  kLogits,      // logits = x Wr:          [N, H] x [H, E] -> acc
  kGradX,       // grad_x += g_logits Wr^T: [N, E] x [E, H]
  kGradWeight,  // grad_Wr = x^T g_logits:  [H, N] x [N, E]
};

GemmDesc router_desc(const deepep4j_moe* b, RouterGemm kind) {
  const int64_t H = b->cfg.hidden, E = b->cfg.num_experts;
  GemmDesc g;
  g.ab_dtype = g.c_dtype = b->cfg.dtype;
  switch (kind) {
    case RouterGemm::kLogits: g.c_dtype = acc_dtype(b->cfg.dtype), g.lda = H, g.ldb = E, g.ldc = E; break;
    case RouterGemm::kGradX: g.trans_b = true, g.lda = E, g.ldb = E, g.ldc = H, g.beta = 1.0; break;
    case RouterGemm::kGradWeight: g.trans_a = true, g.lda = H, g.ldb = E, g.ldc = E; break;
  }
  return g;
}

// Runs, once per process and block shape, every GEMM shape a step of this block can run: each expert GEMM for every
// padded row count up to R * max_tokens (a rank receives each token at most once per expert), each router GEMM for
// every N up to max_tokens. Why: cuBLAS sets up a kernel (loads it, sets its attributes) at its first launch, and that
// may wait for the whole device; inside a step, another rank's kernel on the same GPU may be spinning for this rank
// (2 ranks on one GPU: an EP2 step then deadlocks until timeout_ms). Ranks of one process share the warm-up: the
// first to come runs it, the others wait here (on the host, before any kernel of theirs spins) and skip it.
// Grouped calls (cublasGemmGroupedBatchedEx) choose kernels from the whole set of groups and are not covered here
// (CudaMoeOps warms them at one small shape).
int warm_gemms(deepep4j_moe* b) {
  MoeOps& ops = *b->ops;
  if (!ops.on_device()) return DEEPEP4J_OK;
  const deepep4j_moe_config& c = b->cfg;
  const int64_t H = c.hidden, F = c.ffn, E = c.num_experts, N = c.max_tokens;
  const int64_t most = ops.padded_rows(int64_t(b->num_ranks) * N);
  const std::vector<int64_t> key = {b->buf->config.device_id, c.dtype, H, F, E, most, N};
  static std::mutex mutex;
  static std::set<std::vector<int64_t>> warmed;
  std::lock_guard<std::mutex> lock(mutex);
  if (warmed.count(key)) return DEEPEP4J_OK;
  const size_t es = elem_bytes(c.dtype);
  // Operands: workspaces the steps use anyway (contents are overwritten by every step), expert 0's weights, and
  // expert 0's gradients (zeroed after).
  int st = ensure(b, b->xe, size_t(most * H) * es);
  if (!st) st = ensure(b, b->act_a, size_t(most * F) * es);
  if (!st) st = ensure(b, b->ye, size_t(most * H) * es);
  const ExpertWeights w = expert(b, b->params, 0, es);
  const ExpertWeights g = expert(b, b->grads, 0, acc_bytes(c.dtype));
  for (int64_t rows = ops.padded_rows(1); rows <= most && !st; rows = ops.padded_rows(rows + 1))
    for (ExpertGemm kind : kExpertGemms) {
      const bool into_grads = kind == ExpertGemm::kGradDown || kind == ExpertGemm::kGradUp;
      const void* in = kind == ExpertGemm::kUp || kind == ExpertGemm::kGradUp ? b->xe.ptr
                       : kind == ExpertGemm::kGradH                         ? b->ye.ptr
                                                                            : b->act_a.ptr;
      const void* other = kind == ExpertGemm::kGradDown ? b->ye.ptr
                          : kind == ExpertGemm::kGradUp ? b->act_a.ptr
                          : kind == ExpertGemm::kUp || kind == ExpertGemm::kGradX ? static_cast<const void*>(w.w1)
                                                                                  : static_cast<const void*>(w.w2);
      void* out = into_grads ? const_cast<uint8_t*>(g.w1)
                  : kind == ExpertGemm::kUp || kind == ExpertGemm::kGradH ? b->act_a.ptr
                                                                          : b->ye.ptr;
      const GemmGroup q = expert_group(b, kind, rows, in, other, out);
      for (double beta : {0.0, 1.0}) {  // accumulate 0 / 1, and gxe's two passes
        if (!st && (beta == 0.0 || into_grads || kind == ExpertGemm::kGradX))
          st = ops.gemm(expert_desc(b, kind, beta), &q, 1, DEEPEP4J_MOE_GEMM_LOOP);
      }
    }
  for (int64_t n = 1; n <= N && !st; ++n) {
    const GemmGroup logits{n, E, H, b->x.ptr, b->wr.ptr, b->scores.ptr};
    const GemmGroup grad_x{n, H, E, b->g_logits.ptr, b->wr.ptr, b->xe.ptr};
    const GemmGroup grad_wr{H, E, n, b->x.ptr, b->g_logits.ptr, b->wr.ptr};
    st = ops.gemm(router_desc(b, RouterGemm::kLogits), &logits, 1, DEEPEP4J_MOE_GEMM_LOOP);
    if (!st) st = ops.gemm(router_desc(b, RouterGemm::kGradX), &grad_x, 1, DEEPEP4J_MOE_GEMM_LOOP);
    if (!st) st = ops.gemm(router_desc(b, RouterGemm::kGradWeight), &grad_wr, 1, DEEPEP4J_MOE_GEMM_LOOP);
  }
  if (!st) st = ops.zero(const_cast<uint8_t*>(g.w1), size_t(3 * H * F) * acc_bytes(c.dtype));
  if (!st) st = ops.synchronize();
  if (!st) warmed.insert(key);
  return st;
}

}  // namespace

int block_create(deepep4j_moe* b) {
  const deepep4j_moe_config& c = b->cfg;
  b->rank = b->buf->rank;
  b->num_ranks = b->buf->num_ranks;
  b->num_local = c.num_experts / b->num_ranks;
  const int32_t kpad = (c.num_topk + 1) / 2 * 2;  // fp64 tail: K weights padded to whole 16-byte vectors
  b->row_width = c.dtype == DEEPEP4J_FLOAT64 ? c.hidden + kpad : c.hidden;
  b->tensor_count = int64_t(b->num_local) * 3 * c.hidden * c.ffn;
  const size_t n = size_t(b->tensor_count);
  int st = b->ops->alloc(n * elem_bytes(c.dtype), &b->params);
  if (!st) st = b->ops->alloc(n * acc_bytes(c.dtype), &b->grads);
  if (!st) st = b->ops->alloc(n * acc_bytes(c.dtype), &b->state_m);
  if (!st) st = b->ops->alloc(n * acc_bytes(c.dtype), &b->state_v);
  if (!st) st = presize(b);
  if (!st) st = warm_gemms(b);
  if (st) return fail_peers(b, st);
  return agree_on_config(b);
}

int block_wait(deepep4j_moe* b) {
  int st = finish_outputs(b);
  if (b->pending_status != DEEPEP4J_OK) {
    st = b->pending_status;
    b->pending_status = DEEPEP4J_OK;
  }
  return st;
}

int block_forward(deepep4j_moe* b, int64_t N, const deepep4j_moe_forward_args* a) {
  MoeOps& ops = *b->ops;
  const deepep4j_moe_config& c = b->cfg;
  const int32_t dt = c.dtype, E = c.num_experts, K = c.num_topk, L = b->num_local;
  const int64_t H = c.hidden, F = c.ffn, W = b->row_width;
  const size_t es = elem_bytes(dt), as = acc_bytes(dt);
  const bool f64 = dt == DEEPEP4J_FLOAT64;
  release_handle(b);
  b->pending_copies.clear();

  // ---- router (local): failures are passed to the peers waiting in notify.
  const void *x = nullptr, *wr = nullptr, *bias = nullptr, *replay = nullptr;
  void* y = nullptr;
  int st = keep_in(b, a->memory, a->x, size_t(N * H) * es, b->x, &x);
  if (!st) st = keep_in(b, a->memory, a->router_weight, size_t(H * E) * es, b->wr, &wr);
  if (!st) st = stage_in(b, a->memory, a->router_bias, size_t(E) * 4, b->bias, &bias);
  if (!st) st = stage_in(b, a->memory, a->replay_topk_idx, size_t(N * K) * 8, b->replay, &replay);
  if (!st) st = stage_out(b, a->memory, a->y, size_t(N * H) * es, b->y_stage, &y);
  if (!st) st = ensure(b, b->scores, size_t(N * E) * as);
  if (!st) st = ensure(b, b->topk_idx, size_t(N * K) * 8);
  if (!st) st = ensure(b, b->gate, size_t(N * K) * as);
  if (!st) st = ensure(b, b->weights, size_t(N * K) * as);
  if (!st) st = ensure(b, b->weights_f32, size_t(N * K) * 4);
  if (!st) st = ensure(b, b->gate_sum, size_t(N) * as);
  if (!st) st = ensure(b, b->load, size_t(E) * 4);
  if (!st) st = ensure(b, b->prob_sum, size_t(E) * as);
  if (!st) st = ensure_host(b, b->load, size_t(E) * 4);
  if (!st) st = ensure_host(b, b->prob_sum, size_t(E) * as);
  if (!st && N > 0) {
    GemmGroup q{N, E, H, x, wr, b->scores.ptr};
    st = ops.gemm(router_desc(b, RouterGemm::kLogits), &q, 1, DEEPEP4J_MOE_GEMM_LOOP);
  }
  if (!st) {
    RouterForward r{N, E, K, c.score_function, c.normalize_topk, b->scores.ptr, static_cast<const float*>(bias),
                    static_cast<const int64_t*>(replay), static_cast<int64_t*>(b->topk_idx.ptr), b->gate.ptr,
                    b->weights.ptr, static_cast<float*>(b->weights_f32.ptr), b->gate_sum.ptr,
                    static_cast<int32_t*>(b->load.ptr), b->prob_sum.ptr};
    st = ops.router_forward(dt, r);
  }
  // The load and score sums reach the host with notify's synchronisation.
  if (!st) st = ops.copy(b->load.host, b->load.ptr, size_t(E) * 4, Copy::kDeviceToHost);
  if (!st) st = ops.copy(b->prob_sum.host, b->prob_sum.ptr, size_t(E) * as, Copy::kDeviceToHost);
  // fp64 rows carry their routing weights in the tail (dispatch's weights are fp32).
  const void* send_x = x;
  if (!st && f64) {
    st = ensure(b, b->xw, size_t(N * W) * es);
    if (!st) st = ops.copy_2d(b->xw.ptr, W * es, x, H * es, H * es, N);
    if (!st) st = ops.pack_columns(dt, N, K, b->weights.ptr, b->xw.ptr, DEEPEP4J_FLOAT64, W, H);
    send_x = b->xw.ptr;
  }
  if (st) return fail_peers(b, st);

  // ---- notify + dispatch (collective)
  const int32_t dispatch_dtype = f64 ? DEEPEP4J_FLOAT64 : dt;
  int64_t M = 0;
  b->counts.assign(size_t(L), 0);
  st = deepep4j_notify_dispatch(b->buf, static_cast<int64_t*>(b->topk_idx.ptr), N, K, E, W, dispatch_dtype, &b->handle,
                                &M, b->counts.data(), ops.stream());
  if (st) return st;
  b->offsets.assign(size_t(L) + 1, 0);
  for (int32_t j = 0; j < L; ++j)
    b->offsets[size_t(j) + 1] = b->offsets[size_t(j)] + ops.padded_rows(b->counts[size_t(j)]);
  const int64_t A = b->offsets[size_t(L)];  // assignments, with each expert's padding
  st = ensure(b, b->recv_x, size_t(M * W) * es);
  if (!st) st = ensure(b, b->recv_idx, size_t(M * K) * 8);
  if (!st) st = ensure(b, b->recv_w, size_t(M * K) * 4);
  if (st) return fail_peers(b, st);
  deepep4j_dispatch_args da{};
  da.x = send_x;
  da.topk_weights = f64 ? nullptr : static_cast<const float*>(b->weights_f32.ptr);
  da.recv_x = b->recv_x.ptr;
  da.recv_topk_idx = static_cast<int64_t*>(b->recv_idx.ptr);
  da.recv_topk_weights = f64 ? nullptr : static_cast<float*>(b->recv_w.ptr);
  st = deepep4j_dispatch(b->buf, b->handle, -1, &da, ops.stream());
  if (st) return st;

  // ---- experts (local)
  st = ensure(b, b->assign_row, size_t(A) * 4);
  if (!st) st = ensure(b, b->assign_slot, size_t(A) * 4);
  if (!st) st = ensure(b, b->pos, size_t(M * K) * 4);
  if (!st) st = ensure(b, b->assign_w, size_t(A) * as);
  if (!st) st = ensure(b, b->xe, size_t(A * H) * es);
  if (!st) st = ensure(b, b->act_a, size_t(A * F) * es);
  if (!st) st = ensure(b, b->act_b, size_t(A * F) * es);
  if (!st) st = ensure(b, b->act_h, size_t(A * F) * es);
  if (!st) st = ensure(b, b->ye, size_t(A * H) * es);
  if (!st) st = ensure(b, b->y_recv, size_t(M * W) * es);
  if (!st) {
    Permutation p{M, K, L, static_cast<const int64_t*>(b->recv_idx.ptr), b->offsets.data(),
                  static_cast<int32_t*>(b->assign_row.ptr), static_cast<int32_t*>(b->assign_slot.ptr),
                  static_cast<int32_t*>(b->pos.ptr)};
    st = ops.permutation(p);
  }
  if (!st)
    st = f64 ? ops.gather_slots(dt, A, K, static_cast<int32_t*>(b->assign_slot.ptr), b->recv_x.ptr, DEEPEP4J_FLOAT64,
                                W, H, b->assign_w.ptr)
             : ops.gather_slots(dt, A, K, static_cast<int32_t*>(b->assign_slot.ptr), b->recv_w.ptr, DEEPEP4J_FLOAT32,
                                K, 0, b->assign_w.ptr);
  if (!st) st = ops.gather_rows(dt, A, H, b->recv_x.ptr, W, static_cast<int32_t*>(b->assign_row.ptr), nullptr, b->xe.ptr);
  std::vector<GemmGroup> groups;
  if (!st) {
    // a = xe W1, b = xe W3: one call over 2L products.
    for (int32_t j = 0; j < L; ++j) {
      const int64_t off = b->offsets[size_t(j)], cnt = rows_of(b, j);
      if (cnt == 0) continue;
      ExpertWeights w = expert(b, b->params, j, es);
      const uint8_t* xj = static_cast<const uint8_t*>(b->xe.ptr) + off * H * es;
      groups.push_back(expert_group(b, ExpertGemm::kUp, cnt, xj, w.w1, static_cast<uint8_t*>(b->act_a.ptr) + off * F * es));
      groups.push_back(expert_group(b, ExpertGemm::kUp, cnt, xj, w.w3, static_cast<uint8_t*>(b->act_b.ptr) + off * F * es));
    }
    st = ops.gemm(expert_desc(b, ExpertGemm::kUp, 0.0), groups.data(), int32_t(groups.size()), c.gemm);
  }
  if (!st) st = ops.swiglu_forward(dt, A * F, b->act_a.ptr, b->act_b.ptr, b->act_h.ptr);
  if (!st) {
    groups.clear();
    for (int32_t j = 0; j < L; ++j) {
      const int64_t off = b->offsets[size_t(j)], cnt = rows_of(b, j);
      if (cnt == 0) continue;
      groups.push_back(expert_group(b, ExpertGemm::kDown, cnt, static_cast<uint8_t*>(b->act_h.ptr) + off * F * es,
                                    expert(b, b->params, j, es).w2, static_cast<uint8_t*>(b->ye.ptr) + off * H * es));
    }
    st = ops.gemm(expert_desc(b, ExpertGemm::kDown, 0.0), groups.data(), int32_t(groups.size()), c.gemm);
  }
  if (!st)
    st = ops.scatter_rows(dt, M, K, H, static_cast<int32_t*>(b->pos.ptr), b->ye.ptr, b->assign_w.ptr, b->y_recv.ptr, W);
  void* y_combined = y;
  if (!st && f64) {
    st = ensure(b, b->y_out, size_t(N * W) * es);
    y_combined = b->y_out.ptr;
  }
  if (st) return fail_peers(b, st);

  // ---- combine (collective)
  deepep4j_combine_args ca{};
  ca.y = b->y_recv.ptr;
  ca.out = y_combined;
  st = deepep4j_combine(b->buf, b->handle, dispatch_dtype, &ca, ops.stream());
  if (st) return st;
  if (f64 && N > 0) st = ops.copy_2d(y, H * es, b->y_out.ptr, W * es, H * es, N);

  // ---- outputs
  const bool host_out = staged(b, a->memory);
  if (!st && a->topk_idx)
    st = host_out ? queue_copy_out(b, a->topk_idx, b->topk_idx.ptr, size_t(N * K) * 8, b->idx_stage)
                  : ops.copy(a->topk_idx, b->topk_idx.ptr, size_t(N * K) * 8, Copy::kDeviceToDevice);
  if (!st && a->topk_weights)
    st = host_out ? queue_copy_out(b, a->topk_weights, b->weights_f32.ptr, size_t(N * K) * 4, b->w_stage)
                  : ops.copy(a->topk_weights, b->weights_f32.ptr, size_t(N * K) * 4, Copy::kDeviceToDevice);
  if (!st) st = queue_out(b, a->memory, a->y, size_t(N * H) * es, b->y_stage);
  // Host statistics (copied before notify, which synchronised the stream).
  const int32_t* load = static_cast<const int32_t*>(b->load.host);
  if (!st && a->expert_load) std::memcpy(a->expert_load, load, size_t(E) * 4);
  if (!st && a->recv_per_local_expert) std::memcpy(a->recv_per_local_expert, b->counts.data(), size_t(L) * 4);
  if (!st && a->aux_loss) {
    double total = 0;
    for (int32_t e = 0; e < E; ++e) {
      const double p = f64 ? static_cast<const double*>(b->prob_sum.host)[e] : static_cast<const float*>(b->prob_sum.host)[e];
      total += N > 0 ? (load[e] / double(N * K)) * (p / double(N)) : 0.0;
    }
    *a->aux_loss = c.aux_loss_coef > 0 ? c.aux_loss_coef * E * total : 0.0;
  }
  if (st) return st;
  b->n = N;
  b->m = M;
  b->assignments = A;
  b->has_forward = true;
  if (!a->async_combine) return finish_outputs(b);
  return DEEPEP4J_OK;
}

int block_backward(deepep4j_moe* b, const deepep4j_moe_backward_args* a) {
  MoeOps& ops = *b->ops;
  const deepep4j_moe_config& c = b->cfg;
  const int32_t dt = c.dtype, E = c.num_experts, K = c.num_topk, L = b->num_local;
  const int64_t H = c.hidden, F = c.ffn, W = b->row_width, N = b->n, M = b->m, A = b->assignments;
  const size_t es = elem_bytes(dt), as = acc_bytes(dt);
  const bool f64 = dt == DEEPEP4J_FLOAT64;
  const int32_t dispatch_dtype = f64 ? DEEPEP4J_FLOAT64 : dt;
  b->pending_copies.clear();

  // ---- grad_y to the experts' ranks (collective, cached routing)
  const void* gy = nullptr;
  void *gx = nullptr, *gwr = nullptr;
  int st = stage_in(b, a->memory, a->grad_y, size_t(N * H) * es, b->gy, &gy);
  if (!st) st = stage_out(b, a->memory, a->grad_x, size_t(N * H) * es, b->grad_x, &gx);
  if (!st) st = stage_out(b, a->memory, a->grad_router_weight, size_t(H * E) * es, b->grad_wr, &gwr);
  const void* send = gy;
  if (!st && f64) {
    st = ensure(b, b->xw, size_t(N * W) * es);
    if (!st) st = ops.copy_2d(b->xw.ptr, W * es, gy, H * es, H * es, N);
    send = b->xw.ptr;
  }
  if (!st) st = ensure(b, b->g_recv, size_t(M * W) * es);
  if (st) return fail_peers(b, st);
  deepep4j_dispatch_args da{};
  da.x = send;
  da.recv_x = b->g_recv.ptr;
  st = deepep4j_dispatch(b->buf, b->handle, dispatch_dtype, &da, ops.stream());
  if (st) return st;

  // ---- experts backward (local)
  st = ensure(b, b->gw_assign, size_t(A) * as);
  if (!st) st = ensure(b, b->ge, size_t(A * H) * es);
  if (!st) st = ensure(b, b->gh, size_t(A * F) * es);
  if (!st) st = ensure(b, b->ga, size_t(A * F) * es);
  if (!st) st = ensure(b, b->gb, size_t(A * F) * es);
  if (!st) st = ensure(b, b->gxe, size_t(A * H) * es);
  if (!st) st = ensure(b, b->g_recv_x, size_t(M * W) * es);
  if (!st) st = ensure(b, b->g_recv_w, size_t(M * K) * 4);
  const int32_t* row = static_cast<const int32_t*>(b->assign_row.ptr);
  if (!st) st = ops.row_dots(dt, A, H, b->g_recv.ptr, W, row, b->ye.ptr, b->gw_assign.ptr);
  if (!st) st = ops.gather_rows(dt, A, H, b->g_recv.ptr, W, row, b->assign_w.ptr, b->ge.ptr);
  // accumulate = 0: the weight-gradient GEMMs overwrite GRADS (beta 0) instead of adding to a zeroed copy, which saves
  // a pass over the fp32 gradients; only the experts that received nothing are zeroed.
  const double grad_beta = a->accumulate ? 1.0 : 0.0;
  for (int32_t j = 0; j < L && !st && !a->accumulate; ++j)
    if (b->counts[size_t(j)] == 0)
      st = ops.zero(const_cast<uint8_t*>(expert(b, b->grads, j, as).w1), size_t(3 * H * F) * as);
  std::vector<GemmGroup> groups;
  auto at = [](const Workspace& w, int64_t off, int64_t width, size_t elem) {
    return static_cast<uint8_t*>(w.ptr) + size_t(off * width) * elem;
  };
  if (!st) {  // gW2 += h^T ge
    for (int32_t j = 0; j < L; ++j) {
      const int64_t off = b->offsets[size_t(j)], cnt = rows_of(b, j);
      if (cnt == 0) continue;
      groups.push_back(expert_group(b, ExpertGemm::kGradDown, cnt, at(b->act_h, off, F, es), at(b->ge, off, H, es),
                                    const_cast<uint8_t*>(expert(b, b->grads, j, as).w2)));
    }
    st = ops.gemm(expert_desc(b, ExpertGemm::kGradDown, grad_beta), groups.data(), int32_t(groups.size()), c.gemm);
  }
  if (!st) {  // gh = ge W2^T
    groups.clear();
    for (int32_t j = 0; j < L; ++j) {
      const int64_t off = b->offsets[size_t(j)], cnt = rows_of(b, j);
      if (cnt == 0) continue;
      groups.push_back(expert_group(b, ExpertGemm::kGradH, cnt, at(b->ge, off, H, es), expert(b, b->params, j, es).w2,
                                    at(b->gh, off, F, es)));
    }
    st = ops.gemm(expert_desc(b, ExpertGemm::kGradH, 0.0), groups.data(), int32_t(groups.size()), c.gemm);
  }
  if (!st) st = ops.swiglu_backward(dt, A * F, b->act_a.ptr, b->act_b.ptr, b->gh.ptr, b->ga.ptr, b->gb.ptr);
  if (!st) {  // gW1 += xe^T ga, gW3 += xe^T gb
    groups.clear();
    for (int32_t j = 0; j < L; ++j) {
      const int64_t off = b->offsets[size_t(j)], cnt = rows_of(b, j);
      if (cnt == 0) continue;
      ExpertWeights w = expert(b, b->grads, j, as);
      groups.push_back(expert_group(b, ExpertGemm::kGradUp, cnt, at(b->xe, off, H, es), at(b->ga, off, F, es),
                                    const_cast<uint8_t*>(w.w1)));
      groups.push_back(expert_group(b, ExpertGemm::kGradUp, cnt, at(b->xe, off, H, es), at(b->gb, off, F, es),
                                    const_cast<uint8_t*>(w.w3)));
    }
    st = ops.gemm(expert_desc(b, ExpertGemm::kGradUp, grad_beta), groups.data(), int32_t(groups.size()), c.gemm);
  }
  for (int pass = 0; pass < 2 && !st; ++pass) {  // gxe = ga W1^T + gb W3^T
    groups.clear();
    for (int32_t j = 0; j < L; ++j) {
      const int64_t off = b->offsets[size_t(j)], cnt = rows_of(b, j);
      if (cnt == 0) continue;
      ExpertWeights w = expert(b, b->params, j, es);
      groups.push_back(expert_group(b, ExpertGemm::kGradX, cnt, at(pass ? b->gb : b->ga, off, F, es),
                                    pass ? w.w3 : w.w1, at(b->gxe, off, H, es)));
    }
    st = ops.gemm(expert_desc(b, ExpertGemm::kGradX, pass), groups.data(), int32_t(groups.size()), c.gemm);
  }
  const int32_t* pos = static_cast<const int32_t*>(b->pos.ptr);
  if (!st) st = ops.scatter_rows(dt, M, K, H, pos, b->gxe.ptr, nullptr, b->g_recv_x.ptr, W);
  if (!st)
    st = f64 ? ops.scatter_slots(dt, M, K, pos, b->gw_assign.ptr, b->g_recv_x.ptr, DEEPEP4J_FLOAT64, W, H)
             : ops.scatter_slots(dt, M, K, pos, b->gw_assign.ptr, b->g_recv_w.ptr, DEEPEP4J_FLOAT32, K, 0);
  void* combined = gx;
  if (!st) st = ensure(b, b->out_topk_w, size_t(N * K) * 4);
  if (!st && f64) {
    st = ensure(b, b->g_out, size_t(N * W) * es);
    combined = b->g_out.ptr;
  }
  if (st) return fail_peers(b, st);

  // ---- input gradients and routing-weight gradients back to the tokens' ranks (collective)
  deepep4j_combine_args ca{};
  ca.y = b->g_recv_x.ptr;
  ca.out = combined;
  if (!f64) {
    ca.y_topk_weights = static_cast<const float*>(b->g_recv_w.ptr);
    ca.out_topk_weights = static_cast<float*>(b->out_topk_w.ptr);
  }
  st = deepep4j_combine(b->buf, b->handle, dispatch_dtype, &ca, ops.stream());
  if (st) return st;

  // ---- router backward (local)
  st = ensure(b, b->g_weights, size_t(N * K) * as);
  if (!st) st = ensure(b, b->g_logits, size_t(N * E) * es);
  if (!st)
    st = f64 ? ops.unpack_columns(dt, N, K, b->g_out.ptr, DEEPEP4J_FLOAT64, W, H, b->g_weights.ptr)
             : ops.unpack_columns(dt, N, K, b->out_topk_w.ptr, DEEPEP4J_FLOAT32, K, 0, b->g_weights.ptr);
  if (!st && f64 && N > 0) st = ops.copy_2d(gx, H * es, b->g_out.ptr, W * es, H * es, N);
  if (!st) {
    const double aux = c.aux_loss_coef > 0 && N > 0
                           ? a->aux_loss_scale * c.aux_loss_coef * E / (double(N) * K * double(N))
                           : 0.0;
    RouterBackward r{N, E, K, c.score_function, c.normalize_topk, b->scores.ptr,
                     static_cast<const int64_t*>(b->topk_idx.ptr), b->weights.ptr, b->gate_sum.ptr, b->g_weights.ptr,
                     static_cast<const int32_t*>(b->load.ptr), aux, b->g_logits.ptr};
    st = ops.router_backward(dt, r);
  }
  if (!st && N > 0) {  // grad_x += g_logits Wr^T
    GemmGroup q{N, H, E, b->g_logits.ptr, b->wr.ptr, gx};
    st = ops.gemm(router_desc(b, RouterGemm::kGradX), &q, 1, DEEPEP4J_MOE_GEMM_LOOP);
  }
  if (!st) {  // grad_Wr = x^T g_logits
    GemmGroup q{H, E, N, b->x.ptr, b->g_logits.ptr, gwr};
    st = N > 0 ? ops.gemm(router_desc(b, RouterGemm::kGradWeight), &q, 1, DEEPEP4J_MOE_GEMM_LOOP)
               : ops.zero(gwr, size_t(H * E) * es);
  }
  if (!st) st = queue_out(b, a->memory, a->grad_x, size_t(N * H) * es, b->grad_x);
  if (!st) st = queue_out(b, a->memory, a->grad_router_weight, size_t(H * E) * es, b->grad_wr);
  if (!st) st = finish_outputs(b);
  return st;
}

// The update of DL4J 1.0.0-M2.1 (org.nd4j.linalg.learning.*Updater, the native sgd_updater / adam_updater ops, and
// regularization.WeightDecay), on g = GRADS * grad_scale (DL4J divides by the minibatch before its updater):
//   SGD:   p -= lr * g
//   Adam:  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  t = iteration + 1
//          a = lr * sqrt(1 - b2^t) / (1 - b1^t)   (a NaN, 0 or infinite a becomes epsilon)
//          p -= a * m / (sqrt(v) + epsilon)       (epsilon outside the bias correction, as DL4J has it)
//   AdamW: M2.1 has no AdamW updater; it is Adam plus WeightDecay(coeff, applyLR = true), applied after the updater
//          to the parameter before the step: p -= a * m / (sqrt(v) + epsilon) + lr * weight_decay * p.
int block_step(deepep4j_moe* b, const deepep4j_optimizer* opt) {
  return b->ops->optimizer_step(b->cfg.dtype, b->tensor_count, *opt, b->params, b->grads, b->state_m, b->state_v);
}

}  // namespace moe
}  // namespace deepep4j

deepep4j_moe::~deepep4j_moe() {
  using namespace deepep4j::moe;
  if (!ops) return;
  if (handle) deepep4j_handle_destroy(handle);
  ops->synchronize();
  for (void* p : {params, grads, state_m, state_v})
    if (p) ops->release(p);
  for (Workspace* w : {&x, &wr, &bias, &replay, &scores, &topk_idx, &gate, &weights, &weights_f32, &gate_sum, &load,
                       &prob_sum, &xw, &recv_x, &recv_idx, &recv_w, &assign_row, &assign_slot, &pos, &assign_w, &xe,
                       &act_a, &act_b, &act_h, &ye, &y_recv, &y_out, &gy, &g_recv, &gw_assign, &ge, &gh, &ga, &gb,
                       &gxe, &g_recv_x, &g_recv_w, &g_out, &out_topk_w, &g_weights, &g_logits, &grad_x, &grad_wr,
                       &cfg_rows, &cfg_recv, &cfg_idx, &y_stage, &idx_stage, &w_stage})
    free_workspace(this, *w);
}
