// bench_ep_cuda.cu — bench_ep --device cuda: dispatch and combine on R GPUs (one thread per rank, rank r on device
// r % devices) for both backends, printed beside the raw peer-to-peer copy bandwidth measured in the same run.
//
//   bench_ep --device cuda [--tokens 128,512,4096,8192] [--hidden 7168] [--topk 8] [--experts 256] [--ranks 2]
//            [--dtypes bf16,fp8] [--backends deepep-sm,deepep-ce,alltoall] [--num-sms 24] [--ring-tokens 0]
//            [--chunk 0] [--buffer-mb 0] [--timeout-ms 30000] [--iters 20] [--warmup 5] [--seed 1] [--sweep]
//
// Backends: deepep-sm = the NVLink backend with SM ring kernels (config.cuda_transfer = sm), deepep-ce = the same
// with copy-engine transfers (copy_engine), deepep = its default (auto), deepep-queued = SM rings with
// config.stream_ordered = 1 (calls queue their step and return), alltoall = NCCL.
// With deepep-queued the run also prints: the empty step's fixed cost (N = 0; sync vs queued calls, and queued
// dispatch + combine pairs back to back), notify -> dispatch -> combine replayed from a CUDA graph against the same
// calls made eagerly, and an async combine beside a ~1 ms compute-bound kernel (FMA chains on the SMs the ranks'
// combines leave free) against each alone. Every run ends with the copy floor: each rank's received bf16 bytes copied
// once by a plain kernel on --num-sms SMs and on the rank's share of the GPU, all ranks at once. --buffer-mb 0 sizes the
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
#include <chrono>
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
  std::vector<std::string> dtypes{"bf16", "fp8"}, backends{"deepep-sm", "deepep-queued", "deepep-ce", "alltoall"};
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
    if (b != "deepep" && b != "deepep-sm" && b != "deepep-queued" && b != "deepep-ce" && b != "alltoall")
      die("--backends: " + b + " is not one of deepep, deepep-sm, deepep-queued, deepep-ce, alltoall");
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

// Every rank's stream, created once for the whole run. Ranks of one process that share a GPU must never share a
// hardware work queue (one rank's spinning kernel at the head of a queue would hold back the other rank's launches:
// a hang until timeout_ms), and the driver spreads streams over only CUDA_DEVICE_MAX_CONNECTIONS queues, so the
// bench creates as few streams as it can: these, and each buffer's own two.
struct RankStreams {
  std::vector<cudaStream_t> s;
  explicit RankStreams(int ranks) : s(size_t(ranks)) {
    for (int r = 0; r < ranks; ++r) {
      cuda_must(cudaSetDevice(device_of(r)), "cudaSetDevice");
      cuda_must(cudaStreamCreateWithFlags(&s[size_t(r)], cudaStreamNonBlocking), "stream");
    }
  }
  RankStreams(const RankStreams&) = delete;
  ~RankStreams() {
    for (cudaStream_t x : s) cudaStreamDestroy(x);
  }
  cudaStream_t operator[](int r) const { return s[size_t(r)]; }
};

