// test_gpu_moe_block.cpp — the MoE block on the GPU against the CPU reference: outputs and gradients (fp32 within
// 1e-5 of the output's scale, bf16 within bf16 rounding), fp64 gradients against finite differences, the optimizer
// against the CPU's, bad input on one of 2 ranks, 1 and 2 ranks on one GPU, host and device memory, grouped and
// looped GEMMs. Exit 77 without a GPU.
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#include "../moe_reference.h"

namespace {

using moeref::Model;

moeref::Memory device_memory() {
  moeref::Memory m;
  m.memory = DEEPEP4J_MEMORY_DEVICE;
  m.to_device = [](const std::vector<uint8_t>& v) -> void* {
    void* p = nullptr;
    cudaMalloc(&p, v.size() + 16);
    cudaMemcpy(p, v.data(), v.size(), cudaMemcpyHostToDevice);
    return p;
  };
  // The block's calls are complete on return (NULL stream); no device-wide wait, which could queue behind the other
  // rank's kernels.
  m.from_device = [](void* p, std::vector<uint8_t>* v) {
    cudaMemcpy(v->data(), p, v->size(), cudaMemcpyDeviceToHost);
  };
  m.release = [](void* p) { cudaFree(p); };
  return m;
}

// max |a - b| / max |b|: error relative to the array's scale.
double scaled_error(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = a.size() == b.size() ? 0 : 1e300, scale = 1e-30;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
    diff = std::max(diff, std::fabs(a[i] - b[i]));
    scale = std::max(scale, std::fabs(b[i]));
  }
  return diff / scale;
}

void compare(const moeref::Result& gpu, const moeref::Result& cpu, double tol, const std::string& label) {
  for (size_t r = 0; r < cpu.y.size(); ++r) {
    double e;
    CHECK_MSG(gpu.topk[r] == cpu.topk[r], "%s rank %zu: top-k differs", label.c_str(), r);
    CHECK_MSG((e = scaled_error(gpu.y[r], cpu.y[r])) <= tol, "%s rank %zu: y error %.3g", label.c_str(), r, e);
    CHECK_MSG((e = scaled_error(gpu.gx[r], cpu.gx[r])) <= tol, "%s rank %zu: grad_x error %.3g", label.c_str(), r, e);
    CHECK_MSG((e = scaled_error(gpu.gwr[r], cpu.gwr[r])) <= tol, "%s rank %zu: grad_router error %.3g", label.c_str(),
              r, e);
    CHECK_MSG(std::fabs(gpu.aux[r] - cpu.aux[r]) <= 1e-5 * (1e-9 + std::fabs(cpu.aux[r])), "%s rank %zu: aux",
              label.c_str(), r);
  }
  double e = scaled_error(gpu.grads, cpu.grads);
  CHECK_MSG(e <= tol, "%s: expert grads error %.3g", label.c_str(), e);
}

struct Case {
  Model m;
  std::vector<std::vector<double>> xs, gs;
  std::vector<int64_t> ns;
};

Case make_case(int64_t H, int64_t F, int32_t E, int32_t K, std::vector<int64_t> ns, uint64_t seed, int32_t dtype) {
  Case c;
  c.m = moeref::make_model(H, F, E, K, seed);
  c.m.aux = 0.01;
  c.m.wr = moeref::rounded(c.m.wr, dtype);
  c.m.experts = moeref::rounded(c.m.experts, dtype);
  c.ns = ns;
  for (size_t r = 0; r < ns.size(); ++r) {
    c.xs.push_back(moeref::rounded(moeref::random_vec(size_t(ns[r] * H), seed + 10 * r, 1.0), dtype));
    c.gs.push_back(moeref::rounded(moeref::random_vec(size_t(ns[r] * H), seed + 10 * r + 5, 1.0), dtype));
  }
  return c;
}

