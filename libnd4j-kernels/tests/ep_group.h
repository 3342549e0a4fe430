// ep_group.h — R in-process ranks (one thread each): create, export, connect, run a step, verify it against ref::.
#pragma once

#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

#include "harness.h"
#include "reference.h"

namespace ep {

// Runs f(rank) on R threads and joins them; a REQUIRE that fires inside a rank fails the whole case afterwards.
template <class F>
void run_ranks(int32_t R, F&& f) {
  std::vector<std::thread> threads;
  std::atomic<bool> aborted{false};
  for (int32_t r = 0; r < R; ++r)
    threads.emplace_back([&, r] {
      try {
        f(r);
      } catch (const t::Abort&) {
        aborted = true;
      }
    });
  for (auto& th : threads) th.join();
  if (aborted) throw t::Abort{};
}

// A config sized for `s` with small rings, so tests also exercise wrap-around and chunking.
inline deepep4j_config small_config(const ref::Shape& s, int32_t ring_tokens = 32, int32_t chunk = 8,
                                    int32_t num_sms = 4, int32_t timeout_ms = 20000) {
  deepep4j_config c;
  deepep4j_config_init(&c);
  c.num_sms = num_sms;
  c.ring_tokens = ring_tokens;
  c.max_send_tokens_per_chunk = chunk;
  c.timeout_ms = timeout_ms;
  c.num_threads = 2;
  int64_t bytes = 0;
  if (deepep4j_buffer_size_hint(s.hidden, s.dtype, s.num_ranks, &c, &bytes) != DEEPEP4J_OK) {
    t::fail(__FILE__, __LINE__, t::fmt("buffer_size_hint: %s", deepep4j_last_error()));
    throw t::Abort{};
  }
  c.buffer_bytes = bytes;
  // Room for whole steps (the CUDA copy-engine tests run every case with DEEPEP4J_CUDA_TRANSFER=copy_engine).
  if (const char* mb = getenv("DEEPEP4J_TEST_BUFFER_MB")) c.buffer_bytes = int64_t(atoll(mb)) << 20;
  return c;
}

// R buffers created (rank r with cfg_of(r)) and exported, not yet connected: for tests of connect itself.
// Destroys the buffers.
struct Exported {
  std::vector<deepep4j_buffer*> bufs;
  std::vector<std::vector<uint8_t>> blobs;
  std::vector<size_t> lens;
  std::vector<const void*> ptrs;  // blob pointers as deepep4j_buffer_connect takes them

  Exported(int32_t R, const std::function<deepep4j_config(int32_t)>& cfg_of)
      : bufs(size_t(R), nullptr), blobs(size_t(R), std::vector<uint8_t>(DEEPEP4J_MAX_BLOB_BYTES)), lens(size_t(R), 0) {
    for (int32_t r = 0; r < R; ++r) {
      deepep4j_config c = cfg_of(r);
      REQUIRE_OK(deepep4j_buffer_create(r, R, &c, &bufs[size_t(r)]));
      REQUIRE_OK(deepep4j_buffer_export(bufs[size_t(r)], blobs[size_t(r)].data(), blobs[size_t(r)].size(),
                                        &lens[size_t(r)]));
      ptrs.push_back(blobs[size_t(r)].data());
    }
  }
  Exported(int32_t R, const deepep4j_config& cfg) : Exported(R, [&](int32_t) { return cfg; }) {}
  Exported(const Exported&) = delete;
  Exported& operator=(const Exported&) = delete;
  ~Exported() {
    for (auto* b : bufs) deepep4j_buffer_destroy(b);
  }
  // Connect of rank r with every rank's blob.
  int connect(int32_t r) { return deepep4j_buffer_connect(bufs[size_t(r)], ptrs.data(), lens.data()); }
};

// Exchanges blobs in memory and connects every rank (connect is collective, so one thread per rank).
struct Group {
  std::vector<deepep4j_buffer*> bufs;

