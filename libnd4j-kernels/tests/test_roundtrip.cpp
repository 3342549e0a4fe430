// test_roundtrip.cpp — dispatch then combine on 1, 2, 3, 4 and 8 in-process ranks: received rows, their order and
// metadata equal the naive reference; combine equals the reference sum; identity experts give x times the ranks visited.
#include "ep_group.h"

namespace {

// Experts that return their input: out must be x * (distinct ranks visited), or, weighted, x * (sum of the token's
// valid top-k weights). Checked directly from the inputs, independent of ref::dispatch/combine.
void identity_roundtrip(int32_t R, bool weighted) {
  ref::Shape s;
  s.num_ranks = R;
  s.num_experts = 4 * R;
  s.num_topk = std::min(4, s.num_experts);
  s.hidden = 32;
  std::vector<int64_t> tokens;
  for (int32_t r = 0; r < R; ++r) tokens.push_back(40 + 13 * r);
  std::vector<ref::RankInput> in = ep::make_inputs(s, tokens, 100 + R);
  ep::Group g(R, ep::small_config(s));
  std::vector<std::vector<float>> out(static_cast<size_t>(R));
  ep::run_ranks(R, [&](int32_t r) {
    const ref::RankInput& x = in[size_t(r)];
    deepep4j_handle* h = nullptr;
    int64_t M = 0;
    REQUIRE_OK(deepep4j_notify_dispatch(g[r], x.topk_idx.data(), x.n, s.num_topk, s.num_experts, s.hidden, s.dtype,
                                        &h, &M, nullptr, nullptr));
    std::vector<float> recv(size_t(M * s.hidden)), recv_w(size_t(M * s.num_topk));
    deepep4j_dispatch_args a{};
    a.x = x.x.data();
    a.topk_weights = x.topk_weights.data();
    a.recv_x = recv.data();
    a.recv_topk_weights = recv_w.data();
    REQUIRE_OK(deepep4j_dispatch(g[r], h, -1, &a, nullptr));
    out[size_t(r)].assign(size_t(x.n * s.hidden), -1.0f);
    deepep4j_combine_args c{};
    c.y = recv.data();
    c.recv_topk_weights = weighted ? recv_w.data() : nullptr;
    c.out = out[size_t(r)].data();
    REQUIRE_OK(deepep4j_combine(g[r], h, DEEPEP4J_FLOAT32, &c, nullptr));
    deepep4j_handle_destroy(h);
  });
  const int32_t L = s.num_experts / R, K = s.num_topk;
  for (int32_t r = 0; r < R; ++r) {
    const ref::RankInput& x = in[size_t(r)];
    int bad = 0;
    for (int64_t t = 0; t < x.n; ++t) {
      std::vector<bool> visited(static_cast<size_t>(R), false);
      float factor = 0.0f;
      for (int32_t k = 0; k < K; ++k) {
        int64_t e = x.topk_idx[size_t(t * K + k)];
        if (e < 0) continue;
        if (weighted) factor += x.topk_weights[size_t(t * K + k)];
        if (!weighted && !visited[size_t(e / L)]) factor += 1.0f;
        visited[size_t(e / L)] = true;
      }
      for (int64_t h = 0; h < s.hidden; ++h) {
        float xv = ref::load(s.dtype, x.x.data(), t * s.hidden + h);
        if (out[size_t(r)][size_t(t * s.hidden + h)] != xv * factor) ++bad;
      }
    }
    CHECK_MSG(bad == 0, "R=%d weighted=%d rank %d: %d values differ from x * factor", R, int(weighted), r, bad);
  }
}

}  // namespace

TEST(identity_experts_unweighted) {
  for (int32_t R : {1, 2, 3, 4, 8}) identity_roundtrip(R, false);
}

TEST(identity_experts_weighted) {
  for (int32_t R : {1, 2, 3, 4, 8}) identity_roundtrip(R, true);
}

// Every rank count and dtype, random token counts with N = 0 on some ranks, against the full reference.
TEST(reference_all_rank_counts_and_dtypes) {
  std::mt19937_64 rng(2024);
  for (int32_t R : {1, 2, 3, 4, 8}) {
    for (int32_t dtype : {DEEPEP4J_FLOAT32, DEEPEP4J_BFLOAT16, DEEPEP4J_FLOAT16}) {
      ref::Shape s;
      s.num_ranks = R;
      s.num_experts = R * int32_t(1 + rng() % 4);
      s.num_topk = int32_t(1 + rng() % std::min(6, s.num_experts));
      s.hidden = dtype == DEEPEP4J_FLOAT32 ? 4 * int64_t(1 + rng() % 24) : 8 * int64_t(1 + rng() % 12);
      s.dtype = dtype;
      std::vector<int64_t> tokens;
      for (int32_t r = 0; r < R; ++r) tokens.push_back(rng() % 4 == 0 ? 0 : int64_t(rng() % 150));
      if (R > 1) tokens[size_t(R - 1)] = 0;  // at least one rank sends nothing
      ep::StepOptions o;
      o.weighted_combine = rng() % 2 == 0;
      o.combine_weights = rng() % 2 == 0;
      o.send_weights = o.weighted_combine || o.combine_weights || rng() % 2 == 0;
      std::string label = t::fmt("R=%d dtype=%d E=%d K=%d H=%lld weighted=%d", R, dtype, s.num_experts, s.num_topk,
                                 (long long)s.hidden, int(o.weighted_combine));
      ep::run_and_verify(s, tokens, ep::small_config(s), o, rng(), label);
    }
  }
}

