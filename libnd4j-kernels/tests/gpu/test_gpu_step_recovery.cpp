// test_gpu_step_recovery.cpp — the GPU side of tests/test_step_recovery.cpp (deepep backend, ranks as threads):
// a check only one rank sees reaches the other as PEER_ERROR at once and the group keeps working; a rank that arrives
// after the other abandoned a step gets an error, never OK, and then both refuse every collective call with
// DEEPEP4J_ERR_STATE ("broken ... recreate").
#include <algorithm>
#include <chrono>
#include <thread>

#include "gpu_group.h"

namespace {

constexpr int kTimeoutMs = 1500;

int64_t ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
}

ref::Shape small_shape() {
  ref::Shape s;
  s.num_ranks = 2, s.num_experts = 8, s.num_topk = 2, s.hidden = 256, s.dtype = DEEPEP4J_BFLOAT16;
  return s;
}

deepep4j_config config(const ref::Shape& s) { return gpu::cuda_config(s, DEEPEP4J_BACKEND_DEEPEP, 4, 2, 4, kTimeoutMs); }

void expect_timeout_error(int st, const char* where) {
  std::string msg = deepep4j_last_error();
  CHECK_MSG(st == DEEPEP4J_ERR_TIMEOUT, "%s: %s (expected DEEPEP4J_ERR_TIMEOUT): %s", where, deepep4j_status_name(st),
            msg.c_str());
  CHECK_MSG(msg.find("recreate") != std::string::npos, "%s: %s", where, msg.c_str());
}

void expect_broken(gpu::Group& g, const ref::Shape& s, const std::vector<ref::RankInput>& in) {
  ep::run_ranks(2, [&](int32_t r) {
    CUDA_OK(cudaSetDevice(g.devices[size_t(r)]));
    gpu::Dev idx(in[size_t(r)].topk_idx);
    deepep4j_handle* h = reinterpret_cast<deepep4j_handle*>(0x2);
    int64_t M = -3;
    CHECK_ERR(deepep4j_notify_dispatch(g[r], idx.as<int64_t>(), in[size_t(r)].n, s.num_topk, s.num_experts, s.hidden,
                                       s.dtype, &h, &M, nullptr, nullptr),
              DEEPEP4J_ERR_STATE, "broken", "recreate");
    CHECK(h == reinterpret_cast<deepep4j_handle*>(0x2));
    CHECK_EQ(M, -3);
  });
}

}  // namespace

TEST(null_handle_in_dispatch_reaches_the_peer) {
  ref::Shape s = small_shape();
  gpu::Group g(2, config(s));
  std::vector<ref::RankInput> in = ep::make_inputs(s, {64, 48}, 2);
  ep::run_ranks(2, [&](int32_t r) {
    CUDA_OK(cudaSetDevice(g.devices[size_t(r)]));
    gpu::Dev idx(in[size_t(r)].topk_idx), x(in[size_t(r)].x);
    deepep4j_handle* h = nullptr;
    int64_t M = 0;
    REQUIRE_OK(deepep4j_notify_dispatch(g[r], idx.as<int64_t>(), in[size_t(r)].n, s.num_topk, s.num_experts, s.hidden,
                                        s.dtype, &h, &M, nullptr, nullptr));
    gpu::Dev rx(size_t(M * s.hidden) * ref::elem_size(s.dtype));
    deepep4j_dispatch_args a{};
    a.x = x.p;
    a.recv_x = rx.p;
    auto t0 = std::chrono::steady_clock::now();
    int st = deepep4j_dispatch(g[r], r == 1 ? nullptr : h, -1, &a, nullptr);
    std::string msg = deepep4j_last_error();
    if (r == 1) {
      CHECK_MSG(st == DEEPEP4J_ERR_INVALID_ARGUMENT && msg.find("handle = NULL") != std::string::npos, "rank 1: %s",
                msg.c_str());
    } else {
      CHECK_MSG(st == DEEPEP4J_ERR_PEER_ERROR && msg.find("rank 1") != std::string::npos &&
                    msg.find("handle = NULL") != std::string::npos,
                "rank 0: %s: %s", deepep4j_status_name(st), msg.c_str());
      CHECK_MSG(ms_since(t0) < kTimeoutMs, "rank 0 took %lld ms", (long long)ms_since(t0));
    }
    deepep4j_handle_destroy(h);
  });
  ep::StepOptions o;
  gpu::run_and_verify(g, s, {64, 48}, o, 3, "after a NULL handle");
}