TEST(gpu_equals_cpu_reference) {
  const moeref::Memory dev = device_memory();
  for (int32_t dtype : {DEEPEP4J_FLOAT32, DEEPEP4J_BFLOAT16, DEEPEP4J_FLOAT64}) {
    const double tol = dtype == DEEPEP4J_FLOAT32 ? 1e-5 : dtype == DEEPEP4J_FLOAT64 ? 1e-12 : 3e-2;
    for (int32_t R : {1, 2}) {
      Case small = make_case(8, 6, 4, 2, R == 1 ? std::vector<int64_t>{9} : std::vector<int64_t>{9, 5}, 3, dtype);
      Case many = make_case(64, 32, 32, 4, R == 1 ? std::vector<int64_t>{60} : std::vector<int64_t>{60, 37}, 4, dtype);
      for (Case* c : {&small, &many}) {
        moeref::Result cpu = moeref::run_block(c->m, dtype, R, c->xs, c->gs, c->ns, DEEPEP4J_DEVICE_CPU);
        for (int32_t gemm : {DEEPEP4J_MOE_GEMM_LOOP, DEEPEP4J_MOE_GEMM_AUTO, DEEPEP4J_MOE_GEMM_GROUPED})
          for (bool device : {false, true}) {
            std::string label = t::fmt("dtype %d, %d rank(s), E %d, gemm %d, %s memory", dtype, R, c->m.E, gemm,
                                       device ? "device" : "host");
            moeref::Result gpu = moeref::run_block(c->m, dtype, R, c->xs, c->gs, c->ns, DEEPEP4J_DEVICE_CUDA, gemm,
                                                   device ? &dev : nullptr);
            compare(gpu, cpu, tol, label);
          }
      }
    }
  }
}

// One rank, every dtype, device memory: the case compute-sanitizer runs (two ranks on one GPU spin against each other
// under its serialisation).
TEST(gpu_single_rank) {
  const moeref::Memory dev = device_memory();
  for (int32_t dtype : {DEEPEP4J_FLOAT32, DEEPEP4J_BFLOAT16, DEEPEP4J_FLOAT64}) {
    Case c = make_case(64, 32, 32, 4, {40}, 8, dtype);
    moeref::Result cpu = moeref::run_block(c.m, dtype, 1, c.xs, c.gs, c.ns, DEEPEP4J_DEVICE_CPU);
    for (int32_t gemm : {DEEPEP4J_MOE_GEMM_LOOP, DEEPEP4J_MOE_GEMM_GROUPED}) {
      moeref::Result gpu = moeref::run_block(c.m, dtype, 1, c.xs, c.gs, c.ns, DEEPEP4J_DEVICE_CUDA, gemm, &dev);
      compare(gpu, cpu, dtype == DEEPEP4J_FLOAT32 ? 1e-5 : dtype == DEEPEP4J_FLOAT64 ? 1e-12 : 3e-2,
              t::fmt("single rank dtype %d gemm %d", dtype, gemm));
    }
  }
}

TEST(gpu_fp64_gradients_match_finite_differences) {
  Case c = make_case(8, 6, 4, 2, {7, 4}, 21, DEEPEP4J_FLOAT64);
  moeref::Result gpu = moeref::run_block(c.m, DEEPEP4J_FLOAT64, 2, c.xs, c.gs, c.ns, DEEPEP4J_DEVICE_CUDA);
  const double eps = 1e-5, tol = 1e-6;
  auto fd = [&](double* p) {
    const double keep = *p;
    *p = keep + eps;
    double up = moeref::loss(c.m, c.xs, c.gs, c.ns);
    *p = keep - eps;
    double down = moeref::loss(c.m, c.xs, c.gs, c.ns);
    *p = keep;
    return (up - down) / (2 * eps);
  };
  auto near = [&](double got, double want) { return std::fabs(got - want) <= tol * (1 + std::fabs(want)); };
  for (int r = 0; r < 2; ++r)
    for (size_t i = 0; i < c.xs[size_t(r)].size(); i += 3) {
      double want = fd(&c.xs[size_t(r)][i]);
      CHECK_MSG(near(gpu.gx[size_t(r)][i], want), "grad_x rank %d [%zu] %.12g vs %.12g", r, i, gpu.gx[size_t(r)][i], want);
    }
  for (size_t i = 0; i < c.m.wr.size(); ++i) {
    double want = fd(&c.m.wr[i]);
    double got = gpu.gwr[0][i] + gpu.gwr[1][i];
    CHECK_MSG(near(got, want), "grad_router [%zu] %.12g vs %.12g", i, got, want);
  }
  for (size_t i = 0; i < c.m.experts.size(); i += 5) {
    double want = fd(&c.m.experts[i]);
    CHECK_MSG(near(gpu.grads[i], want), "expert grad [%zu] %.12g vs %.12g", i, gpu.grads[i], want);
  }
}

