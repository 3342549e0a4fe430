// test_gpu_queue.cpp — deepep4j_queue on a GPU: a stream of its own, device arrays from its pool, host arrays staged
// through pinned memory in chunks (more than one staging block per synchronize, sizes not a multiple of a chunk),
// host memory reusable once copy_to_device returned, copy_to_host complete at synchronize; two queues of one device
// driven at once from two threads (two ranks sharing a GPU).
#include <thread>
#include <vector>

#include "gpu_group.h"

namespace {

deepep4j_buffer* cuda_buffer(int32_t rank, int32_t ranks) {
  deepep4j_config c;
  deepep4j_config_init(&c);
  c.device = DEEPEP4J_DEVICE_CUDA;
  c.buffer_bytes = 1 << 20;
  c.timeout_ms = 20000;
  deepep4j_buffer* b = nullptr;
  return deepep4j_buffer_create(rank, ranks, &c, &b) == DEEPEP4J_OK ? b : nullptr;
}

// Three arrays of 9 MiB + 12 bytes in and out before one synchronize: staging grows past its first 16 MiB block.
void round_trips(deepep4j_queue* q, int seed) {
  const int64_t n = (int64_t(9) << 20) / 4 + 3;
  std::vector<std::vector<float>> in(3, std::vector<float>(size_t(n))), out(3, std::vector<float>(size_t(n), -1.f));
  std::vector<void*> d(3, nullptr);
  for (int rep = 0; rep < 3; ++rep) {
    for (int a = 0; a < 3; ++a) {
      for (int64_t i = 0; i < n; ++i) in[size_t(a)][size_t(i)] = float((i * 7 + a + seed + rep) % 1013);
      if (rep == 0) REQUIRE_OK(deepep4j_device_alloc(q, n * 4, &d[size_t(a)]));
      REQUIRE_OK(deepep4j_copy_to_device(q, d[size_t(a)], in[size_t(a)].data(), n * 4));
      std::fill(in[size_t(a)].begin(), in[size_t(a)].end(), -7.f);  // reusable at once
    }
    for (int a = 0; a < 3; ++a) REQUIRE_OK(deepep4j_copy_to_host(q, out[size_t(a)].data(), d[size_t(a)], n * 4));
    REQUIRE_OK(deepep4j_queue_synchronize(q));
    for (int a = 0; a < 3; ++a)
      for (int64_t i = 0; i < n; ++i)
        if (out[size_t(a)][size_t(i)] != float((i * 7 + a + seed + rep) % 1013)) {
          CHECK_MSG(false, "seed %d rep %d array %d element %lld = %g", seed, rep, a, (long long)i,
                    out[size_t(a)][size_t(i)]);
          return;
        }
  }
  for (void* p : d) REQUIRE_OK(deepep4j_device_free(q, p));
  REQUIRE_OK(deepep4j_queue_synchronize(q));
}

}  // namespace

TEST(staged_round_trips_on_one_queue) {
  deepep4j_buffer* b = cuda_buffer(0, 1);
  REQUIRE(b != nullptr);
  deepep4j_queue* q = nullptr;
  REQUIRE_OK(deepep4j_queue_create(b, &q));
  CHECK(deepep4j_queue_stream(q) != nullptr);
  round_trips(q, 1);
  REQUIRE_OK(deepep4j_queue_destroy(q));
  deepep4j_buffer_destroy(b);
}

TEST(two_queues_of_one_device_at_once) {
  deepep4j_buffer* b[2] = {cuda_buffer(0, 2), cuda_buffer(1, 2)};
  REQUIRE(b[0] != nullptr && b[1] != nullptr);
  deepep4j_queue* q[2] = {};
  for (int r = 0; r < 2; ++r) REQUIRE_OK(deepep4j_queue_create(b[r], &q[r]));
  CHECK(deepep4j_queue_stream(q[0]) != deepep4j_queue_stream(q[1]));
  std::thread t0([&] { round_trips(q[0], 2); }), t1([&] { round_trips(q[1], 3); });
  t0.join();
  t1.join();
  for (int r = 0; r < 2; ++r) {
    REQUIRE_OK(deepep4j_queue_destroy(q[r]));
    deepep4j_buffer_destroy(b[r]);
  }
}

GPU_TEST_MAIN()
