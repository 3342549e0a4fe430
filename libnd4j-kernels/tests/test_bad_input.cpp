// test_bad_input.cpp — every rule of the C API: the call fails with a message naming argument, value and rule, the
// outputs stay untouched, every rank of a collective step reports the error, and the group works afterwards.
#include "ep_group.h"

namespace {

deepep4j_config good_config() {
  ref::Shape s;
  return ep::small_config(s);
}

void expect_config_error(const char* field, void (*edit)(deepep4j_config&), int32_t rank, int32_t R,
                         std::initializer_list<const char*> fragments, int status = DEEPEP4J_ERR_INVALID_ARGUMENT) {
  deepep4j_config c = good_config();
  edit(c);
  deepep4j_buffer* b = reinterpret_cast<deepep4j_buffer*>(0x1);
  int st = deepep4j_buffer_create(rank, R, &c, &b);
  std::string msg = deepep4j_last_error();
  CHECK_MSG(st == status, "%s: %s (%s)", field, deepep4j_status_name(st), msg.c_str());
  for (const char* f : fragments) CHECK_MSG(msg.find(f) != std::string::npos, "%s: lacks \"%s\": %s", field, f, msg.c_str());
  CHECK_MSG(b == reinterpret_cast<deepep4j_buffer*>(0x1), "%s: *out was written", field);
  if (st == DEEPEP4J_OK) deepep4j_buffer_destroy(b);
}

// A routing problem made by `bad_rank` only: that rank gets `status` with `fragment`; the others get the same error
// or DEEPEP4J_ERR_PEER_ERROR carrying the bad rank's message. Every output stays untouched.
struct NotifyCall {
  int64_t n = 8;
  int32_t k = 2, e = 6, dtype = DEEPEP4J_FLOAT32;  // 6 experts: divisible by 2 and 3 ranks
  int64_t hidden = 64;
  bool null_idx = false;
  int64_t bad_value = 0;  // written at [n-1, k-1] when nonzero
};

void expect_notify_error(ep::Group& g, int32_t bad_rank, const NotifyCall& bad, const char* fragment,
                         int status = DEEPEP4J_ERR_INVALID_ARGUMENT) {
  const int32_t R = g.size();
  std::vector<std::string> msgs(static_cast<size_t>(R));
  std::vector<int> sts(static_cast<size_t>(R));
  ep::run_ranks(R, [&](int32_t r) {
    NotifyCall c = r == bad_rank ? bad : NotifyCall{};
    std::vector<int64_t> idx(size_t(std::max<int64_t>(c.n, 1) * std::max(c.k, 1)), 0);
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = int64_t(i % 4);
    if (c.bad_value != 0 && c.n > 0) idx[size_t((c.n - 1) * c.k + c.k - 1)] = c.bad_value;
    deepep4j_handle* h = reinterpret_cast<deepep4j_handle*>(0x2);
    int64_t M = -3;
    std::vector<int32_t> per_expert(64, -4);
    sts[size_t(r)] = deepep4j_notify_dispatch(g[r], c.null_idx ? nullptr : idx.data(), c.n, c.k, c.e, c.hidden,
                                              c.dtype, &h, &M, per_expert.data(), nullptr);
    msgs[size_t(r)] = deepep4j_last_error();
    CHECK_MSG(h == reinterpret_cast<deepep4j_handle*>(0x2), "rank %d: out_handle written", r);
    CHECK_MSG(M == -3, "rank %d: num_recv_tokens written", r);
    for (int32_t v : per_expert) CHECK_MSG(v == -4, "rank %d: num_recv_tokens_per_expert written", r);
  });
  const std::string& own = msgs[size_t(bad_rank)];
  CHECK_MSG(sts[size_t(bad_rank)] == status, "bad rank %d: %s: %s", bad_rank, deepep4j_status_name(sts[size_t(bad_rank)]),
            own.c_str());
  CHECK_MSG(own.find(fragment) != std::string::npos, "bad rank %d: lacks \"%s\": %s", bad_rank, fragment, own.c_str());
  for (int32_t r = 0; r < R; ++r) {
    if (r == bad_rank) continue;
    CHECK_MSG(sts[size_t(r)] == status || sts[size_t(r)] == DEEPEP4J_ERR_PEER_ERROR, "rank %d: %s: %s", r,
              deepep4j_status_name(sts[size_t(r)]), msgs[size_t(r)].c_str());
    CHECK_MSG(msgs[size_t(r)].find(fragment) != std::string::npos, "rank %d does not carry \"%s\": %s", r, fragment,
              msgs[size_t(r)].c_str());
  }
}

// A good step on the group: errors must leave it usable.
void good_step(ep::Group& g, const std::string& label) {
  ref::Shape s;
  s.num_ranks = g.size();
  s.num_experts = 2 * g.size();
  s.num_topk = 2;
  s.hidden = 64;
  std::vector<ref::RankInput> in = ep::make_inputs(s, std::vector<int64_t>(size_t(g.size()), 33), 17);
  std::vector<ep::RankResult> res(size_t(g.size()));
  ep::StepOptions o;
  o.weighted_combine = true;
  ep::run_ranks(g.size(), [&](int32_t r) { ep::run_rank(g[r], r, s, in[size_t(r)], o, &res[size_t(r)]); });
  ep::verify(s, in, res, o, label);
}

}  // namespace

