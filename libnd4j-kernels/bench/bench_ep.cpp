// bench_ep.cpp — dispatch / combine throughput of deepep4j on R in-process CPU ranks, printed beside a plain memcpy of
// the same bytes measured in the same run (the ceiling of any copy on this machine).
//
//   bench_ep [--device cpu|cuda] [--tokens 4096] [--hidden 7168] [--topk 8] [--experts 256] [--ranks 2]
//            [--dtype fp32|bf16|fp16] [--iters 10] [--warmup 2] [--threads 0] [--num-sms 20] [--ring-tokens 128]
//            [--chunk 16] [--seed 1] [--cached 0|1]
//
// --cached 1 runs notify once and reuses its handle for every iteration (backward's pattern); by default every
// iteration makes a fresh handle (forward's pattern), as a training step does.
// Metric (DeepEP's): GB/s = rows a rank receives (dispatch) or sends back (combine) x hidden x element size / time,
// the rank's own rows included; time = slowest rank of each iteration, averaged over iterations. The memcpy row copies
// the same bytes per rank with the same number of threads per rank, all ranks at once.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "deepep4j.h"

#ifdef DEEPEP4J_BENCH_CUDA
#include "bench_ep_cuda.h"
#endif

namespace {

struct Options {
  std::string device = "cpu";
  int64_t tokens = 4096;
  int64_t hidden = 7168;
  int32_t topk = 8;
  int32_t experts = 256;
  int32_t ranks = 2;
  std::string dtype = "fp32";
  int iters = 10;
  int warmup = 2;
  int32_t threads = 0;
  int32_t num_sms = 20;
  int32_t ring_tokens = 128;
  int32_t chunk = 16;
  uint64_t seed = 1;
  bool cached = false;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "bench_ep: %s\nusage: bench_ep [--device cpu|cuda] [--tokens N] [--hidden H] [--topk K] [--experts E]\n"
               "                [--ranks R] [--dtype fp32|bf16|fp16] [--iters I] [--warmup W] [--threads T]\n"
               "                [--num-sms S] [--ring-tokens T] [--chunk C] [--seed S] [--cached 0|1]\n",
               why);
  std::exit(2);
}

int64_t parse_int(const char* flag, const char* v, int64_t lo, int64_t hi) {
  char* end = nullptr;
  long long x = std::strtoll(v, &end, 10);
  if (end == v || *end != '\0' || x < lo || x > hi) {
    std::fprintf(stderr, "bench_ep: %s = %s: must be an integer in [%lld, %lld]\n", flag, v, (long long)lo,
                 (long long)hi);
    std::exit(2);
  }
  return x;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") usage("help");
    if (i + 1 >= argc) usage(("missing value after " + a).c_str());
    const char* v = argv[++i];
    if (a == "--device") o.device = v;
    else if (a == "--tokens") o.tokens = parse_int("--tokens", v, 0, int64_t(1) << 24);
    else if (a == "--hidden") o.hidden = parse_int("--hidden", v, 1, 1 << 20);
    else if (a == "--topk") o.topk = int32_t(parse_int("--topk", v, 1, DEEPEP4J_MAX_TOPK));
    else if (a == "--experts") o.experts = int32_t(parse_int("--experts", v, 1, 1 << 16));
    else if (a == "--ranks") o.ranks = int32_t(parse_int("--ranks", v, 1, DEEPEP4J_MAX_RANKS));
    else if (a == "--dtype") o.dtype = v;
    else if (a == "--iters") o.iters = int(parse_int("--iters", v, 1, 100000));
    else if (a == "--warmup") o.warmup = int(parse_int("--warmup", v, 0, 100000));
    else if (a == "--threads") o.threads = int32_t(parse_int("--threads", v, 0, 64));
    else if (a == "--num-sms") o.num_sms = int32_t(parse_int("--num-sms", v, 2, 256));
    else if (a == "--ring-tokens") o.ring_tokens = int32_t(parse_int("--ring-tokens", v, 1, 1 << 20));
    else if (a == "--chunk") o.chunk = int32_t(parse_int("--chunk", v, 1, 1 << 20));
    else if (a == "--seed") o.seed = uint64_t(parse_int("--seed", v, 0, INT64_MAX));
    else if (a == "--cached") o.cached = parse_int("--cached", v, 0, 1) == 1;
    else usage(("unknown flag " + a).c_str());
  }
  if (o.device != "cpu" && o.device != "cuda") usage(("--device = " + o.device + ": must be cpu or cuda").c_str());
  if (o.topk > o.experts) usage("--topk must be <= --experts (experts are distinct per token)");
  return o;
}

