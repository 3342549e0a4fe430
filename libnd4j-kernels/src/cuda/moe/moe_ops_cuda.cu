// moe_ops_cuda.cu — the MoE block's compute on one GPU: cuBLAS (loaded at run time) for every GEMM, the kernels of
// this folder for the rest, everything queued on the caller's stream. Small host-side tables (GEMM pointer arrays,
// expert offsets) go to the device through a ring of pinned slabs, each reused only after its last copy completed.
#include <cuda_runtime.h>

#include <algorithm>
#include <cinttypes>
#include <cstring>
#include <new>
#include <vector>

#include "common/backend.h"
#include "cuda/cuda_util.h"
#include "cuda/moe/cublas_api.h"
#include "cuda/moe/moe_kernels.h"
#include "moe/moe_ops.h"

namespace deepep4j {
namespace cuda {
namespace moe {
namespace {

using deepep4j::moe::Copy;
using deepep4j::moe::GemmDesc;
using deepep4j::moe::GemmGroup;
using deepep4j::moe::MoeOps;

constexpr size_t kSlabBytes = 64 << 10;
constexpr int kSlabs = 16;
constexpr size_t kCublasWorkspace = 32 << 20;  // cuBLAS's recommendation for Hopper

int cublas_type(int32_t dtype) {
  return dtype == DEEPEP4J_FLOAT64 ? kCudaR64F : dtype == DEEPEP4J_BFLOAT16 ? kCudaR16BF : kCudaR32F;
}

class CudaMoeOps final : public MoeOps {
 public:
  ~CudaMoeOps() override {
    use_device();
    if (scratch_) cudaFreeAsync(scratch_, stream_);
    if (stream_) cudaStreamSynchronize(stream_);
    for (auto& s : slabs_) {
      if (s.event) cudaEventDestroy(s.event);
      if (s.host) cudaFreeHost(s.host);
      if (s.dev) cudaFree(s.dev);
    }
    for (void* p : retired_host_) cudaFreeHost(p);
    if (handle_) api_->Destroy(handle_);
    if (workspace_) cudaFree(workspace_);
    if (pool_) cudaMemPoolDestroy(pool_);  // released once the block's last stream-ordered free has run
    if (warm_) cudaFree(warm_);
    if (own_stream_) cudaStreamDestroy(own_stream_);
  }

  int init(int32_t device_id) {
    device_ = device_id;
    const char* why = "";
    api_ = load_cublas(&why);
    if (api_ == nullptr)
      return set_error(DEEPEP4J_ERR_UNAVAILABLE, "MoE block on CUDA needs cuBLAS: %s (install CUDA's libcublas, 12.5 or "
                                                 "newer, on the library path)", why);
    if (int st = use_device()) return st;
    if (api_->Create(&handle_) != 0)
      return set_error(DEEPEP4J_ERR_UNAVAILABLE, "%s: cublasCreate failed on device %d", api_->library, device_id);
    api_->GetVersion(handle_, &version_);
    DEEPEP4J_CUDA_TRY(cudaStreamCreateWithFlags(&own_stream_, cudaStreamNonBlocking));
    stream_ = own_stream_;
    if (int st = create_pool()) return st;
    DEEPEP4J_CUDA_TRY(cudaMalloc(&workspace_, kCublasWorkspace));
    if (api_->SetWorkspace(handle_, workspace_, kCublasWorkspace) != 0)
      return set_error(DEEPEP4J_ERR_INTERNAL, "%s (version %d): cublasSetWorkspace failed", api_->library, version_);
    slabs_.resize(kSlabs);
    for (auto& s : slabs_) {
      DEEPEP4J_CUDA_TRY(cudaMallocHost(&s.host, kSlabBytes));
      DEEPEP4J_CUDA_TRY(cudaMalloc(&s.dev, kSlabBytes));
      DEEPEP4J_CUDA_TRY(cudaEventCreateWithFlags(&s.event, cudaEventDisableTiming));
    }
    // Everything that may load code or wait for the device happens here, before the block's first collective step:
    // with two ranks on one GPU, a lazy kernel load inside a step can wait behind the other rank's spinning kernel,
    // which waits for this rank (moe_kernels.h).
    if (cudaError_t e = preload_moe_kernels()) return cuda_status(e, "loading the MoE block's kernels");
    return warm_cublas();
  }

