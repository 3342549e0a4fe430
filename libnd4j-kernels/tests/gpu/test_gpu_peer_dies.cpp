// test_gpu_peer_dies.cpp — a rank that stops taking part mid-step: the other rank's call ends with
// DEEPEP4J_ERR_TIMEOUT within timeout_ms (plus launch slack), never a hang or a trap, and the buffer then refuses
// further steps with DEEPEP4J_ERR_STATE.
#include <algorithm>
#include <chrono>

#include "gpu_group.h"
#include "proc_group.h"

namespace {

constexpr int kTimeoutMs = 1500;

int64_t ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0).count();
}

// Stream-ordered survivor: dispatch and combine are queued and return at once; deepep4j_buffer_sync reports the
// timeout within timeout_ms (plus slack); the combine queued after the timed-out dispatch moved nothing.
int queued_survivor(deepep4j_buffer* b, int device, const ref::Shape& s, const ref::RankInput& in, const char* label) {
  cudaSetDevice(device);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  gpu::Dev idx(in.topk_idx), x(in.x);
  deepep4j_handle* h = nullptr;
  int64_t M = 0;
  REQUIRE_OK(deepep4j_notify_dispatch(b, idx.as<int64_t>(), in.n, s.num_topk, s.num_experts, s.hidden, s.dtype, &h,
                                      &M, nullptr, stream));
  const size_t row = size_t(s.hidden) * ref::elem_size(s.dtype);
  gpu::Dev rx(size_t(M) * row), y(size_t(M) * row), out(size_t(in.n) * row);
  out.fill(0xEE), y.fill(0);
  CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
  deepep4j_dispatch_args a{};
  a.x = x.p;
  a.recv_x = rx.p;
  deepep4j_combine_args c{};
  c.y = y.p, c.out = out.p;
  auto t0 = std::chrono::steady_clock::now();
  REQUIRE_OK(deepep4j_dispatch(b, h, -1, &a, stream));
  REQUIRE_OK(deepep4j_combine(b, h, s.dtype, &c, stream));
  const int64_t queued = ms_since(t0);
  CHECK_MSG(queued < 500, "%s: queueing dispatch + combine took %lld ms", label, (long long)queued);
  int st = deepep4j_buffer_sync(b, stream);
  int64_t took = ms_since(t0);
  CHECK_ERR(st, DEEPEP4J_ERR_TIMEOUT, "a queued step failed", "timeout_ms = 1500");
  CHECK_MSG(took < kTimeoutMs + 3000, "%s: sync returned after %lld ms", label, (long long)took);
  std::fprintf(stderr, "  %s: survivor got %s after %lld ms: %s\n", label, deepep4j_status_name(st), (long long)took,
               deepep4j_last_error());
  std::vector<uint8_t> got;
  out.get(&got);
  CHECK_MSG(std::all_of(got.begin(), got.end(), [](uint8_t v) { return v == 0xEE; }),
            "%s: the combine queued after the timed-out dispatch wrote out", label);
  CHECK_ERR(deepep4j_dispatch(b, h, -1, &a, stream), DEEPEP4J_ERR_STATE, "recreate");
  CHECK_EQ(cudaDeviceSynchronize(), cudaSuccess);  // no sticky CUDA error: the kernels ended on their own
  cudaStreamDestroy(stream);
  deepep4j_handle_destroy(h);
  return 0;
}

// Rank 0 dispatches and combines as usual; rank 1 notifies, then goes quiet (thread returns / process exits).
int survivor(deepep4j_buffer* b, int device, const ref::Shape& s, const ref::RankInput& in, const char* label) {
  cudaSetDevice(device);
  gpu::Dev idx(in.topk_idx), x(in.x);
  deepep4j_handle* h = nullptr;
  int64_t M = 0;
  REQUIRE_OK(deepep4j_notify_dispatch(b, idx.as<int64_t>(), in.n, s.num_topk, s.num_experts, s.hidden, s.dtype, &h,
                                      &M, nullptr, nullptr));
  gpu::Dev rx(size_t(M * s.hidden) * ref::elem_size(s.dtype));
  deepep4j_dispatch_args a{};
  a.x = x.p;
  a.recv_x = rx.p;
  auto t0 = std::chrono::steady_clock::now();
  int st = deepep4j_dispatch(b, h, -1, &a, nullptr);
  int64_t took = ms_since(t0);
  CHECK_ERR(st, DEEPEP4J_ERR_TIMEOUT, "timeout_ms = 1500");
  CHECK_MSG(took < kTimeoutMs + 3000, "%s: dispatch returned after %lld ms", label, (long long)took);
  std::fprintf(stderr, "  %s: survivor got %s after %lld ms: %s\n", label, deepep4j_status_name(st), (long long)took,
               deepep4j_last_error());
  CHECK_ERR(deepep4j_dispatch(b, h, -1, &a, nullptr), DEEPEP4J_ERR_STATE, "recreate");
  CHECK_EQ(cudaDeviceSynchronize(), cudaSuccess);  // no sticky CUDA error: the kernel ended on its own
  deepep4j_handle_destroy(h);
  return 0;
}

