// test_layout.cpp — deepep4j_get_dispatch_layout against the naive count on random routings (layout needs no peer, so
// one unconnected buffer per shape is enough).
#include "ep_group.h"

TEST(layout_matches_naive_count) {
  std::mt19937_64 rng(11);
  int cases = 0;
  for (int32_t R : {1, 2, 3, 4, 8}) {
    for (int rep = 0; rep < 6; ++rep) {
      ref::Shape s;
      s.num_ranks = R;
      s.num_experts = R * int32_t(1 + rng() % 8);
      s.num_topk = int32_t(1 + rng() % std::min(8, s.num_experts));
      int64_t n = rep == 0 ? 0 : int64_t(rng() % 300);
      ref::RankInput in = ref::make_input(s, n, rng(), 0.2, 0.1);
      deepep4j_config cfg = ep::small_config(s);
      deepep4j_buffer* b = nullptr;
      REQUIRE_OK(deepep4j_buffer_create(int32_t(rng() % uint64_t(R)), R, &cfg, &b));
      std::vector<int32_t> per_rank(static_cast<size_t>(R), -1), per_expert(size_t(s.num_experts), -1);
      std::vector<uint8_t> in_rank(size_t(n * R), 0xEE);
      int st = deepep4j_get_dispatch_layout(b, in.topk_idx.data(), n, s.num_topk, s.num_experts, per_rank.data(),
                                            per_expert.data(), in_rank.data(), nullptr);
      CHECK_MSG(st == DEEPEP4J_OK, "R=%d E=%d K=%d N=%lld: %s", R, s.num_experts, s.num_topk, (long long)n,
                deepep4j_last_error());
      ref::Layout l = ref::layout(s, in);
      CHECK_MSG(per_rank == l.per_rank, "R=%d N=%lld: num_tokens_per_rank", R, (long long)n);
      CHECK_MSG(per_expert == l.per_expert, "R=%d N=%lld: num_tokens_per_expert", R, (long long)n);
      CHECK_MSG(in_rank == l.in_rank, "R=%d N=%lld: is_token_in_rank", R, (long long)n);
      // Every output is optional: each alone gives the same values.
      std::vector<int32_t> only_rank(static_cast<size_t>(R), -1);
      REQUIRE_OK(deepep4j_get_dispatch_layout(b, in.topk_idx.data(), n, s.num_topk, s.num_experts, only_rank.data(),
                                              nullptr, nullptr, nullptr));
      CHECK(only_rank == l.per_rank);
      std::vector<uint8_t> only_in_rank(size_t(n * R), 0xEE);
      REQUIRE_OK(deepep4j_get_dispatch_layout(b, in.topk_idx.data(), n, s.num_topk, s.num_experts, nullptr, nullptr,
                                              only_in_rank.data(), nullptr));
      CHECK(only_in_rank == l.in_rank);
      deepep4j_buffer_destroy(b);
      ++cases;
    }
  }
  CHECK_EQ(cases, 30);
}

TEST(layout_hand_checked_example) {
  // 4 experts on 2 ranks (rank 0: experts 0,1; rank 1: experts 2,3), K = 2.
  ref::Shape s;
  s.num_ranks = 2;
  s.num_experts = 4;
  deepep4j_config cfg = ep::small_config(s);
  deepep4j_buffer* b = nullptr;
  REQUIRE_OK(deepep4j_buffer_create(0, 2, &cfg, &b));
  const int64_t idx[] = {0, 1,     // both on rank 0: counts once for rank 0
                         2, -1,    // rank 1
                         -1, -1,   // nowhere
                         3, 0};    // both ranks
  int32_t per_rank[2], per_expert[4];
  uint8_t in_rank[8];
  REQUIRE_OK(deepep4j_get_dispatch_layout(b, idx, 4, 2, 4, per_rank, per_expert, in_rank, nullptr));
  CHECK_EQ(per_rank[0], 2);
  CHECK_EQ(per_rank[1], 2);
  CHECK_EQ(per_expert[0], 2);
  CHECK_EQ(per_expert[1], 1);
  CHECK_EQ(per_expert[2], 1);
  CHECK_EQ(per_expert[3], 1);
  const uint8_t want[8] = {1, 0, 0, 1, 0, 0, 1, 1};
  CHECK(std::memcmp(in_rank, want, 8) == 0);
  deepep4j_buffer_destroy(b);
}

TEST(layout_rejects_bad_routing_and_leaves_outputs) {
  ref::Shape s;
  s.num_ranks = 2;
  s.num_experts = 4;
  deepep4j_config cfg = ep::small_config(s);
  deepep4j_buffer* b = nullptr;
  REQUIRE_OK(deepep4j_buffer_create(0, 2, &cfg, &b));
  int32_t per_rank[2] = {-5, -5}, per_expert[4] = {-5, -5, -5, -5};
  uint8_t in_rank[4] = {9, 9, 9, 9};
  const int64_t too_big[] = {0, 4, 1, 2};
  CHECK_ERR(deepep4j_get_dispatch_layout(b, too_big, 2, 2, 4, per_rank, per_expert, in_rank, nullptr),
            DEEPEP4J_ERR_INVALID_ARGUMENT, "topk_idx[0,1] = 4", "num_experts = 4");
  const int64_t too_small[] = {0, 1, -2, 2};
  CHECK_ERR(deepep4j_get_dispatch_layout(b, too_small, 2, 2, 4, per_rank, per_expert, in_rank, nullptr),
            DEEPEP4J_ERR_INVALID_ARGUMENT, "topk_idx[1,0] = -2");
  const int64_t ok_idx[] = {0, 1, 2, 3};
  CHECK_ERR(deepep4j_get_dispatch_layout(b, ok_idx, 2, 2, 3, per_rank, per_expert, in_rank, nullptr),
            DEEPEP4J_ERR_INVALID_ARGUMENT, "num_experts = 3", "num_ranks = 2");
  CHECK_ERR(deepep4j_get_dispatch_layout(b, ok_idx, 2, 0, 4, per_rank, per_expert, in_rank, nullptr),
            DEEPEP4J_ERR_INVALID_ARGUMENT, "num_topk = 0");
  CHECK_ERR(deepep4j_get_dispatch_layout(b, ok_idx, 1, DEEPEP4J_MAX_TOPK + 1, 4, per_rank, per_expert, in_rank,
                                         nullptr),
            DEEPEP4J_ERR_INVALID_ARGUMENT, "num_topk = 33");
  CHECK_ERR(deepep4j_get_dispatch_layout(b, ok_idx, -1, 2, 4, per_rank, per_expert, in_rank, nullptr),
            DEEPEP4J_ERR_INVALID_ARGUMENT, "num_tokens = -1");
  CHECK_ERR(deepep4j_get_dispatch_layout(b, nullptr, 2, 2, 4, per_rank, per_expert, in_rank, nullptr),
            DEEPEP4J_ERR_INVALID_ARGUMENT, "topk_idx = NULL");
  CHECK(per_rank[0] == -5 && per_rank[1] == -5);
  for (int32_t v : per_expert) CHECK_EQ(v, -5);
  for (uint8_t v : in_rank) CHECK_EQ(v, 9);
  CHECK_ERR(deepep4j_get_dispatch_layout(nullptr, ok_idx, 2, 2, 4, per_rank, per_expert, in_rank, nullptr),
            DEEPEP4J_ERR_INVALID_ARGUMENT, "buf = NULL");
  deepep4j_buffer_destroy(b);
}

TEST_MAIN()