  bool on_device() const override { return true; }
  // Steps of 8 rows up to 256, then 16 sizes per doubling (at most 1/16, on average ~1/32, more rows): ~16 sizes per
  // doubling of the largest expert for warm_gemms to run.
  int64_t padded_rows(int64_t rows) const override {
    if (rows <= 0) return 0;
    int64_t step = 8;
    while (step * 32 < rows) step *= 2;
    return (rows + step - 1) / step * step;
  }
  // NULL is the block's own stream, never the legacy default stream: two ranks sharing one GPU must not be
  // serialised behind each other's spinning kernels, and the backend puts NULL-stream work on a stream of its own.
  void set_stream(void* s) override {
    stream_ = s ? static_cast<cudaStream_t>(s) : own_stream_;
    use_device();
  }
  void* stream() const override { return stream_; }

  // Stream-ordered, from the block's own pool: cudaFree would wait for the whole device, and with two ranks on one GPU
  // the other rank's kernels may be waiting for this one.
  int alloc(size_t bytes, void** out) override {
    if (int st = use_device()) return st;
    DEEPEP4J_CUDA_TRY(cudaMallocFromPoolAsync(out, bytes, pool_, stream_));
    DEEPEP4J_CUDA_TRY(cudaMemsetAsync(*out, 0, bytes, stream_));
    return DEEPEP4J_OK;
  }
  void release(void* p) override {
    use_device();
    cudaFreeAsync(p, stream_);
  }
  int alloc_host(size_t bytes, void** out) override {
    DEEPEP4J_CUDA_TRY(cudaMallocHost(out, bytes));
    return DEEPEP4J_OK;
  }
  // cudaFreeHost waits for the device too: pinned staging that grew is freed with the block.
  void release_host(void* p) override { retired_host_.push_back(p); }
  int copy(void* dst, const void* src, size_t bytes, Copy kind) override {
    if (bytes == 0) return DEEPEP4J_OK;
    const cudaMemcpyKind k = kind == Copy::kHostToDevice   ? cudaMemcpyHostToDevice
                             : kind == Copy::kDeviceToHost ? cudaMemcpyDeviceToHost
                                                           : cudaMemcpyDeviceToDevice;
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, k, stream_));
    return DEEPEP4J_OK;
  }
  int copy_2d(void* dst, size_t dpitch, const void* src, size_t spitch, size_t row_bytes, int64_t rows) override {
    if (rows == 0) return DEEPEP4J_OK;
    DEEPEP4J_CUDA_TRY(cudaMemcpy2DAsync(dst, dpitch, src, spitch, row_bytes, size_t(rows), cudaMemcpyDeviceToDevice,
                                        stream_));
    return DEEPEP4J_OK;
  }
  int zero(void* p, size_t bytes) override {
    if (bytes) DEEPEP4J_CUDA_TRY(cudaMemsetAsync(p, 0, bytes, stream_));
    return DEEPEP4J_OK;
  }
  int synchronize() override {
    DEEPEP4J_CUDA_TRY(cudaStreamSynchronize(stream_));
    return DEEPEP4J_OK;
  }