TEST(config_rules) {
  expect_config_error("num_sms odd", [](deepep4j_config& c) { c.num_sms = 7; }, 0, 2, {"num_sms = 7", "even"});
  expect_config_error("num_sms zero", [](deepep4j_config& c) { c.num_sms = 0; }, 0, 2, {"num_sms = 0", ">= 2"});
  expect_config_error("num_sms negative", [](deepep4j_config& c) { c.num_sms = -2; }, 0, 2, {"num_sms = -2"});
  expect_config_error("chunk", [](deepep4j_config& c) { c.max_send_tokens_per_chunk = 0; }, 0, 2,
                      {"max_send_tokens_per_chunk = 0", ">= 1"});
  expect_config_error("ring", [](deepep4j_config& c) { c.ring_tokens = c.max_send_tokens_per_chunk - 1; }, 0, 2,
                      {"ring_tokens = 7", "max_send_tokens_per_chunk = 8"});
  expect_config_error("timeout", [](deepep4j_config& c) { c.timeout_ms = 0; }, 0, 2, {"timeout_ms = 0", "> 0"});
  expect_config_error("device", [](deepep4j_config& c) { c.device = 5; }, 0, 2, {"device = 5"});
  expect_config_error("backend", [](deepep4j_config& c) { c.backend = 9; }, 0, 2, {"backend = 9"});
  expect_config_error("threads", [](deepep4j_config& c) { c.num_threads = -1; }, 0, 2, {"num_threads = -1"});
  expect_config_error("max_hidden_bytes", [](deepep4j_config& c) { c.max_hidden_bytes = -16; }, 0, 2,
                      {"max_hidden_bytes = -16"});
  expect_config_error("buffer_bytes", [](deepep4j_config& c) { c.buffer_bytes = 0; }, 0, 2, {"buffer_bytes = 0"});
  expect_config_error("rank", [](deepep4j_config&) {}, 2, 2, {"rank = 2", "num_ranks = 2"});
  expect_config_error("rank negative", [](deepep4j_config&) {}, -1, 2, {"rank = -1"});
  expect_config_error("num_ranks", [](deepep4j_config&) {}, 0, 0, {"num_ranks = 0"});
  expect_config_error("num_ranks big", [](deepep4j_config&) {}, 0, DEEPEP4J_MAX_RANKS + 1, {"num_ranks = 65"});
  deepep4j_buffer* b = nullptr;
  CHECK_ERR(deepep4j_buffer_create(0, 1, nullptr, &b), DEEPEP4J_ERR_INVALID_ARGUMENT, "config = NULL");
  deepep4j_config c = good_config();
  CHECK_ERR(deepep4j_buffer_create(0, 1, &c, nullptr), DEEPEP4J_ERR_INVALID_ARGUMENT, "out = NULL");
}

