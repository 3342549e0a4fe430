// dispatch.cpp — layout, notify (count exchange, handle) and dispatch (rows to the ranks of their experts).
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdlib>
#include <cstring>

#include "../common/dtype.h"
#include "cpu_backend.h"

namespace deepep4j {
namespace cpu {

int CpuBackend::get_dispatch_layout(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int32_t* per_rank,
                        int32_t* per_expert, uint8_t* in_rank, void*) {
  Check c = check_routing(topk_idx, n, k, e, R_, true);
  if (!c.ok()) return set_error(c.status, "%s", c.message.c_str());
  std::vector<int32_t> pr(R_, 0), pe(e, 0);
  std::vector<uint8_t> mask(size_t(n) * R_, 0);
  const int32_t experts_per_rank = e / R_;
  for (int64_t t = 0; t < n; ++t) {
    uint8_t* m = &mask[size_t(t) * R_];
    for (int j = 0; j < k; ++j) {
      int64_t x = topk_idx[t * k + j];
      if (x < 0) continue;
      pe[x]++;
      m[x / experts_per_rank] = 1;
    }
    for (int r = 0; r < R_; ++r) pr[r] += m[r];
  }
  if (per_rank) std::copy(pr.begin(), pr.end(), per_rank);
  if (per_expert) std::copy(pe.begin(), pe.end(), per_expert);
  if (in_rank) std::copy(mask.begin(), mask.end(), in_rank);
  return ok();
}

int CpuBackend::notify_dispatch(const int64_t* topk_idx, int64_t n, int32_t k, int32_t e, int64_t hidden, int32_t dtype,
                    Handle** out_handle, int64_t* num_recv, int32_t* per_local_expert, void*) {
  if (broken_) return broken_error("deepep4j_notify_dispatch");
  Check c = check_routing(topk_idx, n, k, e, R_, true);
  if (c.ok()) c = check_payload(hidden, dtype, true, "notify_dispatch");
  if (c.ok()) c = check_ring(dispatch_slot_bytes(hidden, dtype, k), "dispatch");
  if (!c.ok()) n = 0;  // nothing below reads topk_idx after a failed check

  auto h = std::make_unique<CpuHandle>();
  h->num_tokens = n;
  h->num_topk = k;
  h->num_experts = e;
  h->hidden = hidden;
  h->dtype = dtype;
  h->num_ranks = R_;
  h->channels = C_;
  h->send_tokens.assign(R_, {});
  h->send_begin.assign(R_, std::vector<int64_t>(C_ + 1, 0));
  // rows_to[d][c] and experts_to[d][j]: what this rank sends rank d.
  std::vector<std::vector<int32_t>> rows_to(R_, std::vector<int32_t>(C_, 0));
  const int32_t epr = c.ok() ? e / R_ : 1;
  std::vector<std::vector<int32_t>> experts_to(R_, std::vector<int32_t>(c.ok() ? epr : 0, 0));
  std::vector<uint8_t> hit(R_);
  for (int ch = 0; ch < C_; ++ch) {
    int64_t lo = n * ch / C_, hi = n * (ch + 1) / C_;
    for (int64_t t = lo; t < hi; ++t) {
      std::fill(hit.begin(), hit.end(), 0);
      for (int j = 0; j < k; ++j) {
        int64_t x = topk_idx[t * k + j];
        if (x < 0) continue;
        int d = int(x / epr);
        experts_to[d][x % epr]++;
        hit[d] = 1;
      }
      for (int d = 0; d < R_; ++d)
        if (hit[d]) {
          h->send_tokens[d].push_back(int32_t(t));
          rows_to[d][ch]++;
        }
    }
    for (int d = 0; d < R_; ++d) h->send_begin[d][ch + 1] = (int64_t)h->send_tokens[d].size();
  }

  StepData mine{};
  fill_header(&mine, c, kStepNotify, n, hidden, k, e, dtype, 0, 0);
  std::vector<const StepData*> all;
  int st = exchange(mine, &all, [&](int d, StepData* s) {
    std::copy(rows_to[d].begin(), rows_to[d].end(), s->rows_per_channel);
    if (c.ok()) std::copy(experts_to[d].begin(), experts_to[d].end(), s->rows_per_expert);
  });
  if (st != DEEPEP4J_OK) return st;
  if ((st = verdict(all, kStepNotify)) != DEEPEP4J_OK) return st;

  h->seq = int64_t(step_);
  h->topk_idx.assign(topk_idx, topk_idx + n * k);
  h->recv_begin.assign(R_, std::vector<int64_t>(C_ + 1, 0));
  int64_t m = 0;
  std::vector<int32_t> per_expert(epr, 0);
  for (int s = 0; s < R_; ++s) {
    int64_t from_s = 0;
    for (int ch = 0; ch < C_; ++ch) {
      h->recv_begin[s][ch] = m;
      m += all[s]->rows_per_channel[ch];
      from_s += all[s]->rows_per_channel[ch];
    }
    h->recv_begin[s][C_] = m;
    h->recv_counts_per_rank[s] = int32_t(from_s);
    for (int j = 0; j < epr; ++j) per_expert[j] += all[s]->rows_per_expert[j];
  }
  h->num_recv_tokens = m;
  *num_recv = m;
  if (per_local_expert) std::copy(per_expert.begin(), per_expert.end(), per_local_expert);
  *out_handle = h.release();
  return ok();
}

int CpuBackend::dispatch(Handle* handle, int32_t dtype, const deepep4j_dispatch_args* a, void*) {
  if (broken_) return broken_error("deepep4j_dispatch");
  auto* h = static_cast<CpuHandle*>(handle);
  Check c = check_dispatch_args(*h, dtype, a);
  const int64_t slot = dispatch_slot_bytes(h->hidden, dtype, h->num_topk);
  if (c.ok()) c = check_ring(slot, "dispatch");
  // A rank with no tokens has no weights to give (an empty array may well be NULL): its choice does not count.
  int flags = (c.ok() && h->num_tokens > 0) ? (kFlagKnown1 | (a->topk_weights != nullptr ? 1 : 0)) : 0;
  if (!h->has_recv_local_idx) h->recv_local_idx.assign(size_t(h->num_recv_tokens) * h->num_topk, -1);
  StepData mine{};
  fill_header(&mine, c, kStepDispatch, h->num_tokens, h->hidden, h->num_topk, h->num_experts, dtype, flags, h->seq);
  if (c.ok())
    publish(&mine, {a->recv_x, a->recv_topk_idx, a->recv_topk_weights, a->recv_src_token, a->recv_src_rank,
                    a->recv_x_scales, h->recv_local_idx.data()});
  std::vector<const StepData*> all;
  int st = exchange(mine, &all, [&](int d, StepData* s) { publish_offsets(h, d, s); });
  if (st != DEEPEP4J_OK) return st;
  if ((st = verdict(all, kStepDispatch)) != DEEPEP4J_OK) return st;

  Transfer tr = dispatch_transfer(h, dtype, a, slot, all);
  st = finish_step(run_transfer(tr), kStepDispatch);
  if (st == DEEPEP4J_OK) h->has_recv_local_idx = true;
  return st;
}

CpuBackend::Transfer CpuBackend::dispatch_transfer(CpuHandle* h, int32_t dtype, const deepep4j_dispatch_args* a, int64_t slot,
                           const std::vector<const StepData*>& all) {
  Transfer t;
  t.kind = kStepDispatch;
  t.slot_bytes = slot;
  t.slots = ring_slots(slot);
  const int64_t H = h->hidden;
  const int32_t K = h->num_topk;
  const int64_t row = H * int64_t(dtype_size(dtype));
  const bool fp8 = dtype == DEEPEP4J_FP8_E4M3;
  const int64_t nscales = fp8 ? H / DEEPEP4J_FP8_BLOCK : 0;
  const DispatchSlot lay = DispatchSlot::make(row, K, int32_t(nscales));
  const int32_t epr = h->num_experts / R_;
  const uint8_t* x = static_cast<const uint8_t*>(a->x);

  // Every direct peer's outputs as it published them (this rank's from its own arguments).
  auto outs = std::make_shared<std::vector<DispatchOut>>(R_);
  for (int p = 0; p < R_; ++p) {
    if (!peer_direct_[p]) continue;
    const uint64_t* q = all[p]->ptrs;
    (*outs)[p] = DispatchOut{reinterpret_cast<uint8_t*>(q[0]), reinterpret_cast<int64_t*>(q[1]),
                             reinterpret_cast<float*>(q[2]), reinterpret_cast<int64_t*>(q[3]),
                             reinterpret_cast<int32_t*>(q[4]), reinterpret_cast<float*>(q[5]),
                             reinterpret_cast<int64_t*>(q[6]), all[p]->row_offsets};
  }
  // Writes row `m` of rank `o`'s receive side from a token's data (rings, self and direct copies alike).
  auto deliver = [=](const DispatchOut& o, int s, int64_t m, int64_t src_token, const int64_t* local_idx,
                     const float* weights, const uint8_t* xrow, const float* scales) {
    std::memcpy(o.recv_x + m * row, xrow, size_t(row));
    if (o.recv_topk_idx) std::memcpy(o.recv_topk_idx + m * K, local_idx, sizeof(int64_t) * K);
    std::memcpy(o.local_idx + m * K, local_idx, sizeof(int64_t) * K);
    if (o.recv_topk_weights) std::memcpy(o.recv_topk_weights + m * K, weights, sizeof(float) * K);
    if (o.recv_src_token) o.recv_src_token[m] = src_token;
    if (o.recv_src_rank) o.recv_src_rank[m] = s;
    if (fp8) std::memcpy(o.recv_x_scales + m * nscales, scales, sizeof(float) * nscales);
  };
  // Local expert ids and weights of token t as seen by rank d.
  auto route = [=](int d, int64_t t, int64_t* local_idx, float* weights) {
    for (int j = 0; j < K; ++j) {
      int64_t x_e = h->topk_idx[t * K + j];
      bool local = x_e >= 0 && x_e / epr == d;
      local_idx[j] = local ? x_e - int64_t(d) * epr : -1;
      weights[j] = (local && a->topk_weights) ? a->topk_weights[t * K + j] : 0.0f;
    }
  };
  const DispatchOut self{static_cast<uint8_t*>(a->recv_x), a->recv_topk_idx, a->recv_topk_weights, a->recv_src_token,
                         a->recv_src_rank, a->recv_x_scales, h->recv_local_idx.data(), nullptr};
  t.send_count = [=](int d, int c) { return h->send_begin[d][c + 1] - h->send_begin[d][c]; };
  t.pack = [=](int d, int c, int64_t i, uint8_t* s) {
    int64_t tok = h->send_tokens[d][h->send_begin[d][c] + i];
    int64_t local_idx[DEEPEP4J_MAX_TOPK];
    route(d, tok, local_idx, reinterpret_cast<float*>(s + lay.weights_off));
    *reinterpret_cast<int32_t*>(s) = int32_t(tok);
    int32_t* ids = reinterpret_cast<int32_t*>(s + lay.ids_off);
    for (int j = 0; j < K; ++j) ids[j] = int32_t(local_idx[j]);
    std::memcpy(s + lay.row_off, x + tok * row, size_t(row));
    if (fp8) std::memcpy(s + lay.scales_off, a->x_scales + tok * nscales, sizeof(float) * nscales);
  };
  t.recv_count = [=](int s, int c) { return h->recv_begin[s][c + 1] - h->recv_begin[s][c]; };
  t.unpack = [=](int s, int c, int64_t i, const uint8_t* sl) {
    int64_t local_idx[DEEPEP4J_MAX_TOPK];
    const int32_t* ids = reinterpret_cast<const int32_t*>(sl + lay.ids_off);
    for (int j = 0; j < K; ++j) local_idx[j] = ids[j];
    deliver(self, s, h->recv_begin[s][c] + i, *reinterpret_cast<const int32_t*>(sl), local_idx,
            reinterpret_cast<const float*>(sl + lay.weights_off), sl + lay.row_off,
            reinterpret_cast<const float*>(sl + lay.scales_off));
  };
  // Pushes row i of channel c straight into rank d's outputs (d = this rank included).
  t.direct_copy = [=](int d, int c, int64_t i) {
    int64_t tok = h->send_tokens[d][h->send_begin[d][c] + i];
    int64_t local_idx[DEEPEP4J_MAX_TOPK];
    float weights[DEEPEP4J_MAX_TOPK];
    route(d, tok, local_idx, weights);
    int64_t m = d == rank_ ? h->recv_begin[rank_][c] + i : (*outs)[d].row_offsets[c] + i;
    deliver(d == rank_ ? self : (*outs)[d], rank_, m, tok, local_idx, weights, x + tok * row,
            fp8 ? a->x_scales + tok * nscales : nullptr);
  };
  return t;
}

}  // namespace cpu
}  // namespace deepep4j
