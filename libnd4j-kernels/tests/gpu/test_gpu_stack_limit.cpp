// test_gpu_stack_limit.cpp — the stack rule of kernels.h: after a buffer or MoE block is created, the device's stack
// limit covers the per-thread local memory of every kernel it may launch (a launch needing more grows local memory,
// which waits for every running kernel: with two ranks on one GPU, for the other rank's spinning one); up to
// kFewRanks ranks every kernel fits CUDA's default 1 KB stack (no raise at all); and every kernel of the engine's
// kernel files is in the lists that create covers. Exit 77 without a GPU.
#include <cuda.h>

#include <set>
#include <string>

#include "../moe_reference.h"
#include "cuda/kernels.h"
#include "cuda/moe/moe_kernels.h"
#include "gpu_group.h"

namespace {

namespace cu = deepep4j::cuda;

constexpr size_t kDefaultStack = 1024;  // CUDA's default cudaLimitStackSize
size_t g_start_limit = 0;               // the limit before any create (each case starts from it)

size_t stack_limit() {
  size_t v = 0;
  CUDA_OK(cudaDeviceGetLimit(&v, cudaLimitStackSize));
  return v;
}

// Back to the limit the process started with (no buffer exists between cases, so lowering it is safe here).
void reset_limit() {
  CUDA_OK(cudaSetDevice(0));
  CUDA_OK(cudaDeviceSetLimit(cudaLimitStackSize, g_start_limit));
  REQUIRE(stack_limit() <= kDefaultStack);
}

// Every list of kernels.h for R ranks, each into its own set (name, set).
struct Lists {
  cu::KernelSet control, ring_dispatch, ring_combine, ce, a2a, moe;
  explicit Lists(int32_t R) {
    CUDA_OK(cu::load_control_kernels(&control));
    CUDA_OK(cu::load_ring_dispatch_kernels(&ring_dispatch));
    CUDA_OK(cu::load_ring_combine_kernels(R, &ring_combine));
    CUDA_OK(cu::load_ce_kernels(R, &ce));
    CUDA_OK(cu::load_a2a_kernels(R, &a2a));
    CUDA_OK(deepep4j::cuda::moe::load_moe_kernels(&moe));
  }
  std::vector<std::pair<const char*, const cu::KernelSet*>> all() const {
    return {{"control", &control}, {"ring dispatch", &ring_dispatch}, {"ring combine", &ring_combine},
            {"copy engine", &ce},  {"all-to-all", &a2a},              {"MoE block", &moe}};
  }
};

size_t most(std::initializer_list<const cu::KernelSet*> sets) {
  size_t m = 0;
  for (const cu::KernelSet* k : sets) m = std::max(m, k->stack_bytes);
  return m;
}

// Creates R buffers of `cfg` on device 0 (create alone loads the kernels and raises the limit; no connect), checks
// the limit then covers `need` (and is left alone when the start limit already did), destroys them. False (nothing checked) when the backend is unavailable here.
bool limit_after_create_covers(int32_t R, deepep4j_config cfg, size_t need, const char* what) {
  reset_limit();
  cfg.device_id = 0;
  std::vector<deepep4j_buffer*> bufs(size_t(R), nullptr);
  bool available = true;
  for (int32_t r = 0; r < R && available; ++r) {
    const int st = deepep4j_buffer_create(r, R, &cfg, &bufs[size_t(r)]);
    if (st == DEEPEP4J_ERR_UNAVAILABLE) {
      std::fprintf(stderr, "  %s, R = %d: backend unavailable here (%s), not checked\n", what, R,
                   deepep4j_last_error());
      available = false;
    } else {
      REQUIRE_OK(st);
    }
  }
  if (available) {
    const size_t limit = stack_limit();
    std::fprintf(stderr, "  %s, R = %d: kernels need %zu bytes of stack, limit after create %zu\n", what, R, need,
                 limit);
    CHECK_MSG(limit >= need, "%s, R = %d: stack limit %zu after create < %zu bytes its kernels need", what, R, limit,
              need);
    // Raised only when needed: the limit costs device memory for every thread the device can hold.
    if (need <= g_start_limit)
      CHECK_MSG(limit == g_start_limit, "%s, R = %d: stack limit raised to %zu though its kernels need %zu", what, R,
                limit, need);
  }
  for (deepep4j_buffer* b : bufs)
    if (b) deepep4j_buffer_destroy(b);
  return available;
}

ref::Shape shape(int32_t R) {
  ref::Shape s;
  s.num_ranks = R, s.num_experts = 2 * R, s.num_topk = 2, s.hidden = 256, s.dtype = DEEPEP4J_BFLOAT16;
  return s;
}

}  // namespace

