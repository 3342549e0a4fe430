// test_step_recovery.cpp — failures one rank alone sees, and what a buffer guarantees after a timeout.
//   * A check only one rank can make (a NULL output or handle, a handle of another buffer, NULL blobs at connect)
//     reaches every rank: the others return DEEPEP4J_ERR_PEER_ERROR naming the rank and its reason at once, not a
//     timeout, and the group keeps working.
//   * A step abandoned after a timeout is abandoned on every rank: a rank arriving late gets an error, never OK, and
//     from then on every collective call of every rank that took part refuses with DEEPEP4J_ERR_STATE ("the buffer is
//     broken ... destroy and recreate"); no rank ever succeeds with data of the abandoned step.
#include <chrono>
#include <thread>

#include "ep_group.h"

namespace {

int64_t ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
}

ref::Shape shape3() {
  ref::Shape s;
  s.num_ranks = 3;
  s.num_experts = 6;
  s.hidden = 32;
  return s;
}

// The group still carries a correct step.
void still_works(ep::Group& g, const ref::Shape& s, const char* label) {
  std::vector<ref::RankInput> in = ep::make_inputs(s, {21, 17, 30}, 5);
  std::vector<ep::RankResult> res(size_t(s.num_ranks));
  ep::StepOptions o;
  ep::run_ranks(s.num_ranks, [&](int32_t r) { ep::run_rank(g[r], r, s, in[size_t(r)], o, &res[size_t(r)]); });
  ep::verify(s, in, res, o, label);
}

void expect_peer_error(int st, const std::string& msg, int64_t took, const char* reason, const char* where) {
  CHECK_MSG(st == DEEPEP4J_ERR_PEER_ERROR, "%s: %s: %s", where, deepep4j_status_name(st), msg.c_str());
  CHECK_MSG(msg.find("rank 1") != std::string::npos && msg.find(reason) != std::string::npos, "%s: %s", where,
            msg.c_str());
  CHECK_MSG(took < 5000, "%s: took %lld ms (a wait for the timeout?)", where, (long long)took);
}

}  // namespace

TEST(null_out_handle_in_notify_reaches_every_rank) {
  ref::Shape s = shape3();
  ep::Group g(3, ep::small_config(s));
  std::vector<ref::RankInput> in = ep::make_inputs(s, {10, 12, 14}, 3);
  ep::run_ranks(3, [&](int32_t r) {
    const ref::RankInput& x = in[size_t(r)];
    deepep4j_handle* h = reinterpret_cast<deepep4j_handle*>(0x2);
    int64_t M = -3;
    auto t0 = std::chrono::steady_clock::now();
    int st = deepep4j_notify_dispatch(g[r], x.topk_idx.data(), x.n, s.num_topk, s.num_experts, s.hidden, s.dtype,
                                      r == 1 ? nullptr : &h, &M, nullptr, nullptr);
    std::string msg = deepep4j_last_error();
    if (r == 1) {
      CHECK_MSG(st == DEEPEP4J_ERR_INVALID_ARGUMENT && msg.find("out_handle") != std::string::npos, "rank 1: %s: %s",
                deepep4j_status_name(st), msg.c_str());
    } else {
      expect_peer_error(st, msg, ms_since(t0), "out_handle", t::fmt("rank %d", r).c_str());
      CHECK(h == reinterpret_cast<deepep4j_handle*>(0x2));
      CHECK_EQ(M, -3);
    }
  });
  still_works(g, s, "after a NULL out_handle");
}

