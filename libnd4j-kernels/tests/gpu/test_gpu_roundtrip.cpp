// test_gpu_roundtrip.cpp — both CUDA backends against the reference, ranks as threads of one process (peer access):
// every dtype, empty and uneven ranks, tiny rings (chunking, wrap-around), weighted combine, returned weights, cached
// mode with another precision, the benchmark's shape, many steps on one group, a bad input on one rank, and the rings'
// trace (config.cuda_trace).
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "gpu_group.h"

namespace {

ref::Shape shape(int32_t R, int32_t E, int32_t K, int64_t H, int32_t dtype) {
  ref::Shape s;
  s.num_ranks = R, s.num_experts = E, s.num_topk = K, s.hidden = H, s.dtype = dtype;
  return s;
}

void all_dtypes(int32_t R, int32_t ring, int32_t chunk, int32_t num_sms,
                const std::vector<int32_t>& backends = gpu::backends()) {
  for (int32_t backend : backends)
    for (int32_t dtype : {DEEPEP4J_FLOAT32, DEEPEP4J_BFLOAT16, DEEPEP4J_FLOAT16, DEEPEP4J_FP8_E4M3}) {
      if (backend == DEEPEP4J_BACKEND_ALLTOALL && R > gpu::device_count()) {
        // NCCL refuses two ranks on one GPU; the library says so before NCCL is asked.
        ref::Shape s = shape(R, 4 * R, 3, 136, dtype);
        deepep4j_config c = gpu::cuda_config(s, backend, ring, chunk, num_sms);
        std::vector<deepep4j_buffer*> b(size_t(R), nullptr);
        std::vector<std::vector<uint8_t>> blobs(size_t(R), std::vector<uint8_t>(DEEPEP4J_MAX_BLOB_BYTES));
        std::vector<size_t> lens(static_cast<size_t>(R));
        std::vector<const void*> ptrs;
        for (int32_t r = 0; r < R; ++r) {
          c.device_id = r % gpu::device_count();
          REQUIRE_OK(deepep4j_buffer_create(r, R, &c, &b[size_t(r)]));
          REQUIRE_OK(deepep4j_buffer_export(b[size_t(r)], blobs[size_t(r)].data(), blobs[size_t(r)].size(),
                                            &lens[size_t(r)]));
          ptrs.push_back(blobs[size_t(r)].data());
        }
        CHECK_ERR(deepep4j_buffer_connect(b[0], ptrs.data(), lens.data()), DEEPEP4J_ERR_INVALID_ARGUMENT,
                  "one GPU per rank");
        for (auto* x : b) deepep4j_buffer_destroy(x);
        break;
      }
      ref::Shape s = shape(R, 4 * R, 3, dtype == DEEPEP4J_FP8_E4M3 ? 256 : 136, dtype);
      gpu::Group g(R, gpu::cuda_config(s, backend, ring, chunk, num_sms));
      std::vector<int64_t> tokens;
      for (int32_t r = 0; r < R; ++r) tokens.push_back(r == 1 ? 0 : 37 + 61 * r);
      for (int variant = 0; variant < 3; ++variant) {
        ep::StepOptions o;
        o.run_combine = dtype != DEEPEP4J_FP8_E4M3;
        o.weighted_combine = variant >= 1;
        o.combine_weights = variant == 2;
        o.send_weights = variant != 0 || dtype == DEEPEP4J_FP8_E4M3;
        gpu::run_and_verify(g, s, tokens, o, 100 + variant,
                            t::fmt("%s R=%d dtype=%d ring=%d variant=%d", gpu::backend_name(backend), R, dtype, ring,
                                   variant));
      }
    }
}

}  // namespace

TEST(two_ranks_every_dtype) { all_dtypes(2, 32, 8, 4); }
TEST(two_ranks_tiny_rings) { all_dtypes(2, 2, 1, 6); }
TEST(four_ranks_every_dtype) { all_dtypes(4, 8, 4, 4); }
// A rank's own rows skip the rings (dispatch: sender and receiver blocks copy half each; combine: read from y): one rank
// has nothing else, three ranks an odd split.
TEST(one_and_three_ranks_every_dtype) {
  all_dtypes(1, 32, 8, 4, {DEEPEP4J_BACKEND_DEEPEP});
  all_dtypes(3, 8, 4, 6, {DEEPEP4J_BACKEND_DEEPEP});
}

