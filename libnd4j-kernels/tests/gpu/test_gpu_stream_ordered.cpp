// test_gpu_stream_ordered.cpp — stream-ordered steps (config.stream_ordered = 1) on the deepep backend, ranks as
// threads: dispatch / combine / cached dispatch queued back to back return before the GPU is done (a peer that comes
// late does not hold the call) and equal the reference; a worst-case sized notify -> dispatch -> combine captured in a
// CUDA graph, replayed on new data, equals it every time; an async combine on the comm stream runs while later work
// on the caller's stream completes, and a reader ordered by deepep4j_comm_wait sees the finished output.
#include <algorithm>
#include <chrono>
#include <thread>

#include "gpu_group.h"

namespace {

using Clock = std::chrono::steady_clock;

int64_t ms_since(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(Clock::now() - t0).count();
}

ref::Shape shape() {
  ref::Shape s;
  s.num_ranks = 2, s.num_experts = 8, s.num_topk = 2, s.hidden = 256, s.dtype = DEEPEP4J_BFLOAT16;
  return s;
}

deepep4j_config so_config(const ref::Shape& s) {
  deepep4j_config c = gpu::cuda_config(s, DEEPEP4J_BACKEND_DEEPEP, 32, 8, 4, 20000);
  c.stream_ordered = 1;
  c.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_SM;  // stream-ordered steps use the rings (copy_engine is refused)
  return c;
}

struct Stream {
  cudaStream_t s = nullptr;
  Stream() { CUDA_OK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking)); }
  ~Stream() { cudaStreamDestroy(s); }
};

// Device -> host copy queued on `s` (valid after the stream is synchronised).
template <class T>
void get_async(const gpu::Dev& d, size_t count, std::vector<T>* out, cudaStream_t s) {
  out->resize(count);
  if (count) CUDA_OK(cudaMemcpyAsync(out->data(), d.p, count * sizeof(T), cudaMemcpyDeviceToHost, s));
}

// The first expect.size() elements of got equal expect (got holds worst-case sized arrays).
template <class T>
bool prefix_equals(const std::vector<T>& got, const std::vector<T>& expect) {
  return got.size() >= expect.size() && std::equal(expect.begin(), expect.end(), got.begin());
}

// The receive arrays of one dispatch, `rows` rows, filled with 0xEE so unwritten parts show.
struct RecvArrays {
  gpu::Dev x, idx, w, src_token, src_rank;
  RecvArrays(int64_t rows, const ref::Shape& s)
      : x(size_t(rows * s.hidden) * ref::elem_size(s.dtype)), idx(size_t(rows * s.num_topk) * 8),
        w(size_t(rows * s.num_topk) * 4), src_token(size_t(rows) * 8), src_rank(size_t(rows) * 4) {
    for (gpu::Dev* d : {&x, &idx, &w, &src_token, &src_rank}) d->fill(0xEE);
  }
  deepep4j_dispatch_args args(const gpu::DevInput& in) const {
    deepep4j_dispatch_args a{};
    a.x = in.x.p, a.topk_weights = in.topk_weights.as<float>();
    a.recv_x = x.p, a.recv_topk_idx = idx.as<int64_t>(), a.recv_topk_weights = w.as<float>();
    a.recv_src_token = src_token.as<int64_t>(), a.recv_src_rank = src_rank.as<int32_t>();
    return a;
  }
  void get(int64_t rows, const ref::Shape& s, ref::Received* out, cudaStream_t st) const {
    get_async(x, size_t(rows * s.hidden) * ref::elem_size(s.dtype), &out->x, st);
    get_async(idx, size_t(rows * s.num_topk), &out->topk_idx, st);
    get_async(w, size_t(rows * s.num_topk), &out->topk_weights, st);
    get_async(src_token, size_t(rows), &out->src_token, st);
    get_async(src_rank, size_t(rows), &out->src_rank, st);
  }
};

}  // namespace