TEST(null_blobs_in_connect_reach_the_peer) {
  ref::Shape s = small_shape();
  deepep4j_config cfg = config(s);
  const int n = gpu::device_count();
  std::vector<deepep4j_buffer*> bufs(2, nullptr);
  std::vector<std::vector<uint8_t>> blobs(2, std::vector<uint8_t>(DEEPEP4J_MAX_BLOB_BYTES));
  std::vector<size_t> lens(2);
  std::vector<const void*> ptrs;
  for (int32_t r = 0; r < 2; ++r) {
    cfg.device_id = r % n;
    REQUIRE_OK(deepep4j_buffer_create(r, 2, &cfg, &bufs[size_t(r)]));
    REQUIRE_OK(deepep4j_buffer_export(bufs[size_t(r)], blobs[size_t(r)].data(), blobs[size_t(r)].size(),
                                      &lens[size_t(r)]));
    ptrs.push_back(blobs[size_t(r)].data());
  }
  ep::run_ranks(2, [&](int32_t r) {
    auto t0 = std::chrono::steady_clock::now();
    int st = deepep4j_buffer_connect(bufs[size_t(r)], r == 1 ? nullptr : ptrs.data(), lens.data());
    std::string msg = deepep4j_last_error();
    if (r == 0) {
      CHECK_MSG(st == DEEPEP4J_ERR_PEER_ERROR && msg.find("rank 1") != std::string::npos &&
                    msg.find("blobs/lens = NULL") != std::string::npos,
                "rank 0: %s: %s", deepep4j_status_name(st), msg.c_str());
      CHECK_MSG(ms_since(t0) < kTimeoutMs, "rank 0 took %lld ms", (long long)ms_since(t0));
    } else {
      CHECK_ERR(st, DEEPEP4J_ERR_INVALID_ARGUMENT, "blobs/lens = NULL");
    }
  });
  for (auto* b : bufs) deepep4j_buffer_destroy(b);
}

// Rank 0 gives up on notify (or dispatch); rank 1 arrives afterwards and must not be told OK.
void late_rank(bool in_dispatch) {
  ref::Shape s = small_shape();
  gpu::Group g(2, config(s));
  std::vector<ref::RankInput> in = ep::make_inputs(s, {64, 64}, 4);
  std::atomic<bool> rank0_done{false};
  ep::run_ranks(2, [&](int32_t r) {
    CUDA_OK(cudaSetDevice(g.devices[size_t(r)]));
    gpu::Dev idx(in[size_t(r)].topk_idx), x(in[size_t(r)].x);
    deepep4j_handle* h = nullptr;
    int64_t M = 0;
    if (in_dispatch)
      REQUIRE_OK(deepep4j_notify_dispatch(g[r], idx.as<int64_t>(), in[size_t(r)].n, s.num_topk, s.num_experts,
                                          s.hidden, s.dtype, &h, &M, nullptr, nullptr));
    if (r == 1)
      while (!rank0_done) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    int st;
    if (in_dispatch) {
      gpu::Dev rx(size_t(M * s.hidden) * ref::elem_size(s.dtype));
      deepep4j_dispatch_args a{};
      a.x = x.p;
      a.recv_x = rx.p;
      st = deepep4j_dispatch(g[r], h, -1, &a, nullptr);
    } else {
      st = deepep4j_notify_dispatch(g[r], idx.as<int64_t>(), in[size_t(r)].n, s.num_topk, s.num_experts, s.hidden,
                                    s.dtype, &h, &M, nullptr, nullptr);
    }
    expect_timeout_error(st, t::fmt("%s on rank %d", in_dispatch ? "dispatch" : "notify", r).c_str());
    if (r == 0) rank0_done = true;
    if (h) deepep4j_handle_destroy(h);
  });
  expect_broken(g, s, in);
}

