// bench_ep_cuda.cu — bench_ep --device cuda: dispatch and combine on R GPUs (one thread per rank, rank r on device
// r % devices) for both backends, printed beside the raw peer-to-peer copy bandwidth measured in the same run.
//
//   bench_ep --device cuda [--tokens 128,512,4096,8192] [--hidden 7168] [--topk 8] [--experts 256] [--ranks 2]
//            [--dtypes bf16,fp8] [--backends deepep-sm,deepep-ce,alltoall] [--num-sms 24] [--ring-tokens 0]
//            [--chunk 0] [--buffer-mb 0] [--timeout-ms 30000] [--iters 20] [--warmup 5] [--seed 1] [--sweep]
//
// Backends: deepep-sm = the NVLink backend with SM ring kernels (config.cuda_transfer = sm), deepep-ce = the same
// with copy-engine transfers (copy_engine), deepep = its default (auto), alltoall = NCCL. --buffer-mb 0 sizes the
// buffer by buffer_size_hint for the rings, and for copy engines large enough for every source's whole step.
//
// Metric (DeepEP's): GB/s = rows a rank receives in dispatch (= rows it sends back in combine), self-copy included,
// x hidden x bytes per element (fp8: + the fp32 scales) / time. Time: CUDA events around one call, after warm-up, L2
// flushed before each call, ranks released together by a spin barrier; per iteration the slowest rank; mean of iters.
// --ring-tokens / --chunk 0 pick defaults (ring 128, chunk 16 for deepep). --sweep runs deepep bf16 over SM counts and
// chunk sizes and prints the best per token count.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "bench_ep_cuda.h"
#include "deepep4j.h"

namespace {

struct Opts {
  std::vector<int64_t> tokens{128, 512, 4096, 8192};
  int64_t hidden = 7168;
  int32_t topk = 8, experts = 256, ranks = 2;
  std::vector<std::string> dtypes{"bf16", "fp8"}, backends{"deepep-sm", "deepep-ce", "alltoall"};
  int32_t num_sms = 24, ring_tokens = 0, chunk = 0;
  int64_t buffer_mb = 0;
  int32_t timeout_ms = 30000;
  int iters = 20, warmup = 5;
  uint64_t seed = 1;
  bool sweep = false;
};

[[noreturn]] void die(const std::string& why) {
  std::fprintf(stderr, "bench_ep --device cuda: %s\n", why.c_str());
  std::exit(2);
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string part; std::getline(ss, part, ',');)
    if (!part.empty()) out.push_back(part);
  return out;
}

int64_t num(const std::string& flag, const std::string& v, int64_t lo, int64_t hi) {
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (end == v.c_str() || *end || x < lo || x > hi)
    die(flag + " = " + v + ": must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return x;
}

Opts parse(int argc, char** argv) {
  Opts o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--sweep") {
      o.sweep = true;
      continue;
    }
    if (i + 1 >= argc) die("missing value after " + a);
    std::string v = argv[++i];
    if (a == "--device") continue;
    if (a == "--tokens") {
      o.tokens.clear();
      for (auto& t : split(v)) o.tokens.push_back(num(a, t, 1, 1 << 20));
    } else if (a == "--hidden") o.hidden = num(a, v, 128, 1 << 16);
    else if (a == "--topk") o.topk = int32_t(num(a, v, 1, DEEPEP4J_MAX_TOPK));
    else if (a == "--experts") o.experts = int32_t(num(a, v, 1, 1 << 14));
    else if (a == "--ranks") o.ranks = int32_t(num(a, v, 1, DEEPEP4J_MAX_RANKS));
    else if (a == "--dtypes" || a == "--dtype") o.dtypes = split(v);
    else if (a == "--backends") o.backends = split(v);
    else if (a == "--num-sms") o.num_sms = int32_t(num(a, v, 2, 256));
    else if (a == "--ring-tokens") o.ring_tokens = int32_t(num(a, v, 0, 1 << 16));
    else if (a == "--chunk") o.chunk = int32_t(num(a, v, 0, 1 << 16));
    else if (a == "--buffer-mb") o.buffer_mb = num(a, v, 0, 1 << 20);
    else if (a == "--timeout-ms") o.timeout_ms = int32_t(num(a, v, 1, 1 << 30));
    else if (a == "--iters") o.iters = int(num(a, v, 1, 10000));
    else if (a == "--warmup") o.warmup = int(num(a, v, 0, 10000));
    else if (a == "--seed") o.seed = uint64_t(num(a, v, 0, 1ll << 62));
    else die("unknown flag " + a);
  }
  for (auto& d : o.dtypes)
    if (d != "bf16" && d != "fp8" && d != "fp32") die("--dtypes: " + d + " is not one of bf16, fp8, fp32");
  for (auto& b : o.backends)
    if (b != "deepep" && b != "deepep-sm" && b != "deepep-ce" && b != "alltoall")
      die("--backends: " + b + " is not one of deepep, deepep-sm, deepep-ce, alltoall");
  if (o.topk > o.experts || o.experts % o.ranks) die("--topk <= --experts and --experts % --ranks == 0 required");
  return o;
}