// Random configurations: ring depth, chunk, channels, copy threads, shapes and options all drawn at once.
TEST(random_sweep) {
  std::mt19937_64 rng(4242);
  for (int run = 0; run < 150; ++run) {
    ref::Shape s;
    const int32_t ranks[] = {1, 2, 3, 4, 5, 8};
    s.num_ranks = ranks[rng() % 6];
    s.num_experts = s.num_ranks * int32_t(1 + rng() % 6);
    s.num_topk = int32_t(1 + rng() % std::min(9, s.num_experts));
    const int32_t dtypes[] = {DEEPEP4J_FLOAT32, DEEPEP4J_BFLOAT16, DEEPEP4J_FLOAT16};
    s.dtype = dtypes[rng() % 3];
    s.hidden = (s.dtype == DEEPEP4J_FLOAT32 ? 4 : 8) * int64_t(1 + rng() % 40);
    int32_t chunk = int32_t(1 + rng() % 6), ring = chunk + int32_t(rng() % 10), sms = 2 * int32_t(1 + rng() % 4);
    deepep4j_config cfg = ep::small_config(s, ring, chunk, sms);
    cfg.num_threads = int32_t(rng() % 4);
    std::vector<int64_t> tokens;
    for (int32_t r = 0; r < s.num_ranks; ++r) tokens.push_back(rng() % 5 == 0 ? 0 : int64_t(rng() % 120));
    ep::StepOptions o;
    o.weighted_combine = rng() % 2 == 0;
    o.combine_weights = rng() % 3 == 0;
    o.send_weights = o.weighted_combine || o.combine_weights || rng() % 2 == 0;
    ep::run_and_verify(s, tokens, cfg, o, rng(),
                       t::fmt("sweep %d: R=%d E=%d K=%d H=%lld dtype=%d ring=%d chunk=%d sms=%d threads=%d", run,
                              s.num_ranks, s.num_experts, s.num_topk, (long long)s.hidden, s.dtype, ring, chunk, sms,
                              cfg.num_threads));
  }
}

// fp8 e4m3 dispatch moves bytes and their fp32 scales unchanged (combine is fp32/bf16/fp16 only).
TEST(fp8_dispatch_carries_bytes_and_scales) {
  for (int32_t R : {1, 2, 3}) {
    ref::Shape s;
    s.num_ranks = R;
    s.num_experts = 4 * R;
    s.num_topk = 3;
    s.hidden = 256;
    s.dtype = DEEPEP4J_FP8_E4M3;
    ep::StepOptions o;
    o.run_combine = false;
    std::vector<int64_t> tokens;
    for (int32_t r = 0; r < R; ++r) tokens.push_back(r == 1 ? 0 : 77 + r);
    ep::run_and_verify(s, tokens, ep::small_config(s, 8, 4), o, 55 + R, t::fmt("fp8 R=%d", R));
  }
}

// Tokens whose every top-k entry is -1 go nowhere and combine to zero; a step where no token goes anywhere works.
TEST(tokens_routed_nowhere) {
  ref::Shape s;
  s.num_ranks = 3;
  s.num_experts = 6;
  s.num_topk = 3;
  s.hidden = 16;
  std::vector<ref::RankInput> in = ep::make_inputs(s, {20, 0, 9}, 5);
  for (auto& x : in) std::fill(x.topk_idx.begin(), x.topk_idx.end(), -1);
  ep::Group g(3, ep::small_config(s));
  std::vector<ep::RankResult> res(3);
  ep::StepOptions o;
  o.combine_weights = true;
  ep::run_ranks(3, [&](int32_t r) { ep::run_rank(g[r], r, s, in[size_t(r)], o, &res[size_t(r)]); });
  ep::verify(s, in, res, o, "all -1");
  for (auto& r : res) {
    CHECK_EQ(r.recv.m, 0);
    for (uint8_t b : r.combined.out) CHECK_EQ(b, 0);  // +0.0f everywhere
  }
  // Half the tokens dead, half alive, in one step.
  in = ep::make_inputs(s, {50, 50, 50}, 6);
  for (auto& x : in)
    for (int64_t t = 0; t < x.n; t += 2)
      for (int32_t k = 0; k < s.num_topk; ++k) x.topk_idx[size_t(t * s.num_topk + k)] = -1;
  ep::run_ranks(3, [&](int32_t r) { ep::run_rank(g[r], r, s, in[size_t(r)], o, &res[size_t(r)]); });
  ep::verify(s, in, res, o, "every other token -1");
}

// Many steps on one group: ring counters carry over between steps and steps of different shapes follow each other.
TEST(consecutive_steps_on_one_group) {
  ref::Shape s;
  s.num_ranks = 4;
  s.num_experts = 16;
  s.num_topk = 4;
  s.hidden = 64;
  deepep4j_config cfg = ep::small_config(s, 8, 4);
  ep::Group g(4, cfg);
  std::mt19937_64 rng(77);
  for (int step = 0; step < 12; ++step) {
    ref::Shape st = s;
    st.dtype = step % 3 == 0 ? DEEPEP4J_FLOAT32 : step % 3 == 1 ? DEEPEP4J_BFLOAT16 : DEEPEP4J_FLOAT16;
    st.hidden = st.dtype == DEEPEP4J_FLOAT32 ? 64 : 120;
    st.num_topk = int32_t(1 + rng() % 4);
    std::vector<int64_t> tokens;
    for (int r = 0; r < 4; ++r) tokens.push_back(int64_t(rng() % 90));
    std::vector<ref::RankInput> in = ep::make_inputs(st, tokens, 1000 + step);
    std::vector<ep::RankResult> res(4);
    ep::StepOptions o;
    o.weighted_combine = step % 2 == 1;
    ep::run_ranks(4, [&](int32_t r) { ep::run_rank(g[r], r, st, in[size_t(r)], o, &res[size_t(r)]); });
    ep::verify(st, in, res, o, t::fmt("step %d", step));
  }
}

TEST_MAIN()