  int gemm(const GemmDesc& d, const GemmGroup* groups, int32_t count, int32_t mode) override {
    std::vector<const GemmGroup*> live;
    for (int32_t i = 0; i < count; ++i) {
      const GemmGroup& g = groups[i];
      if (g.m == 0 || g.n == 0) continue;
      if (g.k == 0) {
        if (d.beta == 0.0) return set_error(DEEPEP4J_ERR_INTERNAL, "gemm with k = 0 and beta = 0");
        continue;  // C = beta * C with beta = 1
      }
      live.push_back(&g);
    }
    if (live.empty()) return DEEPEP4J_OK;
    if (api_->SetStream(handle_, stream_) != 0)
      return set_error(DEEPEP4J_ERR_INTERNAL, "%s: cublasSetStream failed", api_->library);
    const bool f64 = d.ab_dtype == DEEPEP4J_FLOAT64;
    bool grouped = mode == DEEPEP4J_MOE_GEMM_GROUPED;
    if (mode == DEEPEP4J_MOE_GEMM_AUTO) {
      // Many small products: one grouped call; few large ones: a loop of GEMMs (see BENCHMARKS.md).
      int64_t rows = 0;
      for (auto* g : live) rows += std::min(g->m, g->k);
      grouped = live.size() >= 16 && rows / int64_t(live.size()) < 384;
    }
    if (grouped && !f64 && live.size() > 1) {
      if (api_->GemmGroupedBatchedEx == nullptr)
        return set_error(DEEPEP4J_ERR_UNAVAILABLE,
                         "config.gemm = GROUPED: %s (version %d) has no cublasGemmGroupedBatchedEx (needs cuBLAS >= "
                         "12.5); use gemm = LOOP or AUTO",
                         api_->library, version_);
      return d.c_dtype == d.ab_dtype ? gemm_grouped(d, live) : gemm_grouped_mixed(d, live);
    }
    for (auto* g : live)
      if (int st = gemm_one(d, *g)) return st;
    return DEEPEP4J_OK;
  }

  int router_forward(int32_t dtype, const deepep4j::moe::RouterForward& r) override {
    if (r.e > 4096)
      return set_error(DEEPEP4J_ERR_INVALID_ARGUMENT, "config.num_experts = %d: the CUDA router takes at most 4096",
                       r.e);
    return launched(launch_router_forward(dtype, r, stream_), "router forward");
  }
  int router_backward(int32_t dtype, const deepep4j::moe::RouterBackward& r) override {
    return launched(launch_router_backward(dtype, r, stream_), "router backward");
  }
  int permutation(const deepep4j::moe::Permutation& p) override {
    void* offsets = nullptr;
    if (int st = to_device(p.offsets, sizeof(int64_t) * size_t(p.num_local + 1), &offsets)) return st;
    return launched(launch_permutation(p, static_cast<const int64_t*>(offsets), stream_), "permutation");
  }
  int gather_rows(int32_t dtype, int64_t count, int64_t h, const void* src, int64_t stride, const int32_t* row,
                  const void* scale, void* dst) override {
    return launched(launch_gather_rows(dtype, count, h, src, stride, row, scale, dst, stream_), "gather rows");
  }
  int scatter_rows(int32_t dtype, int64_t m, int32_t k, int64_t h, const int32_t* pos, const void* src,
                   const void* scale, void* out, int64_t out_stride) override {
    return launched(launch_scatter_rows(dtype, m, k, h, pos, src, scale, out, out_stride, stream_), "scatter rows");
  }
  int row_dots(int32_t dtype, int64_t count, int64_t h, const void* rows, int64_t stride, const int32_t* row,
               const void* src, void* out) override {
    return launched(launch_row_dots(dtype, count, h, rows, stride, row, src, out, stream_), "row dots");
  }
  int gather_slots(int32_t dtype, int64_t count, int32_t k, const int32_t* slot, const void* values, int32_t vdt,
                   int64_t stride, int64_t offset, void* out) override {
    return launched(launch_gather_slots(dtype, count, k, slot, values, vdt, stride, offset, out, stream_),
                    "gather slots");
  }
  int scatter_slots(int32_t dtype, int64_t m, int32_t k, const int32_t* pos, const void* src, void* values, int32_t vdt,
                    int64_t stride, int64_t offset) override {
    return launched(launch_scatter_slots(dtype, m, k, pos, src, values, vdt, stride, offset, stream_),
                    "scatter slots");
  }
  int unpack_columns(int32_t dtype, int64_t rows, int32_t k, const void* in, int32_t in_dtype, int64_t stride,
                     int64_t offset, void* out) override {
    return launched(launch_columns(false, dtype, rows, k, in, in_dtype, stride, offset, out, stream_), "columns");
  }
  int pack_columns(int32_t dtype, int64_t rows, int32_t k, const void* in, void* out, int32_t out_dtype,
                   int64_t stride, int64_t offset) override {
    return launched(launch_columns(true, dtype, rows, k, in, out_dtype, stride, offset, out, stream_), "columns");
  }
  int swiglu_forward(int32_t dtype, int64_t count, const void* a, const void* b, void* h) override {
    return launched(launch_swiglu_forward(dtype, count, a, b, h, stream_), "swiglu forward");
  }
  int swiglu_backward(int32_t dtype, int64_t count, const void* a, const void* b, const void* gh, void* ga,
                      void* gb) override {
    return launched(launch_swiglu_backward(dtype, count, a, b, gh, ga, gb, stream_), "swiglu backward");
  }
  int optimizer_step(int32_t dtype, int64_t count, const deepep4j_optimizer& opt, void* params, const void* grads,
                     void* m, void* v) override {
    return launched(launch_optimizer_step(dtype, count, opt, params, grads, m, v, stream_), "optimizer step");
  }