struct Group {
  std::vector<deepep4j_buffer*> bufs;
  Group(const Opts& o, const std::string& name, int32_t num_sms, int32_t ring, int32_t chunk) : bufs(size_t(o.ranks)) {
    const int32_t backend = name == "alltoall" ? DEEPEP4J_BACKEND_ALLTOALL : DEEPEP4J_BACKEND_DEEPEP;
    deepep4j_config c;
    deepep4j_config_init(&c);
    c.stream_ordered = name == "deepep-queued" ? 1 : 0;
    c.cuda_transfer = name == "deepep-sm" || name == "deepep-queued" ? DEEPEP4J_CUDA_TRANSFER_SM
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
    if (name != "deepep-sm" && name != "deepep-queued" && name != "alltoall") {
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
  double rows = 0;  // rows a rank receives, mean over ranks
};

// Rank r's routing (top-k distinct random experts per token, weights in (0, 1]) and rows of `es`-byte elements.
void make_inputs(const Opts& o, int r, int64_t tokens, size_t es, std::vector<int64_t>* idx, std::vector<float>* w,
                 std::vector<uint8_t>* x) {
  std::mt19937_64 rng(o.seed * 1000 + uint64_t(r) + 7 * uint64_t(tokens));
  idx->assign(size_t(tokens * o.topk), 0);
  w->assign(idx->size(), 0.0f);
  std::vector<int32_t> perm(size_t(o.experts));
  for (int64_t t = 0; t < tokens; ++t) {
    for (int e = 0; e < o.experts; ++e) perm[size_t(e)] = e;
    for (int k = 0; k < o.topk; ++k) {
      std::swap(perm[size_t(k)], perm[size_t(k + int(rng() % uint64_t(o.experts - k)))]);
      (*idx)[size_t(t * o.topk + k)] = perm[size_t(k)];
      (*w)[size_t(t * o.topk + k)] = float(1 + rng() % 8) / 8.0f;
    }
  }
  x->assign(size_t(tokens * o.hidden) * es, 0);
  for (auto& b : *x) b = uint8_t(rng() & 0x3f);  // small finite values in every dtype
}

// Mean over iterations (after warm-up) of the slowest rank's time, in microseconds.
double slowest_mean_us(const std::vector<std::vector<float>>& ms, int warmup) {
  double sum = 0;
  int n = 0;
  for (size_t it = size_t(warmup); it < ms[0].size(); ++it, ++n) {
    float m = 0;
    for (const auto& per_rank : ms) m = std::max(m, per_rank[it]);
    sum += m;
  }
  return n ? sum / n * 1000.0 : 0.0;
}

template <class T>
T* dev_copy(const std::vector<T>& v) {
  void* p = nullptr;
  cuda_must(cudaMalloc(&p, v.size() * sizeof(T) + 16), "cudaMalloc");
  if (!v.empty()) cuda_must(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "copy");
  return static_cast<T*>(p);
}

void* dev_alloc(size_t bytes) {
  void* p = nullptr;
  cuda_must(cudaMalloc(&p, bytes + 16), "cudaMalloc");
  return p;
}

// A rank's thread setup for the stream-ordered rows: its device, its stream, and `tokens` bf16 tokens' routing inputs
// on the device; freed with the object.
struct RankInputs {
  cudaStream_t s = nullptr;
  int64_t* idx = nullptr;
  float* w = nullptr;
  uint8_t* x = nullptr;
  RankInputs(const Opts& o, const RankStreams& streams, int r, int64_t tokens) : s(streams[r]) {
    cuda_must(cudaSetDevice(device_of(r)), "cudaSetDevice");
    std::vector<int64_t> hi;
    std::vector<float> hw;
    std::vector<uint8_t> hx;
    make_inputs(o, r, tokens, 2, &hi, &hw, &hx);
    idx = dev_copy(hi), w = dev_copy(hw), x = dev_copy(hx);
  }
  RankInputs(const RankInputs&) = delete;
  ~RankInputs() {
    for (void* p : {(void*)idx, (void*)w, (void*)x}) cudaFree(p);
  }
};

// Times `body` on every rank at once: ranks released together, CUDA events on the rank's stream around it.
struct Timer {
  SpinBarrier& bar;
  cudaStream_t s;
  cudaEvent_t e0, e1;
  void* flush = nullptr;  // L2 flush before each timing when set
  Timer(SpinBarrier& b, cudaStream_t st) : bar(b), s(st) {
    cuda_must(cudaEventCreate(&e0), "event");
    cuda_must(cudaEventCreate(&e1), "event");
  }
  ~Timer() {
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
  }
  template <class Body>
  float ms(Body&& body) {
    if (flush) cuda_must(cudaMemsetAsync(flush, 1, size_t(256) << 20, s), "flush L2");
    cuda_must(cudaStreamSynchronize(s), "sync");
    bar.wait();
    cuda_must(cudaEventRecord(e0, s), "record");
    body();
    cuda_must(cudaEventRecord(e1, s), "record");
    cuda_must(cudaEventSynchronize(e1), "sync");
    float t = 0;
    cuda_must(cudaEventElapsedTime(&t, e0, e1), "elapsed");
    return t;
  }
};

int32_t dtype_code(const std::string& d) {
  return d == "fp8" ? DEEPEP4J_FP8_E4M3 : d == "fp32" ? DEEPEP4J_FLOAT32 : DEEPEP4J_BFLOAT16;
}

// One shape on one group: every rank routes its tokens to top-k distinct random experts, then times dispatch (cached
// handle, as every step after notify) and combine (bf16, or fp32 for fp32 runs).
Result run_shape(const Opts& o, const RankStreams& rs, Group& g, int64_t tokens, const std::string& dtype_name) {
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
      std::vector<int64_t> idx;
      std::vector<float> w;
      std::vector<uint8_t> x;
      make_inputs(o, r, tokens, es, &idx, &w, &x);
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
      const cudaStream_t s = rs[r];
      Timer tm(bar, s);
      tm.flush = flush;
      for (int it = 0; it < total; ++it) {
        t_disp[size_t(r)][size_t(it)] = tm.ms([&] { must(deepep4j_dispatch(b, h, -1, &da, s), "dispatch", r); });
        t_comb[size_t(r)][size_t(it)] = tm.ms([&] { must(deepep4j_combine(b, h, cdtype, &ca, s), "combine", r); });
      }
      deepep4j_handle_destroy(h);
      for (void* p : {d_idx, d_w, d_x, d_xs, flush, rx, rxs, rw, y, out}) cudaFree(p);
    });
  for (auto& t : th) t.join();
  Result res;
  res.dispatch_us = slowest_mean_us(t_disp, o.warmup);
  res.combine_us = slowest_mean_us(t_comb, o.warmup);
  double rows = 0;
  for (int64_t m : recv_rows) rows += double(m);
  rows /= R;  // mean rows per rank
  res.rows = rows;
  res.dispatch_gbs = rows * double(H * int64_t(es) + S * 4) / (res.dispatch_us * 1e3);
  res.combine_gbs = rows * double(H * int64_t(ces)) / (res.combine_us * 1e3);
  return res;
}

