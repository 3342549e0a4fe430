// gpu_group.h — R ranks on CUDA devices (rank r on device r % count), driven from one thread per rank: the same steps
// as ep_group.h with inputs and outputs in device memory, results copied back in the reference's form.
#pragma once

#include <string>

#include <cuda_runtime.h>
#include <sys/wait.h>
#include <unistd.h>

#include "ep_group.h"

namespace gpu {

constexpr int kSkip = 77;  // ctest SKIP_RETURN_CODE: no GPU visible

inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) return 0;
  return n;
}

#define CUDA_OK(call)                                                                                 \
  do {                                                                                                \
    cudaError_t e_ = (call);                                                                          \
    if (e_ != cudaSuccess) {                                                                          \
      t::fail(__FILE__, __LINE__, t::fmt("%s -> %s", #call, cudaGetErrorString(e_)));                \
      throw t::Abort{};                                                                               \
    }                                                                                                 \
  } while (0)

// Device copy of a host vector (NULL when empty), freed at scope end.
struct Dev {
  void* p = nullptr;
  size_t bytes = 0;
  Dev() = default;
  explicit Dev(size_t n) : bytes(n) {
    // Stream-ordered: cudaMalloc/cudaFree may wait for the whole device, including another rank's spinning kernel.
    if (n) CUDA_OK(cudaMallocAsync(&p, n, cudaStreamLegacy));
  }
  template <class T>
  explicit Dev(const std::vector<T>& v) : Dev(v.size() * sizeof(T)) {
    if (bytes) CUDA_OK(cudaMemcpy(p, v.data(), bytes, cudaMemcpyHostToDevice));
  }
  Dev(Dev&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
  Dev& operator=(Dev&& o) noexcept {
    std::swap(p, o.p);
    std::swap(bytes, o.bytes);
    return *this;
  }
  ~Dev() {
    if (p) cudaFreeAsync(p, cudaStreamLegacy);
  }
  template <class T>
  T* as() const { return static_cast<T*>(p); }
  // Fills with a byte pattern so unwritten outputs show.
  void fill(int byte) {
    if (bytes) CUDA_OK(cudaMemset(p, byte, bytes));
  }
  template <class T>
  void get(std::vector<T>* out) const {
    out->resize(bytes / sizeof(T));
    if (bytes) CUDA_OK(cudaMemcpy(out->data(), p, bytes, cudaMemcpyDeviceToHost));
  }
};

inline deepep4j_config cuda_config(const ref::Shape& s, int32_t backend, int32_t ring_tokens = 32, int32_t chunk = 8,
                                   int32_t num_sms = 4, int32_t timeout_ms = 20000) {
  deepep4j_config c = ep::small_config(s, ring_tokens, chunk, num_sms, timeout_ms);
  c.device = DEEPEP4J_DEVICE_CUDA;
  c.backend = backend;
  return c;
}

struct Group {
  std::vector<deepep4j_buffer*> bufs;
  std::vector<int> devices;
  Group(int32_t R, deepep4j_config cfg) : bufs(size_t(R), nullptr) {
    const int n = device_count();
    std::vector<std::vector<uint8_t>> blobs(size_t(R), std::vector<uint8_t>(DEEPEP4J_MAX_BLOB_BYTES));
    std::vector<size_t> lens(size_t(R), 0);
    for (int32_t r = 0; r < R; ++r) {
      cfg.device_id = r % n;
      devices.push_back(cfg.device_id);
      REQUIRE_OK(deepep4j_buffer_create(r, R, &cfg, &bufs[size_t(r)]));
      REQUIRE_OK(deepep4j_buffer_export(bufs[size_t(r)], blobs[size_t(r)].data(), blobs[size_t(r)].size(),
                                        &lens[size_t(r)]));
    }
    std::vector<const void*> ptrs;
    for (auto& b : blobs) ptrs.push_back(b.data());
    ep::run_ranks(R, [&](int32_t r) {
      REQUIRE_OK(deepep4j_buffer_connect(bufs[size_t(r)], ptrs.data(), lens.data()));
    });
    // With DEEPEP4J_TEST_POOL_PEER_ACCESS=1 every device may use every other device's default pool, where Dev
    // allocates: copy-engine dispatch then writes rows straight into recv_x (else through the landing zones).
    if (getenv("DEEPEP4J_TEST_POOL_PEER_ACCESS") && std::string(getenv("DEEPEP4J_TEST_POOL_PEER_ACCESS")) == "1")
      for (int owner = 0; owner < n; ++owner)
        for (int peer = 0; peer < n; ++peer) {
          if (peer == owner) continue;
          cudaMemPool_t pool;
          CUDA_OK(cudaDeviceGetDefaultMemPool(&pool, owner));
          cudaMemAccessDesc desc{};
          desc.location.type = cudaMemLocationTypeDevice;
          desc.location.id = peer;
          desc.flags = cudaMemAccessFlagsProtReadWrite;
          CUDA_OK(cudaMemPoolSetAccess(pool, &desc, 1));
        }
  }
  Group(const Group&) = delete;
  ~Group() {
    for (auto* b : bufs) deepep4j_buffer_destroy(b);
  }
  deepep4j_buffer* operator[](int32_t r) const { return bufs[size_t(r)]; }
};

// Device-side inputs of one rank.
struct DevInput {
  Dev x, x_scales, topk_idx, topk_weights;
  explicit DevInput(const ref::RankInput& in)
      : x(in.x), x_scales(in.x_scales), topk_idx(in.topk_idx), topk_weights(in.topk_weights) {}
};

// Dispatch with handle h (fresh or cached) of data `in` in `dtype`; fills out (m and per-rank counts already set).
inline void dispatch_into(deepep4j_buffer* b, deepep4j_handle* h, const ref::Shape& s, int32_t dtype,
                          const ref::RankInput& in, bool send_weights, ref::Received* out, int32_t dtype_arg) {
  const int64_t M = out->m, H = s.hidden;
  const int32_t K = s.num_topk;
  const bool fp8 = dtype == DEEPEP4J_FP8_E4M3;
  DevInput d(in);
  Dev rx(size_t(M * H) * ref::elem_size(dtype)), rs(fp8 ? size_t(M * (H / DEEPEP4J_FP8_BLOCK)) * 4 : 0);
  Dev ri(size_t(M * K) * 8), rw(size_t(M * K) * 4), rt(size_t(M) * 8), rr(size_t(M) * 4);
  for (Dev* v : {&rx, &rs, &ri, &rw, &rt, &rr}) v->fill(0xEE);
  deepep4j_dispatch_args a{};
  a.x = d.x.p;
  a.x_scales = fp8 ? d.x_scales.as<float>() : nullptr;
  a.topk_weights = send_weights ? d.topk_weights.as<float>() : nullptr;
  a.recv_x = rx.p;
  a.recv_x_scales = fp8 ? rs.as<float>() : nullptr;
  a.recv_topk_idx = ri.as<int64_t>();
  a.recv_topk_weights = send_weights ? rw.as<float>() : nullptr;
  a.recv_src_token = rt.as<int64_t>();
  a.recv_src_rank = rr.as<int32_t>();
  REQUIRE_OK(deepep4j_dispatch(b, h, dtype_arg, &a, nullptr));
  rx.get(&out->x);
  rs.get(&out->x_scales);
  ri.get(&out->topk_idx);
  if (send_weights) rw.get(&out->topk_weights);
  rt.get(&out->src_token);
  rr.get(&out->src_rank);
}

inline void combine_into(deepep4j_buffer* b, deepep4j_handle* h, const ref::Shape& s, int32_t dtype, int64_t n,
                         const ep::StepOptions& o, ep::RankResult* res) {
  const int64_t H = s.hidden;
  const int32_t K = s.num_topk;
  res->y_topk_weights.clear();
  if (o.combine_weights) res->y_topk_weights = res->recv.topk_weights;
  Dev y(res->y), rw(res->recv.topk_weights), yw(res->y_topk_weights);
  Dev out(size_t(n * H) * ref::elem_size(dtype)), ow(o.combine_weights ? size_t(n * K) * 4 : 0);
  out.fill(0xEE);
  ow.fill(0xEE);
  deepep4j_combine_args c{};
  c.y = y.p;
  c.recv_topk_weights = o.weighted_combine ? rw.as<float>() : nullptr;
  c.y_topk_weights = o.combine_weights ? yw.as<float>() : nullptr;
  c.out = out.p;
  c.out_topk_weights = o.combine_weights ? ow.as<float>() : nullptr;
  REQUIRE_OK(deepep4j_combine(b, h, dtype, &c, nullptr));
  out.get(&res->combined.out);
  res->combined.out_topk_weights.clear();
  if (o.combine_weights) ow.get(&res->combined.out_topk_weights);
}

// layout + notify + dispatch (+ combine) of one rank on its device.
inline void run_rank(deepep4j_buffer* b, int device, int32_t rank, const ref::Shape& s, const ref::RankInput& in,
                     const ep::StepOptions& o, ep::RankResult* res, bool keep_handle = false) {
  CUDA_OK(cudaSetDevice(device));
  const int32_t R = s.num_ranks, E = s.num_experts, K = s.num_topk;
  Dev idx(in.topk_idx), per_rank(size_t(R) * 4), per_expert(size_t(E) * 4), in_rank(size_t(in.n * R));
  in_rank.fill(0xEE);
  REQUIRE_OK(deepep4j_get_dispatch_layout(b, idx.as<int64_t>(), in.n, K, E, per_rank.as<int32_t>(),
                                          per_expert.as<int32_t>(), in_rank.as<uint8_t>(), nullptr));
  CUDA_OK(cudaStreamSynchronize(cudaStreamLegacy));
  per_rank.get(&res->layout.per_rank);
  per_expert.get(&res->layout.per_expert);
  in_rank.get(&res->layout.in_rank);
  deepep4j_handle* h = nullptr;
  int64_t M = -1;
  res->recv.per_local_expert.assign(size_t(E / R), -1);
  REQUIRE_OK(deepep4j_notify_dispatch(b, idx.as<int64_t>(), in.n, K, E, s.hidden, s.dtype, &h, &M,
                                      res->recv.per_local_expert.data(), nullptr));
  REQUIRE(h != nullptr && M >= 0);
  res->recv.m = M;
  res->recv.per_source_rank.assign(size_t(R), -1);
  REQUIRE_OK(deepep4j_handle_recv_counts_per_rank(h, res->recv.per_source_rank.data()));
  gpu::dispatch_into(b, h, s, s.dtype, in, o.send_weights, &res->recv, -1);
  if (o.run_combine) {
    int32_t cd = o.combine_dtype < 0 ? s.dtype : o.combine_dtype;
    res->y = ep::make_y(res->recv, s.hidden, s.dtype, cd, rank);
    gpu::combine_into(b, h, s, cd, in.n, o, res);
  }
  if (keep_handle)
    res->handle = h;
  else
    REQUIRE_OK(deepep4j_handle_destroy(h));
}

inline void run_and_verify(const Group& g, const ref::Shape& s, const std::vector<int64_t>& tokens,
                           const ep::StepOptions& o, uint64_t seed, const std::string& label) {
  std::vector<ref::RankInput> in = ep::make_inputs(s, tokens, seed);
  std::vector<ep::RankResult> res(size_t(s.num_ranks));
  ep::run_ranks(s.num_ranks, [&](int32_t r) {
    run_rank(g[r], g.devices[size_t(r)], r, s, in[size_t(r)], o, &res[size_t(r)]);
  });
  ep::verify(s, in, res, o, label);
}

inline const char* backend_name(int32_t b) { return b == DEEPEP4J_BACKEND_ALLTOALL ? "alltoall" : "deepep"; }

// Backends to test: both, or those named in DEEPEP4J_TEST_BACKENDS (e.g. "deepep" under compute-sanitizer, whose
// instrumentation NCCL's start-up does not survive).
inline std::vector<int32_t> backends() {
  const char* env = std::getenv("DEEPEP4J_TEST_BACKENDS");
  std::vector<int32_t> out;
  for (int32_t b : {DEEPEP4J_BACKEND_DEEPEP, DEEPEP4J_BACKEND_ALLTOALL})
    if (env == nullptr || std::strstr(env, backend_name(b)) != nullptr) out.push_back(b);
  return out;
}

// The backends that can run `ranks` ranks here: alltoall (NCCL) needs one GPU per rank, so with fewer GPUs it is left
// out, saying why.
inline std::vector<int32_t> backends(int32_t ranks) {
  std::vector<int32_t> out;
  for (int32_t b : backends()) {
    if (b == DEEPEP4J_BACKEND_ALLTOALL && ranks > device_count()) {
      std::fprintf(stderr, "  alltoall skipped: NCCL needs one GPU per rank (%d ranks, %d GPUs visible)\n", ranks,
                   device_count());
      continue;
    }
    out.push_back(b);
  }
  return out;
}

}  // namespace gpu

namespace gpu {
// Device count asked in a child process, so the parent stays free of CUDA and can still fork CUDA ranks.
inline int device_count_forked() {
  pid_t pid = fork();
  if (pid == 0) _exit(device_count() > 100 ? 100 : device_count());
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return 0;
  return WEXITSTATUS(status);
}

// What rank d would return if it were right: lets a process that ran one rank reuse ep::verify for that rank.
inline ep::RankResult expected_result(const ref::Shape& s, const std::vector<ref::RankInput>& in,
                                      const ep::StepOptions& o, int32_t d) {
  ep::RankResult r;
  r.layout = ref::layout(s, in[size_t(d)]);
  std::vector<ref::Received> all;
  for (int32_t i = 0; i < s.num_ranks; ++i) all.push_back(ref::dispatch(s, in, i));
  r.recv = all[size_t(d)];
  if (!o.run_combine) return r;
  int32_t cd = o.combine_dtype < 0 ? s.dtype : o.combine_dtype;
  std::vector<std::vector<uint8_t>> ys;
  std::vector<std::vector<float>> yw;
  for (int32_t i = 0; i < s.num_ranks; ++i) {
    ys.push_back(ep::make_y(all[size_t(i)], s.hidden, s.dtype, cd, i));
    if (o.combine_weights) yw.push_back(all[size_t(i)].topk_weights);
  }
  r.combined = ref::combine(s, all, ys, yw, o.combine_weights, o.weighted_combine, d, in[size_t(d)].n, cd);
  return r;
}
}  // namespace gpu

// Skips the whole program (exit 77) when no CUDA device is visible.
#define GPU_TEST_MAIN()                                                              \
  int main(int argc, char** argv) {                                                  \
    if (gpu::device_count_forked() == 0) {                                           \
      std::fprintf(stderr, "no CUDA device visible: skipped\n");                     \
      return gpu::kSkip;                                                             \
    }                                                                                \
    return t::main(argc, argv);                                                      \
  }