// No silent fallback: the all-to-all backend is CUDA only, and CUDA needs a device.
TEST(unavailable_backends) {
  expect_config_error("alltoall on cpu", [](deepep4j_config& c) { c.backend = DEEPEP4J_BACKEND_ALLTOALL; }, 0, 2, {},
                      DEEPEP4J_ERR_UNAVAILABLE);
  if (deepep4j_cuda_available() == 0)
    expect_config_error("cuda without a device", [](deepep4j_config& c) { c.device = DEEPEP4J_DEVICE_CUDA; }, 0, 2,
                        {}, DEEPEP4J_ERR_UNAVAILABLE);
}

TEST(calls_before_connect) {
  deepep4j_config c = good_config();
  deepep4j_buffer* b = nullptr;
  REQUIRE_OK(deepep4j_buffer_create(0, 2, &c, &b));
  int64_t idx[2] = {0, 1};
  deepep4j_handle* h = nullptr;
  int64_t M = 0;
  CHECK_ERR(deepep4j_notify_dispatch(b, idx, 1, 2, 4, 64, DEEPEP4J_FLOAT32, &h, &M, nullptr, nullptr),
            DEEPEP4J_ERR_STATE, "not connected");
  const void* blobs[2] = {nullptr, nullptr};
  size_t lens[2] = {0, 0};
  CHECK_ERR(deepep4j_buffer_connect(b, blobs, lens), DEEPEP4J_ERR_INVALID_ARGUMENT, "blobs[0]");
  // A failed connect breaks the buffer (its peers were told): recreate it.
  CHECK_ERR(deepep4j_buffer_connect(b, nullptr, lens), DEEPEP4J_ERR_STATE, "broken", "recreate");
  deepep4j_buffer_destroy(b);
  REQUIRE_OK(deepep4j_buffer_create(0, 2, &c, &b));
  CHECK_ERR(deepep4j_buffer_connect(b, nullptr, lens), DEEPEP4J_ERR_INVALID_ARGUMENT, "blobs");
  deepep4j_buffer_destroy(b);
  REQUIRE_OK(deepep4j_buffer_create(0, 2, &c, &b));
  // Garbage where a blob should be.
  uint8_t own[DEEPEP4J_MAX_BLOB_BYTES], junk[64];
  size_t own_len = 0;
  REQUIRE_OK(deepep4j_buffer_export(b, own, sizeof(own), &own_len));
  std::memset(junk, 0x77, sizeof(junk));
  const void* mixed[2] = {own, junk};
  size_t mixed_lens[2] = {own_len, sizeof(junk)};
  int st = deepep4j_buffer_connect(b, mixed, mixed_lens);
  CHECK_MSG(st == DEEPEP4J_ERR_INVALID_ARGUMENT || st == DEEPEP4J_ERR_PEER_MISMATCH, "junk blob: %s: %s",
            deepep4j_status_name(st), deepep4j_last_error());
  CHECK(std::string(deepep4j_last_error()).find("blobs[1]") != std::string::npos);
  deepep4j_buffer_destroy(b);
}

TEST(notify_rules_reported_on_every_rank) {
  ep::Group g(3, good_config());
  NotifyCall c;
  c.bad_value = 6;
  expect_notify_error(g, 1, c, "topk_idx[7,1] = 6");
  c.bad_value = -2;
  expect_notify_error(g, 2, c, "topk_idx[7,1] = -2");
  c = NotifyCall{};
  c.e = 7;
  expect_notify_error(g, 0, c, "num_experts = 7");
  c = NotifyCall{};
  c.k = 0;
  expect_notify_error(g, 1, c, "num_topk = 0");
  c = NotifyCall{};
  c.k = DEEPEP4J_MAX_TOPK + 1;
  expect_notify_error(g, 1, c, "num_topk = 33");
  c = NotifyCall{};
  c.n = -1;
  expect_notify_error(g, 2, c, "num_tokens = -1");
  c = NotifyCall{};
  c.null_idx = true;
  expect_notify_error(g, 0, c, "topk_idx = NULL");
  good_step(g, "after notify errors");
}