// Holds its stream until the host sets *open (at most max_ns): work queued behind it starts only once all of it is
// queued, so events around that work time the GPU alone, without the host's enqueueing.
__global__ void gate_kernel(const volatile int* open, unsigned long long max_ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t0));
  do asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t)); while (*open == 0 && t - t0 < max_ns);
}

__global__ void empty_kernel() {}

// The fixed cost of a step: N = 0 on every rank, so dispatch and combine move nothing. Single calls (events around
// each) and, for queued calls, `pairs` dispatch + combine pairs back to back (per pair); for queued calls also where
// a single call's time goes: the host's time in the call, and the GPU's time for it when it was queued behind a
// gate (so the GPU never waits for the host).
struct EmptyStep {
  double dispatch_us = 0, combine_us = 0, pair_us = 0;
  double host_dispatch_us = 0, host_combine_us = 0, gpu_dispatch_us = 0, gpu_combine_us = 0;
  double host_launch_us = 0, gpu_launch_us = 0;  // the same for one empty kernel launch: the floor of a call
};
EmptyStep run_empty_step(const Opts& o, const RankStreams& rs, Group& g, bool queued) {
  const int R = o.ranks, total = o.warmup + o.iters, pairs = 100;
  std::vector<std::vector<float>> td(size_t(R), std::vector<float>(size_t(total), 0.0f)), tc = td, tp = td;
  std::vector<std::vector<float>> hd = td, hc = td, gd = td, gc = td;  // host ms in the call; gated GPU ms
  std::vector<std::vector<float>> hl = td, gl = td;                    // the same for an empty kernel
  SpinBarrier bar(R);
  std::vector<std::thread> th;
  for (int r = 0; r < R; ++r)
    th.emplace_back([&, r] {
      cuda_must(cudaSetDevice(device_of(r)), "cudaSetDevice");
      cudaStream_t s = rs[r];
      deepep4j_buffer* b = g.bufs[size_t(r)];
      int64_t* d_idx = static_cast<int64_t*>(dev_alloc(64));
      deepep4j_handle* h = nullptr;
      int64_t M = 0;
      must(deepep4j_notify_dispatch(b, d_idx, 0, o.topk, o.experts, o.hidden, DEEPEP4J_BFLOAT16, &h, &M, nullptr, s),
           "notify_dispatch", r);
      deepep4j_dispatch_args da{};
      deepep4j_combine_args ca{};
      Timer tm(bar, s);
      volatile int* gate = nullptr;
      int* gate_dev = nullptr;
      cuda_must(cudaHostAlloc((void**)&gate, sizeof(int), cudaHostAllocMapped), "cudaHostAlloc");
      cuda_must(cudaHostGetDevicePointer((void**)&gate_dev, (void*)gate, 0), "cudaHostGetDevicePointer");
      for (int it = 0; it < total; ++it) {
        td[size_t(r)][size_t(it)] = tm.ms([&] { must(deepep4j_dispatch(b, h, -1, &da, s), "dispatch", r); });
        tc[size_t(r)][size_t(it)] =
            tm.ms([&] { must(deepep4j_combine(b, h, DEEPEP4J_BFLOAT16, &ca, s), "combine", r); });
        if (!queued) continue;
        tp[size_t(r)][size_t(it)] = tm.ms([&] {
          for (int i = 0; i < pairs; ++i) {
            must(deepep4j_dispatch(b, h, -1, &da, s), "dispatch", r);
            must(deepep4j_combine(b, h, DEEPEP4J_BFLOAT16, &ca, s), "combine", r);
          }
        }) / pairs;
        for (int phase = 0; phase < 3; ++phase) {
          cuda_must(cudaStreamSynchronize(s), "sync");
          *gate = 0;
          bar.wait();
          gate_kernel<<<1, 1, 0, s>>>(gate_dev, 1000000000ull);
          cuda_must(cudaEventRecord(tm.e0, s), "record");
          const auto h0 = std::chrono::steady_clock::now();
          if (phase == 0)
            must(deepep4j_dispatch(b, h, -1, &da, s), "dispatch", r);
          else if (phase == 1)
            must(deepep4j_combine(b, h, DEEPEP4J_BFLOAT16, &ca, s), "combine", r);
          else
            empty_kernel<<<1, 1, 0, s>>>();
          const auto h1 = std::chrono::steady_clock::now();
          cuda_must(cudaEventRecord(tm.e1, s), "record");
          bar.wait();  // every rank's call is queued: open the gates together
          *gate = 1;
          cuda_must(cudaEventSynchronize(tm.e1), "sync");
          float ms = 0;
          cuda_must(cudaEventElapsedTime(&ms, tm.e0, tm.e1), "elapsed");
          (phase == 0 ? gd : phase == 1 ? gc : gl)[size_t(r)][size_t(it)] = ms;
          (phase == 0 ? hd : phase == 1 ? hc : hl)[size_t(r)][size_t(it)] =
              float(std::chrono::duration<double, std::milli>(h1 - h0).count());
        }
      }
      cudaFreeHost(const_cast<int*>(gate));
      must(deepep4j_buffer_sync(b, s), "buffer_sync", r);
      deepep4j_handle_destroy(h);
      cudaFree(d_idx);
    });
  for (auto& t : th) t.join();
  EmptyStep e;
  e.dispatch_us = slowest_mean_us(td, o.warmup);
  e.combine_us = slowest_mean_us(tc, o.warmup);
  e.pair_us = queued ? slowest_mean_us(tp, o.warmup) : 0;
  if (queued) {
    e.host_dispatch_us = slowest_mean_us(hd, o.warmup), e.host_combine_us = slowest_mean_us(hc, o.warmup);
    e.gpu_dispatch_us = slowest_mean_us(gd, o.warmup), e.gpu_combine_us = slowest_mean_us(gc, o.warmup);
    e.host_launch_us = slowest_mean_us(hl, o.warmup), e.gpu_launch_us = slowest_mean_us(gl, o.warmup);
  }
  return e;
}