 private:
  struct Slab {
    void* host = nullptr;
    void* dev = nullptr;
    cudaEvent_t event = nullptr;
    bool used = false;
  };

  int use_device() const { return cuda_status(cudaSetDevice(device_), "cudaSetDevice"); }

  // The block's device memory comes from a pool of its own that keeps what it has mapped (release threshold: all):
  // the device's default pool is shared with the backend and other libraries, and by default gives memory back to
  // the driver at every synchronisation, so a later step would map it again; mapping and unmapping while a peer's
  // kernel spins on the same GPU is what the block must not risk inside a step (like copy_engine.cu's staging pool).
  int create_pool() {
    cudaMemPoolProps props{};
    props.allocType = cudaMemAllocationTypePinned;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = device_;
    DEEPEP4J_CUDA_TRY(cudaMemPoolCreate(&pool_, &props));
    uint64_t keep_all = UINT64_MAX;
    DEEPEP4J_CUDA_TRY(cudaMemPoolSetAttribute(pool_, cudaMemPoolAttrReleaseThreshold, &keep_all));
    return DEEPEP4J_OK;
  }

  // cuBLAS sets up its handle and loads kernels at first use: one small product of every kind the block runs (each
  // dtype, fp32 C from bf16, loop and grouped, each transpose the backward uses), run now and waited for.
  int warm_cublas() {
    constexpr int64_t n = 64;
    const size_t bytes = size_t(n * n) * sizeof(double);
    // Kept until the block is destroyed: cudaFree waits for the whole device, where a peer may already spin in the
    // config agreement's barrier, waiting for this rank.
    DEEPEP4J_CUDA_TRY(cudaMalloc(&warm_, 4 * bytes));
    char* p = static_cast<char*>(warm_);
    int st = cuda_status(cudaMemsetAsync(warm_, 0, 4 * bytes, stream_), "cudaMemsetAsync");
    const GemmGroup groups[2] = {{n, n, n, p, p + bytes, p + 2 * bytes}, {n, n, n, p, p + bytes, p + 3 * bytes}};
    for (int32_t dtype : {DEEPEP4J_FLOAT32, DEEPEP4J_BFLOAT16, DEEPEP4J_FLOAT64})
      for (int32_t c_dtype : {dtype, int32_t(DEEPEP4J_FLOAT32)})
        for (int32_t mode : {DEEPEP4J_MOE_GEMM_LOOP, DEEPEP4J_MOE_GEMM_GROUPED})
          for (int t = 0; t < 3 && st == DEEPEP4J_OK; ++t) {
            if (c_dtype != dtype && dtype != DEEPEP4J_BFLOAT16) continue;
            if (mode == DEEPEP4J_MOE_GEMM_GROUPED && api_->GemmGroupedBatchedEx == nullptr) continue;
            GemmDesc d;
            d.trans_a = t == 1;
            d.trans_b = t == 2;
            d.ab_dtype = dtype;
            d.c_dtype = c_dtype;
            d.lda = d.ldb = d.ldc = n;
            st = gemm(d, groups, 2, mode);
          }
    if (st == DEEPEP4J_OK) st = synchronize();
    return st;
  }

  int launched(cudaError_t e, const char* what) { return cuda_status(e, what); }