TEST(payload_rules) {
  ep::Group g(2, good_config());
  NotifyCall c;
  c.hidden = 6;  // 24 bytes: not a multiple of 16
  expect_notify_error(g, 0, c, "hidden = 6");
  c.dtype = DEEPEP4J_BFLOAT16;
  c.hidden = 4;  // 8 bytes
  expect_notify_error(g, 1, c, "hidden = 4");
  c.dtype = DEEPEP4J_FP8_E4M3;
  c.hidden = 64;  // multiple of 16 bytes but not of the 128-channel scale block
  expect_notify_error(g, 0, c, "hidden = 64");
  c.dtype = 9;
  expect_notify_error(g, 1, c, "dtype = 9");
  c = NotifyCall{};
  c.hidden = 0;
  expect_notify_error(g, 0, c, "hidden = 0");
  good_step(g, "after payload errors");
}

// Dispatch / combine argument errors on one rank: that rank names the argument, the peers fail too, nothing is written.
TEST(dispatch_and_combine_arguments) {
  ref::Shape s;
  s.num_experts = 4;
  s.hidden = 64;
  ep::Group g(2, good_config());
  std::vector<ref::RankInput> in = ep::make_inputs(s, {16, 16}, 8);
  struct Bad {
    const char* what;
    int which;  // 0 x NULL, 1 recv_x NULL, 2 weights without source, 3 scales without fp8, 4 combine fp8,
                // 5 combine y NULL, 6 combine out NULL, 7 y_topk_weights without out_topk_weights, 8 args NULL
  };
  for (Bad bad : {Bad{"x = NULL", 0}, Bad{"recv_x = NULL", 1}, Bad{"topk_weights = NULL", 2},
                  Bad{"x_scales", 3}, Bad{"fp8_e4m3", 4}, Bad{"y = NULL", 5}, Bad{"out = NULL", 6},
                  Bad{"y_topk_weights", 7}, Bad{"args = NULL", 8}}) {
    std::vector<int> sts(2);
    std::vector<std::string> msgs(2);
    ep::run_ranks(2, [&](int32_t r) {
      const ref::RankInput& x = in[size_t(r)];
      deepep4j_handle* h = nullptr;
      int64_t M = 0;
      REQUIRE_OK(deepep4j_notify_dispatch(g[r], x.topk_idx.data(), x.n, s.num_topk, s.num_experts, s.hidden, s.dtype,
                                          &h, &M, nullptr, nullptr));
      std::vector<float> recv(size_t(M * s.hidden), -9.0f), recv_w(size_t(M * s.num_topk), -9.0f);
      std::vector<float> out(size_t(x.n * s.hidden), -9.0f);
      float scales[4] = {1, 1, 1, 1};
      deepep4j_dispatch_args a{};
      a.x = x.x.data();
      a.topk_weights = x.topk_weights.data();
      a.recv_x = recv.data();
      a.recv_topk_weights = recv_w.data();
      bool mine = r == 1;  // rank 1 makes the mistake
      bool combine_case = bad.which >= 4;
      if (mine && bad.which == 0) a.x = nullptr;
      if (mine && bad.which == 1) a.recv_x = nullptr;
      if (mine && bad.which == 2) a.topk_weights = nullptr;
      if (mine && bad.which == 3) a.x_scales = scales;
      int st = deepep4j_dispatch(g[r], h, -1, (mine && bad.which == 8) ? nullptr : &a, nullptr);
      if (!combine_case || bad.which == 8) {
        sts[size_t(r)] = st;
        msgs[size_t(r)] = deepep4j_last_error();
        for (float v : recv) CHECK_MSG(v == -9.0f, "%s: rank %d recv_x written", bad.what, r);
        for (float v : recv_w) CHECK_MSG(v == -9.0f, "%s: rank %d recv_topk_weights written", bad.what, r);
        deepep4j_handle_destroy(h);
        return;
      }
      REQUIRE_OK(st);
      std::vector<float> yw(size_t(M * s.num_topk), 0.0f);
      deepep4j_combine_args c{};
      c.y = recv.data();
      c.out = out.data();
      int32_t dtype = DEEPEP4J_FLOAT32;
      if (mine && bad.which == 4) dtype = DEEPEP4J_FP8_E4M3;
      if (mine && bad.which == 5) c.y = nullptr;
      if (mine && bad.which == 6) c.out = nullptr;
      if (mine && bad.which == 7) c.y_topk_weights = yw.data();
      sts[size_t(r)] = deepep4j_combine(g[r], h, dtype, &c, nullptr);
      msgs[size_t(r)] = deepep4j_last_error();
      for (float v : out) CHECK_MSG(v == -9.0f, "%s: rank %d out written", bad.what, r);
      deepep4j_handle_destroy(h);
    });
    CHECK_MSG(sts[1] == DEEPEP4J_ERR_INVALID_ARGUMENT, "%s: rank 1 %s: %s", bad.what, deepep4j_status_name(sts[1]),
              msgs[1].c_str());
    CHECK_MSG(msgs[1].find(bad.what) != std::string::npos, "rank 1 lacks \"%s\": %s", bad.what, msgs[1].c_str());
    CHECK_MSG(sts[0] == DEEPEP4J_ERR_INVALID_ARGUMENT || sts[0] == DEEPEP4J_ERR_PEER_ERROR, "%s: rank 0 %s: %s",
              bad.what, deepep4j_status_name(sts[0]), msgs[0].c_str());
    CHECK_MSG(msgs[0].find(bad.what) != std::string::npos, "rank 0 lacks \"%s\": %s", bad.what, msgs[0].c_str());
  }
  good_step(g, "after dispatch/combine errors");
}