// config.cuda_trace on the rings: after each ring step of a call that waits, every rank prints one line naming the
// call, the rank and both roles' blocks (num_sms 4: 2 senders, 2 receivers), and the step is still right.
TEST(ring_trace_lines) {
  ref::Shape s = shape(2, 8, 3, 256, DEEPEP4J_BFLOAT16);
  deepep4j_config c = gpu::cuda_config(s, DEEPEP4J_BACKEND_DEEPEP, 32, 8, 4);
  c.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_SM;
  c.stream_ordered = 0;
  c.cuda_trace = 1;
  std::fflush(stderr);
  FILE* captured = std::tmpfile();
  REQUIRE(captured != nullptr);
  const int saved = dup(2);
  dup2(fileno(captured), 2);
  {
    gpu::Group g(2, c);
    ep::StepOptions o;
    o.weighted_combine = true;
    gpu::run_and_verify(g, s, {100, 60}, o, 5, "traced ring step");
  }
  std::fflush(stderr);
  dup2(saved, 2);
  close(saved);
  std::string text;
  std::rewind(captured);
  for (int ch; (ch = std::fgetc(captured)) != EOF;) text.push_back(char(ch));
  std::fclose(captured);
  auto count = [&](const std::string& what) {
    int n = 0;
    for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
    return n;
  };
  for (const char* call : {"deepep4j_dispatch", "deepep4j_combine"})
    for (int r = 0; r < 2; ++r)
      CHECK_MSG(count(t::fmt("deepep4j trace: %s rank %d rings: kernel ", call, r)) == 1,
                "one trace line for %s on rank %d; stderr was:\n%s", call, r, text.c_str());
  CHECK_MSG(count("2 senders busy") == 4 && count("2 receivers busy") == 4, "both roles' blocks in every line:\n%s",
            text.c_str());
}

// DeepEP's benchmark shape at 512 tokens: hidden 7168, top-8 of 256 experts, bf16, 24 SMs, deep rings.
TEST(benchmark_shape_bf16) {
  for (int32_t backend : gpu::backends(2)) {
    ref::Shape s = shape(2, 256, 8, 7168, DEEPEP4J_BFLOAT16);
    gpu::Group g(2, gpu::cuda_config(s, backend, 64, 16, 24));
    ep::StepOptions o;
    o.weighted_combine = true;
    gpu::run_and_verify(g, s, {512, 300}, o, 7, t::fmt("%s benchmark shape", gpu::backend_name(backend)));
  }
}

// Steps of different shapes and dtypes on one group: ring counters carry over from step to step.
TEST(many_steps_one_group) {
  for (int32_t backend : gpu::backends(2)) {
    ref::Shape s0 = shape(2, 16, 4, 512, DEEPEP4J_BFLOAT16);
    gpu::Group g(2, gpu::cuda_config(s0, backend, 16, 4, 8));
    for (int step = 0; step < 8; ++step) {
      ref::Shape s = shape(2, 16, 1 + step % 4, step % 2 ? 512 : 128, step % 3 ? DEEPEP4J_BFLOAT16 : DEEPEP4J_FLOAT32);
      ep::StepOptions o;
      o.weighted_combine = step % 2 == 1;
      gpu::run_and_verify(g, s, {int64_t(50 + 31 * step), int64_t(200 - 17 * step)}, o, 300 + step,
                          t::fmt("%s step %d", gpu::backend_name(backend), step));
    }
  }
}

// Cached mode: the handle of a step carries new data, also as bf16 over an fp32 handle (backward's precision).
TEST(cached_mode_and_dtype_override) {
  for (int32_t backend : gpu::backends(2)) {
    const int32_t R = 2;
    ref::Shape s = shape(R, 8, 3, 128, DEEPEP4J_FLOAT32);
    gpu::Group g(R, gpu::cuda_config(s, backend, 8, 4, 4));
    std::vector<ref::RankInput> in = ep::make_inputs(s, {90, 45}, 11);
    std::vector<ep::RankResult> first(R);
    ep::StepOptions o;
    ep::run_ranks(R, [&](int32_t r) {
      gpu::run_rank(g[r], g.devices[size_t(r)], r, s, in[size_t(r)], o, &first[size_t(r)], true);
    });
    ep::verify(s, in, first, o, t::fmt("%s cached: first step", gpu::backend_name(backend)));
    for (int iter = 0; iter < 2; ++iter) {
      ref::Shape s2 = s;
      s2.dtype = iter == 0 ? DEEPEP4J_FLOAT32 : DEEPEP4J_BFLOAT16;
      std::vector<ref::RankInput> in2;
      for (int32_t r = 0; r < R; ++r) {
        ref::RankInput x = ref::make_input(s2, in[size_t(r)].n, 77 + 10 * iter + r);
        x.topk_idx = in[size_t(r)].topk_idx;
        x.topk_weights = in[size_t(r)].topk_weights;
        in2.push_back(std::move(x));
      }
      std::vector<ep::RankResult> res(R);
      ep::StepOptions o2;
      o2.weighted_combine = true;
      o2.combine_weights = iter == 1;
      ep::run_ranks(R, [&](int32_t r) {
        cudaSetDevice(g.devices[size_t(r)]);
        ep::RankResult& x = res[size_t(r)];
        deepep4j_handle* h = first[size_t(r)].handle;
        x.layout = ref::layout(s2, in2[size_t(r)]);
        x.recv.m = deepep4j_handle_num_recv_tokens(h);
        x.recv.per_local_expert = first[size_t(r)].recv.per_local_expert;
        x.recv.per_source_rank = first[size_t(r)].recv.per_source_rank;
        gpu::dispatch_into(g[r], h, s2, s2.dtype, in2[size_t(r)], true, &x.recv, s2.dtype);
        x.y = ep::make_y(x.recv, s2.hidden, s2.dtype, s2.dtype, r);
        gpu::combine_into(g[r], h, s2, s2.dtype, in2[size_t(r)].n, o2, &x);
      });
      ep::verify(s2, in2, res, o2, t::fmt("%s cached iter %d", gpu::backend_name(backend), iter));
    }
    for (auto& r : first) deepep4j_handle_destroy(r.handle);
  }
}