// Stream-ordered steps: rank 1 passes a NULL handle to dispatch and is told at once; rank 0's dispatch was queued
// (OK), its combine queued after it or refused, and the first of them or deepep4j_buffer_sync reports PEER_ERROR naming
// rank 1, within timeout_ms. Rank 0's outputs are untouched; then both buffers are broken.
TEST(null_handle_under_stream_ordered_steps_reaches_the_peer) {
  ref::Shape s = small_shape();
  deepep4j_config cfg = config(s);
  cfg.stream_ordered = 1, cfg.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_SM;
  gpu::Group g(2, cfg);
  std::vector<ref::RankInput> in = ep::make_inputs(s, {64, 48}, 2);
  ep::run_ranks(2, [&](int32_t r) {
    CUDA_OK(cudaSetDevice(g.devices[size_t(r)]));
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    gpu::Dev idx(in[size_t(r)].topk_idx), x(in[size_t(r)].x);
    deepep4j_handle* h = nullptr;
    int64_t M = 0;
    REQUIRE_OK(deepep4j_notify_dispatch(g[r], idx.as<int64_t>(), in[size_t(r)].n, s.num_topk, s.num_experts, s.hidden,
                                        s.dtype, &h, &M, nullptr, stream));
    gpu::Dev rx(size_t(M * s.hidden) * ref::elem_size(s.dtype)), y(size_t(M * s.hidden) * ref::elem_size(s.dtype));
    gpu::Dev out(size_t(in[size_t(r)].n * s.hidden) * ref::elem_size(s.dtype));
    rx.fill(0xEE), out.fill(0xEE), y.fill(0);
    CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
    deepep4j_dispatch_args a{};
    a.x = x.p;
    a.recv_x = rx.p;
    auto t0 = std::chrono::steady_clock::now();
    int st = deepep4j_dispatch(g[r], r == 1 ? nullptr : h, -1, &a, stream);
    if (r == 1) {
      CHECK_ERR(st, DEEPEP4J_ERR_INVALID_ARGUMENT, "handle = NULL");
    } else {
      CHECK_MSG(st == DEEPEP4J_OK, "rank 0: a queued dispatch returned %s: %s", deepep4j_status_name(st),
                deepep4j_last_error());
      deepep4j_combine_args c{};
      c.y = y.p, c.out = out.p;
      int first = deepep4j_combine(g[r], h, s.dtype, &c, stream);  // refused if the failure is already known
      std::string msg = deepep4j_last_error();
      if (first == DEEPEP4J_OK) {
        first = deepep4j_buffer_sync(g[r], stream);
        msg = deepep4j_last_error();
      }
      CHECK_MSG(first == DEEPEP4J_ERR_PEER_ERROR && msg.find("rank 1 reported") != std::string::npos &&
                    msg.find("handle = NULL") != std::string::npos,
                "rank 0: %s: %s", deepep4j_status_name(first), msg.c_str());
      CHECK_MSG(ms_since(t0) < kTimeoutMs, "rank 0 took %lld ms", (long long)ms_since(t0));
      CHECK_ERR(deepep4j_buffer_sync(g[r], stream), DEEPEP4J_ERR_PEER_ERROR, "rank 1");
      std::vector<uint8_t> got_rx, got_out;
      rx.get(&got_rx);
      out.get(&got_out);
      CHECK_MSG(std::all_of(got_rx.begin(), got_rx.end(), [](uint8_t b) { return b == 0xEE; }),
                "rank 0: recv_x of the failed step was written");
      CHECK_MSG(std::all_of(got_out.begin(), got_out.end(), [](uint8_t b) { return b == 0xEE; }),
                "rank 0: out of the combine queued after the failed step was written");
    }
    CHECK_ERR(deepep4j_dispatch(g[r], h, -1, &a, stream), DEEPEP4J_ERR_STATE, "broken", "recreate");
    cudaStreamDestroy(stream);
    deepep4j_handle_destroy(h);
  });
}

// A queued notify (worst-case sized handle) with an out-of-range expert id on rank 1: found on the device; rank 1's
// report names the entry, rank 0's names rank 1; a step queued after it moves nothing.
TEST(bad_topk_in_a_queued_notify_reaches_every_rank) {
  ref::Shape s = small_shape();
  deepep4j_config cfg = config(s);
  cfg.stream_ordered = 1, cfg.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_SM;
  gpu::Group g(2, cfg);
  std::vector<ref::RankInput> in = ep::make_inputs(s, {32, 32}, 7);
  in[1].topk_idx[5] = 8;  // token 2, k = 1
  ep::run_ranks(2, [&](int32_t r) {
    CUDA_OK(cudaSetDevice(g.devices[size_t(r)]));
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    gpu::Dev idx(in[size_t(r)].topk_idx), x(in[size_t(r)].x), m(8), rx(size_t(64 * s.hidden) * 2);
    rx.fill(0xEE);
    CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
    deepep4j_handle* h = nullptr;
    REQUIRE_OK(deepep4j_handle_create_queued(g[r], 32, s.num_topk, s.num_experts, s.hidden, s.dtype, 64, &h));
    REQUIRE_OK(deepep4j_notify_dispatch_queued(g[r], h, idx.as<int64_t>(), m.as<int64_t>(), nullptr, stream));
    deepep4j_dispatch_args a{};
    a.x = x.p;
    a.recv_x = rx.p;
    int st = deepep4j_dispatch(g[r], h, -1, &a, stream);
    if (st == DEEPEP4J_OK) st = deepep4j_buffer_sync(g[r], stream);
    if (r == 1)
      CHECK_ERR(st, DEEPEP4J_ERR_INVALID_ARGUMENT, "topk_idx[2][1] = 8", "num_experts = 8");
    else
      CHECK_ERR(st, DEEPEP4J_ERR_PEER_ERROR, "rank 1 reported", "topk_idx[2][1] = 8");
    deepep4j_buffer_sync(g[r], stream);
    std::vector<uint8_t> got;
    rx.get(&got);
    CHECK_MSG(std::all_of(got.begin(), got.end(), [](uint8_t b) { return b == 0xEE; }),
              "rank %d: recv_x of the dispatch after the failed notify was written", r);
    cudaStreamDestroy(stream);
    deepep4j_handle_destroy(h);
  });
}

TEST(late_rank_after_abandoned_notify_gets_an_error) { late_rank(false); }
TEST(late_rank_after_abandoned_dispatch_gets_an_error) { late_rank(true); }

GPU_TEST_MAIN()