// A bad argument on one of two ranks sharing the GPU: INVALID_ARGUMENT there, PEER_ERROR (by fail_step, no timeout)
// on the other, outputs untouched, and the group goes on.
TEST(gpu_bad_input_on_one_rank_fails_every_rank) { moeref::check_bad_input_on_one_rank(DEEPEP4J_DEVICE_CUDA); }

// Three steps of each optimizer on the GPU equal the same steps on the CPU reference.
TEST(gpu_optimizer_equals_cpu) {
  Model m = moeref::make_model(8, 4, 2, 1, 5);
  for (int32_t kind : {DEEPEP4J_OPT_SGD, DEEPEP4J_OPT_ADAM, DEEPEP4J_OPT_ADAMW})
    for (int32_t dtype : {DEEPEP4J_FLOAT32, DEEPEP4J_FLOAT64, DEEPEP4J_BFLOAT16}) {
      std::vector<std::vector<double>> out;
      for (int32_t device : {DEEPEP4J_DEVICE_CPU, DEEPEP4J_DEVICE_CUDA}) {
        ep::Group g(1, moeref::buffer_config(m, 1, device));
        deepep4j_moe_config mc = moeref::moe_config(m, dtype, 16);
        deepep4j_moe* moe = nullptr;
        REQUIRE_OK(deepep4j_moe_create(g[0], &mc, &moe));
        const int64_t count = 2 * 3 * m.H * m.F;
        std::vector<double> p = moeref::random_vec(size_t(count), 50, 1.0);
        REQUIRE_OK(deepep4j_moe_write(moe, DEEPEP4J_MOE_PARAMS, DEEPEP4J_FLOAT64, p.data(), count));
        deepep4j_optimizer o;
        deepep4j_optimizer_init(&o, kind);
        o.learning_rate = 0.05;
        o.weight_decay = 0.1;
        o.grad_scale = 0.25;
        for (int it = 0; it < 3; ++it) {
          std::vector<double> grad = moeref::random_vec(size_t(count), 60 + it, 2.0);
          REQUIRE_OK(deepep4j_moe_write(moe, DEEPEP4J_MOE_GRADS, DEEPEP4J_FLOAT64, grad.data(), count));
          o.iteration = it;
          REQUIRE_OK(deepep4j_moe_step(moe, &o, nullptr));
        }
        REQUIRE_OK(deepep4j_moe_read(moe, DEEPEP4J_MOE_PARAMS, DEEPEP4J_FLOAT64, p.data(), count));
        out.push_back(p);
        deepep4j_moe_destroy(moe);
      }
      const double tol = dtype == DEEPEP4J_FLOAT64 ? 1e-14 : dtype == DEEPEP4J_FLOAT32 ? 1e-6 : 1e-2;
      double e = scaled_error(out[1], out[0]);
      CHECK_MSG(e <= tol, "kind %d dtype %d: GPU params differ from CPU by %.3g", kind, dtype, e);
    }
}

}  // namespace

int main(int argc, char** argv) {
  // Ranks share this GPU. Under CUDA's lazy module loading a kernel's first launch may wait for the whole device, i.e.
  // behind the other rank's spinning kernel, which waits for this rank; cuBLAS picks its kernels by shape, so the block
  // cannot load them all ahead. Eager loading (read when CUDA starts, so set first) loads every kernel at start.
  setenv("CUDA_MODULE_LOADING", "EAGER", 0);
  if (deepep4j_cuda_device_count() == 0) {
    std::fprintf(stderr, "skipped: no CUDA device visible (or this build has no CUDA backend)\n");
    return 77;
  }
  return t::main(argc, argv);
}