TEST(handle_of_another_buffer) {
  ref::Shape s;
  s.num_ranks = 1;
  s.num_experts = 2;
  deepep4j_config cfg = ep::small_config(s);
  ep::Group a(1, cfg), b(1, cfg);
  int64_t idx[2] = {0, 1};
  deepep4j_handle* h = nullptr;
  int64_t M = 0;
  REQUIRE_OK(deepep4j_notify_dispatch(a[0], idx, 1, 2, 2, 16, DEEPEP4J_FLOAT32, &h, &M, nullptr, nullptr));
  float x[16] = {}, recv[16] = {};
  deepep4j_dispatch_args d{};
  d.x = x;
  d.recv_x = recv;
  CHECK_ERR(deepep4j_dispatch(b[0], h, -1, &d, nullptr), DEEPEP4J_ERR_STATE, "another buffer");
  CHECK_ERR(deepep4j_dispatch(a[0], nullptr, -1, &d, nullptr), DEEPEP4J_ERR_INVALID_ARGUMENT, "handle = NULL");
  deepep4j_combine_args c{};
  c.y = recv;
  c.out = x;
  CHECK_ERR(deepep4j_combine(b[0], h, DEEPEP4J_FLOAT32, &c, nullptr), DEEPEP4J_ERR_STATE, "another buffer");
  int32_t counts[1] = {-1};
  CHECK_ERR(deepep4j_handle_recv_counts_per_rank(nullptr, counts), DEEPEP4J_ERR_INVALID_ARGUMENT, "handle");
  CHECK_EQ(counts[0], -1);
  CHECK_EQ(deepep4j_handle_num_tokens(nullptr), -1);
  REQUIRE_OK(deepep4j_handle_destroy(h));
  REQUIRE_OK(deepep4j_handle_destroy(nullptr));
}

TEST_MAIN()