void cuda_must(cudaError_t e, const char* what) {
  if (e != cudaSuccess) die(std::string(what) + ": " + cudaGetErrorString(e));
}

void must(int st, const char* what, int rank) {
  if (st != DEEPEP4J_OK)
    die(std::string("rank ") + std::to_string(rank) + ": " + what + " -> " + deepep4j_status_name(st) + ": " +
        deepep4j_last_error());
}

// Spin barrier for the rank threads: releases them within microseconds of each other.
struct SpinBarrier {
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    int gen = gen_.load();
    if (count_.fetch_add(1) + 1 == n_) {
      count_.store(0);
      gen_.fetch_add(1);
    } else {
      while (gen_.load() == gen) {
      }
    }
  }
  int n_;
  std::atomic<int> count_{0}, gen_{0};
};

int device_of(int rank) {
  int n = 0;
  cudaGetDeviceCount(&n);
  return rank % n;
}

struct Group {
  std::vector<deepep4j_buffer*> bufs;
  Group(const Opts& o, const std::string& name, int32_t num_sms, int32_t ring, int32_t chunk) : bufs(size_t(o.ranks)) {
    const int32_t backend = name == "alltoall" ? DEEPEP4J_BACKEND_ALLTOALL : DEEPEP4J_BACKEND_DEEPEP;
    deepep4j_config c;
    deepep4j_config_init(&c);
    c.cuda_transfer = name == "deepep-sm"   ? DEEPEP4J_CUDA_TRANSFER_SM
                      : name == "deepep-ce" ? DEEPEP4J_CUDA_TRANSFER_COPY_ENGINE
                                            : DEEPEP4J_CUDA_TRANSFER_AUTO;
    c.device = DEEPEP4J_DEVICE_CUDA;
    c.backend = backend;
    c.num_sms = num_sms;
    c.ring_tokens = ring > 0 ? ring : 128;
    c.max_send_tokens_per_chunk = chunk > 0 ? chunk : std::min(16, c.ring_tokens);
    c.timeout_ms = o.timeout_ms;
    int64_t bytes = 0;
    must(deepep4j_buffer_size_hint(o.hidden, DEEPEP4J_BFLOAT16, o.ranks, &c, &bytes), "buffer_size_hint", 0);
    if (name != "deepep-sm" && name != "alltoall") {
      // Every source's whole step in its landing zone: rows of up to 2 bytes per element plus slot metadata.
      int64_t most = *std::max_element(o.tokens.begin(), o.tokens.end());
      bytes = std::max<int64_t>(bytes, int64_t(o.ranks) * most * (o.hidden * 2 + 1024));
    }
    if (o.buffer_mb > 0) bytes = o.buffer_mb << 20;
    c.buffer_bytes = bytes;
    std::vector<std::vector<uint8_t>> blobs(size_t(o.ranks), std::vector<uint8_t>(DEEPEP4J_MAX_BLOB_BYTES));
    std::vector<size_t> lens(size_t(o.ranks));
    for (int r = 0; r < o.ranks; ++r) {
      c.device_id = device_of(r);
      must(deepep4j_buffer_create(r, o.ranks, &c, &bufs[size_t(r)]), "buffer_create", r);
      must(deepep4j_buffer_export(bufs[size_t(r)], blobs[size_t(r)].data(), blobs[size_t(r)].size(), &lens[size_t(r)]),
           "buffer_export", r);
    }
    std::vector<const void*> ptrs;
    for (auto& b : blobs) ptrs.push_back(b.data());
    std::vector<std::thread> th;
    for (int r = 0; r < o.ranks; ++r)
      th.emplace_back([&, r] { must(deepep4j_buffer_connect(bufs[size_t(r)], ptrs.data(), lens.data()), "connect", r); });
    for (auto& t : th) t.join();
  }
  ~Group() {
    for (auto* b : bufs) deepep4j_buffer_destroy(b);
  }
};

struct Result {
  double dispatch_us = 0, combine_us = 0, dispatch_gbs = 0, combine_gbs = 0;
};