// Rank 1 passes a NULL handle to dispatch, or its peer's handle (another buffer's) to combine.
TEST(bad_handle_in_dispatch_or_combine_reaches_every_rank) {
  for (bool in_combine : {false, true}) {
    ref::Shape s = shape3();
    ep::Group g(3, ep::small_config(s));
    std::vector<ref::RankInput> in = ep::make_inputs(s, {10, 12, 14}, 4);
    std::vector<deepep4j_handle*> handles(3, nullptr);
    const char* reason = in_combine ? "another buffer" : "handle = NULL";
    ep::run_ranks(3, [&](int32_t r) {
      const ref::RankInput& x = in[size_t(r)];
      int64_t M = 0;
      REQUIRE_OK(deepep4j_notify_dispatch(g[r], x.topk_idx.data(), x.n, s.num_topk, s.num_experts, s.hidden, s.dtype,
                                          &handles[size_t(r)], &M, nullptr, nullptr));
      std::vector<float> recv(size_t(M * s.hidden), -9.0f), out(size_t(x.n * s.hidden), -9.0f);
      deepep4j_dispatch_args a{};
      a.x = x.x.data();
      a.recv_x = recv.data();
      auto t0 = std::chrono::steady_clock::now();
      int st;
      if (!in_combine) {
        st = deepep4j_dispatch(g[r], r == 1 ? nullptr : handles[size_t(r)], -1, &a, nullptr);
      } else {
        REQUIRE_OK(deepep4j_dispatch(g[r], handles[size_t(r)], -1, &a, nullptr));
        deepep4j_combine_args c{};
        c.y = recv.data();
        c.out = out.data();
        // Rank 1 uses rank 0's handle; handles are read here only, after every rank's notify returned.
        st = deepep4j_combine(g[r], r == 1 ? handles[0] : handles[size_t(r)], DEEPEP4J_FLOAT32, &c, nullptr);
        for (float v : out) CHECK_EQ(v, -9.0f);
      }
      std::string msg = deepep4j_last_error();
      if (r == 1)
        CHECK_MSG(st != DEEPEP4J_OK && msg.find(reason) != std::string::npos, "rank 1: %s: %s",
                  deepep4j_status_name(st), msg.c_str());
      else
        expect_peer_error(st, msg, ms_since(t0), reason, t::fmt("rank %d", r).c_str());
    });
    for (auto* h : handles) deepep4j_handle_destroy(h);
    still_works(g, s, in_combine ? "after a foreign handle in combine" : "after a NULL handle in dispatch");
  }
}

TEST(null_blobs_in_connect_reach_every_rank) {
  const int32_t R = 3;
  ep::Exported e(R, ep::small_config(shape3()));
  ep::run_ranks(R, [&](int32_t r) {
    auto t0 = std::chrono::steady_clock::now();
    int st = deepep4j_buffer_connect(e.bufs[size_t(r)], r == 1 ? nullptr : e.ptrs.data(), e.lens.data());
    std::string msg = deepep4j_last_error();
    if (r == 1)
      CHECK_MSG(st == DEEPEP4J_ERR_INVALID_ARGUMENT && msg.find("blobs/lens = NULL") != std::string::npos,
                "rank 1: %s: %s", deepep4j_status_name(st), msg.c_str());
    else
      expect_peer_error(st, msg, ms_since(t0), "blobs/lens = NULL", t::fmt("rank %d", r).c_str());
  });
}

namespace {

constexpr int32_t kTimeoutMs = 300;

deepep4j_config short_timeout() {
  ref::Shape s;
  deepep4j_config c = ep::small_config(s, 4, 2, 2);
  c.timeout_ms = kTimeoutMs;
  return c;
}

void expect_error_not_ok(int st, const char* where) {
  std::string msg = deepep4j_last_error();
  CHECK_MSG(st == DEEPEP4J_ERR_TIMEOUT, "%s: %s (expected DEEPEP4J_ERR_TIMEOUT): %s", where, deepep4j_status_name(st),
            msg.c_str());
  CHECK_MSG(msg.find("recreate") != std::string::npos, "%s: %s", where, msg.c_str());
}

// After a timeout every rank refuses the next collective call the same way.
void expect_broken(ep::Group& g, const std::vector<ref::RankInput>& in, const ref::Shape& s) {
  ep::run_ranks(2, [&](int32_t r) {
    const ref::RankInput& x = in[size_t(r)];
    deepep4j_handle* h = reinterpret_cast<deepep4j_handle*>(0x2);
    int64_t M = -3;
    auto t0 = std::chrono::steady_clock::now();
    CHECK_ERR(deepep4j_notify_dispatch(g[r], x.topk_idx.data(), x.n, s.num_topk, s.num_experts, s.hidden, s.dtype,
                                       &h, &M, nullptr, nullptr),
              DEEPEP4J_ERR_STATE, "broken", "recreate");
    CHECK_MSG(ms_since(t0) < kTimeoutMs / 2, "rank %d: broken buffer took %lld ms to refuse", r,
              (long long)ms_since(t0));
    CHECK(h == reinterpret_cast<deepep4j_handle*>(0x2));
    CHECK_EQ(M, -3);
    CHECK_ERR(deepep4j_fail_step(g[r], DEEPEP4J_ERR_INVALID_ARGUMENT, "x"), DEEPEP4J_ERR_STATE, "broken");
  });
}

}  // namespace

