// test_peer_failure.cpp — peers that never arrive (at connect, at notify, at dispatch, at combine): the ranks that did
// arrive end in DEEPEP4J_ERR_TIMEOUT after about timeout_ms, with a message naming the missing rank.
#include <chrono>

#include "ep_group.h"

namespace {

int64_t ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
}

constexpr int32_t kTimeoutMs = 300;

deepep4j_config short_timeout(int32_t R) {
  ref::Shape s;
  s.num_ranks = R;
  s.num_experts = 2 * R;
  deepep4j_config c = ep::small_config(s, 2, 1, 2);
  c.timeout_ms = kTimeoutMs;
  return c;
}

void expect_timeout(int st, int64_t waited, const char* missing, const char* where) {
  std::string msg = deepep4j_last_error();
  CHECK_MSG(st == DEEPEP4J_ERR_TIMEOUT, "%s: %s: %s", where, deepep4j_status_name(st), msg.c_str());
  CHECK_MSG(msg.find(missing) != std::string::npos, "%s: message does not name %s: %s", where, missing, msg.c_str());
  CHECK_MSG(waited >= kTimeoutMs - 20 && waited < 20 * kTimeoutMs, "%s: waited %lld ms for a %d ms timeout", where,
            (long long)waited, kTimeoutMs);
}

}  // namespace

TEST(peer_never_connects) {
  const int32_t R = 3;
  ep::Exported e(R, short_timeout(R));
  // Rank 2 exported its blob but never calls connect.
  ep::run_ranks(2, [&](int32_t r) {
    auto t0 = std::chrono::steady_clock::now();
    int st = e.connect(r);
    expect_timeout(st, ms_since(t0), "rank 2", t::fmt("connect on rank %d", r).c_str());
  });
}

TEST(peer_skips_notify) {
  ep::Group g(3, short_timeout(3));
  int64_t idx[4] = {0, 5, 2, -1};
  ep::run_ranks(2, [&](int32_t r) {  // rank 2 stays away
    deepep4j_handle* h = reinterpret_cast<deepep4j_handle*>(0x2);
    int64_t M = -3;
    auto t0 = std::chrono::steady_clock::now();
    int st = deepep4j_notify_dispatch(g[r], idx, 2, 2, 6, 16, DEEPEP4J_FLOAT32, &h, &M, nullptr, nullptr);
    expect_timeout(st, ms_since(t0), "rank 2", t::fmt("notify on rank %d", r).c_str());
    CHECK(h == reinterpret_cast<deepep4j_handle*>(0x2));
    CHECK_EQ(M, -3);
  });
}

// Both ranks notify; rank 1 then never dispatches (or never combines): rank 0 times out naming rank 1.
TEST(peer_skips_dispatch_or_combine) {
  for (bool skip_combine : {false, true}) {
    ep::Group g(2, short_timeout(2));
    std::vector<int64_t> idx(64 * 2);
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = i % 2 == 0 ? 0 : 3;  // every token visits both ranks
    std::vector<float> x(64 * 16, 1.0f);
    ep::run_ranks(2, [&](int32_t r) {
      deepep4j_handle* h = nullptr;
      int64_t M = 0;
      REQUIRE_OK(deepep4j_notify_dispatch(g[r], idx.data(), 64, 2, 4, 16, DEEPEP4J_FLOAT32, &h, &M, nullptr,
                                          nullptr));
      std::vector<float> recv(size_t(M * 16), 0.0f), out(64 * 16, -9.0f);
      deepep4j_dispatch_args a{};
      a.x = x.data();
      a.recv_x = recv.data();
      if (r == 1 && !skip_combine) {
        deepep4j_handle_destroy(h);
        return;
      }
      auto t0 = std::chrono::steady_clock::now();
      int st = deepep4j_dispatch(g[r], h, -1, &a, nullptr);
      if (!skip_combine) {
        expect_timeout(st, ms_since(t0), "rank 1", "dispatch on rank 0");
      } else {
        REQUIRE_OK(st);
        if (r == 0) {
          deepep4j_combine_args c{};
          c.y = recv.data();
          c.out = out.data();
          t0 = std::chrono::steady_clock::now();
          st = deepep4j_combine(g[r], h, DEEPEP4J_FLOAT32, &c, nullptr);
          expect_timeout(st, ms_since(t0), "rank 1", "combine on rank 0");
        }
      }
      deepep4j_handle_destroy(h);
    });
  }
}

TEST_MAIN()