int32_t dtype_code(const std::string& d) {
  return d == "fp8" ? DEEPEP4J_FP8_E4M3 : d == "fp32" ? DEEPEP4J_FLOAT32 : DEEPEP4J_BFLOAT16;
}

// One shape on one group: every rank routes its tokens to top-k distinct random experts, then times dispatch (cached
// handle, as every step after notify) and combine (bf16, or fp32 for fp32 runs).
Result run_shape(const Opts& o, Group& g, int64_t tokens, const std::string& dtype_name) {
  const int R = o.ranks;
  const int32_t dtype = dtype_code(dtype_name);
  const int32_t cdtype = dtype == DEEPEP4J_FLOAT32 ? DEEPEP4J_FLOAT32 : DEEPEP4J_BFLOAT16;
  const size_t es = dtype == DEEPEP4J_FLOAT32 ? 4 : dtype == DEEPEP4J_FP8_E4M3 ? 1 : 2, ces = cdtype == DEEPEP4J_FLOAT32 ? 4 : 2;
  const int64_t H = o.hidden, S = dtype == DEEPEP4J_FP8_E4M3 ? H / DEEPEP4J_FP8_BLOCK : 0;
  const int total = o.warmup + o.iters;
  std::vector<std::vector<float>> t_disp(static_cast<size_t>(R), std::vector<float>(static_cast<size_t>(total)));
  std::vector<std::vector<float>> t_comb = t_disp;
  std::vector<int64_t> recv_rows(static_cast<size_t>(R));
  SpinBarrier bar(R);
  std::vector<std::thread> th;
  for (int r = 0; r < R; ++r)
    th.emplace_back([&, r] {
      cuda_must(cudaSetDevice(device_of(r)), "cudaSetDevice");
      std::mt19937_64 rng(o.seed * 1000 + uint64_t(r) + 7 * uint64_t(tokens));
      std::vector<int64_t> idx(size_t(tokens * o.topk));
      std::vector<float> w(idx.size());
      std::vector<int32_t> perm(size_t(o.experts));
      for (int64_t t = 0; t < tokens; ++t) {
        for (int e = 0; e < o.experts; ++e) perm[size_t(e)] = e;
        for (int k = 0; k < o.topk; ++k) {
          std::swap(perm[size_t(k)], perm[size_t(k + int(rng() % uint64_t(o.experts - k)))]);
          idx[size_t(t * o.topk + k)] = perm[size_t(k)];
          w[size_t(t * o.topk + k)] = float(1 + rng() % 8) / 8.0f;
        }
      }
      std::vector<uint8_t> x(size_t(tokens * H) * es);
      for (auto& b : x) b = uint8_t(rng() & 0x3f);  // small finite values in every dtype
      std::vector<float> xs(size_t(tokens * S), 1.0f);
      void *d_idx, *d_w, *d_x, *d_xs = nullptr, *flush;
      const size_t flush_bytes = size_t(256) << 20;
      cuda_must(cudaMalloc(&d_idx, idx.size() * 8), "cudaMalloc");
      cuda_must(cudaMalloc(&d_w, w.size() * 4), "cudaMalloc");
      cuda_must(cudaMalloc(&d_x, x.size() + 16), "cudaMalloc");
      cuda_must(cudaMalloc(&flush, flush_bytes), "cudaMalloc");
      if (S) cuda_must(cudaMalloc(&d_xs, xs.size() * 4), "cudaMalloc");
      cuda_must(cudaMemcpy(d_idx, idx.data(), idx.size() * 8, cudaMemcpyHostToDevice), "copy");
      cuda_must(cudaMemcpy(d_w, w.data(), w.size() * 4, cudaMemcpyHostToDevice), "copy");
      cuda_must(cudaMemcpy(d_x, x.data(), x.size(), cudaMemcpyHostToDevice), "copy");
      if (S) cuda_must(cudaMemcpy(d_xs, xs.data(), xs.size() * 4, cudaMemcpyHostToDevice), "copy");
      deepep4j_buffer* b = g.bufs[size_t(r)];
      deepep4j_handle* h = nullptr;
      int64_t M = 0;
      must(deepep4j_notify_dispatch(b, static_cast<int64_t*>(d_idx), tokens, o.topk, o.experts, H, dtype, &h, &M,
                                    nullptr, nullptr),
           "notify_dispatch", r);
      recv_rows[size_t(r)] = M;
      void *rx, *rxs = nullptr, *rw, *y, *out;
      cuda_must(cudaMalloc(&rx, size_t(M * H) * es + 16), "cudaMalloc");
      if (S) cuda_must(cudaMalloc(&rxs, size_t(M * S) * 4 + 16), "cudaMalloc");
      cuda_must(cudaMalloc(&rw, size_t(M * o.topk) * 4 + 16), "cudaMalloc");
      cuda_must(cudaMalloc(&y, size_t(M * H) * ces + 16), "cudaMalloc");
      cuda_must(cudaMalloc(&out, size_t(tokens * H) * ces + 16), "cudaMalloc");
      cuda_must(cudaMemset(y, 0x3c, size_t(M * H) * ces), "cudaMemset");
      deepep4j_dispatch_args da{};
      da.x = d_x, da.x_scales = static_cast<float*>(d_xs), da.topk_weights = static_cast<float*>(d_w);
      da.recv_x = rx, da.recv_x_scales = static_cast<float*>(rxs), da.recv_topk_weights = static_cast<float*>(rw);
      deepep4j_combine_args ca{};
      ca.y = y, ca.recv_topk_weights = static_cast<float*>(rw), ca.out = out;
      cudaEvent_t e0, e1;
      cuda_must(cudaEventCreate(&e0), "event");
      cuda_must(cudaEventCreate(&e1), "event");
      cudaStream_t s = nullptr;
      cuda_must(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "stream");
      for (int it = 0; it < total; ++it) {
        for (int phase = 0; phase < 2; ++phase) {
          cuda_must(cudaMemsetAsync(flush, it & 0xff, flush_bytes, s), "flush L2");
          cuda_must(cudaStreamSynchronize(s), "sync");
          bar.wait();
          cuda_must(cudaEventRecord(e0, s), "record");
          if (phase == 0)
            must(deepep4j_dispatch(b, h, -1, &da, s), "dispatch", r);
          else
            must(deepep4j_combine(b, h, cdtype, &ca, s), "combine", r);
          cuda_must(cudaEventRecord(e1, s), "record");
          cuda_must(cudaEventSynchronize(e1), "sync");
          float ms = 0;
          cuda_must(cudaEventElapsedTime(&ms, e0, e1), "elapsed");
          (phase == 0 ? t_disp : t_comb)[size_t(r)][size_t(it)] = ms;
        }
      }
      deepep4j_handle_destroy(h);
      for (void* p : {d_idx, d_w, d_x, d_xs, flush, rx, rxs, rw, y, out}) cudaFree(p);
      cudaEventDestroy(e0);
      cudaStreamDestroy(s);
      cudaEventDestroy(e1);
    });
  for (auto& t : th) t.join();
  Result res;
  double sd = 0, sc = 0;
  for (int it = o.warmup; it < total; ++it) {
    float md = 0, mc = 0;
    for (int r = 0; r < R; ++r) {
      md = std::max(md, t_disp[size_t(r)][size_t(it)]);
      mc = std::max(mc, t_comb[size_t(r)][size_t(it)]);
    }
    sd += md, sc += mc;
  }
  res.dispatch_us = sd / o.iters * 1000.0;
  res.combine_us = sc / o.iters * 1000.0;
  double rows = 0;
  for (int64_t m : recv_rows) rows += double(m);
  rows /= R;  // mean rows per rank
  res.dispatch_gbs = rows * double(H * int64_t(es) + S * 4) / (res.dispatch_us * 1e3);
  res.combine_gbs = rows * double(H * int64_t(ces)) / (res.combine_us * 1e3);
  return res;
}