// notify -> dispatch -> combine (y = the received rows) of `tokens` tokens: replayed from a CUDA graph captured once
// (worst-case sized handle, deepep4j_notify_dispatch_queued) and made eagerly (notify_dispatch, which waits for the
// counts, then queued dispatch and combine). L2 flushed before each.
struct GraphRow {
  double graph_us = 0, eager_us = 0;
};
GraphRow run_graph_row(const Opts& o, const RankStreams& rs, Group& g, int64_t tokens) {
  const int R = o.ranks, total = o.warmup + o.iters;
  const int64_t H = o.hidden, worst = int64_t(R) * tokens;
  const int32_t dt = DEEPEP4J_BFLOAT16;
  std::vector<std::vector<float>> tg(size_t(R), std::vector<float>(size_t(total), 0.0f)), te = tg;
  SpinBarrier bar(R);
  std::vector<std::thread> th;
  for (int r = 0; r < R; ++r)
    th.emplace_back([&, r] {
      RankInputs in(o, rs, r, tokens);
      cudaStream_t s = in.s;
      int64_t* d_idx = in.idx;
      float* d_w = in.w;
      uint8_t* d_x = in.x;
      deepep4j_buffer* b = g.bufs[size_t(r)];
      void* rx = dev_alloc(size_t(worst * H) * 2);
      float* rw = static_cast<float*>(dev_alloc(size_t(worst * o.topk) * 4));
      void* out = dev_alloc(size_t(tokens * H) * 2);
      int64_t* m_dev = static_cast<int64_t*>(dev_alloc(8));
      deepep4j_dispatch_args da{};
      da.x = d_x, da.topk_weights = d_w, da.recv_x = rx, da.recv_topk_weights = rw;
      deepep4j_combine_args ca{};
      ca.y = rx, ca.recv_topk_weights = rw, ca.out = out;
      deepep4j_handle* h = nullptr;
      must(deepep4j_handle_create_queued(b, tokens, o.topk, o.experts, H, dt, worst, &h), "handle_create_queued", r);
      cudaGraph_t graph;
      cuda_must(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "begin capture");
      must(deepep4j_notify_dispatch_queued(b, h, d_idx, m_dev, nullptr, s), "notify_dispatch_queued", r);
      must(deepep4j_dispatch(b, h, -1, &da, s), "dispatch", r);
      must(deepep4j_combine(b, h, dt, &ca, s), "combine", r);
      cuda_must(cudaStreamEndCapture(s, &graph), "end capture");
      cudaGraphExec_t exec;
      cuda_must(cudaGraphInstantiate(&exec, graph, 0), "instantiate");
      Timer tm(bar, s);
      tm.flush = dev_alloc(size_t(256) << 20);
      for (int it = 0; it < total; ++it) {
        tg[size_t(r)][size_t(it)] = tm.ms([&] { cuda_must(cudaGraphLaunch(exec, s), "graph launch"); });
        deepep4j_handle* e = nullptr;
        te[size_t(r)][size_t(it)] = tm.ms([&] {
          int64_t M = 0;
          must(deepep4j_notify_dispatch(b, d_idx, tokens, o.topk, o.experts, H, dt, &e, &M, nullptr, s), "notify", r);
          must(deepep4j_dispatch(b, e, -1, &da, s), "dispatch", r);
          must(deepep4j_combine(b, e, dt, &ca, s), "combine", r);
        });
        must(deepep4j_buffer_sync(b, s), "buffer_sync", r);
        deepep4j_handle_destroy(e);
      }
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
      deepep4j_handle_destroy(h);
      for (void* p : {rx, (void*)rw, out, (void*)m_dev, tm.flush}) cudaFree(p);
    });
  for (auto& t : th) t.join();
  return {slowest_mean_us(tg, o.warmup), slowest_mean_us(te, o.warmup)};
}

