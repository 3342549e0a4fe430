// test_peer_mismatch.cpp — ranks that disagree: on the config at connect, on (H, K, E, dtype) at notify, on the dtype
// of a cached dispatch. Every rank returns DEEPEP4J_ERR_PEER_MISMATCH (never a hang) and outputs stay untouched.
#include "ep_group.h"

namespace {

// Connects R ranks whose configs come from cfg_of(rank); returns each rank's status and message.
std::vector<std::pair<int, std::string>> connect_all(int32_t R, const std::function<deepep4j_config(int32_t)>& cfg_of) {
  ep::Exported e(R, cfg_of);
  std::vector<std::pair<int, std::string>> out(static_cast<size_t>(R));
  ep::run_ranks(R, [&](int32_t r) {
    int st = e.connect(r);
    out[size_t(r)] = {st, deepep4j_last_error()};
  });
  return out;
}

deepep4j_config base_config() {
  ref::Shape s;
  s.num_ranks = 3;
  deepep4j_config c = ep::small_config(s);
  c.timeout_ms = 5000;
  c.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_AUTO;  // the values the messages above name, whatever the environment
  c.ce_chunks = 4;
  return c;
}

void expect_connect_mismatch(const char* field, const std::function<void(deepep4j_config&)>& edit) {
  auto res = connect_all(3, [&](int32_t r) {
    deepep4j_config c = base_config();
    if (r == 2) edit(c);
    return c;
  });
  for (int32_t r = 0; r < 3; ++r) {
    CHECK_MSG(res[size_t(r)].first == DEEPEP4J_ERR_PEER_MISMATCH, "%s: rank %d %s: %s", field, r,
              deepep4j_status_name(res[size_t(r)].first), res[size_t(r)].second.c_str());
    CHECK_MSG(res[size_t(r)].second.find(field) != std::string::npos, "%s: rank %d message: %s", field, r,
              res[size_t(r)].second.c_str());
  }
}

struct Call {
  int64_t hidden = 64;
  int32_t k = 2, e = 6, dtype = DEEPEP4J_FLOAT32;
};

void expect_notify_mismatch(ep::Group& g, const char* field, const Call& odd) {
  const int32_t R = g.size();
  ep::run_ranks(R, [&](int32_t r) {
    Call c = r == 1 ? odd : Call{};
    std::vector<int64_t> idx(size_t(10 * c.k));
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = int64_t(i % size_t(std::min(c.e, 6)));
    deepep4j_handle* h = reinterpret_cast<deepep4j_handle*>(0x2);
    int64_t M = -3;
    int32_t per_expert[8] = {-4, -4, -4, -4, -4, -4, -4, -4};
    int st = deepep4j_notify_dispatch(g[r], idx.data(), 10, c.k, c.e, c.hidden, c.dtype, &h, &M, per_expert, nullptr);
    std::string msg = deepep4j_last_error();
    CHECK_MSG(st == DEEPEP4J_ERR_PEER_MISMATCH, "%s: rank %d %s: %s", field, r, deepep4j_status_name(st), msg.c_str());
    CHECK_MSG(msg.find(field) != std::string::npos, "%s: rank %d message: %s", field, r, msg.c_str());
    CHECK(h == reinterpret_cast<deepep4j_handle*>(0x2));
    CHECK_EQ(M, -3);
    for (int32_t v : per_expert) CHECK_EQ(v, -4);
  });
}

}  // namespace

TEST(config_disagreement_at_connect) {
  expect_connect_mismatch("num_sms", [](deepep4j_config& c) { c.num_sms += 2; });
  expect_connect_mismatch("ring_tokens", [](deepep4j_config& c) { c.ring_tokens += 1; });
  expect_connect_mismatch("max_send_tokens_per_chunk", [](deepep4j_config& c) { c.max_send_tokens_per_chunk -= 1; });
  expect_connect_mismatch("buffer_bytes", [](deepep4j_config& c) { c.buffer_bytes += 4096; });
  // Settings of the CUDA transfer must agree too (senders and receivers cut a step into the same chunks); the message
  // names both values.
  expect_connect_mismatch("ce_chunks = 4 on rank 0 but 2 on rank 2", [](deepep4j_config& c) { c.ce_chunks = 2; });
  expect_connect_mismatch("cuda_transfer = 0 on rank 0 but 1 on rank 2",
                          [](deepep4j_config& c) { c.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_SM; });
}