// Raw copy bandwidth between devices 0 and 1 (one way, and each way while both run), the ceiling of any transfer.
void p2p_ceiling(double* one_way, double* both_ways) {
  const size_t bytes = size_t(256) << 20;
  void *a0, *b0, *a1, *b1;
  cudaSetDevice(0);
  cudaDeviceEnablePeerAccess(1, 0);
  cudaGetLastError();
  cuda_must(cudaMalloc(&a0, bytes), "cudaMalloc");
  cuda_must(cudaMalloc(&b0, bytes), "cudaMalloc");
  cudaSetDevice(1);
  cudaDeviceEnablePeerAccess(0, 0);
  cudaGetLastError();
  cuda_must(cudaMalloc(&a1, bytes), "cudaMalloc");
  cuda_must(cudaMalloc(&b1, bytes), "cudaMalloc");
  cudaStream_t s0, s1;
  cudaEvent_t x0, y0, x1, y1;
  cudaSetDevice(0);
  cudaStreamCreate(&s0);
  cudaEventCreate(&x0), cudaEventCreate(&y0);
  cudaSetDevice(1);
  cudaStreamCreate(&s1);
  cudaEventCreate(&x1), cudaEventCreate(&y1);
  float best1 = 1e9f, best2 = 1e9f;
  for (int it = 0; it < 6; ++it) {
    cudaSetDevice(0);
    cudaEventRecord(x0, s0);
    cudaMemcpyPeerAsync(a1, 1, a0, 0, bytes, s0);
    cudaEventRecord(y0, s0);
    cudaEventSynchronize(y0);
    float ms = 0;
    cudaEventElapsedTime(&ms, x0, y0);
    if (it > 0) best1 = std::min(best1, ms);
    cudaSetDevice(0);
    cudaEventRecord(x0, s0);
    cudaMemcpyPeerAsync(a1, 1, a0, 0, bytes, s0);
    cudaEventRecord(y0, s0);
    cudaSetDevice(1);
    cudaEventRecord(x1, s1);
    cudaMemcpyPeerAsync(b0, 0, b1, 1, bytes, s1);
    cudaEventRecord(y1, s1);
    cudaEventSynchronize(y0);
    cudaEventSynchronize(y1);
    float m0 = 0, m1 = 0;
    cudaEventElapsedTime(&m0, x0, y0);
    cudaEventElapsedTime(&m1, x1, y1);
    if (it > 0) best2 = std::min(best2, std::max(m0, m1));
  }
  cuda_must(cudaGetLastError(), "p2p copies");
  *one_way = double(bytes) / (best1 * 1e6);
  *both_ways = double(bytes) / (best2 * 1e6);
  for (void* p : {a0, b0}) cudaSetDevice(0), cudaFree(p);
  for (void* p : {a1, b1}) cudaSetDevice(1), cudaFree(p);
}

}  // namespace