// Compute-bound stand-in for a GEMM: independent FMA chains in registers, no memory traffic, one block per SM it
// is given. `iters` sets its length.
__global__ void fma_load(float* sink, int iters) {
  float a[8];
  for (int j = 0; j < 8; ++j) a[j] = float(threadIdx.x + j) * 1e-3f;
  for (int i = 0; i < iters; ++i)
    for (int j = 0; j < 8; ++j) a[j] = fmaf(a[j], 0.999f, 1e-3f);
  float t = 0;
  for (int j = 0; j < 8; ++j) t += a[j];
  if (t == 12345.0f) sink[0] = t;  // keeps the chains alive
}

// Rank 0 runs a ~1 ms fma_load on the SMs the ranks' combines leave free, beside an async combine of `tokens`
// tokens (deepep4j_combine_async, deepep4j_comm_wait); every rank combines. Times on rank 0's stream.
struct OverlapRow {
  double load_ms = 0, combine_us = 0, both_ms = 0;
  int blocks = 0;
};
OverlapRow run_overlap_row(const Opts& o, const RankStreams& rs, Group& g, int64_t tokens, int sms) {
  const int R = o.ranks, total = o.warmup + o.iters;
  const int64_t H = o.hidden;
  const int32_t dt = DEEPEP4J_BFLOAT16;
  int devices = 0;
  cudaGetDeviceCount(&devices);
  const int ranks_per_gpu = (R + devices - 1) / devices;
  OverlapRow row;
  row.blocks = std::max(1, sms - ranks_per_gpu * o.num_sms);
  std::vector<std::vector<float>> tl(size_t(R), std::vector<float>(size_t(total), 0.0f)), tc = tl, tb = tl;
  std::atomic<int> load_iters{0};
  SpinBarrier bar(R);
  std::vector<std::thread> th;
  for (int r = 0; r < R; ++r)
    th.emplace_back([&, r] {
      RankInputs in(o, rs, r, tokens);
      cudaStream_t s = in.s;
      int64_t* d_idx = in.idx;
      float* d_w = in.w;
      uint8_t* d_x = in.x;
      deepep4j_buffer* b = g.bufs[size_t(r)];
      Timer tm(bar, s);
      deepep4j_handle* h = nullptr;
      int64_t M = 0;
      must(deepep4j_notify_dispatch(b, d_idx, tokens, o.topk, o.experts, H, dt, &h, &M, nullptr, s), "notify", r);
      void* rx = dev_alloc(size_t(M * H) * 2);
      float* rw = static_cast<float*>(dev_alloc(size_t(M * o.topk) * 4));
      void* out = dev_alloc(size_t(tokens * H) * 2);
      float* sink = static_cast<float*>(dev_alloc(16));
      deepep4j_dispatch_args da{};
      da.x = d_x, da.topk_weights = d_w, da.recv_x = rx, da.recv_topk_weights = rw;
      bar.wait();  // every rank's setup calls are done before a kernel spins for the others
      must(deepep4j_dispatch(b, h, -1, &da, s), "dispatch", r);
      deepep4j_combine_args ca{};
      ca.y = rx, ca.recv_topk_weights = rw, ca.out = out;
      if (r == 0) {  // length of the load: ~1 ms alone
        const int probe = 1 << 16;
        float ms = tm.ms([&] { fma_load<<<row.blocks, 256, 0, s>>>(sink, probe); });
        ms = tm.ms([&] { fma_load<<<row.blocks, 256, 0, s>>>(sink, probe); });
        load_iters = std::max(1, int(double(probe) / std::max(ms, 1e-3f)));
      } else {
        tm.ms([] {});
        tm.ms([] {});
      }
      const int iters = load_iters.load();
      std::string where;  // names the iteration and part in a failure
      for (int it = 0; it < total; ++it) {
        tl[size_t(r)][size_t(it)] = tm.ms([&] {
          if (r == 0) fma_load<<<row.blocks, 256, 0, s>>>(sink, iters);
        });
        where = "overlap iteration " + std::to_string(it) + ", combine alone: ";
        tc[size_t(r)][size_t(it)] = tm.ms([&] {
          must(deepep4j_combine_async(b, h, dt, &ca, s), (where + "combine_async").c_str(), r);
          must(deepep4j_comm_wait(b, s), (where + "comm_wait").c_str(), r);
        });
        where = "overlap iteration " + std::to_string(it) + ", combine beside the load: ";
        tb[size_t(r)][size_t(it)] = tm.ms([&] {
          must(deepep4j_combine_async(b, h, dt, &ca, s), (where + "combine_async").c_str(), r);
          if (r == 0) fma_load<<<row.blocks, 256, 0, s>>>(sink, iters);
          must(deepep4j_comm_wait(b, s), (where + "comm_wait").c_str(), r);
        });
      }
      cuda_must(cudaGetLastError(), "fma_load");
      must(deepep4j_buffer_sync(b, s), "buffer_sync", r);
      deepep4j_handle_destroy(h);
      for (void* p : {rx, (void*)rw, out, (void*)sink}) cudaFree(p);
    });
  for (auto& t : th) t.join();
  // Rank 0's figures: the load runs there.
  std::vector<std::vector<float>> l0{tl[0]}, b0{tb[0]};
  row.load_ms = slowest_mean_us(l0, o.warmup) / 1000.0;
  row.combine_us = slowest_mean_us(tc, o.warmup);
  row.both_ms = slowest_mean_us(b0, o.warmup) / 1000.0;
  return row;
}