// An out-of-range expert id on one rank: that rank names it, the other reports the peer's error; both keep working.
TEST(bad_topk_on_one_rank) {
  for (int32_t backend : gpu::backends(2)) {
    ref::Shape s = shape(2, 8, 2, 64, DEEPEP4J_FLOAT32);
    gpu::Group g(2, gpu::cuda_config(s, backend));
    std::vector<ref::RankInput> in = ep::make_inputs(s, {10, 10}, 5);
    in[1].topk_idx[7] = 8;  // token 3, k = 1
    ep::run_ranks(2, [&](int32_t r) {
      cudaSetDevice(g.devices[size_t(r)]);
      gpu::Dev idx(in[size_t(r)].topk_idx);
      deepep4j_handle* h = nullptr;
      int64_t M = 0;
      int st = deepep4j_notify_dispatch(g[r], idx.as<int64_t>(), 10, 2, 8, 64, DEEPEP4J_FLOAT32, &h, &M, nullptr,
                                        nullptr);
      if (r == 1)
        CHECK_ERR(st, DEEPEP4J_ERR_INVALID_ARGUMENT, "topk_idx[3][1] = 8");
      else
        CHECK_ERR(st, DEEPEP4J_ERR_PEER_ERROR, "rank 1");
      CHECK(h == nullptr);
    });
    ep::StepOptions o;
    gpu::run_and_verify(g, s, {10, 10}, o, 6, t::fmt("%s after a bad step", gpu::backend_name(backend)));
  }
}

// cuda_transfer = copy_engine with landing zones too small for the step: every rank names buffer_bytes and
// leaves the outputs untouched, and the group still works with a step that fits.
TEST(copy_engine_without_room) {
  const char* was_mb = getenv("DEEPEP4J_TEST_BUFFER_MB");
  const std::string saved_mb = was_mb ? was_mb : "";
  unsetenv("DEEPEP4J_TEST_BUFFER_MB");
  {
    ref::Shape s = shape(2, 8, 2, 64, DEEPEP4J_FLOAT32);
    deepep4j_config cfg = gpu::cuda_config(s, DEEPEP4J_BACKEND_DEEPEP, 2, 1, 2);  // ring of 2 slots: zones of ~2 rows
    cfg.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_COPY_ENGINE;
    cfg.stream_ordered = 0;  // stream-ordered steps refuse copy engines
    gpu::Group g(2, cfg);
    std::vector<ref::RankInput> in = ep::make_inputs(s, {40, 40}, 9);
    ep::run_ranks(2, [&](int32_t r) {
      cudaSetDevice(g.devices[size_t(r)]);
      gpu::Dev idx(in[size_t(r)].topk_idx), x(in[size_t(r)].x);
      deepep4j_handle* h = nullptr;
      int64_t M = 0;
      REQUIRE_OK(deepep4j_notify_dispatch(g[r], idx.as<int64_t>(), 40, 2, 8, 64, DEEPEP4J_FLOAT32, &h, &M, nullptr,
                                          nullptr));
      gpu::Dev rx(size_t(M) * 64 * 4);
      rx.fill(0xEE);
      deepep4j_dispatch_args a{};
      a.x = x.p;
      a.recv_x = rx.p;
      CHECK_ERR(deepep4j_dispatch(g[r], h, -1, &a, nullptr), DEEPEP4J_ERR_INVALID_ARGUMENT, "landing zone");
      std::vector<uint8_t> after;
      rx.get(&after);
      CHECK(std::all_of(after.begin(), after.end(), [](uint8_t b) { return b == 0xEE; }));
      deepep4j_handle_destroy(h);
    });
    ep::StepOptions o;
    gpu::run_and_verify(g, s, {2, 1}, o, 10, "copy_engine: a step that fits, after one that did not");
  }
  if (was_mb) setenv("DEEPEP4J_TEST_BUFFER_MB", saved_mb.c_str(), 1);
}

GPU_TEST_MAIN()