int bench_ep_cuda(int argc, char** argv) {
  Opts o = parse(argc, argv);
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) die("no CUDA device visible");
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  char date[64];
  std::time_t now = std::time(nullptr);
  std::strftime(date, sizeof(date), "%Y-%m-%d %H:%M UTC", std::gmtime(&now));
  std::printf("# bench_ep --device cuda: %d rank(s) on %d x %s, %s, deepep4j %s\n", o.ranks, n, prop.name, date,
              deepep4j_version());
  std::printf("# hidden %lld, top-%d of %d experts, %d SMs, ring %d, chunk %d, %d iters after %d warm-up\n",
              (long long)o.hidden, o.topk, o.experts, o.num_sms, o.ring_tokens ? o.ring_tokens : 128,
              o.chunk ? o.chunk : 16, o.iters, o.warmup);
  if (n >= 2) {
    double one = 0, both = 0;
    p2p_ceiling(&one, &both);
    std::printf("# raw P2P copy GPU0->GPU1 (cudaMemcpyPeerAsync, 256 MiB): %.1f GB/s one way, %.1f GB/s each way "
                "when both run\n", one, both);
  }
  if (o.sweep) {
    std::printf("| tokens | SMs | chunk | ring | dispatch us | GB/s | combine us | GB/s |\n|---|---|---|---|---|---|---|---|\n");
    for (int32_t sms : {24, 32, 48, 64})
      for (int32_t chunk : {12, 24, 48})
        for (int32_t ring : {96, 192}) {
          if (sms > prop.multiProcessorCount) continue;
          Group g(o, "deepep-sm", sms, ring, chunk);
          for (int64_t t : o.tokens) {
            Result r = run_shape(o, g, t, "bf16");
            std::printf("| %lld | %d | %d | %d | %.1f | %.1f | %.1f | %.1f |\n", (long long)t, sms, chunk, ring,
                        r.dispatch_us, r.dispatch_gbs, r.combine_us, r.combine_gbs);
            std::fflush(stdout);
          }
        }
    return 0;
  }
  std::printf("| backend | dtype | tokens | dispatch us | dispatch GB/s | combine us | combine GB/s |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const std::string& be : o.backends) {
    Group g(o, be, o.num_sms, o.ring_tokens, o.chunk);
    for (const std::string& dt : o.dtypes)
      for (int64_t t : o.tokens) {
        Result r = run_shape(o, g, t, dt);
        std::printf("| %s | %s | %lld | %.1f | %.1f | %.1f | %.1f |\n", be.c_str(), dt.c_str(), (long long)t,
                    r.dispatch_us, r.dispatch_gbs, r.combine_us, r.combine_gbs);
        std::fflush(stdout);
      }
  }
  std::printf("# combine carries bf16 rows (fp32 for fp32 runs); fp8 dispatch bytes include the fp32 scales\n");
  return 0;
}
