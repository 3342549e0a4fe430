// test_chunked.cpp — steps whose volume is many times the rings (a ring of one token, chunks that do not divide the
// ring), and buffers too small for one chunk: refused at creation with the minimum size, or at notify.
#include "ep_group.h"

TEST(tiny_rings_carry_large_steps) {
  struct Ring {
    int32_t ring, chunk, sms;
  };
  for (Ring rg : {Ring{1, 1, 2}, Ring{3, 2, 2}, Ring{5, 5, 4}, Ring{7, 3, 6}}) {
    for (int32_t R : {2, 3}) {
      ref::Shape s;
      s.num_ranks = R;
      s.num_experts = 3 * R;
      s.num_topk = 3;
      s.hidden = 128;
      s.dtype = DEEPEP4J_BFLOAT16;
      deepep4j_config cfg = ep::small_config(s, rg.ring, rg.chunk, rg.sms);
      ep::StepOptions o;
      o.weighted_combine = true;
      o.combine_weights = true;
      std::vector<int64_t> tokens(static_cast<size_t>(R), 257);
      ep::run_and_verify(s, tokens, cfg, o, 40 + rg.ring,
                         t::fmt("R=%d ring=%d chunk=%d sms=%d", R, rg.ring, rg.chunk, rg.sms));
    }
  }
}

// With max_hidden_bytes the size is checked at creation: the documented size (size_hint for the ring depth wanted)
// is accepted; a quarter of one chunk is refused with a message naming the value and the minimum, and that minimum
// is itself accepted.
TEST(too_small_at_creation_names_minimum) {
  ref::Shape s;
  s.num_ranks = 2;
  s.hidden = 256;
  deepep4j_config cfg = ep::small_config(s, 4, 2);
  int64_t need = 0;
  REQUIRE_OK(deepep4j_buffer_size_hint(s.hidden, s.dtype, 2, &cfg, &need));
  cfg.max_hidden_bytes = int32_t(s.hidden * 4);
  cfg.buffer_bytes = need;
  deepep4j_buffer* ok = nullptr;
  REQUIRE_OK(deepep4j_buffer_create(0, 2, &cfg, &ok));
  deepep4j_buffer_destroy(ok);
  int64_t one_chunk = 0;
  deepep4j_config min_cfg = cfg;
  min_cfg.ring_tokens = cfg.max_send_tokens_per_chunk;
  REQUIRE_OK(deepep4j_buffer_size_hint(s.hidden, s.dtype, 2, &min_cfg, &one_chunk));
  cfg.buffer_bytes = one_chunk / 4;
  deepep4j_buffer* b = reinterpret_cast<deepep4j_buffer*>(0x1);
  const std::string named = "buffer_bytes = " + std::to_string(cfg.buffer_bytes);
  CHECK_ERR(deepep4j_buffer_create(0, 2, &cfg, &b), DEEPEP4J_ERR_INVALID_ARGUMENT, named.c_str(), "minimum is ");
  CHECK(b == reinterpret_cast<deepep4j_buffer*>(0x1));
  std::string msg = deepep4j_last_error();
  size_t at = msg.find("minimum is ");
  REQUIRE(at != std::string::npos);
  long long minimum = std::atoll(msg.c_str() + at + 11);
  CHECK_MSG(minimum > cfg.buffer_bytes && minimum <= need, "minimum %lld outside (%lld, %lld]", minimum,
            (long long)cfg.buffer_bytes, (long long)need);
  cfg.buffer_bytes = minimum;
  deepep4j_buffer* at_min = nullptr;
  REQUIRE_OK(deepep4j_buffer_create(0, 2, &cfg, &at_min));
  deepep4j_buffer_destroy(at_min);
}

// Without max_hidden_bytes the check happens at notify, on every rank, and the outputs stay untouched.
TEST(too_small_at_notify_fails_on_every_rank) {
  ref::Shape narrow;
  narrow.num_ranks = 2;
  narrow.hidden = 16;
  deepep4j_config cfg = ep::small_config(narrow, 1, 1, 2);
  ep::Group g(2, cfg);
  ref::Shape wide = narrow;
  wide.hidden = 16 * 1024;
  std::vector<ref::RankInput> in = ep::make_inputs(wide, {4, 4}, 3);
  ep::run_ranks(2, [&](int32_t r) {
    deepep4j_handle* h = reinterpret_cast<deepep4j_handle*>(0x2);
    int64_t M = -3;
    int32_t per_expert[4] = {-4, -4, -4, -4};
    int st = deepep4j_notify_dispatch(g[r], in[size_t(r)].topk_idx.data(), 4, wide.num_topk, wide.num_experts,
                                      wide.hidden, wide.dtype, &h, &M, per_expert, nullptr);
    std::string msg = deepep4j_last_error();
    // The rank whose verdict is reported gets INVALID_ARGUMENT; the others PEER_ERROR carrying that message.
    CHECK_MSG(st == DEEPEP4J_ERR_INVALID_ARGUMENT || (r > 0 && st == DEEPEP4J_ERR_PEER_ERROR), "rank %d: %s: %s", r,
              deepep4j_status_name(st), msg.c_str());
    CHECK_MSG(msg.find("buffer_bytes") != std::string::npos, "rank %d: %s", r, msg.c_str());
    CHECK(h == reinterpret_cast<deepep4j_handle*>(0x2));
    CHECK_EQ(M, -3);
    for (int32_t v : per_expert) CHECK_EQ(v, -4);
  });
  // The group still works for rows that fit.
  ep::StepOptions o;
  std::vector<ref::RankInput> ok_in = ep::make_inputs(narrow, {60, 60}, 4);
  std::vector<ep::RankResult> res(2);
  ep::run_ranks(2, [&](int32_t r) { ep::run_rank(g[r], r, narrow, ok_in[size_t(r)], o, &res[size_t(r)]); });
  ep::verify(narrow, ok_in, res, o, "after a refused step");
}

TEST_MAIN()