// Rank 0 gives up on notify; rank 1 calls notify afterwards and must not be told OK.
TEST(late_rank_after_abandoned_notify_gets_an_error) {
  ref::Shape s;
  ep::Group g(2, short_timeout());
  std::vector<ref::RankInput> in = ep::make_inputs(s, {16, 16}, 8);
  std::atomic<bool> rank0_done{false};
  ep::run_ranks(2, [&](int32_t r) {
    const ref::RankInput& x = in[size_t(r)];
    if (r == 1)
      while (!rank0_done) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    deepep4j_handle* h = reinterpret_cast<deepep4j_handle*>(0x2);
    int64_t M = -3;
    int st = deepep4j_notify_dispatch(g[r], x.topk_idx.data(), x.n, s.num_topk, s.num_experts, s.hidden, s.dtype, &h,
                                      &M, nullptr, nullptr);
    expect_error_not_ok(st, t::fmt("notify on rank %d", r).c_str());
    CHECK(h == reinterpret_cast<deepep4j_handle*>(0x2));
    CHECK_EQ(M, -3);
    if (r == 0) rank0_done = true;
  });
  expect_broken(g, in, s);
}

// Both ranks make the same calls, rank 1 arrives at dispatch (or combine) after rank 0 gave up.
TEST(late_rank_in_dispatch_or_combine_then_every_rank_refuses) {
  for (bool late_in_combine : {false, true}) {
    ref::Shape s;
    ep::Group g(2, short_timeout());
    std::vector<ref::RankInput> in = ep::make_inputs(s, {40, 40}, 9);
    std::atomic<bool> rank0_done{false};
    const char* label = late_in_combine ? "combine" : "dispatch";
    ep::run_ranks(2, [&](int32_t r) {
      const ref::RankInput& x = in[size_t(r)];
      deepep4j_handle* h = nullptr;
      int64_t M = 0;
      REQUIRE_OK(deepep4j_notify_dispatch(g[r], x.topk_idx.data(), x.n, s.num_topk, s.num_experts, s.hidden, s.dtype,
                                          &h, &M, nullptr, nullptr));
      std::vector<float> recv(size_t(M * s.hidden), -9.0f), out(size_t(x.n * s.hidden), -9.0f);
      deepep4j_dispatch_args a{};
      a.x = x.x.data();
      a.recv_x = recv.data();
      if (late_in_combine) REQUIRE_OK(deepep4j_dispatch(g[r], h, -1, &a, nullptr));
      if (r == 1)
        while (!rank0_done) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      int st;
      if (!late_in_combine) {
        st = deepep4j_dispatch(g[r], h, -1, &a, nullptr);
      } else {
        deepep4j_combine_args c{};
        c.y = recv.data();
        c.out = out.data();
        st = deepep4j_combine(g[r], h, DEEPEP4J_FLOAT32, &c, nullptr);
        for (float v : out) CHECK_EQ(v, -9.0f);
      }
      expect_error_not_ok(st, t::fmt("%s on rank %d", label, r).c_str());
      if (r == 0) rank0_done = true;
      deepep4j_handle_destroy(h);
    });
    expect_broken(g, in, s);
  }
}

// Rank 0 gives up on connect; rank 1 connects afterwards and must not be told OK.
TEST(late_rank_after_abandoned_connect_gets_an_error) {
  deepep4j_config c = short_timeout();
  std::vector<deepep4j_buffer*> bufs(2, nullptr);
  std::vector<std::vector<uint8_t>> blobs(2, std::vector<uint8_t>(DEEPEP4J_MAX_BLOB_BYTES));
  std::vector<size_t> lens(2);
  std::vector<const void*> ptrs;
  for (int32_t r = 0; r < 2; ++r) {
    REQUIRE_OK(deepep4j_buffer_create(r, 2, &c, &bufs[size_t(r)]));
    REQUIRE_OK(deepep4j_buffer_export(bufs[size_t(r)], blobs[size_t(r)].data(), blobs[size_t(r)].size(),
                                      &lens[size_t(r)]));
    ptrs.push_back(blobs[size_t(r)].data());
  }
  expect_error_not_ok(deepep4j_buffer_connect(bufs[0], ptrs.data(), lens.data()), "connect on rank 0");
  auto t0 = std::chrono::steady_clock::now();
  expect_error_not_ok(deepep4j_buffer_connect(bufs[1], ptrs.data(), lens.data()), "late connect on rank 1");
  CHECK_MSG(ms_since(t0) < kTimeoutMs * 3, "late connect took %lld ms", (long long)ms_since(t0));
  for (auto* b : bufs) deepep4j_buffer_destroy(b);
}

TEST_MAIN()
