// test_cross_process.cpp — ranks as separate processes (fork; blobs exchanged through pipes): the same results as
// threads, and a peer that dies mid-step ends in a timeout on the survivors instead of a hang.
#include <dirent.h>

#include "ep_group.h"
#include "proc_group.h"

namespace {

// Shared-memory names this process created that are still linked (the backend names them deepep4j.<pid>.*).
int linked_names_of_this_process() {
  std::string prefix = "deepep4j." + std::to_string(getpid()) + ".";
  int n = 0;
  if (DIR* d = opendir("/dev/shm")) {
    while (dirent* e = readdir(d))
      if (std::strncmp(e->d_name, prefix.c_str(), prefix.size()) == 0) ++n;
    closedir(d);
  }
  return n;
}

void cross_process_step(int32_t R, int32_t dtype) {
  ref::Shape s;
  s.num_ranks = R;
  s.num_experts = 4 * R;
  s.num_topk = 4;
  s.hidden = dtype == DEEPEP4J_FLOAT32 ? 96 : 192;
  s.dtype = dtype;
  std::vector<int64_t> tokens;
  for (int32_t r = 0; r < R; ++r) tokens.push_back(r == R - 1 ? 0 : 120 + 31 * r);
  const uint64_t seed = 300 + uint64_t(R) * 7 + uint64_t(dtype);
  deepep4j_config cfg = ep::small_config(s, 8, 4);
  std::vector<int> codes = proc::run_processes(
      R, cfg,
      [&](int32_t r, deepep4j_buffer* b) {
        // Every process rebuilds every rank's inputs from the seed, so it can check its own results alone.
        // Once every peer has mapped the region its name is gone, so a crash leaks no shared memory.
        CHECK_MSG(linked_names_of_this_process() == 0, "rank %d: %d shared-memory name(s) still linked after connect", r,
                  linked_names_of_this_process());
        std::vector<ref::RankInput> in = ep::make_inputs(s, tokens, seed);
        for (int step = 0; step < 2; ++step) {
          ep::StepOptions o;
          o.weighted_combine = step == 1;
          o.combine_weights = step == 1;
          ep::RankResult res;
          ep::run_rank(b, r, s, in[size_t(r)], o, &res);
          ep::verify_rank(s, in, r, res, o, t::fmt("process R=%d dtype=%d step %d", R, dtype, step));
        }
        return 0;
      },
      60000);
  for (int32_t r = 0; r < R; ++r) CHECK_MSG(codes[size_t(r)] == 0, "R=%d rank %d exit code %d", R, r, codes[size_t(r)]);
}

}  // namespace

TEST(two_processes) { cross_process_step(2, DEEPEP4J_FLOAT32); }

// In one process: connected or not, destroying the buffers leaves no shared-memory name behind.
TEST(no_names_left_in_process) {
  ref::Shape s;
  s.num_ranks = 3;
  deepep4j_config cfg = ep::small_config(s);
  {
    ep::Group g(3, cfg);
    CHECK_EQ(linked_names_of_this_process(), 0);
  }
  deepep4j_buffer* lone = nullptr;
  REQUIRE_OK(deepep4j_buffer_create(1, 3, &cfg, &lone));  // never connected: its name must go with it
  CHECK_EQ(linked_names_of_this_process(), 1);             // (and the probe does see a linked name)
  deepep4j_buffer_destroy(lone);
  CHECK_EQ(linked_names_of_this_process(), 0);
}
TEST(three_processes_bf16) { cross_process_step(3, DEEPEP4J_BFLOAT16); }
TEST(four_processes_fp16) { cross_process_step(4, DEEPEP4J_FLOAT16); }

// Rank 1 completes notify and then exits without dispatching: rank 0's dispatch gives up after timeout_ms with
// DEEPEP4J_ERR_TIMEOUT naming rank 1.
TEST(peer_dies_mid_step) {
  ref::Shape s;
  s.num_ranks = 2;
  s.num_experts = 4;
  s.num_topk = 2;
  s.hidden = 64;
  deepep4j_config cfg = ep::small_config(s, 2, 1, 2, 400);
  std::vector<int> codes = proc::run_processes(
      2, cfg,
      [&](int32_t r, deepep4j_buffer* b) {
        std::vector<ref::RankInput> in = ep::make_inputs(s, {200, 200}, 9);
        // Every token visits both ranks so rank 0 must wait for rank 1's rows.
        for (auto& x : in)
          for (int64_t t = 0; t < x.n; ++t) {
            x.topk_idx[size_t(t * 2)] = 0;
            x.topk_idx[size_t(t * 2 + 1)] = 3;
          }
        deepep4j_handle* h = nullptr;
        int64_t M = 0;
        REQUIRE_OK(deepep4j_notify_dispatch(b, in[size_t(r)].topk_idx.data(), 200, 2, 4, 64, s.dtype, &h, &M, nullptr,
                                            nullptr));
        CHECK_EQ(M, 400);
        if (r == 1) _exit(0);  // dies holding the step
        std::vector<float> recv(size_t(M * 64), -9.0f);
        deepep4j_dispatch_args a{};
        a.x = in[0].x.data();
        a.recv_x = recv.data();
        int64_t t0 = proc::now_ms();
        int st = deepep4j_dispatch(b, h, -1, &a, nullptr);
        int64_t waited = proc::now_ms() - t0;
        std::string msg = deepep4j_last_error();
        CHECK_MSG(st == DEEPEP4J_ERR_TIMEOUT, "dispatch -> %s: %s", deepep4j_status_name(st), msg.c_str());
        CHECK_MSG(msg.find("rank 1") != std::string::npos, "message does not name rank 1: %s", msg.c_str());
        CHECK_MSG(waited >= 300 && waited < 10000, "waited %lld ms for a 400 ms timeout", (long long)waited);
        deepep4j_handle_destroy(h);
        return 0;
      },
      30000);
  CHECK_EQ(codes[0], 0);
  CHECK_EQ(codes[1], 0);
}

TEST_MAIN()
