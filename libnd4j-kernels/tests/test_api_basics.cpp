// test_api_basics.cpp — version, status names, config defaults, size hint, buffer getters, blob export, thread-local
// errors and a one-rank step (every row stays home).
#include <string>
#include <vector>

#include "ep_group.h"

TEST(version_and_status_names) {
  CHECK(std::strcmp(deepep4j_version(), "0.1.0") == 0);
  CHECK(std::strcmp(deepep4j_status_name(DEEPEP4J_OK), "DEEPEP4J_OK") == 0);
  CHECK(std::strcmp(deepep4j_status_name(DEEPEP4J_ERR_TIMEOUT), "DEEPEP4J_ERR_TIMEOUT") == 0);
  CHECK(std::strcmp(deepep4j_status_name(DEEPEP4J_ERR_PEER_MISMATCH), "DEEPEP4J_ERR_PEER_MISMATCH") == 0);
  CHECK(std::strcmp(deepep4j_status_name(DEEPEP4J_ERR_INTERNAL), "DEEPEP4J_ERR_INTERNAL") == 0);
  CHECK(std::strcmp(deepep4j_status_name(99), "DEEPEP4J_ERR_UNKNOWN") == 0);
  int n = deepep4j_cuda_device_count();
  CHECK(n >= 0);
  CHECK_EQ(deepep4j_cuda_available(), n > 0 ? 1 : 0);
}

TEST(config_defaults) {
  deepep4j_config c;
  std::memset(&c, 0x5a, sizeof(c));
  deepep4j_config_init(&c);
  CHECK_EQ(c.buffer_bytes, int64_t(256) << 20);
  CHECK_EQ(c.num_sms, 20);
  CHECK_EQ(c.max_send_tokens_per_chunk, 16);
  CHECK_EQ(c.ring_tokens, 128);
  CHECK_EQ(c.timeout_ms, 60000);
  CHECK_EQ(c.device, DEEPEP4J_DEVICE_CPU);
  CHECK_EQ(c.device_id, 0);
  CHECK_EQ(c.backend, DEEPEP4J_BACKEND_DEEPEP);
  CHECK_EQ(c.num_threads, 0);
  CHECK_EQ(c.max_hidden_bytes, 0);
  CHECK_EQ(c.cuda_transfer, DEEPEP4J_CUDA_TRANSFER_AUTO);
  CHECK_EQ(c.ce_chunks, 4);
  CHECK_EQ(c.cuda_trace, 0);
  CHECK_EQ(c.cpu_direct, 1);
  CHECK_EQ(c.stream_ordered, 0);
  deepep4j_config_init(nullptr);  // documented as harmless
}