TEST(blobs_in_the_wrong_order) {
  const int32_t R = 2;
  deepep4j_config c = base_config();
  std::vector<deepep4j_buffer*> bufs(2, nullptr);
  std::vector<std::vector<uint8_t>> blobs(2, std::vector<uint8_t>(DEEPEP4J_MAX_BLOB_BYTES));
  std::vector<size_t> lens(2);
  for (int32_t r = 0; r < R; ++r) {
    REQUIRE_OK(deepep4j_buffer_create(r, R, &c, &bufs[size_t(r)]));
    REQUIRE_OK(deepep4j_buffer_export(bufs[size_t(r)], blobs[size_t(r)].data(), blobs[size_t(r)].size(),
                                      &lens[size_t(r)]));
  }
  const void* swapped[2] = {blobs[1].data(), blobs[0].data()};
  size_t swapped_lens[2] = {lens[1], lens[0]};
  ep::run_ranks(R, [&](int32_t r) {
    int st = deepep4j_buffer_connect(bufs[size_t(r)], swapped, swapped_lens);
    std::string msg = deepep4j_last_error();
    CHECK_MSG(st == DEEPEP4J_ERR_INVALID_ARGUMENT || st == DEEPEP4J_ERR_PEER_MISMATCH, "rank %d: %s: %s", r,
              deepep4j_status_name(st), msg.c_str());
    CHECK_MSG(msg.find("blobs[0]") != std::string::npos, "rank %d: %s", r, msg.c_str());
  });
  for (auto* b : bufs) deepep4j_buffer_destroy(b);
}

TEST(shape_disagreement_at_notify) {
  ep::Group g(3, base_config());
  Call c;
  c.hidden = 128;
  expect_notify_mismatch(g, "hidden", c);
  c = Call{};
  c.k = 3;
  expect_notify_mismatch(g, "num_topk", c);
  c = Call{};
  c.e = 12;
  expect_notify_mismatch(g, "num_experts", c);
  c = Call{};
  c.dtype = DEEPEP4J_BFLOAT16;
  expect_notify_mismatch(g, "dtype", c);
  // The group is still usable.
  ref::Shape s;
  s.num_ranks = 3;
  s.num_experts = 6;
  std::vector<ref::RankInput> in = ep::make_inputs(s, {10, 20, 30}, 4);
  std::vector<ep::RankResult> res(3);
  ep::StepOptions o;
  ep::run_ranks(3, [&](int32_t r) { ep::run_rank(g[r], r, s, in[size_t(r)], o, &res[size_t(r)]); });
  ep::verify(s, in, res, o, "after mismatches");
}

// A cached dispatch where one rank overrides the dtype and the other does not.
TEST(dtype_disagreement_in_cached_dispatch) {
  ref::Shape s;
  s.num_experts = 4;
  s.hidden = 64;
  ep::Group g(2, base_config());
  std::vector<ref::RankInput> in = ep::make_inputs(s, {12, 12}, 21);
  ep::run_ranks(2, [&](int32_t r) {
    const ref::RankInput& x = in[size_t(r)];
    deepep4j_handle* h = nullptr;
    int64_t M = 0;
    REQUIRE_OK(deepep4j_notify_dispatch(g[r], x.topk_idx.data(), x.n, s.num_topk, s.num_experts, s.hidden, s.dtype,
                                        &h, &M, nullptr, nullptr));
    std::vector<float> recv(size_t(M * s.hidden), -9.0f);
    deepep4j_dispatch_args a{};
    a.x = x.x.data();
    a.recv_x = recv.data();
    int st = deepep4j_dispatch(g[r], h, r == 0 ? DEEPEP4J_BFLOAT16 : -1, &a, nullptr);
    std::string msg = deepep4j_last_error();
    CHECK_MSG(st == DEEPEP4J_ERR_PEER_MISMATCH, "rank %d: %s: %s", r, deepep4j_status_name(st), msg.c_str());
    CHECK_MSG(msg.find("dtype") != std::string::npos, "rank %d: %s", r, msg.c_str());
    for (float v : recv) CHECK_EQ(v, -9.0f);
    deepep4j_handle_destroy(h);
  });
}

TEST_MAIN()