// Up to kFewRanks ranks no kernel needs more than the default stack, so a buffer of a few ranks raises nothing.
TEST(kernels_of_few_ranks_fit_the_default_stack) {
  const Lists l(cu::kFewRanks);
  for (const auto& [name, k] : l.all()) {
    std::fprintf(stderr, "  %s: %zu kernels, largest stack %zu bytes\n", name, k->entries.size(), k->stack_bytes);
    CHECK_MSG(!k->entries.empty(), "%s: no kernels listed", name);
    CHECK_MSG(k->stack_bytes <= kDefaultStack, "%s kernels (R <= %d) need %zu bytes of stack, more than the default %zu",
              name, cu::kFewRanks, k->stack_bytes, kDefaultStack);
  }
}

// Every backend and transfer mode, for a few ranks and for more than kFewRanks (where the combine kernels need more
// than the default stack, so create must raise it).
TEST(limit_after_buffer_create_covers_its_kernels) {
  for (int32_t R : {2, 2 * cu::kFewRanks}) {
    const Lists l(R);
    deepep4j_config c = gpu::cuda_config(shape(R), DEEPEP4J_BACKEND_DEEPEP);
    c.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_SM;
    limit_after_create_covers(R, c, most({&l.control, &l.ring_dispatch, &l.ring_combine}), "deepep, sm");
    c.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_AUTO;
    limit_after_create_covers(R, c, most({&l.control, &l.ring_dispatch, &l.ring_combine, &l.ce}),
                              "deepep, auto (rings and copy engine)");
    c.cuda_transfer = DEEPEP4J_CUDA_TRANSFER_SM;
    c.stream_ordered = 1;
    limit_after_create_covers(R, c, most({&l.control, &l.ring_dispatch, &l.ring_combine}), "deepep, stream-ordered");
    deepep4j_config a = gpu::cuda_config(shape(R), DEEPEP4J_BACKEND_ALLTOALL);
    limit_after_create_covers(R, a, most({&l.control, &l.a2a}), "alltoall");
  }
  // The any-R specialisations do need more than the default: otherwise the R = 16 cases above prove nothing.
  const Lists big(2 * cu::kFewRanks);
  CHECK_MSG(big.ring_combine.stack_bytes > kDefaultStack, "ring combine for R > %d: %zu bytes", cu::kFewRanks,
            big.ring_combine.stack_bytes);
}

// A MoE block's create covers the kernels it launches (today they fit the default stack, so this holds without a raise;
// it fails once one of them does not and the block's create does not raise the limit).
TEST(limit_after_moe_create_covers_its_kernels) {
  const Lists l(1);
  moeref::Model m = moeref::make_model(8, 4, 2, 1, 5);
  reset_limit();
  ep::Group g(1, moeref::buffer_config(m, 1, DEEPEP4J_DEVICE_CUDA));
  reset_limit();  // the buffer's own raise (none for one rank) must not be what covers the block
  deepep4j_moe_config mc = moeref::moe_config(m, DEEPEP4J_BFLOAT16, 16);
  deepep4j_moe* moe = nullptr;
  REQUIRE_OK(deepep4j_moe_create(g[0], &mc, &moe));
  const size_t limit = stack_limit();
  CHECK_MSG(limit >= l.moe.stack_bytes, "stack limit %zu after deepep4j_moe_create < %zu bytes its kernels need",
            limit, l.moe.stack_bytes);
  deepep4j_moe_destroy(moe);
}

