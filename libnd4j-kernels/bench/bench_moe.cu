// bench_moe.cu — the MoE block per rank on one GPU: forward and forward+backward ms, expert TFLOP/s, and beside it the
// GPU's dense bf16 GEMM rate on the same rows (one cublasGemmEx of N*K x H x F) from the same run. Ranks are threads;
// EP2 runs 2 ranks on one GPU (they share it, so per-rank rates are half of what one GPU per rank would give).
//   bench_moe [--tokens 4096] [--ranks 1,2] [--iters 10] [--gemm auto|grouped|loop] [--shapes H:F:E:K,...]
//             [--repeat 1] [--timeout-ms 60000]
// --repeat runs each (shape, ranks) that many times, each with new buffers and blocks (a row each): the 2-ranks-on-
// one-GPU runs repeated catch a step that deadlocks only sometimes.
// Weights and activations are random (a hash filled on the device), bf16.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "cuda/moe/cublas_api.h"
#include "deepep4j.h"
#include "moe/moe_block.h"

namespace {

__global__ void fill_kernel(__nv_bfloat16* p, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    uint64_t z = (uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    p[i] = __float2bfloat16((float(z >> 40) / float(1 << 24) * 2.0f - 1.0f) * scale);
  }
}

void fill(void* p, int64_t n, uint64_t seed, float scale, cudaStream_t s = nullptr) {
  fill_kernel<<<4096, 256, 0, s>>>(static_cast<__nv_bfloat16*>(p), n, seed, scale);
}

// A failed call ends the process at once: every rank's thread fails the same step, and std::exit from two threads
// runs static destructors under the other threads (the likely cause of the SIGSEGV after an EP2 timeout on the H200).
#define CK(call)                                                                          \
  do {                                                                                    \
    int s_ = (call);                                                                      \
    if (s_ != 0) {                                                                        \
      std::fprintf(stderr, "%s:%d %s -> %d: %s\n", __FILE__, __LINE__, #call, s_, deepep4j_last_error()); \
      std::fflush(nullptr);                                                               \
      std::_Exit(1);                                                                      \
    }                                                                                     \
  } while (0)

struct Shape {
  int64_t h, f;
  int32_t e, k;
};

// Dense bf16 GEMM [rows x h] x [h x f] with fp32 accumulation: TFLOP/s.
double dense_rate(int64_t rows, int64_t h, int64_t f) {
  const char* why = "";
  const deepep4j::cuda::Cublas* api = deepep4j::cuda::load_cublas(&why);
  if (!api) return 0;
  deepep4j::cuda::cublasHandle_t handle;
  api->Create(&handle);
  void *a, *b, *c;
  cudaMalloc(&a, rows * h * 2);
  cudaMalloc(&b, h * f * 2);
  cudaMalloc(&c, rows * f * 2);
  fill(a, rows * h, 1, 1.0f);
  fill(b, h * f, 2, 0.05f);
  const float one = 1, zero = 0;
  auto gemm = [&] {
    api->GemmEx(handle, 0, 0, int(f), int(rows), int(h), &one, b, deepep4j::cuda::kCudaR16BF, int(f), a,
                deepep4j::cuda::kCudaR16BF, int(h), &zero, c, deepep4j::cuda::kCudaR16BF, int(f),
                deepep4j::cuda::kCublasCompute32F, deepep4j::cuda::kCublasGemmDefault);
  };
  for (int i = 0; i < 3; ++i) gemm();
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  cudaEventRecord(e0);
  const int reps = 20;
  for (int i = 0; i < reps; ++i) gemm();
  cudaEventRecord(e1);
  cudaEventSynchronize(e1);
  float ms = 0;
  cudaEventElapsedTime(&ms, e0, e1);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  api->Destroy(handle);
  return 2.0 * rows * h * f * reps / (ms * 1e-3) / 1e12;
}

struct Times {
  double fwd_ms = 0, fb_ms = 0;
};

Times run(const Shape& s, int32_t R, int64_t n, int iters, int32_t gemm, int32_t timeout_ms) {
  deepep4j_config cfg;
  deepep4j_config_init(&cfg);
  cfg.device = DEEPEP4J_DEVICE_CUDA;
  cfg.num_sms = 24;
  cfg.timeout_ms = timeout_ms;
  int64_t bytes = 0;
  CK(deepep4j_buffer_size_hint(s.h, DEEPEP4J_BFLOAT16, R, &cfg, &bytes));
  cfg.buffer_bytes = bytes;
  std::vector<deepep4j_buffer*> bufs(static_cast<size_t>(R));
  std::vector<std::vector<uint8_t>> blobs(size_t(R), std::vector<uint8_t>(DEEPEP4J_MAX_BLOB_BYTES));
  std::vector<size_t> lens(static_cast<size_t>(R));
  std::vector<const void*> ptrs;
  for (int32_t r = 0; r < R; ++r) {
    CK(deepep4j_buffer_create(r, R, &cfg, &bufs[size_t(r)]));
    CK(deepep4j_buffer_export(bufs[size_t(r)], blobs[size_t(r)].data(), blobs[size_t(r)].size(), &lens[size_t(r)]));
    ptrs.push_back(blobs[size_t(r)].data());
  }
  std::vector<Times> per(static_cast<size_t>(R));
  std::vector<std::thread> th;
  for (int32_t r = 0; r < R; ++r)
    th.emplace_back([&, r] {
      cudaSetDevice(0);
      deepep4j_buffer* b = bufs[size_t(r)];
      CK(deepep4j_buffer_connect(b, ptrs.data(), lens.data()));
      deepep4j_moe_config mc;
      deepep4j_moe_config_init(&mc);
      mc.hidden = s.h;
      mc.ffn = s.f;
      mc.num_experts = s.e;
      mc.num_topk = s.k;
      mc.dtype = DEEPEP4J_BFLOAT16;
      mc.gemm = gemm;
      mc.max_tokens = n;
      deepep4j_moe* moe = nullptr;
      CK(deepep4j_moe_create(b, &mc, &moe));
      // Expert weights filled in place (writing them through deepep4j_moe_write would need a host copy of all).
      const int64_t per_expert = 3 * s.h * s.f;
      // Every call of a rank on its own non-blocking stream (no legacy-stream or device-wide waits while the other
      // rank's kernels spin).
      cudaStream_t st;
      cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
      fill(moe->params, (s.e / R) * per_expert, 10 + r, 1.0f / std::sqrt(float(s.h)), st);
      void *x, *wr, *y, *gy, *gx, *gwr;
      cudaMalloc(&x, n * s.h * 2);
      cudaMalloc(&wr, s.h * s.e * 2);
      cudaMalloc(&y, n * s.h * 2);
      cudaMalloc(&gy, n * s.h * 2);
      cudaMalloc(&gx, n * s.h * 2);
      cudaMalloc(&gwr, s.h * s.e * 2);
      fill(x, n * s.h, 100 + r, 1.0f, st);
      fill(gy, n * s.h, 200 + r, 1e-3f, st);
      fill(wr, s.h * s.e, 300, 1.0f / std::sqrt(float(s.h)), st);
      cudaStreamSynchronize(st);
      deepep4j_moe_forward_args fa{};
      fa.memory = DEEPEP4J_MEMORY_DEVICE;
      fa.x = x;
      fa.router_weight = wr;
      fa.y = y;
      deepep4j_moe_backward_args ba{};
      ba.memory = DEEPEP4J_MEMORY_DEVICE;
      ba.grad_y = gy;
      ba.grad_x = gx;
      ba.grad_router_weight = gwr;
      ba.aux_loss_scale = 1;
      for (int i = 0; i < 3; ++i) {
        CK(deepep4j_moe_forward(moe, n, &fa, st));
        CK(deepep4j_moe_backward(moe, &ba, st));
      }
      cudaStreamSynchronize(st);
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) CK(deepep4j_moe_forward(moe, n, &fa, st));
      cudaStreamSynchronize(st);
      auto t1 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) {
        // The last step as an NVTX range, for a profile of one step: ncu --nvtx --nvtx-include "moe_step/".
        if (i == iters - 1) nvtxRangePushA("moe_step");
        CK(deepep4j_moe_forward(moe, n, &fa, st));
        CK(deepep4j_moe_backward(moe, &ba, st));
        if (i == iters - 1) nvtxRangePop();
      }
      cudaStreamSynchronize(st);
      auto t2 = std::chrono::steady_clock::now();
      per[size_t(r)].fwd_ms = std::chrono::duration<double, std::milli>(t1 - t0).count() / iters;
      per[size_t(r)].fb_ms = std::chrono::duration<double, std::milli>(t2 - t1).count() / iters;
      for (void* p : {x, wr, y, gy, gx, gwr}) cudaFree(p);
      deepep4j_moe_destroy(moe);
      cudaStreamDestroy(st);
    });
  for (auto& t : th) t.join();
  for (auto* b : bufs) deepep4j_buffer_destroy(b);
  Times worst;
  for (auto& t : per) {
    worst.fwd_ms = std::max(worst.fwd_ms, t.fwd_ms);
    worst.fb_ms = std::max(worst.fb_ms, t.fb_ms);
  }
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  // Ranks share this GPU. Under CUDA's lazy module loading a kernel's first launch may wait for the whole device, i.e.
  // behind the other rank's spinning kernel, which waits for this rank; cuBLAS picks its kernels by shape, so the block
  // cannot load them all ahead. Eager loading (read when CUDA starts, so set first) loads every kernel at start.
  setenv("CUDA_MODULE_LOADING", "EAGER", 0);
  int64_t tokens = 4096;
  int iters = 10, repeat = 1;
  int32_t timeout_ms = 60000;
  int32_t gemm = DEEPEP4J_MOE_GEMM_AUTO;
  std::vector<int32_t> ranks = {1, 2};
  std::vector<Shape> shapes = {{2048, 768, 128, 8}, {7168, 2048, 64, 8}, {1024, 2048, 8, 2}};
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i], v = argv[i + 1];
    if (a == "--tokens") tokens = std::atoll(v.c_str());
    else if (a == "--iters") iters = std::atoi(v.c_str());
    else if (a == "--repeat") repeat = std::max(1, std::atoi(v.c_str()));
    else if (a == "--timeout-ms") timeout_ms = std::atoi(v.c_str());
    else if (a == "--gemm") gemm = v == "grouped" ? DEEPEP4J_MOE_GEMM_GROUPED : v == "loop" ? DEEPEP4J_MOE_GEMM_LOOP
                                                                                         : DEEPEP4J_MOE_GEMM_AUTO;
    else if (a == "--ranks") {
      ranks.clear();
      for (char* p = std::strtok(argv[i + 1], ","); p; p = std::strtok(nullptr, ",")) ranks.push_back(std::atoi(p));
    } else if (a == "--shapes") {
      shapes.clear();
      for (char* p = std::strtok(argv[i + 1], ","); p; p = std::strtok(nullptr, ",")) {
        Shape s{};
        std::sscanf(p, "%ld:%ld:%d:%d", &s.h, &s.f, &s.e, &s.k);
        shapes.push_back(s);
      }
    } else {
      std::fprintf(stderr, "unknown flag %s\n", a.c_str());
      return 2;
    }
  }
  if (deepep4j_cuda_device_count() == 0) {
    std::fprintf(stderr, "bench_moe: no CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf("bench_moe on %s, %ld tokens per rank, bf16, gemm %s\n", prop.name, long(tokens),
              gemm == DEEPEP4J_MOE_GEMM_AUTO ? "auto" : gemm == DEEPEP4J_MOE_GEMM_GROUPED ? "grouped" : "loop");
  std::printf("| hidden / ffn / experts / top-k | EP | fwd ms | fwd+bwd ms | expert TFLOP/s fwd | fwd+bwd | dense bf16 "
              "GEMM TFLOP/s |\n|---|---|---|---|---|---|---|\n");
  for (const Shape& s : shapes) {
    const double dense = dense_rate(tokens * s.k, s.h, s.f);
    for (int32_t R : ranks)
      for (int rep = 0; rep < repeat; ++rep) {
        Times t = run(s, R, tokens, iters, gemm, timeout_ms);
        const double flop = 2.0 * tokens * s.k * 3 * s.h * s.f;  // per rank
        std::printf("| %ld / %ld / %d / %d | %d | %.3f | %.3f | %.0f | %.0f | %.0f |\n", long(s.h), long(s.f), s.e,
                    s.k, R, t.fwd_ms, t.fb_ms, flop / t.fwd_ms / 1e9, 3 * flop / t.fb_ms / 1e9, dense);
        std::fflush(stdout);
      }
  }
  return 0;
}