  Group(int32_t R, const deepep4j_config& cfg) {
    Exported e(R, cfg);
    run_ranks(R, [&](int32_t r) { REQUIRE_OK(e.connect(r)); });
    bufs.swap(e.bufs);  // the group owns the connected buffers now
  }
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;
  ~Group() {
    for (auto* b : bufs) deepep4j_buffer_destroy(b);
  }
  int32_t size() const { return int32_t(bufs.size()); }
  deepep4j_buffer* operator[](int32_t r) const { return bufs[size_t(r)]; }
};

// How one step is run.
struct StepOptions {
  bool send_weights = true;         // pass topk_weights / recv_topk_weights
  bool weighted_combine = false;    // combine with recv_topk_weights
  bool combine_weights = false;     // return y_topk_weights = recv_topk_weights, expect out_topk_weights
  bool run_combine = true;          // fp8 has no combine
  int32_t combine_dtype = -1;       // -1 = the shape's dtype
};

// What one rank saw in one step, in the same form as the reference.
struct RankResult {
  ref::Layout layout;
  ref::Received recv;
  std::vector<uint8_t> y;  // rows this rank returned: recv_x * (rank + 1)
  std::vector<float> y_topk_weights;
  ref::Combined combined;
  deepep4j_handle* handle = nullptr;  // kept when the caller asks (cached mode), else destroyed
};

// The rows a rank returns in combine: its received rows times (rank + 1), so a wrong (rank, row) mapping shows.
inline std::vector<uint8_t> make_y(const ref::Received& r, int64_t H, int32_t in_dtype, int32_t out_dtype,
                                   int32_t rank) {
  std::vector<uint8_t> y(size_t(r.m * H) * ref::elem_size(out_dtype));
  for (int64_t i = 0; i < r.m * H; ++i)
    ref::store(out_dtype, y.data(), i, ref::load(in_dtype, r.x.data(), i) * float(rank + 1));
  return y;
}

// Dispatch with an existing handle (fresh or cached) into `out`, which must already carry m and per-rank counts.
// Rows are of `dtype`; the call passes `dtype_arg` (-1 = the handle's dtype, or an explicit override).
inline void dispatch_into(deepep4j_buffer* b, deepep4j_handle* h, const ref::Shape& s, int32_t dtype,
                          const ref::RankInput& in, bool send_weights, ref::Received* out, int32_t dtype_arg) {
  const int64_t M = out->m, H = s.hidden;
  const int32_t K = s.num_topk;
  out->x.assign(size_t(M * H) * ref::elem_size(dtype), 0xEE);
  out->x_scales.assign(dtype == DEEPEP4J_FP8_E4M3 ? size_t(M * (H / DEEPEP4J_FP8_BLOCK)) : 0, -7.0f);
  out->topk_idx.assign(size_t(M * K), -99);
  out->topk_weights.assign(size_t(M * K), -99.0f);
  out->src_token.assign(size_t(M), -99);
  out->src_rank.assign(size_t(M), -99);
  deepep4j_dispatch_args a{};
  a.x = in.x.data();
  a.x_scales = dtype == DEEPEP4J_FP8_E4M3 ? in.x_scales.data() : nullptr;
  a.topk_weights = send_weights ? in.topk_weights.data() : nullptr;
  a.recv_x = out->x.data();
  a.recv_x_scales = dtype == DEEPEP4J_FP8_E4M3 ? out->x_scales.data() : nullptr;
  a.recv_topk_idx = out->topk_idx.data();
  a.recv_topk_weights = send_weights ? out->topk_weights.data() : nullptr;
  a.recv_src_token = out->src_token.data();
  a.recv_src_rank = out->src_rank.data();
  REQUIRE_OK(deepep4j_dispatch(b, h, dtype_arg, &a, nullptr));
}

// Combine `res->y` back (res->recv must hold this rank's received routing).
inline void combine_into(deepep4j_buffer* b, deepep4j_handle* h, const ref::Shape& s, int32_t dtype, int64_t n,
                         const StepOptions& o, RankResult* res) {
  const int64_t H = s.hidden;
  const int32_t K = s.num_topk;
  res->combined.out.assign(size_t(n * H) * ref::elem_size(dtype), 0xEE);
  res->combined.out_topk_weights.assign(o.combine_weights ? size_t(n * K) : 0, -99.0f);
  res->y_topk_weights.clear();
  if (o.combine_weights) res->y_topk_weights = res->recv.topk_weights;
  // Weights of non-local entries must not count: give them a value that would show if they did.
  std::vector<float> scale_weights = res->recv.topk_weights;
  for (size_t i = 0; i < scale_weights.size(); ++i)
    if (res->recv.topk_idx[i] < 0) scale_weights[i] = 100.0f;
  deepep4j_combine_args c{};
  c.y = res->y.data();
  c.recv_topk_weights = o.weighted_combine ? scale_weights.data() : nullptr;
  c.y_topk_weights = o.combine_weights ? res->y_topk_weights.data() : nullptr;
  c.out = res->combined.out.data();
  c.out_topk_weights = o.combine_weights ? res->combined.out_topk_weights.data() : nullptr;
  REQUIRE_OK(deepep4j_combine(b, h, dtype, &c, nullptr));
}

// layout + notify + dispatch (+ combine) on one rank.
inline void run_rank(deepep4j_buffer* b, int32_t rank, const ref::Shape& s, const ref::RankInput& in,
                     const StepOptions& o, RankResult* res, bool keep_handle = false) {
  const int32_t R = s.num_ranks, E = s.num_experts, K = s.num_topk;
  res->layout.per_rank.assign(size_t(R), -1);
  res->layout.per_expert.assign(size_t(E), -1);
  res->layout.in_rank.assign(size_t(in.n * R), 0xEE);
  REQUIRE_OK(deepep4j_get_dispatch_layout(b, in.topk_idx.data(), in.n, K, E, res->layout.per_rank.data(),
                                          res->layout.per_expert.data(), res->layout.in_rank.data(), nullptr));
  deepep4j_handle* h = nullptr;
  int64_t M = -1;
  res->recv.per_local_expert.assign(size_t(E / R), -1);
  REQUIRE_OK(deepep4j_notify_dispatch(b, in.topk_idx.data(), in.n, K, E, s.hidden, s.dtype, &h, &M,
                                      res->recv.per_local_expert.data(), nullptr));
  REQUIRE(h != nullptr && M >= 0);
  res->recv.m = M;
  res->recv.per_source_rank.assign(size_t(R), -1);
  REQUIRE_OK(deepep4j_handle_recv_counts_per_rank(h, res->recv.per_source_rank.data()));
  CHECK_EQ(deepep4j_handle_num_tokens(h), in.n);
  CHECK_EQ(deepep4j_handle_num_recv_tokens(h), M);
  CHECK_EQ(deepep4j_handle_num_topk(h), K);
  CHECK_EQ(deepep4j_handle_hidden(h), s.hidden);
  CHECK_EQ(deepep4j_handle_num_experts(h), E);
  dispatch_into(b, h, s, s.dtype, in, o.send_weights, &res->recv, -1);
  if (o.run_combine) {
    int32_t cd = o.combine_dtype < 0 ? s.dtype : o.combine_dtype;
    res->y = make_y(res->recv, s.hidden, s.dtype, cd, rank);
    combine_into(b, h, s, cd, in.n, o, res);
  }
  if (keep_handle) {
    res->handle = h;
  } else {
    REQUIRE_OK(deepep4j_handle_destroy(h));
  }
}

// Compares rank r's result with the reference; `label` says which configuration failed.
inline void verify_rank(const ref::Shape& s, const std::vector<ref::RankInput>& in, int32_t r, const RankResult& got,
                        const StepOptions& o, const std::string& label) {
  const int32_t R = s.num_ranks;
  std::vector<ref::Received> expect(static_cast<size_t>(R));
  for (int32_t d = 0; d < R; ++d) expect[size_t(d)] = ref::dispatch(s, in, d);
  const ref::Received& e = expect[size_t(r)];
  ref::Layout l = ref::layout(s, in[size_t(r)]);
  std::string where = label + t::fmt(" rank %d", r);
  CHECK_MSG(got.layout.per_rank == l.per_rank, "%s: num_tokens_per_rank", where.c_str());
  CHECK_MSG(got.layout.per_expert == l.per_expert, "%s: num_tokens_per_expert", where.c_str());
  CHECK_MSG(got.layout.in_rank == l.in_rank, "%s: is_token_in_rank", where.c_str());
  CHECK_MSG(got.recv.m == e.m, "%s: M = %lld, expected %lld", where.c_str(), (long long)got.recv.m, (long long)e.m);
  if (got.recv.m != e.m) return;
  CHECK_MSG(got.recv.per_local_expert == e.per_local_expert, "%s: num_recv_tokens_per_expert", where.c_str());
  CHECK_MSG(got.recv.per_source_rank == e.per_source_rank, "%s: recv_counts_per_rank", where.c_str());
  CHECK_MSG(got.recv.x == e.x, "%s: recv_x differs", where.c_str());
  CHECK_MSG(got.recv.x_scales == e.x_scales, "%s: recv_x_scales differs", where.c_str());
  CHECK_MSG(got.recv.topk_idx == e.topk_idx, "%s: recv_topk_idx differs", where.c_str());
  if (o.send_weights) CHECK_MSG(got.recv.topk_weights == e.topk_weights, "%s: recv_topk_weights", where.c_str());
  CHECK_MSG(got.recv.src_token == e.src_token, "%s: recv_src_token differs", where.c_str());
  CHECK_MSG(got.recv.src_rank == e.src_rank, "%s: recv_src_rank differs", where.c_str());
  if (!o.run_combine) return;
  int32_t cd = o.combine_dtype < 0 ? s.dtype : o.combine_dtype;
  std::vector<std::vector<uint8_t>> ys;
  std::vector<std::vector<float>> yw;
  for (int32_t d = 0; d < R; ++d) {
    ys.push_back(make_y(expect[size_t(d)], s.hidden, s.dtype, cd, d));
    if (o.combine_weights) yw.push_back(expect[size_t(d)].topk_weights);
  }
  ref::Combined c = ref::combine(s, expect, ys, yw, o.combine_weights, o.weighted_combine, r, in[size_t(r)].n, cd);
  if (got.combined.out != c.out) {
    size_t first = 0;
    while (first < c.out.size() && got.combined.out[first] == c.out[first]) ++first;
    t::fail(__FILE__, __LINE__,
            t::fmt("%s: combine out differs first at byte %zu of %zu", where.c_str(), first, c.out.size()));
  }
  CHECK_MSG(got.combined.out_topk_weights == c.out_topk_weights, "%s: out_topk_weights differs", where.c_str());
}

inline void verify(const ref::Shape& s, const std::vector<ref::RankInput>& in, const std::vector<RankResult>& res,
                   const StepOptions& o, const std::string& label) {
  for (int32_t r = 0; r < s.num_ranks; ++r) verify_rank(s, in, r, res[size_t(r)], o, label);
}

// Inputs of every rank for a step: rank r's tokens come from seed * 131 + r, so any process can rebuild them.
inline std::vector<ref::RankInput> make_inputs(const ref::Shape& s, const std::vector<int64_t>& tokens, uint64_t seed) {
  std::vector<ref::RankInput> in;
  for (int32_t r = 0; r < s.num_ranks; ++r) in.push_back(ref::make_input(s, tokens[size_t(r)], seed * 131 + r));
  return in;
}

// One full step on a fresh group of ranks; returns after verifying.
inline void run_and_verify(const ref::Shape& s, const std::vector<int64_t>& tokens, const deepep4j_config& cfg,
                           const StepOptions& o, uint64_t seed, const std::string& label) {
  std::vector<ref::RankInput> in = make_inputs(s, tokens, seed);
  Group g(s.num_ranks, cfg);
  std::vector<RankResult> res(size_t(s.num_ranks));
  run_ranks(s.num_ranks, [&](int32_t r) { run_rank(g[r], r, s, in[size_t(r)], o, &res[size_t(r)]); });
  verify(s, in, res, o, label);
}

}  // namespace ep
