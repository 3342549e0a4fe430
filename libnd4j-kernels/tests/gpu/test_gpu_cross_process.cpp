// test_gpu_cross_process.cpp — one process per rank: regions are shared with CUDA IPC handles carried in the blobs.
// Each child runs its rank on its own device and checks its results against the reference.
#include "gpu_group.h"
#include "proc_group.h"

namespace {

void cross_process(int32_t backend, int32_t R, int32_t dtype, int64_t hidden) {
  const int devices = gpu::device_count_forked();
  ref::Shape s;
  s.num_ranks = R, s.num_experts = 4 * R, s.num_topk = 3, s.hidden = hidden, s.dtype = dtype;
  deepep4j_config cfg = gpu::cuda_config(s, backend, 8, 4, 4);
  std::vector<int64_t> tokens;
  for (int32_t r = 0; r < R; ++r) tokens.push_back(120 + 13 * r);
  std::vector<int> codes = proc::run_processes(
      R, cfg,
      [&](int32_t r, deepep4j_buffer* b) {
        std::vector<ref::RankInput> in = ep::make_inputs(s, tokens, 41);
        for (int step = 0; step < 2; ++step) {
          ep::StepOptions o;
          o.weighted_combine = step == 1;
          o.run_combine = dtype != DEEPEP4J_FP8_E4M3;
          std::vector<ep::RankResult> res;
          for (int32_t d = 0; d < R; ++d) res.push_back(gpu::expected_result(s, in, o, d));
          res[size_t(r)] = ep::RankResult{};
          gpu::run_rank(b, r % devices, r, s, in[size_t(r)], o, &res[size_t(r)]);
          ep::verify(s, in, res, o, t::fmt("%s process rank %d step %d", gpu::backend_name(backend), r, step));
        }
        return 0;
      },
      120000, devices);
  for (int32_t r = 0; r < R; ++r)
    CHECK_MSG(codes[size_t(r)] == 0, "%s: rank %d exited with %d", gpu::backend_name(backend), r, codes[size_t(r)]);
}

}  // namespace

TEST(ipc_two_processes_bf16) { cross_process(DEEPEP4J_BACKEND_DEEPEP, 2, DEEPEP4J_BFLOAT16, 256); }
TEST(ipc_two_processes_fp8) { cross_process(DEEPEP4J_BACKEND_DEEPEP, 2, DEEPEP4J_FP8_E4M3, 512); }
// Processes sharing a GPU would only time-slice (no MPS), so four processes need four GPUs.
TEST(ipc_four_processes_fp32) {
  if (gpu::device_count_forked() < 4) {
    std::fprintf(stderr, "  fewer than 4 GPUs: four-process case not run\n");
    return;
  }
  cross_process(DEEPEP4J_BACKEND_DEEPEP, 4, DEEPEP4J_FLOAT32, 64);
}
TEST(alltoall_two_processes_bf16) {
  if (gpu::device_count_forked() < 2) {
    std::fprintf(stderr, "  alltoall skipped: NCCL needs one GPU per rank (2 processes, fewer GPUs visible)\n");
    return;
  }
  cross_process(DEEPEP4J_BACKEND_ALLTOALL, 2, DEEPEP4J_BFLOAT16, 256);
}

GPU_TEST_MAIN()