void quiet(deepep4j_buffer* b, int device, const ref::Shape& s, const ref::RankInput& in) {
  cudaSetDevice(device);
  gpu::Dev idx(in.topk_idx);
  deepep4j_handle* h = nullptr;
  int64_t M = 0;
  REQUIRE_OK(deepep4j_notify_dispatch(b, idx.as<int64_t>(), in.n, s.num_topk, s.num_experts, s.hidden, s.dtype, &h,
                                      &M, nullptr, nullptr));
  deepep4j_handle_destroy(h);
}

// Every token has experts on both ranks' sides often enough that both directions carry rows.
std::vector<ref::RankInput> inputs(const ref::Shape& s) {
  return {ref::make_input(s, 200, 3, 0.0, 0.0), ref::make_input(s, 200, 4, 0.0, 0.0)};
}

ref::Shape small_shape() {
  ref::Shape s;
  s.num_ranks = 2, s.num_experts = 8, s.num_topk = 2, s.hidden = 256, s.dtype = DEEPEP4J_BFLOAT16;
  return s;
}

void threads_case(int32_t backend) {
  ref::Shape s = small_shape();
  std::vector<ref::RankInput> in = inputs(s);
  gpu::Group g(2, gpu::cuda_config(s, backend, 4, 2, 4, kTimeoutMs));
  ep::run_ranks(2, [&](int32_t r) {
    if (r == 0)
      survivor(g[0], g.devices[0], s, in[0], gpu::backend_name(backend));
    else
      quiet(g[1], g.devices[1], s, in[1]);
  });
}

}  // namespace

// Runs first: a process that has used CUDA cannot fork CUDA ranks.
// The peer process exits after notify; its region stays mapped by the survivor until the survivor lets go.
TEST(deepep_peer_process_exits) {
  ref::Shape s = small_shape();
  const int devices = gpu::device_count_forked();
  deepep4j_config cfg = gpu::cuda_config(s, DEEPEP4J_BACKEND_DEEPEP, 4, 2, 4, kTimeoutMs);
  std::vector<int> codes = proc::run_processes(
      2, cfg,
      [&](int32_t r, deepep4j_buffer* b) {
        std::vector<ref::RankInput> in = inputs(s);
        if (r == 1) {
          quiet(b, r % devices, s, in[1]);
          _exit(0);  // dies without destroying anything
        }
        return survivor(b, r % devices, s, in[0], "deepep process");
      },
      60000, devices);
  CHECK_MSG(codes[0] == 0, "survivor exited with %d", codes[0]);
  CHECK_MSG(codes[1] == 0, "quiet rank exited with %d", codes[1]);
}

// The same with stream-ordered steps, the peer a process that exits.
TEST(deepep_peer_process_exits_under_stream_ordered_steps) {
  ref::Shape s = small_shape();
  const int devices = gpu::device_count_forked();
  deepep4j_config cfg = gpu::cuda_config(s, DEEPEP4J_BACKEND_DEEPEP, 4, 2, 4, kTimeoutMs);
  cfg.stream_ordered = 1, cfg.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_SM;
  std::vector<int> codes = proc::run_processes(
      2, cfg,
      [&](int32_t r, deepep4j_buffer* b) {
        std::vector<ref::RankInput> in = inputs(s);
        if (r == 1) {
          quiet(b, r % devices, s, in[1]);
          _exit(0);
        }
        return queued_survivor(b, r % devices, s, in[0], "deepep process, stream-ordered");
      },
      60000, devices);
  CHECK_MSG(codes[0] == 0, "survivor exited with %d", codes[0]);
  CHECK_MSG(codes[1] == 0, "quiet rank exited with %d", codes[1]);
}

TEST(deepep_peer_stops_in_process) { threads_case(DEEPEP4J_BACKEND_DEEPEP); }
TEST(deepep_peer_stops_in_process_under_stream_ordered_steps) {
  ref::Shape s = small_shape();
  std::vector<ref::RankInput> in = inputs(s);
  deepep4j_config cfg = gpu::cuda_config(s, DEEPEP4J_BACKEND_DEEPEP, 4, 2, 4, kTimeoutMs);
  cfg.stream_ordered = 1, cfg.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_SM;
  gpu::Group g(2, cfg);
  ep::run_ranks(2, [&](int32_t r) {
    if (r == 0)
      queued_survivor(g[0], g.devices[0], s, in[0], "deepep threads, stream-ordered");
    else
      quiet(g[1], g.devices[1], s, in[1]);
  });
}
TEST(alltoall_peer_stops_in_process) {
  if (gpu::backends(2).size() < 2) return;  // says why
  threads_case(DEEPEP4J_BACKEND_ALLTOALL);
}

GPU_TEST_MAIN()