// Rank 1 arrives 300 ms late; rank 0's calls return long before that, and both ranks' results are right.
TEST(queued_steps_return_early_and_equal_the_reference) {
  ref::Shape s = shape();
  gpu::Group g(2, so_config(s));
  ep::StepOptions o;
  for (uint64_t seed : {11ull, 12ull}) {
    std::vector<ref::RankInput> in = ep::make_inputs(s, {96, 80}, seed);
    std::vector<ep::RankResult> res(2);
    ep::run_ranks(2, [&](int32_t r) {
      CUDA_OK(cudaSetDevice(g.devices[size_t(r)]));
      Stream st;
      const int32_t R = s.num_ranks, E = s.num_experts, K = s.num_topk;
      const int64_t H = s.hidden, n = in[size_t(r)].n;
      const ref::Received expect = ref::dispatch(s, in, r);
      gpu::DevInput d(in[size_t(r)]);
      gpu::Dev per_rank(size_t(R) * 4), per_expert(size_t(E) * 4), in_rank(size_t(n * R));
      ep::RankResult& out = res[size_t(r)];
      out.y = ep::make_y(expect, H, s.dtype, s.dtype, r);  // what this rank's experts return (from the reference)
      gpu::Dev y(out.y), combined(size_t(n * H) * ref::elem_size(s.dtype));
      combined.fill(0xEE);
      RecvArrays recv(expect.m, s), again(expect.m, s);
      CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
      REQUIRE_OK(deepep4j_get_dispatch_layout(g[r], d.topk_idx.as<int64_t>(), n, K, E, per_rank.as<int32_t>(),
                                              per_expert.as<int32_t>(), in_rank.as<uint8_t>(), st.s));
      deepep4j_handle* h = nullptr;
      int64_t M = -1;
      out.recv.per_local_expert.assign(size_t(E / R), -1);
      REQUIRE_OK(deepep4j_notify_dispatch(g[r], d.topk_idx.as<int64_t>(), n, K, E, H, s.dtype, &h, &M,
                                          out.recv.per_local_expert.data(), st.s));
      REQUIRE(M == expect.m);
      out.recv.m = M;
      out.recv.per_source_rank.assign(size_t(R), -1);
      REQUIRE_OK(deepep4j_handle_recv_counts_per_rank(h, out.recv.per_source_rank.data()));
      if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
      const auto t0 = Clock::now();
      deepep4j_dispatch_args a = recv.args(d);
      REQUIRE_OK(deepep4j_dispatch(g[r], h, -1, &a, st.s));
      deepep4j_combine_args c{};
      c.y = y.p, c.out = combined.p;
      REQUIRE_OK(deepep4j_combine(g[r], h, s.dtype, &c, st.s));
      deepep4j_dispatch_args a2 = again.args(d);  // cached mode: the same routing again, no count exchange
      REQUIRE_OK(deepep4j_dispatch(g[r], h, -1, &a2, st.s));
      const int64_t queued_ms = ms_since(t0);
      if (r == 0) CHECK_MSG(queued_ms < 150, "rank 0: three queued calls took %lld ms (they wait for the GPU?)",
                            (long long)queued_ms);
      get_async(per_rank, size_t(R), &out.layout.per_rank, st.s);
      get_async(per_expert, size_t(E), &out.layout.per_expert, st.s);
      get_async(in_rank, size_t(n * R), &out.layout.in_rank, st.s);
      recv.get(M, s, &out.recv, st.s);
      ref::Received second;
      again.get(M, s, &second, st.s);
      get_async(combined, size_t(n * H) * ref::elem_size(s.dtype), &out.combined.out, st.s);
      REQUIRE_OK(deepep4j_buffer_sync(g[r], st.s));
      if (r == 0) CHECK_MSG(ms_since(t0) >= 250, "rank 0 finished %lld ms after queueing; rank 1 came 300 ms late",
                            (long long)ms_since(t0));
      CHECK_MSG(second.x == out.recv.x && second.topk_idx == out.recv.topk_idx, "rank %d: cached dispatch differs", r);
      REQUIRE_OK(deepep4j_handle_destroy(h));
    });
    ep::verify(s, in, res, o, t::fmt("queued steps, seed %llu", (unsigned long long)seed));
  }
}