  // Copies a small host table to device memory, ordered on the stream.
  int to_device(const void* host, size_t bytes, void** out) {
    if (bytes > kSlabBytes)
      return set_error(DEEPEP4J_ERR_INTERNAL, "MoE block: a %zu-byte table exceeds the %zu-byte staging slab", bytes,
                       kSlabBytes);
    Slab& s = slabs_[size_t(next_slab_)];
    next_slab_ = (next_slab_ + 1) % kSlabs;
    if (s.used) DEEPEP4J_CUDA_TRY(cudaEventSynchronize(s.event));  // its previous copy has long finished
    std::memcpy(s.host, host, bytes);
    DEEPEP4J_CUDA_TRY(cudaMemcpyAsync(s.dev, s.host, bytes, cudaMemcpyHostToDevice, stream_));
    DEEPEP4J_CUDA_TRY(cudaEventRecord(s.event, stream_));
    s.used = true;
    *out = s.dev;
    return DEEPEP4J_OK;
  }

  // Row-major C[m,n] = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: B and A swap places.
  int gemm_one(const GemmDesc& d, const GemmGroup& g) {
    const bool f64 = d.ab_dtype == DEEPEP4J_FLOAT64;
    const float af = float(d.alpha), bf = float(d.beta);
    const double ad = d.alpha, bd = d.beta;
    const int st = api_->GemmEx(handle_, d.trans_b ? kCublasOpT : kCublasOpN, d.trans_a ? kCublasOpT : kCublasOpN,
                                int(g.n), int(g.m), int(g.k), f64 ? static_cast<const void*>(&ad) : &af, g.b,
                                cublas_type(d.ab_dtype), int(d.ldb), g.a, cublas_type(d.ab_dtype), int(d.lda),
                                f64 ? static_cast<const void*>(&bd) : &bf, g.c, cublas_type(d.c_dtype), int(d.ldc),
                                f64 ? kCublasCompute64F : kCublasCompute32F, kCublasGemmDefault);
    if (st != 0)
      return set_error(DEEPEP4J_ERR_INTERNAL,
                       "%s (version %d): cublasGemmEx(m=%" PRId64 ", n=%" PRId64 ", k=%" PRId64 ") failed with status %d",
                       api_->library, version_, g.m, g.n, g.k, st);
    return DEEPEP4J_OK;
  }

  int gemm_grouped(const GemmDesc& d, const std::vector<const GemmGroup*>& live) {
    const int count = int(live.size());
    std::vector<int> ta(size_t(count), d.trans_b ? kCublasOpT : kCublasOpN);
    std::vector<int> tb(size_t(count), d.trans_a ? kCublasOpT : kCublasOpN);
    const size_t c = static_cast<size_t>(count);
    std::vector<int> m(c), n(c), k(c), lda(c, int(d.ldb)), ldb(c, int(d.lda)), ldc(c, int(d.ldc)), size(c, 1);
    std::vector<float> alpha(size_t(count), float(d.alpha)), beta(size_t(count), float(d.beta));
    std::vector<const void*> ptrs(size_t(3 * count));
    for (int i = 0; i < count; ++i) {
      m[size_t(i)] = int(live[size_t(i)]->n);
      n[size_t(i)] = int(live[size_t(i)]->m);
      k[size_t(i)] = int(live[size_t(i)]->k);
      ptrs[size_t(i)] = live[size_t(i)]->b;
      ptrs[size_t(count + i)] = live[size_t(i)]->a;
      ptrs[size_t(2 * count + i)] = live[size_t(i)]->c;
    }
    void* dev = nullptr;
    if (int st = to_device(ptrs.data(), ptrs.size() * sizeof(void*), &dev)) return st;
    const void* const* p = static_cast<const void* const*>(dev);
    const int st = api_->GemmGroupedBatchedEx(handle_, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(),
                                              p, cublas_type(d.ab_dtype), lda.data(), p + count,
                                              cublas_type(d.ab_dtype), ldb.data(), beta.data(),
                                              const_cast<void* const*>(p + 2 * count), cublas_type(d.c_dtype),
                                              ldc.data(), count, size.data(), kCublasCompute32F);
    if (st != 0)
      return set_error(DEEPEP4J_ERR_INTERNAL, "%s (version %d): cublasGemmGroupedBatchedEx(%d groups) failed with "
                                              "status %d",
                       api_->library, version_, count, st);
    return DEEPEP4J_OK;
  }