// The environment gives defaults to the transfer settings, through config_init only; a bad value is an invalid field
// that buffer_create names.
TEST(config_defaults_from_environment) {
  const char* names[] = {"DEEPEP4J_CUDA_TRANSFER", "DEEPEP4J_CE_CHUNKS", "DEEPEP4J_CUDA_TRACE", "DEEPEP4J_CPU_DIRECT",
                         "DEEPEP4J_STREAM_ORDERED"};
  std::vector<std::pair<bool, std::string>> saved;
  for (const char* n : names) saved.push_back({getenv(n) != nullptr, getenv(n) ? getenv(n) : ""});
  setenv("DEEPEP4J_CUDA_TRANSFER", "copy_engine", 1);
  setenv("DEEPEP4J_CE_CHUNKS", "3", 1);
  setenv("DEEPEP4J_CUDA_TRACE", "1", 1);
  setenv("DEEPEP4J_CPU_DIRECT", "0", 1);
  setenv("DEEPEP4J_STREAM_ORDERED", "1", 1);
  deepep4j_config c;
  deepep4j_config_init(&c);
  CHECK_EQ(c.stream_ordered, 1);
  CHECK_EQ(c.cuda_transfer, DEEPEP4J_CUDA_TRANSFER_COPY_ENGINE);
  CHECK_EQ(c.ce_chunks, 3);
  CHECK_EQ(c.cuda_trace, 1);
  CHECK_EQ(c.cpu_direct, 0);
  setenv("DEEPEP4J_CUDA_TRANSFER", "sm", 1);
  deepep4j_config_init(&c);
  CHECK_EQ(c.cuda_transfer, DEEPEP4J_CUDA_TRANSFER_SM);
  setenv("DEEPEP4J_CUDA_TRANSFER", "fast", 1);
  setenv("DEEPEP4J_CE_CHUNKS", "four", 1);
  deepep4j_config_init(&c);
  deepep4j_buffer* b = nullptr;
  CHECK_ERR(deepep4j_buffer_create(0, 1, &c, &b), DEEPEP4J_ERR_INVALID_ARGUMENT, "cuda_transfer = -1",
            "DEEPEP4J_CUDA_TRANSFER");
  c.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_AUTO;
  CHECK_ERR(deepep4j_buffer_create(0, 1, &c, &b), DEEPEP4J_ERR_INVALID_ARGUMENT, "ce_chunks = -1", "[1, 16]");
  c.ce_chunks = 17;
  CHECK_ERR(deepep4j_buffer_create(0, 1, &c, &b), DEEPEP4J_ERR_INVALID_ARGUMENT, "ce_chunks = 17");
  c.ce_chunks = 4;
  c.cpu_direct = 2;
  CHECK_ERR(deepep4j_buffer_create(0, 1, &c, &b), DEEPEP4J_ERR_INVALID_ARGUMENT, "cpu_direct = 2");
  c.cpu_direct = 1;
  c.cuda_trace = -1;
  CHECK_ERR(deepep4j_buffer_create(0, 1, &c, &b), DEEPEP4J_ERR_INVALID_ARGUMENT, "cuda_trace = -1");
  c.cuda_trace = 0;
  c.stream_ordered = 2;
  CHECK_ERR(deepep4j_buffer_create(0, 1, &c, &b), DEEPEP4J_ERR_INVALID_ARGUMENT, "stream_ordered = 2");
  c.stream_ordered = 1;
  c.device = DEEPEP4J_DEVICE_CUDA;
  c.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_COPY_ENGINE;
  CHECK_ERR(deepep4j_buffer_create(0, 1, &c, &b), DEEPEP4J_ERR_INVALID_ARGUMENT, "stream_ordered = 1",
            "cuda_transfer = copy_engine");
  CHECK(b == nullptr);
  for (size_t i = 0; i < saved.size(); ++i)
    if (saved[i].first) setenv(names[i], saved[i].second.c_str(), 1); else unsetenv(names[i]);
}

TEST(size_hint_grows_with_ring_ranks_and_row) {
  deepep4j_config c;
  deepep4j_config_init(&c);
  int64_t base = 0, deeper = 0, more_ranks = 0, wider = 0, bf16 = 0;
  REQUIRE_OK(deepep4j_buffer_size_hint(7168, DEEPEP4J_FLOAT32, 2, &c, &base));
  CHECK(base > 0);
  // One ring slot must at least hold a row, so the hint covers ranks * channels * ring_tokens rows.
  CHECK(base >= int64_t(2) * (c.num_sms / 2) * c.ring_tokens * 7168 * 4);
  c.ring_tokens *= 2;
  REQUIRE_OK(deepep4j_buffer_size_hint(7168, DEEPEP4J_FLOAT32, 2, &c, &deeper));
  CHECK(deeper > base);
  c.ring_tokens /= 2;
  REQUIRE_OK(deepep4j_buffer_size_hint(7168, DEEPEP4J_FLOAT32, 4, &c, &more_ranks));
  CHECK(more_ranks > base);
  REQUIRE_OK(deepep4j_buffer_size_hint(14336, DEEPEP4J_FLOAT32, 2, &c, &wider));
  CHECK(wider > base);
  REQUIRE_OK(deepep4j_buffer_size_hint(7168, DEEPEP4J_BFLOAT16, 2, &c, &bf16));
  CHECK(bf16 < base);
  int64_t untouched = 12345;
  CHECK_ERR(deepep4j_buffer_size_hint(7, DEEPEP4J_FLOAT32, 2, &c, &untouched), DEEPEP4J_ERR_INVALID_ARGUMENT,
            "hidden = 7");
  CHECK_ERR(deepep4j_buffer_size_hint(64, DEEPEP4J_FLOAT32, 0, &c, &untouched), DEEPEP4J_ERR_INVALID_ARGUMENT,
            "num_ranks = 0");
  CHECK_ERR(deepep4j_buffer_size_hint(64, DEEPEP4J_FLOAT32, 2, nullptr, &untouched), DEEPEP4J_ERR_INVALID_ARGUMENT,
            "config");
  CHECK_EQ(untouched, 12345);
}