int32_t dtype_of(const std::string& s) {
  if (s == "fp32") return DEEPEP4J_FLOAT32;
  if (s == "bf16") return DEEPEP4J_BFLOAT16;
  if (s == "fp16") return DEEPEP4J_FLOAT16;
  usage(("--dtype = " + s + ": the CPU bench runs fp32, bf16 or fp16").c_str());
}

size_t elem_size(int32_t dtype) { return dtype == DEEPEP4J_FLOAT32 ? 4 : 2; }

// Ends the run on any failed call: a benchmark of a failing call would measure nothing.
void must(int status, const char* what, int rank) {
  if (status == DEEPEP4J_OK) return;
  std::fprintf(stderr, "bench_ep: rank %d: %s -> %s: %s\n", rank, what, deepep4j_status_name(status),
               deepep4j_last_error());
  std::exit(1);
}

// A reusable barrier for the rank threads (C++17 has none).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    uint64_t gen = gen_;
    if (++arrived_ == n_) {
      arrived_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int n_, arrived_ = 0;
  uint64_t gen_ = 0;
};

double now_us() {
  return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Copies `bytes` from src to dst with `threads` threads (contiguous slices, like the ring copies).
void parallel_memcpy(uint8_t* dst, const uint8_t* src, size_t bytes, int threads) {
  if (threads <= 1) {
    std::memcpy(dst, src, bytes);
    return;
  }
  std::vector<std::thread> ts;
  size_t slice = (bytes / size_t(threads) + 63) & ~size_t(63);
  for (int t = 0; t < threads; ++t) {
    size_t lo = std::min(bytes, slice * size_t(t)), hi = std::min(bytes, lo + slice);
    ts.emplace_back([=] { std::memcpy(dst + lo, src + lo, hi - lo); });
  }
  for (auto& th : ts) th.join();
}

struct Rank {
  deepep4j_buffer* buf = nullptr;
  std::vector<uint8_t> x, recv_x, out;
  std::vector<int64_t> idx;
  std::vector<float> weights;
  deepep4j_handle* handle = nullptr;
  int64_t m = 0;
  std::vector<uint8_t> copy_src, copy_dst;
  std::vector<double> t_notify, t_dispatch, t_combine, t_memcpy;
};

struct Stat {
  double avg = 0, min = 0;
};

// Per iteration the slowest rank counts; then average and best over iterations.
Stat slowest(const std::vector<Rank>& ranks, std::vector<double> Rank::*times) {
  size_t iters = (ranks[0].*times).size();
  Stat s;
  s.min = 1e300;
  for (size_t i = 0; i < iters; ++i) {
    double worst = 0;
    for (const Rank& r : ranks) worst = std::max(worst, (r.*times)[i]);
    s.avg += worst / double(iters);
    s.min = std::min(s.min, worst);
  }
  return s;
}

int run_cpu(const Options& o) {
  const int32_t dtype = dtype_of(o.dtype), R = o.ranks, K = o.topk, E = o.experts;
  const int64_t N = o.tokens, H = o.hidden;
  const size_t row = size_t(H) * elem_size(dtype);
  if (E % R != 0) usage("--experts must be divisible by --ranks");

  deepep4j_config cfg;
  deepep4j_config_init(&cfg);
  cfg.num_sms = o.num_sms;
  cfg.ring_tokens = o.ring_tokens;
  cfg.max_send_tokens_per_chunk = o.chunk;
  cfg.num_threads = o.threads;
  must(deepep4j_buffer_size_hint(H, dtype, R, &cfg, &cfg.buffer_bytes), "deepep4j_buffer_size_hint", -1);

  std::vector<Rank> ranks(static_cast<size_t>(R));
  std::vector<std::vector<uint8_t>> blobs(static_cast<size_t>(R), std::vector<uint8_t>(DEEPEP4J_MAX_BLOB_BYTES));
  std::vector<size_t> lens(static_cast<size_t>(R));
  std::vector<const void*> ptrs;
  for (int32_t r = 0; r < R; ++r) {
    Rank& k = ranks[size_t(r)];
    must(deepep4j_buffer_create(r, R, &cfg, &k.buf), "deepep4j_buffer_create", r);
    must(deepep4j_buffer_export(k.buf, blobs[size_t(r)].data(), blobs[size_t(r)].size(), &lens[size_t(r)]),
         "deepep4j_buffer_export", r);
    ptrs.push_back(blobs[size_t(r)].data());
    // Inputs: small integers (exact in every dtype) and top-k distinct uniform experts, as DeepEP's test draws them.
    std::mt19937_64 rng(o.seed * 1000 + uint64_t(r));
    k.x.resize(size_t(N) * row);
    if (dtype == DEEPEP4J_FLOAT32) {
      float* xf = reinterpret_cast<float*>(k.x.data());
      for (int64_t i = 0; i < N * H; ++i) xf[i] = float(int(rng() % 17) - 8);
    } else {
      uint16_t* xh = reinterpret_cast<uint16_t*>(k.x.data());
      // bf16 / fp16 bit patterns of small integers would need a converter; any finite pattern moves the same bytes.
      for (int64_t i = 0; i < N * H; ++i) xh[i] = uint16_t(0x3c00u | (rng() & 0x3ffu));
    }
    k.idx.resize(size_t(N * K));
    k.weights.resize(size_t(N * K));
    std::vector<int32_t> perm(static_cast<size_t>(E));
    for (int32_t e = 0; e < E; ++e) perm[size_t(e)] = e;
    for (int64_t t = 0; t < N; ++t) {
      for (int32_t j = 0; j < K; ++j) std::swap(perm[size_t(j)], perm[size_t(j) + rng() % size_t(E - j)]);
      for (int32_t j = 0; j < K; ++j) {
        k.idx[size_t(t * K + j)] = perm[size_t(j)];
        k.weights[size_t(t * K + j)] = 1.0f / float(K);
      }
    }
  }
  {
    std::vector<std::thread> ts;
    for (int32_t r = 0; r < R; ++r)
      ts.emplace_back([&, r] {
        must(deepep4j_buffer_connect(ranks[size_t(r)].buf, ptrs.data(), lens.data()), "deepep4j_buffer_connect", r);
      });
    for (auto& t : ts) t.join();
  }
  deepep4j_config eff;
  must(deepep4j_buffer_config(ranks[0].buf, &eff), "deepep4j_buffer_config", 0);
  const int threads_per_rank =
      o.threads > 0 ? o.threads : std::max(1, int(std::thread::hardware_concurrency()) / R);

  Barrier barrier(R);
  std::atomic<bool> bad{false};
  auto rank_main = [&](int32_t r) {
    Rank& k = ranks[size_t(r)];
    for (int it = 0; it < o.warmup + o.iters; ++it) {
      const bool record = it >= o.warmup;
      // notify (layout included: it is what a caller runs before every fresh dispatch)
      barrier.wait();
      double t0 = now_us();
      if (!o.cached || it == 0) {
        std::vector<int32_t> per_rank(static_cast<size_t>(R)), per_expert(static_cast<size_t>(E));
        must(deepep4j_get_dispatch_layout(k.buf, k.idx.data(), N, K, E, per_rank.data(), per_expert.data(), nullptr,
                                          nullptr),
             "deepep4j_get_dispatch_layout", r);
        if (k.handle) deepep4j_handle_destroy(k.handle);
        must(deepep4j_notify_dispatch(k.buf, k.idx.data(), N, K, E, H, dtype, &k.handle, &k.m, nullptr, nullptr),
             "deepep4j_notify_dispatch", r);
      }
      double t1 = now_us();
      if (k.recv_x.size() != size_t(k.m) * row) {
        k.recv_x.assign(size_t(k.m) * row, 0);
        k.out.assign(size_t(N) * row, 0);
        k.copy_src.assign(size_t(k.m) * row, 1);
        k.copy_dst.assign(size_t(k.m) * row, 0);
      }
      // dispatch
      deepep4j_dispatch_args a{};
      a.x = k.x.data();
      a.recv_x = k.recv_x.data();
      barrier.wait();
      double t2 = now_us();
      must(deepep4j_dispatch(k.buf, k.handle, -1, &a, nullptr), "deepep4j_dispatch", r);
      double t3 = now_us();
      // combine: identity experts, so out = x * (ranks visited) can be spot-checked
      deepep4j_combine_args c{};
      c.y = k.recv_x.data();
      c.out = k.out.data();
      barrier.wait();
      double t4 = now_us();
      must(deepep4j_combine(k.buf, k.handle, dtype, &c, nullptr), "deepep4j_combine", r);
      double t5 = now_us();
      // memcpy of the bytes this rank received, same threads per rank, all ranks at once
      barrier.wait();
      double t6 = now_us();
      parallel_memcpy(k.copy_dst.data(), k.copy_src.data(), k.copy_src.size(), threads_per_rank);
      double t7 = now_us();
      if (record) {
        k.t_notify.push_back(t1 - t0);
        k.t_dispatch.push_back(t3 - t2);
        k.t_combine.push_back(t5 - t4);
        k.t_memcpy.push_back(t7 - t6);
      }
    }
    // Spot check (fp32): combine of the received rows gives x times the number of ranks each token visited.
    if (dtype == DEEPEP4J_FLOAT32) {
      const int32_t L = E / R;
      const float* x = reinterpret_cast<const float*>(k.x.data());
      const float* out = reinterpret_cast<const float*>(k.out.data());
      for (int64_t t = 0; t < N; t += std::max<int64_t>(1, N / 64)) {
        std::vector<bool> seen(static_cast<size_t>(R), false);
        int visits = 0;
        for (int32_t j = 0; j < K; ++j) {
          int64_t d = k.idx[size_t(t * K + j)] / L;
          if (!seen[size_t(d)]) ++visits;
          seen[size_t(d)] = true;
        }
        for (int64_t h = 0; h < H; h += 97)
          if (out[t * H + h] != x[t * H + h] * float(visits)) bad = true;
      }
    }
  };
  std::vector<std::thread> ts;
  for (int32_t r = 0; r < R; ++r) ts.emplace_back(rank_main, r);
  for (auto& t : ts) t.join();
  if (bad) {
    std::fprintf(stderr, "bench_ep: combine result differs from x * (ranks visited): the numbers below are void\n");
    return 1;
  }

  double bytes = 0;  // average bytes a rank receives
  for (const Rank& k : ranks) bytes += double(k.m) * double(row) / double(R);
  Stat mc = slowest(ranks, &Rank::t_memcpy), no = slowest(ranks, &Rank::t_notify),
       di = slowest(ranks, &Rank::t_dispatch), co = slowest(ranks, &Rank::t_combine);
  auto gbs = [&](double us) { return bytes / (us * 1e3); };

  std::printf("# bench_ep  device cpu  deepep4j %s  ranks %d (threads)  tokens/rank %lld  hidden %lld  top-%d of %d "
              "experts  dtype %s  handle %s\n",
              deepep4j_version(), R, (long long)N, (long long)H, K, E, o.dtype.c_str(),
              o.cached ? "cached (one notify)" : "fresh each iteration");
  std::printf("# copy threads/rank %d  channels %d  ring %d tokens  chunk %d  buffer %.1f MiB/rank  iters %d (+%d "
              "warm-up)  hw threads %u\n",
              threads_per_rank, eff.num_sms / 2, eff.ring_tokens, eff.max_send_tokens_per_chunk,
              double(eff.buffer_bytes) / (1 << 20), o.iters, o.warmup, std::thread::hardware_concurrency());
  std::printf("# received rows/rank:");
  for (const Rank& k : ranks) std::printf(" %lld", (long long)k.m);
  std::printf("  (%.1f MB/rank)\n", bytes / 1e6);
  std::printf("#\n# %-26s %12s %12s %10s %11s\n", "op", "avg_us", "best_us", "GB/s", "of memcpy");
  std::printf("  %-26s %12.1f %12.1f %10.2f %10.0f%%\n", "memcpy (same bytes)", mc.avg, mc.min, gbs(mc.avg), 100.0);
  if (!o.cached) std::printf("  %-26s %12.1f %12.1f %10s %11s\n", "layout + notify", no.avg, no.min, "-", "-");
  std::printf("  %-26s %12.1f %12.1f %10.2f %10.0f%%\n", "dispatch", di.avg, di.min, gbs(di.avg),
              100.0 * mc.avg / di.avg);
  std::printf("  %-26s %12.1f %12.1f %10.2f %10.0f%%\n", "combine", co.avg, co.min, gbs(co.avg),
              100.0 * mc.avg / co.avg);

  for (Rank& k : ranks) {
    deepep4j_handle_destroy(k.handle);
    deepep4j_buffer_destroy(k.buf);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // The CUDA bench has flags of its own (table of shapes, backends, sweep), so it parses its arguments itself.
  bool cuda = false;
  for (int i = 1; i + 1 < argc; ++i) cuda = cuda || (std::string(argv[i]) == "--device" && std::string(argv[i + 1]) == "cuda");
  Options o = cuda ? Options{} : parse(argc, argv);
  if (cuda) {
#ifdef DEEPEP4J_BENCH_CUDA
    return bench_ep_cuda(argc, argv);
#else
    std::fprintf(stderr, "bench_ep: --device cuda: this bench_ep was built without the CUDA backend (no nvcc at "
                         "build time); rebuild with nvcc available or -DDEEPEP4J_CUDA=ON\n");
    return 2;
#endif
  }
  return run_cpu(o);
}