// One plain copy, HBM to HBM: 16-byte loads, eight per thread in flight before their stores, grid-stride.
__global__ void __launch_bounds__(768, 1) plain_copy(const int4* __restrict__ src, int4* __restrict__ dst, int64_t n) {
  constexpr int kUnroll = 8;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + stride * (kUnroll - 1) < n; i += stride * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldg(src + i + stride * u);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dst[i + stride * u] = v[u];
  }
  for (; i < n; i += stride) dst[i] = __ldg(src + i);
}

// The floor of any transfer that moves each received row once: every rank at once copies `bytes` (what it receives
// in dispatch, and sends back in combine) with plain_copy on `blocks` blocks of 768 threads (as many as a ring
// kernel has). Mean over iterations of the slowest rank, L2 flushed before each, in microseconds.
double copy_floor_us(const Opts& o, const RankStreams& rs, int64_t bytes, int blocks) {
  const int R = o.ranks, total = o.warmup + o.iters;
  std::vector<std::vector<float>> t(size_t(R), std::vector<float>(size_t(total), 0.0f));
  SpinBarrier bar(R);
  std::vector<std::thread> th;
  for (int r = 0; r < R; ++r)
    th.emplace_back([&, r] {
      cuda_must(cudaSetDevice(device_of(r)), "cudaSetDevice");
      Timer tm(bar, rs[r]);
      tm.flush = dev_alloc(size_t(256) << 20);
      void* src = dev_alloc(size_t(bytes));
      void* dst = dev_alloc(size_t(bytes));
      cuda_must(cudaMemset(src, 1, size_t(bytes)), "cudaMemset");
      for (int it = 0; it < total; ++it)
        t[size_t(r)][size_t(it)] = tm.ms([&] {
          plain_copy<<<blocks, 768, 0, rs[r]>>>(static_cast<const int4*>(src), static_cast<int4*>(dst), bytes / 16);
        });
      cuda_must(cudaGetLastError(), "plain_copy");
      for (void* p : {src, dst, tm.flush}) cudaFree(p);
    });
  for (auto& x : th) x.join();
  return slowest_mean_us(t, o.warmup);
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
  const RankStreams rs(o.ranks);
  if (o.sweep) {
    std::printf("| tokens | SMs | chunk | ring | dispatch us | GB/s | combine us | GB/s |\n|---|---|---|---|---|---|---|---|\n");
    for (int32_t sms : {24, 32, 48, 64})
      for (int32_t chunk : {12, 24, 48})
        for (int32_t ring : {96, 192}) {
          if (sms > prop.multiProcessorCount) continue;
          Group g(o, "deepep-sm", sms, ring, chunk);
          for (int64_t t : o.tokens) {
            Result r = run_shape(o, rs, g, t, "bf16");
            std::printf("| %lld | %d | %d | %d | %.1f | %.1f | %.1f | %.1f |\n", (long long)t, sms, chunk, ring,
                        r.dispatch_us, r.dispatch_gbs, r.combine_us, r.combine_gbs);
            std::fflush(stdout);
          }
        }
    return 0;
  }
  std::printf("| backend | dtype | tokens | dispatch us | dispatch GB/s | combine us | combine GB/s |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  std::vector<double> bf16_rows(o.tokens.size(), 0.0);  // rows a rank receives, per token count (bf16 runs)
  for (const std::string& be : o.backends) {
    Group g(o, be, o.num_sms, o.ring_tokens, o.chunk);
    for (const std::string& dt : o.dtypes)
      for (size_t ti = 0; ti < o.tokens.size(); ++ti) {
        const int64_t t = o.tokens[ti];
        Result r = run_shape(o, rs, g, t, dt);
        if (dt == "bf16") bf16_rows[ti] = r.rows;
        std::printf("| %s | %s | %lld | %.1f | %.1f | %.1f | %.1f |\n", be.c_str(), dt.c_str(), (long long)t,
                    r.dispatch_us, r.dispatch_gbs, r.combine_us, r.combine_gbs);
        std::fflush(stdout);
      }
  }
  std::printf("# combine carries bf16 rows (fp32 for fp32 runs); fp8 dispatch bytes include the fp32 scales\n");
  // The copy floor: what moving each rank's bf16 rows once costs on the SMs a ring kernel has, and on the rank's share
  // of the GPU's SMs, measured now (the rings move a peer's row twice: into the ring, then out of it).
  const int ranks_per_gpu = (o.ranks + n - 1) / n;
  const int share = std::max(1, prop.multiProcessorCount / ranks_per_gpu);
  std::printf("| copy floor (bf16 rows received per rank, copied once, every rank at once) | tokens | MB per rank | on "
              "%d SMs per rank: us | GB/s | on %d SMs per rank: us | GB/s |\n|---|---|---|---|---|---|---|\n",
              o.num_sms, share);
  for (size_t ti = 0; ti < o.tokens.size(); ++ti) {
    if (bf16_rows[ti] <= 0) continue;
    const int64_t bytes = (int64_t(bf16_rows[ti]) * o.hidden * 2 + 15) / 16 * 16;
    const double few = copy_floor_us(o, rs, bytes, o.num_sms), all = copy_floor_us(o, rs, bytes, share);
    std::printf("| floor | %lld | %.1f | %.1f | %.1f | %.1f | %.1f |\n", (long long)o.tokens[ti], bytes / 1e6, few,
                bytes / (few * 1e3), all, bytes / (all * 1e3));
    std::fflush(stdout);
  }
  if (std::find(o.backends.begin(), o.backends.end(), "deepep-queued") != o.backends.end()) {
    std::fflush(stdout);
    Group sync_group(o, "deepep-sm", o.num_sms, o.ring_tokens, o.chunk);
    EmptyStep es = run_empty_step(o, rs, sync_group, false);
    Group g(o, "deepep-queued", o.num_sms, o.ring_tokens, o.chunk);
    EmptyStep eq = run_empty_step(o, rs, g, true);
    std::printf("# empty step (N = 0), fixed cost: deepep-sm dispatch %.1f us / combine %.1f us; deepep-queued "
                "dispatch %.1f us / combine %.1f us; queued pairs back to back %.1f us per dispatch + combine\n",
                es.dispatch_us, es.combine_us, eq.dispatch_us, eq.combine_us, eq.pair_us);
    std::printf("# where a queued empty call goes: host time in the call dispatch %.1f us / combine %.1f us; GPU "
                "time of the call queued behind a gate dispatch %.1f us / combine %.1f us; one empty kernel "
                "the same way: host %.1f us, GPU %.1f us\n", eq.host_dispatch_us, eq.host_combine_us,
                eq.gpu_dispatch_us, eq.gpu_combine_us, eq.host_launch_us, eq.gpu_launch_us);
    std::printf("| CUDA graph (deepep-queued, bf16) | tokens | notify+dispatch+combine us, graph replay | same calls "
                "eagerly us |\n|---|---|---|---|\n");
    for (int64_t t : o.tokens) {
      if (t > 4096) continue;
      GraphRow gr = run_graph_row(o, rs, g, t);
      std::printf("| graph | %lld | %.1f | %.1f |\n", (long long)t, gr.graph_us, gr.eager_us);
      std::fflush(stdout);
    }
    int64_t overlap_tokens = 0;
    for (int64_t t : o.tokens)
      if (t <= 4096) overlap_tokens = std::max(overlap_tokens, t);
    if (overlap_tokens > 0) {
      OverlapRow ov = run_overlap_row(o, rs, g, overlap_tokens, prop.multiProcessorCount);
      std::printf("# overlap (deepep-queued, bf16, %lld tokens): compute load on %d SMs alone %.3f ms; async combine "
                  "alone %.1f us; both %.3f ms = %.2fx the load alone\n", (long long)overlap_tokens, ov.blocks,
                  ov.load_ms, ov.combine_us, ov.both_ms, ov.both_ms / ov.load_ms);
    }
  }
  return 0;
}