// buffer_size_min is the smallest buffer a step runs with: that size works, one byte less fails the step on every rank
// with a message naming the same minimum; the hint (full ring depth) is larger.
TEST(size_min_is_the_smallest_working_buffer) {
  for (int32_t dtype : {DEEPEP4J_FLOAT32, DEEPEP4J_BFLOAT16}) {
    ref::Shape s;
    s.num_ranks = 2, s.num_experts = 4, s.num_topk = 2, s.hidden = 64, s.dtype = dtype;
    deepep4j_config c = ep::small_config(s, 32, 8, 4);
    int64_t min = 0, hint = 0;
    REQUIRE_OK(deepep4j_buffer_size_min(s.hidden, dtype, s.num_topk, s.num_ranks, &c, &min));
    REQUIRE_OK(deepep4j_buffer_size_hint(s.hidden, dtype, s.num_ranks, &c, &hint));
    CHECK_MSG(hint > min, "hint %lld <= min %lld", (long long)hint, (long long)min);
    c.buffer_bytes = min;
    ep::StepOptions o;
    o.combine_weights = true;
    ep::run_and_verify(s, {40, 33}, c, o, 6, t::fmt("buffer_bytes = size_min (%s)", dtype == 0 ? "fp32" : "bf16"));
    c.buffer_bytes = min - 1;
    ep::Group g(2, c);
    std::vector<ref::RankInput> in = ep::make_inputs(s, {40, 33}, 6);
    const std::string named = t::fmt("minimum is %lld bytes", (long long)min);
    ep::run_ranks(2, [&](int32_t r) {
      deepep4j_handle* h = nullptr;
      int64_t M = 0;
      CHECK_ERR(deepep4j_notify_dispatch(g[r], in[size_t(r)].topk_idx.data(), in[size_t(r)].n, s.num_topk,
                                         s.num_experts, s.hidden, dtype, &h, &M, nullptr, nullptr),
                r == 0 ? DEEPEP4J_ERR_INVALID_ARGUMENT : DEEPEP4J_ERR_PEER_ERROR, named.c_str());
    });
  }
  deepep4j_config c;
  deepep4j_config_init(&c);
  int64_t untouched = 7;
  CHECK_ERR(deepep4j_buffer_size_min(64, DEEPEP4J_FLOAT32, 0, 2, &c, &untouched), DEEPEP4J_ERR_INVALID_ARGUMENT,
            "num_topk = 0");
  CHECK_ERR(deepep4j_buffer_size_min(7, DEEPEP4J_FLOAT32, 2, 2, &c, &untouched), DEEPEP4J_ERR_INVALID_ARGUMENT,
            "hidden = 7");
  CHECK_EQ(untouched, 7);
}

TEST(buffer_getters_and_export) {
  ref::Shape s;
  s.num_ranks = 3;
  deepep4j_config cfg = ep::small_config(s);
  deepep4j_buffer* b = nullptr;
  REQUIRE_OK(deepep4j_buffer_create(2, 3, &cfg, &b));
  CHECK_EQ(deepep4j_buffer_rank(b), 2);
  CHECK_EQ(deepep4j_buffer_num_ranks(b), 3);
  deepep4j_config got;
  REQUIRE_OK(deepep4j_buffer_config(b, &got));
  CHECK_EQ(got.buffer_bytes, cfg.buffer_bytes);
  CHECK_EQ(got.num_sms, cfg.num_sms);
  CHECK_EQ(got.ring_tokens, cfg.ring_tokens);
  CHECK_EQ(got.max_send_tokens_per_chunk, cfg.max_send_tokens_per_chunk);
  CHECK_EQ(got.timeout_ms, cfg.timeout_ms);
  uint8_t blob[DEEPEP4J_MAX_BLOB_BYTES];
  size_t len = 0;
  REQUIRE_OK(deepep4j_buffer_export(b, blob, sizeof(blob), &len));
  CHECK(len > 0 && len <= DEEPEP4J_MAX_BLOB_BYTES);
  // Exporting is repeatable and gives the same bytes.
  uint8_t blob2[DEEPEP4J_MAX_BLOB_BYTES];
  size_t len2 = 0;
  REQUIRE_OK(deepep4j_buffer_export(b, blob2, sizeof(blob2), &len2));
  CHECK(len2 == len && std::memcmp(blob, blob2, len) == 0);
  size_t small_len = 777;
  CHECK_ERR(deepep4j_buffer_export(b, blob, 3, &small_len), DEEPEP4J_ERR_INVALID_ARGUMENT, "capacity");
  CHECK_EQ(small_len, size_t(777));
  CHECK_EQ(deepep4j_buffer_rank(nullptr), -1);
  CHECK_EQ(deepep4j_buffer_num_ranks(nullptr), -1);
  REQUIRE_OK(deepep4j_buffer_destroy(b));
  REQUIRE_OK(deepep4j_buffer_destroy(nullptr));
}

