// test_fail_step.cpp — deepep4j_fail_step: a rank whose own checks failed before the step's call joins the step
// with its failure, so peers in notify, dispatch or combine return PEER_ERROR with its message instead of waiting.
#include "ep_group.h"

namespace {

enum class Step { kNotify, kDispatch, kCombine };

void peer_fails(Step step) {
  ref::Shape s;
  s.num_ranks = 3;
  s.num_experts = 6;
  s.hidden = 32;
  deepep4j_config cfg = ep::small_config(s);
  cfg.timeout_ms = 20000;  // a wait until timeout would show as a slow, failing case
  ep::Group g(3, cfg);
  std::vector<ref::RankInput> in = ep::make_inputs(s, {25, 30, 35}, 12);
  const char* why = "x: shape [25, 31] does not match hidden = 32";
  ep::run_ranks(3, [&](int32_t r) {
    const ref::RankInput& x = in[size_t(r)];
    deepep4j_handle* h = nullptr;
    int64_t M = -3;
    if (step != Step::kNotify)
      REQUIRE_OK(deepep4j_notify_dispatch(g[r], x.topk_idx.data(), x.n, s.num_topk, s.num_experts, s.hidden, s.dtype,
                                          &h, &M, nullptr, nullptr));
    std::vector<float> recv(size_t(std::max<int64_t>(M, 0) * s.hidden), -9.0f), out(size_t(x.n * s.hidden), -9.0f);
    deepep4j_dispatch_args a{};
    a.x = x.x.data();
    a.recv_x = recv.data();
    if (step == Step::kCombine) REQUIRE_OK(deepep4j_dispatch(g[r], h, -1, &a, nullptr));
    std::fill(recv.begin(), recv.end(), -9.0f);
    std::vector<float> y(recv.size(), 1.0f);
    int st;
    if (r == 1) {
      st = deepep4j_fail_step(g[r], DEEPEP4J_ERR_INVALID_ARGUMENT, why);
      CHECK_MSG(st == DEEPEP4J_ERR_INVALID_ARGUMENT, "failing rank: %s", deepep4j_status_name(st));
      CHECK_MSG(std::string(deepep4j_last_error()).find(why) != std::string::npos, "failing rank: %s",
                deepep4j_last_error());
    } else {
      deepep4j_handle* h2 = reinterpret_cast<deepep4j_handle*>(0x2);
      if (step == Step::kNotify) {
        st = deepep4j_notify_dispatch(g[r], x.topk_idx.data(), x.n, s.num_topk, s.num_experts, s.hidden, s.dtype, &h2,
                                      &M, nullptr, nullptr);
        CHECK(h2 == reinterpret_cast<deepep4j_handle*>(0x2));
        CHECK_EQ(M, -3);
      } else if (step == Step::kDispatch) {
        st = deepep4j_dispatch(g[r], h, -1, &a, nullptr);
        for (float v : recv) CHECK_EQ(v, -9.0f);
      } else {
        deepep4j_combine_args c{};
        c.y = y.data();
        c.out = out.data();
        st = deepep4j_combine(g[r], h, DEEPEP4J_FLOAT32, &c, nullptr);
        for (float v : out) CHECK_EQ(v, -9.0f);
      }
      std::string msg = deepep4j_last_error();
      CHECK_MSG(st == DEEPEP4J_ERR_PEER_ERROR, "rank %d: %s: %s", r, deepep4j_status_name(st), msg.c_str());
      CHECK_MSG(msg.find(why) != std::string::npos && msg.find("rank 1") != std::string::npos, "rank %d: %s", r,
                msg.c_str());
    }
    if (h) deepep4j_handle_destroy(h);
  });
  // The group goes on working.
  std::vector<ep::RankResult> res(3);
  ep::StepOptions o;
  ep::run_ranks(3, [&](int32_t r) { ep::run_rank(g[r], r, s, in[size_t(r)], o, &res[size_t(r)]); });
  ep::verify(s, in, res, o, "after fail_step");
}

}  // namespace

TEST(peer_fails_before_notify) { peer_fails(Step::kNotify); }
TEST(peer_fails_before_dispatch) { peer_fails(Step::kDispatch); }
TEST(peer_fails_before_combine) { peer_fails(Step::kCombine); }

TEST(fail_step_rules) {
  ref::Shape s;
  s.num_ranks = 1;
  deepep4j_config cfg = ep::small_config(s);
  ep::Group g(1, cfg);
  CHECK_ERR(deepep4j_fail_step(g[0], DEEPEP4J_OK, "nothing"), DEEPEP4J_ERR_INVALID_ARGUMENT, "DEEPEP4J_OK");
  CHECK_ERR(deepep4j_fail_step(nullptr, DEEPEP4J_ERR_INVALID_ARGUMENT, "x"), DEEPEP4J_ERR_INVALID_ARGUMENT, "buf");
  deepep4j_buffer* lone = nullptr;
  REQUIRE_OK(deepep4j_buffer_create(0, 2, &cfg, &lone));
  CHECK_ERR(deepep4j_fail_step(lone, DEEPEP4J_ERR_INVALID_ARGUMENT, "x"), DEEPEP4J_ERR_STATE, "not connected");
  deepep4j_buffer_destroy(lone);
  // One rank alone: the step is its own, the failure comes straight back.
  CHECK_ERR(deepep4j_fail_step(g[0], DEEPEP4J_ERR_STATE, "binding: tensor on the wrong device"), DEEPEP4J_ERR_STATE,
            "binding: tensor on the wrong device");
}

TEST_MAIN()