  // cublasGemmGroupedBatchedEx takes one type for A, B and C (bf16 in / fp32 out is NOT_SUPPORTED in cuBLAS 13.1):
  // the bf16 products go to a scratch area, then one kernel adds them (times alpha) to the fp32 C (times beta). The
  // products are rounded to bf16 once, as a bf16 framework's weight gradients are.
  int gemm_grouped_mixed(const GemmDesc& d, const std::vector<const GemmGroup*>& live) {
    size_t total = 0;
    for (auto* g : live) {
      if (g->m * g->n >= (int64_t(1) << 31))
        return set_error(DEEPEP4J_ERR_INTERNAL, "MoE block: a grouped product of %" PRId64 " x %" PRId64
                         " elements exceeds 2^31", g->m, g->n);
      total += (size_t(g->m * g->n) + 7) / 8 * 8;
    }
    if (scratch_bytes_ < total * 2) {
      if (scratch_) cudaFreeAsync(scratch_, stream_);
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      DEEPEP4J_CUDA_TRY(cudaMallocFromPoolAsync(&scratch_, total * 2, pool_, stream_));
      scratch_bytes_ = total * 2;
    }
    std::vector<GemmGroup> into(live.size());
    std::vector<AccumulateGroup> table(live.size());
    size_t at = 0;
    for (size_t i = 0; i < live.size(); ++i) {
      into[i] = *live[i];
      into[i].c = static_cast<uint8_t*>(scratch_) + at * 2;
      table[i] = AccumulateGroup{static_cast<float*>(live[i]->c), static_cast<const __nv_bfloat16*>(into[i].c),
                                 live[i]->m, live[i]->n, d.ldc};
      at += (size_t(live[i]->m * live[i]->n) + 7) / 8 * 8;  // each product 16-byte aligned
    }
    GemmDesc bf = d;
    bf.c_dtype = d.ab_dtype;
    bf.alpha = 1.0;
    bf.beta = 0.0;
    std::vector<const GemmGroup*> ptrs;
    for (auto& g : into) {
      ptrs.push_back(&g);
      bf.ldc = g.n;  // products are dense
    }
    if (int st = gemm_grouped(bf, ptrs)) return st;
    void* dev = nullptr;
    if (int st = to_device(table.data(), table.size() * sizeof(AccumulateGroup), &dev)) return st;
    bool wide = true;
    for (const AccumulateGroup& g : table) wide = wide && accumulate_can_widen(g);
    return launched(launch_accumulate_groups(static_cast<const AccumulateGroup*>(dev), int32_t(table.size()), wide,
                                             float(d.alpha), float(d.beta), stream_),
                    "accumulate grouped products");
  }

  const Cublas* api_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  void* warm_ = nullptr;  // operands of warm_cublas
  int version_ = 0;
  int32_t device_ = 0;
  cudaStream_t stream_ = nullptr;
  cudaStream_t own_stream_ = nullptr;
  cudaMemPool_t pool_ = nullptr;
  void* workspace_ = nullptr;
  std::vector<Slab> slabs_;
  std::vector<void*> retired_host_;
  void* scratch_ = nullptr;  // bf16 products of a grouped call whose C is fp32 (see gemm_grouped_mixed)
  size_t scratch_bytes_ = 0;
  int next_slab_ = 0;
};

}  // namespace
}  // namespace moe
}  // namespace cuda

namespace moe {
int make_cuda_moe_ops(int32_t device_id, std::unique_ptr<MoeOps>* out) {
  auto* ops = new (std::nothrow) cuda::moe::CudaMoeOps();
  if (ops == nullptr) return set_error(DEEPEP4J_ERR_OUT_OF_MEMORY, "MoE block: host allocation failed");
  std::unique_ptr<MoeOps> owned(ops);
  if (int st = ops->init(device_id)) return st;
  *out = std::move(owned);
  return DEEPEP4J_OK;
}
}  // namespace moe
}  // namespace deepep4j
