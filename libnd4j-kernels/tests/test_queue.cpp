// test_queue.cpp — queues on the CPU device: device arrays are host memory, copies are complete on return, the
// stream is NULL; argument rules name argument, value and rule. (tests/gpu/ has no twin: the Java GPU tests drive
// the CUDA queue through EpBuffer's staging and EpDeviceArray.)
#include <vector>

#include "harness.h"

namespace {

deepep4j_buffer* cpu_buffer(int32_t host_copy_threads = 0) {
  deepep4j_config c;
  deepep4j_config_init(&c);
  c.buffer_bytes = 1 << 20;
  c.host_copy_threads = host_copy_threads;
  deepep4j_buffer* b = nullptr;
  if (deepep4j_buffer_create(0, 1, &c, &b) != DEEPEP4J_OK) return nullptr;
  return b;
}

}  // namespace

TEST(round_trip_through_device_memory) {
  deepep4j_buffer* b = cpu_buffer();
  REQUIRE(b != nullptr);
  deepep4j_queue* q = nullptr;
  REQUIRE_OK(deepep4j_queue_create(b, &q));
  CHECK(deepep4j_queue_stream(q) == nullptr);
  const int64_t n = (int64_t(9) << 20) / 4 + 3;  // more than one staging chunk on a GPU, and not a multiple of it
  std::vector<float> in(n), out(n, -1.f);
  for (int64_t i = 0; i < n; ++i) in[i] = float(i % 1000) * 0.5f;
  void* d = nullptr;
  REQUIRE_OK(deepep4j_device_alloc(q, n * 4, &d));
  REQUIRE(d != nullptr);
  CHECK(reinterpret_cast<uintptr_t>(d) % 256 == 0);
  REQUIRE_OK(deepep4j_copy_to_device(q, d, in.data(), n * 4));
  in.assign(n, 7.f);  // the host array may be reused as soon as the copy call returned
  REQUIRE_OK(deepep4j_copy_to_host(q, out.data(), d, n * 4));
  REQUIRE_OK(deepep4j_queue_synchronize(q));
  for (int64_t i = 0; i < n; ++i)
    if (out[i] != float(i % 1000) * 0.5f) {
      CHECK_MSG(false, "out[%lld] = %g", (long long)i, out[i]);
      break;
    }
  REQUIRE_OK(deepep4j_device_free(q, d));
  REQUIRE_OK(deepep4j_device_free(q, nullptr));
  void* empty = reinterpret_cast<void*>(1);
  REQUIRE_OK(deepep4j_device_alloc(q, 0, &empty));
  CHECK(empty == nullptr);
  REQUIRE_OK(deepep4j_copy_to_device(q, nullptr, nullptr, 0));
  REQUIRE_OK(deepep4j_queue_destroy(q));
  REQUIRE_OK(deepep4j_queue_destroy(nullptr));
  deepep4j_buffer_destroy(b);
}

// Copies split over 3 threads (slices not multiples of the chunk or of each other) land every byte in place.
TEST(copies_split_over_threads_land_every_byte) {
  deepep4j_buffer* b = cpu_buffer(3);
  REQUIRE(b != nullptr);
  deepep4j_queue* q = nullptr;
  REQUIRE_OK(deepep4j_queue_create(b, &q));
  for (int64_t bytes : {int64_t(3) << 20, (int64_t(5) << 20) + 68, int64_t(1) << 19, int64_t(100)}) {
    std::vector<uint8_t> in(static_cast<size_t>(bytes)), out(static_cast<size_t>(bytes), 0);
    for (int64_t i = 0; i < bytes; ++i) in[size_t(i)] = uint8_t((i * 131 + bytes) % 251);
    void* d = nullptr;
    REQUIRE_OK(deepep4j_device_alloc(q, bytes, &d));
    REQUIRE_OK(deepep4j_copy_to_device(q, d, in.data(), bytes));
    REQUIRE_OK(deepep4j_copy_to_host(q, out.data(), d, bytes));
    REQUIRE_OK(deepep4j_queue_synchronize(q));
    CHECK_MSG(in == out, "%lld bytes: the copy back differs", (long long)bytes);
    REQUIRE_OK(deepep4j_device_free(q, d));
  }
  REQUIRE_OK(deepep4j_queue_destroy(q));
  deepep4j_buffer_destroy(b);
  deepep4j_config c;
  deepep4j_config_init(&c);
  CHECK(c.host_copy_threads == 0);
  c.host_copy_threads = 65;
  deepep4j_buffer* bad = nullptr;
  CHECK_ERR(deepep4j_buffer_create(0, 1, &c, &bad), DEEPEP4J_ERR_INVALID_ARGUMENT, "host_copy_threads = 65",
            "[0, 64]");
}

TEST(bad_arguments_are_named) {
  deepep4j_buffer* b = cpu_buffer();
  REQUIRE(b != nullptr);
  deepep4j_queue* q = nullptr;
  CHECK_ERR(deepep4j_queue_create(nullptr, &q), DEEPEP4J_ERR_INVALID_ARGUMENT, "buf = NULL");
  CHECK_ERR(deepep4j_queue_create(b, nullptr), DEEPEP4J_ERR_INVALID_ARGUMENT, "out = NULL");
  REQUIRE_OK(deepep4j_queue_create(b, &q));
  void* d = nullptr;
  float host[4] = {};
  CHECK_ERR(deepep4j_device_alloc(nullptr, 16, &d), DEEPEP4J_ERR_INVALID_ARGUMENT, "queue = NULL",
            "deepep4j_device_alloc");
  CHECK_ERR(deepep4j_device_alloc(q, -5, &d), DEEPEP4J_ERR_INVALID_ARGUMENT, "bytes = -5", ">= 0");
  CHECK_ERR(deepep4j_device_alloc(q, 16, nullptr), DEEPEP4J_ERR_INVALID_ARGUMENT, "out = NULL");
  REQUIRE_OK(deepep4j_device_alloc(q, 16, &d));
  CHECK_ERR(deepep4j_copy_to_device(q, d, host, -1), DEEPEP4J_ERR_INVALID_ARGUMENT, "bytes = -1");
  CHECK_ERR(deepep4j_copy_to_device(q, nullptr, host, 16), DEEPEP4J_ERR_INVALID_ARGUMENT, "device = NULL",
            "16 bytes");
  CHECK_ERR(deepep4j_copy_to_host(q, nullptr, d, 16), DEEPEP4J_ERR_INVALID_ARGUMENT, "host = NULL",
            "deepep4j_copy_to_host");
  CHECK_ERR(deepep4j_queue_synchronize(nullptr), DEEPEP4J_ERR_INVALID_ARGUMENT, "queue = NULL");
  REQUIRE_OK(deepep4j_device_free(q, d));
  REQUIRE_OK(deepep4j_queue_destroy(q));
  deepep4j_buffer_destroy(b);
}

TEST(cuda_queue_without_a_gpu_is_an_error) {
  if (deepep4j_cuda_device_count() > 0) return;  // a GPU is visible: the GPU machine covers this path
  deepep4j_config c;
  deepep4j_config_init(&c);
  c.device = DEEPEP4J_DEVICE_CUDA;
  deepep4j_buffer* b = nullptr;
  CHECK_ERR(deepep4j_buffer_create(0, 1, &c, &b), DEEPEP4J_ERR_UNAVAILABLE, "CUDA");
}

TEST_MAIN()