TEST(last_error_is_per_thread) {
  deepep4j_config c;
  deepep4j_config_init(&c);
  c.num_sms = 7;
  deepep4j_buffer* b = nullptr;
  CHECK_ERR(deepep4j_buffer_create(0, 1, &c, &b), DEEPEP4J_ERR_INVALID_ARGUMENT, "num_sms = 7");
  std::string other;
  std::thread([&] { other = deepep4j_last_error(); }).join();
  CHECK_MSG(other.empty(), "a fresh thread sees \"%s\"", other.c_str());
  CHECK(std::string(deepep4j_last_error()).find("num_sms = 7") != std::string::npos);
}

// The CPU backend completes every call on return: with stream_ordered = 1 the async combine is a plain combine,
// buffer_sync and comm_wait have nothing to wait for, and worst-case sized queued handles are CUDA only.
TEST(stream_ordered_calls_on_cpu_complete_on_return) {
  ref::Shape s;
  s.num_ranks = 2, s.num_experts = 8, s.num_topk = 2, s.hidden = 32, s.dtype = DEEPEP4J_FLOAT32;
  deepep4j_config cfg = ep::small_config(s);
  cfg.stream_ordered = 1;
  ep::Group g(2, cfg);
  std::vector<ref::RankInput> in = ep::make_inputs(s, {20, 13}, 3);
  std::vector<ep::RankResult> res(2);
  ep::StepOptions o;
  ep::run_ranks(2, [&](int32_t r) {
    ep::run_rank(g[r], r, s, in[size_t(r)], o, &res[size_t(r)], true);
    deepep4j_handle* h = res[size_t(r)].handle;
    std::vector<uint8_t> again(res[size_t(r)].combined.out.size(), 0xEE);
    deepep4j_combine_args c{};
    c.y = res[size_t(r)].y.data(), c.out = again.data();
    REQUIRE_OK(deepep4j_combine_async(g[r], h, s.dtype, &c, nullptr));
    REQUIRE_OK(deepep4j_comm_wait(g[r], nullptr));
    REQUIRE_OK(deepep4j_buffer_sync(g[r], nullptr));
    CHECK_MSG(again == res[size_t(r)].combined.out, "rank %d: combine_async differs from combine", r);
    deepep4j_handle* q = reinterpret_cast<deepep4j_handle*>(0x1);
    CHECK_ERR(deepep4j_handle_create_queued(g[r], 20, 2, 8, 32, DEEPEP4J_FLOAT32, 40, &q), DEEPEP4J_ERR_UNAVAILABLE,
              "CUDA deepep backend");
    CHECK(q == reinterpret_cast<deepep4j_handle*>(0x1));
    CHECK_ERR(deepep4j_handle_create_queued(g[r], 20, 2, 8, 32, DEEPEP4J_FLOAT32, -1, &q),
              DEEPEP4J_ERR_INVALID_ARGUMENT, "num_worst_tokens = -1");
    REQUIRE_OK(deepep4j_handle_destroy(h));
  });
  ep::verify(s, in, res, o, "stream_ordered on CPU");
}

TEST(one_rank_keeps_every_row) {
  for (int32_t dtype : {DEEPEP4J_FLOAT32, DEEPEP4J_BFLOAT16, DEEPEP4J_FLOAT16}) {
    ref::Shape s;
    s.num_ranks = 1;
    s.num_experts = 4;
    s.num_topk = 2;
    s.hidden = 64;
    s.dtype = dtype;
    ep::StepOptions o;
    o.weighted_combine = true;
    o.combine_weights = true;
    ep::run_and_verify(s, {37}, ep::small_config(s), o, 7, t::fmt("R=1 dtype=%d", dtype));
  }
}

TEST_MAIN()
