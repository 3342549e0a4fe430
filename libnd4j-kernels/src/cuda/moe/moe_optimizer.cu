// moe_optimizer.cu — one DL4J update (SGD, Adam, AdamW = Adam + WeightDecay) of the expert parameters; the formulas
// are written out in src/moe/moe_block.cpp (block_step).
#include <cmath>

#include "cuda/moe/moe_kernels.h"
#include "cuda/moe/moe_types.cuh"

namespace deepep4j {
namespace cuda {
namespace moe {
namespace {

template <class A>
struct Hyper {
  int32_t kind;
  A lr, b1, b2, eps, wd, scale, eps_t;
};

template <class T, class A>
__global__ void optimizer_kernel(int64_t n, Hyper<A> o, T* p, const A* g, A* m, A* v) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const A gi = g[i] * o.scale;
    const A pi = to_acc(p[i]);
    A update;
    if (o.kind == DEEPEP4J_OPT_SGD) {
      update = o.lr * gi;
    } else {
      const A mi = o.b1 * m[i] + (A(1) - o.b1) * gi;
      const A vi = o.b2 * v[i] + (A(1) - o.b2) * gi * gi;
      m[i] = mi;
      v[i] = vi;
      update = o.eps_t * mi / (sqrt(vi) + o.eps);
      if (o.kind == DEEPEP4J_OPT_ADAMW) update += o.lr * o.wd * pi;
    }
    p[i] = from_acc<T, A>(pi - update);
  }
}

}  // namespace

cudaError_t launch_optimizer_step(int32_t dtype, int64_t n, const deepep4j_optimizer& opt, void* params,
                                  const void* grads, void* m, void* v, cudaStream_t s) {
  if (n == 0) return cudaSuccess;
  return with_types(dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    Hyper<A> h{opt.kind, A(opt.learning_rate), A(opt.beta1), A(opt.beta2), A(opt.epsilon), A(opt.weight_decay),
               A(opt.grad_scale), A(0)};
    // The bias-corrected rate, on the host in the same type as the CPU reference.
    const A it = A(opt.iteration);
    h.eps_t = h.lr * std::sqrt(A(1) - std::pow(h.b2, it + A(1))) / (A(1) - std::pow(h.b1, it + A(1)));
    if (std::isnan(h.eps_t) || h.eps_t == A(0) || std::isinf(h.eps_t)) h.eps_t = h.eps;
    optimizer_kernel<T, A><<<blocks_for(n, 256), 256, 0, s>>>(n, h, static_cast<T*>(params), static_cast<const A*>(grads),
                                                             static_cast<A*>(m), static_cast<A*>(v));
    return cudaGetLastError();
  });
}

// Loads this file's kernels now (cudaFuncGetAttributes), for every dtype: see preload_moe_kernels.
cudaError_t preload_optimizer_kernels() {
  return for_each_dtype(
      [](auto t, auto acc) { return preload({(const void*)optimizer_kernel<decltype(t), decltype(acc)>}); });
}

}  // namespace moe
}  // namespace cuda
}  // namespace deepep4j