// notify -> dispatch -> combine (y = the received rows) captured once per rank, replayed on three inputs.
TEST(captured_graph_replays_equal_the_reference) {
  ref::Shape s = shape();
  gpu::Group g(2, so_config(s));
  const int64_t n = 64, worst = 2 * n;  // every token of both ranks
  const int reps = 3;
  const int32_t R = s.num_ranks, E = s.num_experts, K = s.num_topk, L = E / R;
  const int64_t H = s.hidden;
  const size_t es = ref::elem_size(s.dtype);
  std::vector<std::vector<ref::RankInput>> ins;
  for (int rep = 0; rep < reps; ++rep) ins.push_back(ep::make_inputs(s, {n, n}, 40 + uint64_t(rep)));
  ep::run_ranks(2, [&](int32_t r) {
    CUDA_OK(cudaSetDevice(g.devices[size_t(r)]));
    Stream st;
    deepep4j_handle* h = nullptr;
    REQUIRE_OK(deepep4j_handle_create_queued(g[r], n, K, E, H, s.dtype, worst, &h));
    CHECK_EQ(deepep4j_handle_num_recv_tokens(h), worst);
    int32_t counts[2];
    CHECK_ERR(deepep4j_handle_recv_counts_per_rank(h, counts), DEEPEP4J_ERR_STATE, "device");
    gpu::DevInput d(ins[0][size_t(r)]);
    RecvArrays recv(worst, s);
    gpu::Dev m_dev(8), per_expert(size_t(L) * 4), combined(size_t(n * H) * es);
    CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
    deepep4j_dispatch_args a = recv.args(d);
    deepep4j_combine_args c{};
    c.y = recv.x.p, c.out = combined.p;  // identity experts: each rank returns the rows it received
    cudaGraph_t graph = nullptr;
    CUDA_OK(cudaStreamBeginCapture(st.s, cudaStreamCaptureModeThreadLocal));
    const int st_notify = deepep4j_notify_dispatch_queued(g[r], h, d.topk_idx.as<int64_t>(), m_dev.as<int64_t>(),
                                                          per_expert.as<int32_t>(), st.s);
    const int st_dispatch = deepep4j_dispatch(g[r], h, -1, &a, st.s);
    const int st_combine = deepep4j_combine(g[r], h, s.dtype, &c, st.s);
    CUDA_OK(cudaStreamEndCapture(st.s, &graph));
    REQUIRE_OK(st_notify);
    REQUIRE_OK(st_dispatch);
    REQUIRE_OK(st_combine);
    cudaGraphExec_t exec = nullptr;
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    for (int rep = 0; rep < reps; ++rep) {
      const std::vector<ref::RankInput>& in = ins[size_t(rep)];
      const ref::RankInput& mine = in[size_t(r)];
      CUDA_OK(cudaMemcpyAsync(d.topk_idx.p, mine.topk_idx.data(), mine.topk_idx.size() * 8, cudaMemcpyHostToDevice, st.s));
      CUDA_OK(cudaMemcpyAsync(d.x.p, mine.x.data(), mine.x.size(), cudaMemcpyHostToDevice, st.s));
      CUDA_OK(cudaMemcpyAsync(d.topk_weights.p, mine.topk_weights.data(), mine.topk_weights.size() * 4,
                              cudaMemcpyHostToDevice, st.s));
      for (const gpu::Dev* v : {&recv.idx, &recv.w, &recv.src_token, &recv.src_rank, &combined})
        CUDA_OK(cudaMemsetAsync(v->p, 0xEE, v->bytes, st.s));
      CUDA_OK(cudaGraphLaunch(exec, st.s));
      int64_t M = -1;
      std::vector<int32_t> ple;
      ref::Received got;
      std::vector<uint8_t> out;
      CUDA_OK(cudaMemcpyAsync(&M, m_dev.p, 8, cudaMemcpyDeviceToHost, st.s));
      get_async(per_expert, size_t(L), &ple, st.s);
      recv.get(worst, s, &got, st.s);
      get_async(combined, size_t(n * H) * es, &out, st.s);
      REQUIRE_OK(deepep4j_buffer_sync(g[r], st.s));
      const std::string where = t::fmt("replay %d rank %d", rep, r);
      std::vector<ref::Received> expect;
      for (int32_t i = 0; i < R; ++i) expect.push_back(ref::dispatch(s, in, i));
      const ref::Received& e = expect[size_t(r)];
      CHECK_MSG(M == e.m, "%s: M = %lld, expected %lld", where.c_str(), (long long)M, (long long)e.m);
      if (M != e.m) continue;
      CHECK_MSG(ple == e.per_local_expert, "%s: per-local-expert counts", where.c_str());
      const size_t m = size_t(M);
      CHECK_MSG(prefix_equals(got.x, e.x),
                "%s: recv_x", where.c_str());
      CHECK_MSG(prefix_equals(got.topk_idx, e.topk_idx),
                "%s: recv_topk_idx", where.c_str());
      CHECK_MSG(prefix_equals(got.topk_weights, e.topk_weights),
                "%s: recv_topk_weights", where.c_str());
      CHECK_MSG(prefix_equals(got.src_token, e.src_token),
                "%s: recv_src_token", where.c_str());
      CHECK_MSG(prefix_equals(got.src_rank, e.src_rank),
                "%s: recv_src_rank", where.c_str());
      bool padded = true;
      for (size_t i = m; i < size_t(worst); ++i) {
        padded = padded && got.src_token[i] == -1 && got.src_rank[i] == -1;
        for (int j = 0; j < K; ++j)
          padded = padded && got.topk_idx[i * size_t(K) + size_t(j)] == -1 && got.topk_weights[i * size_t(K) + size_t(j)] == 0.0f;
      }
      CHECK_MSG(padded, "%s: rows [M, num_worst_tokens) are not marked as padding", where.c_str());
      std::vector<std::vector<uint8_t>> ys;
      for (int32_t i = 0; i < R; ++i) ys.push_back(expect[size_t(i)].x);
      ref::Combined ce = ref::combine(s, expect, ys, {}, false, false, r, n, s.dtype);
      CHECK_MSG(out == ce.out, "%s: combine out differs", where.c_str());
    }
    CUDA_OK(cudaGraphExecDestroy(exec));
    CUDA_OK(cudaGraphDestroy(graph));
    REQUIRE_OK(deepep4j_handle_destroy(h));
  });
}

