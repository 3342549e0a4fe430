// combine.cpp — rows back to their source ranks, reduced per token in fp32 in source-rank order.
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdlib>
#include <cstring>

#include "../common/dtype.h"
#include "cpu_backend.h"

namespace deepep4j {
namespace cpu {

namespace {

// acc = scale * row (first contribution: saves zero-filling and re-reading acc) or acc += scale * row. One straight
// loop per (dtype, first) so the compiler vectorises it; the bf16 loops also get an AVX2 clone (chosen at load time),
// which has no FMA, so the sums round exactly as the reference does.
template <class Acc, class T, class ToFloat>
inline void add_row_of(Acc* acc, const T* r, int64_t h, Acc scale, bool first, ToFloat to_float) {
  if (first)
    for (int64_t i = 0; i < h; ++i) acc[i] = scale * to_float(r[i]);
  else
    for (int64_t i = 0; i < h; ++i) acc[i] += scale * to_float(r[i]);
}

__attribute__((target_clones("avx2", "default"))) void add_bf16_row(float* acc, const uint16_t* r, int64_t h,
                                                                    float scale, bool first) {
  add_row_of(acc, r, h, scale, first, [](uint16_t v) { return bf16_to_float(v); });
}

__attribute__((target_clones("avx2", "default"))) void store_bf16_row(uint16_t* o, const float* acc, int64_t h) {
  for (int64_t i = 0; i < h; ++i) o[i] = float_to_bf16(acc[i]);
}

void add_row(float* acc, const uint8_t* row, int32_t dtype, int64_t h, float scale, bool first) {
  if (dtype == DEEPEP4J_FLOAT32)
    add_row_of(acc, reinterpret_cast<const float*>(row), h, scale, first, [](float v) { return v; });
  else if (dtype == DEEPEP4J_BFLOAT16)
    add_bf16_row(acc, reinterpret_cast<const uint16_t*>(row), h, scale, first);
  else
    add_row_of(acc, reinterpret_cast<const uint16_t*>(row), h, scale, first,
               [](uint16_t v) { return fp16_to_float(v); });
}

// fp64 rows (the MoE block's gradient checks) are reduced in fp64, straight into out.
void add_f64_row(double* acc, const uint8_t* row, int64_t h, float scale, bool first) {
  add_row_of(acc, reinterpret_cast<const double*>(row), h, double(scale), first, [](double v) { return v; });
}

void store_row(uint8_t* out, const float* acc, int32_t dtype, int64_t h) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  if (dtype == DEEPEP4J_BFLOAT16) {
    store_bf16_row(o, acc, h);
  } else {
    for (int64_t i = 0; i < h; ++i) o[i] = float_to_fp16(acc[i]);
  }
}
}  // namespace

int CpuBackend::combine(Handle* handle, int32_t dtype, const deepep4j_combine_args* a, void*) {
  if (broken_) return broken_error("deepep4j_combine");
  auto* h = static_cast<CpuHandle*>(handle);
  Check c = check_combine_args(*h, dtype, a);
  if (c.ok() && a->recv_topk_weights != nullptr && !h->has_recv_local_idx)
    c = Check::fail(DEEPEP4J_ERR_STATE,
                    "recv_topk_weights given but this handle has not dispatched yet: a weighted combine needs the "
                    "local expert ids of a dispatch");
  const int64_t slot = combine_slot_bytes(h->hidden, dtype, h->num_topk);
  if (c.ok()) c = check_ring(slot, "combine");
  // Bits count only where the rank has rows for them: recv/y weights need M > 0; out_topk_weights needs N > 0.
  int flags = 0;
  if (c.ok() && h->num_recv_tokens > 0)
    flags = kFlagKnown1 | kFlagKnown2 | (a->recv_topk_weights ? 1 : 0) | (a->y_topk_weights ? 2 : 0);
  else if (c.ok() && h->num_tokens > 0)
    flags = kFlagKnown2 | (a->out_topk_weights ? 2 : 0);
  StepData mine{};
  fill_header(&mine, c, kStepCombine, h->num_tokens, h->hidden, h->num_topk, h->num_experts, dtype, flags, h->seq);
  if (c.ok())
    publish(&mine, {a->y, a->recv_topk_weights, a->y_topk_weights,
                    h->has_recv_local_idx ? h->recv_local_idx.data() : nullptr});
  std::vector<const StepData*> all;
  int st = exchange(mine, &all, [&](int d, StepData* s) { publish_offsets(h, d, s); });
  if (st != DEEPEP4J_OK) return st;
  if ((st = verdict(all, kStepCombine)) != DEEPEP4J_OK) return st;
  // Accumulators live in the backend and only grow, so a fresh handle per step costs no page faults.
  if (dtype != DEEPEP4J_FLOAT32 && dtype != DEEPEP4J_FLOAT64 && scratch_.size() < size_t(h->num_tokens) * h->hidden)
    scratch_.resize(size_t(h->num_tokens) * h->hidden);
  if (touched_.size() < size_t(h->num_tokens)) touched_.resize(size_t(h->num_tokens));
  Transfer tr = combine_transfer(h, dtype, a, slot, all);
  return finish_step(run_transfer(tr), kStepCombine);
}

CpuBackend::Transfer CpuBackend::combine_transfer(CpuHandle* h, int32_t dtype, const deepep4j_combine_args* a, int64_t slot,
                          const std::vector<const StepData*>& all) {
  Transfer t;
  t.kind = kStepCombine;
  t.slot_bytes = slot;
  t.slots = ring_slots(slot);
  t.ordered_sources = true;
  const int64_t H = h->hidden;
  const int32_t K = h->num_topk;
  const int64_t row = H * int64_t(dtype_size(dtype));
  const CombineSlot lay = CombineSlot::make(row, K);
  const uint8_t* y = static_cast<const uint8_t*>(a->y);
  uint8_t* out = static_cast<uint8_t*>(a->out);
  const bool f32 = dtype == DEEPEP4J_FLOAT32;
  const bool f64 = dtype == DEEPEP4J_FLOAT64;
  float* acc_base = f32 ? reinterpret_cast<float*>(out) : scratch_.data();
  double* acc64 = reinterpret_cast<double*>(out);
  uint8_t* touched = touched_.data();

  auto ins = std::make_shared<std::vector<CombineIn>>(R_);
  for (int p = 0; p < R_; ++p) {
    if (p == rank_) {
      (*ins)[p] = CombineIn{y, a->recv_topk_weights, a->y_topk_weights, h->recv_local_idx.data(), nullptr};
    } else if (peer_direct_[p]) {
      const uint64_t* q = all[p]->ptrs;
      (*ins)[p] = CombineIn{reinterpret_cast<const uint8_t*>(q[0]), reinterpret_cast<const float*>(q[1]),
                            reinterpret_cast<const float*>(q[2]), reinterpret_cast<const int64_t*>(q[3]),
                            all[p]->row_offsets};
    }
  }
  // The combine scale of row m of rank `in`: 1, or the sum of its weights on that rank's local experts.
  auto scale_of = [=](const CombineIn& in, int64_t m) {
    if (!in.recv_topk_weights) return 1.0f;
    float s = 0.0f;
    for (int j = 0; j < K; ++j)
      if (in.local_idx[m * K + j] >= 0) s += in.recv_topk_weights[m * K + j];
    return s;
  };
  // Adds one returned row to its token's accumulator (sources arrive in rank order).
  auto accumulate = [=](int d, int c, int64_t i, const uint8_t* yrow, const float* ytopk, float scale) {
    int64_t tok = h->send_tokens[d][h->send_begin[d][c] + i];
    if (f64)
      add_f64_row(acc64 + tok * H, yrow, H, scale, !touched[tok]);
    else
      add_row(acc_base + tok * H, yrow, dtype, H, scale, !touched[tok]);
    touched[tok] = 1;
    if (a->out_topk_weights)
      for (int j = 0; j < K; ++j) a->out_topk_weights[tok * K + j] += ytopk[j];
  };
  // This rank returns rows it received from rank s (send side of combine = receive side of dispatch).
  t.send_count = [=](int s, int c) { return h->recv_begin[s][c + 1] - h->recv_begin[s][c]; };
  t.pack = [=](int s, int c, int64_t i, uint8_t* sl) {
    int64_t m = h->recv_begin[s][c] + i;
    std::memcpy(sl, y + m * row, size_t(row));
    float* tail = reinterpret_cast<float*>(sl + lay.weights_off);  // K weights, then the scale
    if (a->y_topk_weights)
      std::memcpy(tail, a->y_topk_weights + m * K, sizeof(float) * K);
    else
      std::memset(tail, 0, sizeof(float) * K);
    tail[K] = scale_of((*ins)[rank_], m);
  };
  t.recv_count = [=](int d, int c) { return h->send_begin[d][c + 1] - h->send_begin[d][c]; };
  t.unpack = [=](int d, int c, int64_t i, const uint8_t* sl) {
    const float* tail = reinterpret_cast<const float*>(sl + lay.weights_off);
    accumulate(d, c, i, sl, tail, tail[K]);
  };
  t.token_of = [=](int d, int c, int64_t i) { return int64_t(h->send_tokens[d][h->send_begin[d][c] + i]); };
  // Pulls row i of channel c straight from rank d's y (d = this rank included), at d's turn.
  t.direct_copy = [=](int d, int c, int64_t i) {
    const CombineIn& in = (*ins)[d];
    int64_t m = (d == rank_ ? h->recv_begin[rank_][c] : in.row_offsets[c]) + i;
    float zeros[DEEPEP4J_MAX_TOPK] = {};
    accumulate(d, c, i, in.y + m * row, in.y_topk_weights ? in.y_topk_weights + m * K : zeros, scale_of(in, m));
  };
  t.channel_begin = [=](int c) {
    int64_t lo = h->num_tokens * c / h->channels, hi = h->num_tokens * (c + 1) / h->channels;
    std::fill(touched + lo, touched + hi, 0);
    if (a->out_topk_weights) std::fill(a->out_topk_weights + lo * K, a->out_topk_weights + hi * K, 0.0f);
  };
  // bf16/fp16: a token whose rows are all added is stored at once, while its fp32 accumulator is still in cache.
  constexpr uint8_t kStored = 2;
  t.token_done = [=](int64_t tok) {
    if (f32 || f64) return;
    store_row(out + tok * row, acc_base + tok * H, dtype, H);
    touched[tok] = kStored;
  };
  t.channel_end = [=](int c) {
    int64_t lo = h->num_tokens * c / h->channels, hi = h->num_tokens * (c + 1) / h->channels;
    for (int64_t tok = lo; tok < hi; ++tok) {
      if (touched[tok] == kStored) continue;
      if (!touched[tok] && f64) std::fill(acc64 + tok * H, acc64 + (tok + 1) * H, 0.0);  // visited no rank
      if (f64) continue;
      if (!touched[tok]) std::fill(acc_base + tok * H, acc_base + (tok + 1) * H, 0.0f);  // visited no rank
      if (!f32) store_row(out + tok * row, acc_base + tok * H, dtype, H);
    }
  };
  return t;
}

}  // namespace cpu
}  // namespace deepep4j
