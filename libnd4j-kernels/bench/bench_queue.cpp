// bench_queue.cpp — where the time of host arrays on a GPU goes: host memcpy (into reused and into fresh memory, one
// thread and several), the queue's staged copies (deepep4j_copy_to_device / _to_host + synchronize) and plain
// cudaMemcpy from pageable and from pinned memory (the transfer ceiling), for one array size. One table, GB/s.
// Usage: bench_queue [MiB=32] [reps=5]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "deepep4j.h"

namespace {

double seconds(const std::function<void()>& f, int reps) {
  std::vector<double> t;
  f();  // warm-up
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void ok(int st, const char* what) {
  if (st != DEEPEP4J_OK) {
    std::fprintf(stderr, "%s: %s\n", what, deepep4j_last_error());
    std::exit(1);
  }
}

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

void parallel_memcpy(void* dst, const void* src, size_t n, int threads) {
  std::vector<std::thread> ts;
  size_t part = (n + threads - 1) / threads;
  for (int i = 0; i < threads; ++i) {
    size_t off = part * i, len = off >= n ? 0 : std::min(part, n - off);
    ts.emplace_back([=] { std::memcpy(static_cast<char*>(dst) + off, static_cast<const char*>(src) + off, len); });
  }
  for (auto& t : ts) t.join();
}

}  // namespace

int main(int argc, char** argv) {
  const size_t mib = argc > 1 ? size_t(std::atoi(argv[1])) : 32;
  const int reps = argc > 2 ? std::atoi(argv[2]) : 5;
  const size_t n = mib << 20;
  deepep4j_config c;
  deepep4j_config_init(&c);
  c.device = DEEPEP4J_DEVICE_CUDA;
  c.buffer_bytes = 1 << 20;
  deepep4j_buffer* buf = nullptr;
  ok(deepep4j_buffer_create(0, 1, &c, &buf), "buffer_create");
  deepep4j_queue* q = nullptr;
  ok(deepep4j_queue_create(buf, &q), "queue_create");
  void* dev = nullptr;
  ok(deepep4j_device_alloc(q, int64_t(n), &dev), "device_alloc");
  std::vector<char> src(n, 1), dst(n, 2);
  void* pinned = nullptr;
  cuda_ok(cudaHostAlloc(&pinned, n, cudaHostAllocDefault), "cudaHostAlloc");
  std::memset(pinned, 3, n);
  auto fresh = [&](const std::function<void(char*)>& f) {  // a new pageable array, as ND4J hands out for outputs
    char* p = static_cast<char*>(std::malloc(n));
    f(p);
    std::free(p);
  };
  struct Row {
    const char* what;
    double s;
  };
  std::vector<Row> rows = {
      {"memcpy host->host, reused destination, 1 thread", seconds([&] { std::memcpy(dst.data(), src.data(), n); }, reps)},
      {"memcpy host->host, fresh destination (page faults), 1 thread",
       seconds([&] { fresh([&](char* p) { std::memcpy(p, src.data(), n); }); }, reps)},
      {"memcpy host->pinned, 1 thread", seconds([&] { std::memcpy(pinned, src.data(), n); }, reps)},
      {"memcpy host->pinned, 4 threads", seconds([&] { parallel_memcpy(pinned, src.data(), n, 4); }, reps)},
      {"memcpy host->pinned, 8 threads", seconds([&] { parallel_memcpy(pinned, src.data(), n, 8); }, reps)},
      {"cudaMemcpy pinned->device (transfer ceiling)",
       seconds([&] { cuda_ok(cudaMemcpy(dev, pinned, n, cudaMemcpyHostToDevice), "h2d"); }, reps)},
      {"cudaMemcpy device->pinned (transfer ceiling)",
       seconds([&] { cuda_ok(cudaMemcpy(pinned, dev, n, cudaMemcpyDeviceToHost), "d2h"); }, reps)},
      {"cudaMemcpy pageable->device", seconds([&] { cuda_ok(cudaMemcpy(dev, src.data(), n, cudaMemcpyHostToDevice), "h2d"); }, reps)},
      {"cudaMemcpy device->pageable, reused", seconds([&] { cuda_ok(cudaMemcpy(dst.data(), dev, n, cudaMemcpyDeviceToHost), "d2h"); }, reps)},
      {"queue copy_to_device + synchronize (pageable source)", seconds([&] {
         ok(deepep4j_copy_to_device(q, dev, src.data(), int64_t(n)), "to_device");
         ok(deepep4j_queue_synchronize(q), "sync");
       }, reps)},
      {"queue copy_to_host + synchronize, reused destination", seconds([&] {
         ok(deepep4j_copy_to_host(q, dst.data(), dev, int64_t(n)), "to_host");
         ok(deepep4j_queue_synchronize(q), "sync");
       }, reps)},
      {"queue copy_to_host + synchronize, fresh destination", seconds([&] {
         fresh([&](char* p) {
           ok(deepep4j_copy_to_host(q, p, dev, int64_t(n)), "to_host");
           ok(deepep4j_queue_synchronize(q), "sync");
         });
       }, reps)},
  };
  std::printf("host <-> device copies of %zu MiB, median of %d (%u hardware threads)\n", mib, reps,
              std::thread::hardware_concurrency());
  std::printf("| copy | ms | GB/s |\n|---|---|---|\n");
  for (const Row& r : rows) std::printf("| %s | %.3f | %.1f |\n", r.what, r.s * 1e3, double(n) / r.s / 1e9);
  ok(deepep4j_device_free(q, dev), "device_free");
  cudaFreeHost(pinned);
  deepep4j_queue_destroy(q);
  deepep4j_buffer_destroy(buf);
  return 0;
}