// Rank 1 comes 300 ms late to the combine, so rank 0's async combine waits on the comm stream all that time; work
// queued on rank 0's stream after it finishes meanwhile, and the reader behind deepep4j_comm_wait sees the result.
TEST(async_combine_runs_beside_other_work_and_readers_wait_for_it) {
  ref::Shape s = shape();
  gpu::Group g(2, so_config(s));
  std::vector<ref::RankInput> in = ep::make_inputs(s, {96, 80}, 21);
  std::vector<ep::RankResult> res(2);
  ep::StepOptions o;
  ep::run_ranks(2, [&](int32_t r) {
    CUDA_OK(cudaSetDevice(g.devices[size_t(r)]));
    Stream st;
    const int32_t R = s.num_ranks, E = s.num_experts, K = s.num_topk;
    const int64_t H = s.hidden, n = in[size_t(r)].n;
    const size_t es = ref::elem_size(s.dtype);
    const ref::Received expect = ref::dispatch(s, in, r);
    ep::RankResult& out = res[size_t(r)];
    out.layout = ref::layout(s, in[size_t(r)]);  // layout is not under test here
    out.y = ep::make_y(expect, H, s.dtype, s.dtype, r);
    gpu::DevInput d(in[size_t(r)]);
    gpu::Dev y(out.y), combined(size_t(n * H) * es), work(size_t(1) << 30);
    combined.fill(0xEE);
    RecvArrays recv(expect.m, s), again(expect.m, s);
    CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
    deepep4j_handle* h = nullptr;
    int64_t M = -1;
    out.recv.per_local_expert.assign(size_t(E / R), -1);
    REQUIRE_OK(deepep4j_notify_dispatch(g[r], d.topk_idx.as<int64_t>(), n, K, E, H, s.dtype, &h, &M,
                                        out.recv.per_local_expert.data(), st.s));
    out.recv.m = M;
    out.recv.per_source_rank.assign(size_t(R), -1);
    REQUIRE_OK(deepep4j_handle_recv_counts_per_rank(h, out.recv.per_source_rank.data()));
    deepep4j_dispatch_args a = recv.args(d);
    REQUIRE_OK(deepep4j_dispatch(g[r], h, -1, &a, st.s));
    // Events are created before a rank comes late: cudaEventCreate waits while another thread of the process is
    // inside a cudaMemcpyAsync to pageable memory that waits for the device (rank 0's reader below, behind the
    // combine that waits for rank 1), so creating them late deadlocked the two ranks until timeout_ms (deepep4j.h).
    cudaEvent_t queued, work_done, combine_seen;
    for (cudaEvent_t* e : {&queued, &work_done, &combine_seen}) CUDA_OK(cudaEventCreate(e));
    if (r == 1) std::this_thread::sleep_for(std::chrono::milliseconds(300));
    deepep4j_combine_args c{};
    c.y = y.p, c.out = combined.p;
    REQUIRE_OK(deepep4j_combine_async(g[r], h, s.dtype, &c, st.s));
    CUDA_OK(cudaEventRecord(queued, st.s));
    CUDA_OK(cudaMemsetAsync(work.p, 1, work.bytes, st.s));  // the computation that overlaps the combine
    CUDA_OK(cudaEventRecord(work_done, st.s));
    REQUIRE_OK(deepep4j_comm_wait(g[r], st.s));
    CUDA_OK(cudaEventRecord(combine_seen, st.s));
    get_async(combined, size_t(n * H) * es, &out.combined.out, st.s);  // the reader
    deepep4j_dispatch_args a2 = again.args(d);  // the next step, on the caller's stream: ordered after the combine
    REQUIRE_OK(deepep4j_dispatch(g[r], h, -1, &a2, st.s));
    recv.get(M, s, &out.recv, st.s);
    ref::Received second;
    again.get(M, s, &second, st.s);
    REQUIRE_OK(deepep4j_buffer_sync(g[r], st.s));
    float work_ms = 0, combine_ms = 0;
    CUDA_OK(cudaEventElapsedTime(&work_ms, queued, work_done));
    CUDA_OK(cudaEventElapsedTime(&combine_ms, queued, combine_seen));
    std::fprintf(stderr, "  rank %d: work after the async combine done in %.2f ms, combine seen after %.2f ms\n", r,
                 work_ms, combine_ms);
    if (r == 0) {
      CHECK_MSG(work_ms < 50, "rank 0: work queued after the async combine took %.1f ms: it waited for it", work_ms);
      CHECK_MSG(combine_ms > 200, "rank 0: combine seen after %.1f ms, but rank 1 came 300 ms late", combine_ms);
    }
    CHECK_MSG(second.x == out.recv.x, "rank %d: the dispatch after the async combine differs", r);
    for (cudaEvent_t e : {queued, work_done, combine_seen}) cudaEventDestroy(e);
    REQUIRE_OK(deepep4j_handle_destroy(h));
  });
  ep::verify(s, in, res, o, "async combine");
}

GPU_TEST_MAIN()