// Each kernel file is one CUDA module: every function of a module that holds a listed kernel must be listed itself
// (for some R), so a kernel added to a file without adding it to the file's load_*_kernels list fails here.
TEST(every_kernel_of_a_listed_file_is_listed) {
  CUDA_OK(cudaSetDevice(0));
  void* fp[4] = {};
  const char* names[4] = {"cuFuncGetModule", "cuFuncGetName", "cuModuleGetFunctionCount", "cuModuleEnumerateFunctions"};
  for (int i = 0; i < 4; ++i) {
    cudaDriverEntryPointQueryResult found{};
    CUDA_OK(cudaGetDriverEntryPointByVersion(names[i], &fp[i], 12040, cudaEnableDefault, &found));
    REQUIRE(found == cudaDriverEntryPointSuccess && fp[i] != nullptr);
  }
  auto get_module = reinterpret_cast<CUresult (*)(CUmodule*, CUfunction)>(fp[0]);
  auto get_name = reinterpret_cast<CUresult (*)(const char**, CUfunction)>(fp[1]);
  auto count_of = reinterpret_cast<CUresult (*)(unsigned*, CUmodule)>(fp[2]);
  auto enumerate = reinterpret_cast<CUresult (*)(CUfunction*, unsigned, CUmodule)>(fp[3]);
  auto ok = [](CUresult r, const char* call) {
    if (r != CUDA_SUCCESS) {
      t::fail(__FILE__, __LINE__, t::fmt("%s -> CUresult %d", call, int(r)));
      throw t::Abort{};
    }
  };

  std::set<std::string> listed;
  std::set<CUmodule> modules;
  for (int32_t R : {1, DEEPEP4J_MAX_RANKS}) {
    const Lists l(R);
    for (const auto& list : l.all())
      for (const void* entry : list.second->entries) {
        cudaFunction_t f = nullptr;
        CUDA_OK(cudaGetFuncBySymbol(&f, entry));
        const char* fname = nullptr;
        CUmodule mod = nullptr;
        ok(get_name(&fname, f), "cuFuncGetName");
        ok(get_module(&mod, f), "cuFuncGetModule");
        listed.insert(fname);
        modules.insert(mod);
      }
  }
  size_t seen = 0;
  for (CUmodule mod : modules) {
    unsigned n = 0;
    ok(count_of(&n, mod), "cuModuleGetFunctionCount");
    std::vector<CUfunction> fs(n);
    ok(enumerate(fs.data(), n, mod), "cuModuleEnumerateFunctions");
    for (CUfunction f : fs) {
      const char* fname = nullptr;
      ok(get_name(&fname, f), "cuFuncGetName");
      ++seen;
      CHECK_MSG(listed.count(fname) == 1, "kernel %s is in a kernel file but in no load_*_kernels list", fname);
    }
  }
  std::fprintf(stderr, "  %zu modules, %zu functions, %zu listed kernels\n", modules.size(), seen, listed.size());
  CHECK(seen >= listed.size());
}

int main(int argc, char** argv) {
  // Whole modules loaded at start (read when CUDA starts, so set first): a lazily loaded module may list only the
  // functions loaded so far, which would hide an unlisted kernel from the last case.
  setenv("CUDA_MODULE_LOADING", "EAGER", 1);
  if (deepep4j_cuda_device_count() == 0) {
    std::fprintf(stderr, "skipped: no CUDA device visible (or this build has no CUDA backend)\n");
    return gpu::kSkip;
  }
  if (cudaSetDevice(0) != cudaSuccess || cudaDeviceGetLimit(&g_start_limit, cudaLimitStackSize) != cudaSuccess) {
    std::fprintf(stderr, "cudaDeviceGetLimit(cudaLimitStackSize) failed\n");
    return 1;
  }
  return t::main(argc, argv);
}
