// moe_ops_cpu.cpp — the reference implementation of the MoE block's compute: straight loops over host memory,
// accumulating in fp32 for fp32 / bf16 and in fp64 for fp64 (the same rounding points as the CUDA kernels: bf16 values
// are rounded where they are stored).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "../common/backend.h"
#include "../common/dtype.h"
#include "../moe/moe_ops.h"

namespace deepep4j {
namespace moe {
namespace {

struct Bf16 {
  uint16_t bits;
};

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }
inline float to_acc(Bf16 v) { return bf16_to_float(v.bits); }
template <class T, class A> inline T from_acc(A v);
template <> inline float from_acc<float, float>(float v) { return v; }
template <> inline double from_acc<double, double>(double v) { return v; }
template <> inline Bf16 from_acc<Bf16, float>(float v) { return Bf16{float_to_bf16(v)}; }

// Calls f(T{}, A{}) with the element and accumulation types of a block dtype.
template <class F>
int with_types(int32_t dtype, F&& f) {
  if (dtype == DEEPEP4J_FLOAT64) return f(double{}, double{});
  if (dtype == DEEPEP4J_BFLOAT16) return f(Bf16{}, float{});
  return f(float{}, float{});
}

template <class A>
A load_value(const void* p, int32_t dtype, int64_t i) {
  return dtype == DEEPEP4J_FLOAT64 ? A(static_cast<const double*>(p)[i]) : A(static_cast<const float*>(p)[i]);
}
template <class A>
void store_value(void* p, int32_t dtype, int64_t i, A v) {
  if (dtype == DEEPEP4J_FLOAT64)
    static_cast<double*>(p)[i] = double(v);
  else
    static_cast<float*>(p)[i] = float(v);
}

class CpuMoeOps final : public MoeOps {
 public:
  bool on_device() const override { return false; }
  void set_stream(void*) override {}
  void* stream() const override { return nullptr; }

  int alloc(size_t bytes, void** out) override {
    *out = std::calloc(bytes ? bytes : 1, 1);
    if (*out == nullptr) return set_error(DEEPEP4J_ERR_OUT_OF_MEMORY, "MoE block: %zu bytes of host memory", bytes);
    return DEEPEP4J_OK;
  }
  void release(void* p) override { std::free(p); }
  int alloc_host(size_t bytes, void** out) override { return alloc(bytes, out); }
  void release_host(void* p) override { std::free(p); }
  int copy(void* dst, const void* src, size_t bytes, Copy) override {
    if (bytes) std::memmove(dst, src, bytes);
    return DEEPEP4J_OK;
  }
  int copy_2d(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t row_bytes,
              int64_t rows) override {
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(static_cast<uint8_t*>(dst) + r * dst_pitch, static_cast<const uint8_t*>(src) + r * src_pitch,
                  row_bytes);
    return DEEPEP4J_OK;
  }
  int zero(void* p, size_t bytes) override {
    if (bytes) std::memset(p, 0, bytes);
    return DEEPEP4J_OK;
  }
  int synchronize() override { return DEEPEP4J_OK; }

  int gemm(const GemmDesc& d, const GemmGroup* groups, int32_t count, int32_t) override {
    return with_types(d.ab_dtype, [&](auto t, auto acc) {
      using T = decltype(t);
      using A = decltype(acc);
      for (int32_t g = 0; g < count; ++g) {
        const GemmGroup& q = groups[g];
        const T* a = static_cast<const T*>(q.a);
        const T* b = static_cast<const T*>(q.b);
        std::vector<A> row(static_cast<size_t>(q.n));
        for (int64_t i = 0; i < q.m; ++i) {
          std::fill(row.begin(), row.end(), A(0));
          for (int64_t p = 0; p < q.k; ++p) {
            const A av = to_acc(d.trans_a ? a[p * d.lda + i] : a[i * d.lda + p]);
            if (d.trans_b)
              for (int64_t j = 0; j < q.n; ++j) row[j] += av * to_acc(b[j * d.ldb + p]);
            else
              for (int64_t j = 0; j < q.n; ++j) row[j] += av * to_acc(b[p * d.ldb + j]);
          }
          for (int64_t j = 0; j < q.n; ++j) {
            const int64_t at = i * d.ldc + j;
            if (d.c_dtype == d.ab_dtype) {
              T* c = static_cast<T*>(q.c);
              A v = A(d.alpha) * row[j];
              if (d.beta != 0.0) v += A(d.beta) * to_acc(c[at]);
              c[at] = from_acc<T, A>(v);
            } else {
              A* c = static_cast<A*>(q.c);
              A v = A(d.alpha) * row[j];
              if (d.beta != 0.0) v += A(d.beta) * c[at];
              c[at] = v;
            }
          }
        }
      }
      return DEEPEP4J_OK;
    });
  }

  int router_forward(int32_t dtype, const RouterForward& r) override {
    if (dtype == DEEPEP4J_FLOAT64) return router_forward_t<double>(r);
    return router_forward_t<float>(r);
  }

  // The Java Router's rules: softmax (max-subtracted) or sigmoid; top-k by score + bias, ties to the lower id;
  // weights = gate / sum(gate) when normalising.
  template <class A>
  int router_forward_t(const RouterForward& r) {
    A* s = static_cast<A*>(r.scores);
    A* gate = static_cast<A*>(r.gate);
    A* w = static_cast<A*>(r.weights);
    A* gsum = static_cast<A*>(r.gate_sum);
    A* psum = static_cast<A*>(r.prob_sum);
    const int32_t E = r.e, K = r.k;
    std::fill(r.load, r.load + E, 0);
    std::fill(psum, psum + E, A(0));
    std::vector<bool> taken(static_cast<size_t>(E));
    for (int64_t t = 0; t < r.n; ++t) {
      A* st = s + t * E;
      if (r.score_function == DEEPEP4J_SCORE_SIGMOID) {
        for (int32_t c = 0; c < E; ++c) st[c] = A(1) / (A(1) + std::exp(-st[c]));
      } else {
        A mx = st[0];
        for (int32_t c = 1; c < E; ++c) mx = std::max(mx, st[c]);
        A sum = 0;
        for (int32_t c = 0; c < E; ++c) {
          st[c] = std::exp(st[c] - mx);
          sum += st[c];
        }
        for (int32_t c = 0; c < E; ++c) st[c] /= sum;
      }
      for (int32_t c = 0; c < E; ++c) psum[c] += st[c];
      std::fill(taken.begin(), taken.end(), false);
      for (int32_t j = 0; j < K; ++j) {
        int32_t best = -1;
        if (r.replay) {
          best = int32_t(r.replay[t * K + j]);
        } else {
          A best_v = 0;
          for (int32_t c = 0; c < E; ++c) {
            A v = st[c] + (r.bias ? A(r.bias[c]) : A(0));
            if (!taken[size_t(c)] && (best < 0 || v > best_v)) {
              best = c;
              best_v = v;
            }
          }
          taken[size_t(best)] = true;
        }
        r.topk_idx[t * K + j] = best;
        gate[t * K + j] = st[best];
        r.load[best]++;
      }
      A sum = 0;
      for (int32_t j = 0; j < K; ++j) sum += gate[t * K + j];
      gsum[t] = sum;
      for (int32_t j = 0; j < K; ++j) {
        w[t * K + j] = r.normalize ? gate[t * K + j] / sum : gate[t * K + j];
        r.weights_f32[t * K + j] = float(w[t * K + j]);
      }
    }
    return DEEPEP4J_OK;
  }

  int router_backward(int32_t dtype, const RouterBackward& r) override {
    return with_types(dtype, [&](auto t, auto acc) {
      using T = decltype(t);
      using A = decltype(acc);
      const A* s = static_cast<const A*>(r.scores);
      const A* w = static_cast<const A*>(r.weights);
      const A* gsum = static_cast<const A*>(r.gate_sum);
      const A* gw = static_cast<const A*>(r.grad_weights);
      T* out = static_cast<T*>(r.grad_logits);
      const int32_t E = r.e, K = r.k;
      std::vector<A> gs(static_cast<size_t>(E));
      for (int64_t n = 0; n < r.n; ++n) {
        for (int32_t c = 0; c < E; ++c) gs[size_t(c)] = A(r.aux_factor * r.load[c]);
        A dot = 0;
        for (int32_t j = 0; j < K; ++j) dot += gw[n * K + j] * w[n * K + j];
        for (int32_t j = 0; j < K; ++j) {
          A g = r.normalize ? (gw[n * K + j] - dot) / gsum[n] : gw[n * K + j];
          gs[size_t(r.topk_idx[n * K + j])] += g;
        }
        const A* sn = s + n * E;
        if (r.score_function == DEEPEP4J_SCORE_SIGMOID) {
          for (int32_t c = 0; c < E; ++c) out[n * E + c] = from_acc<T, A>(gs[size_t(c)] * sn[c] * (A(1) - sn[c]));
        } else {
          A d = 0;
          for (int32_t c = 0; c < E; ++c) d += gs[size_t(c)] * sn[c];
          for (int32_t c = 0; c < E; ++c) out[n * E + c] = from_acc<T, A>(sn[c] * (gs[size_t(c)] - d));
        }
      }
      return DEEPEP4J_OK;
    });
  }

  int permutation(const Permutation& p) override {
    std::fill(p.assign_row, p.assign_row + p.offsets[p.num_local], -1);  // padding, where an expert has any
    std::fill(p.assign_slot, p.assign_slot + p.offsets[p.num_local], -1);
    std::vector<int64_t> fill(p.offsets, p.offsets + p.num_local);
    for (int64_t s = 0; s < p.m * p.k; ++s) {
      const int64_t e = p.recv_topk_idx[s];
      if (e < 0) {
        p.pos[s] = -1;
        continue;
      }
      const int64_t a = fill[size_t(e)]++;
      p.assign_row[a] = int32_t(s / p.k);
      p.assign_slot[a] = int32_t(s);
      p.pos[s] = int32_t(a);
    }
    return DEEPEP4J_OK;
  }

  int gather_rows(int32_t dtype, int64_t count, int64_t h, const void* src, int64_t src_stride, const int32_t* row,
                  const void* scale, void* dst) override {
    return with_types(dtype, [&](auto t, auto acc) {
      using T = decltype(t);
      using A = decltype(acc);
      const T* s = static_cast<const T*>(src);
      T* d = static_cast<T*>(dst);
      for (int64_t a = 0; a < count; ++a) {
        if (row[a] < 0) {
          std::memset(d + a * h, 0, sizeof(T) * size_t(h));  // zero bits are 0 in every dtype
          continue;
        }
        const T* in = s + int64_t(row[a]) * src_stride;
        if (scale == nullptr) {
          std::memcpy(d + a * h, in, sizeof(T) * size_t(h));
          continue;
        }
        const A sc = static_cast<const A*>(scale)[a];
        for (int64_t i = 0; i < h; ++i) d[a * h + i] = from_acc<T, A>(sc * to_acc(in[i]));
      }
      return DEEPEP4J_OK;
    });
  }

  int scatter_rows(int32_t dtype, int64_t m, int32_t k, int64_t h, const int32_t* pos, const void* src,
                   const void* scale, void* out, int64_t out_stride) override {
    return with_types(dtype, [&](auto t, auto acc) {
      using T = decltype(t);
      using A = decltype(acc);
      const T* s = static_cast<const T*>(src);
      T* o = static_cast<T*>(out);
      std::vector<A> row(static_cast<size_t>(h));
      for (int64_t r = 0; r < m; ++r) {
        std::fill(row.begin(), row.end(), A(0));
        for (int32_t j = 0; j < k; ++j) {
          const int32_t a = pos[r * k + j];
          if (a < 0) continue;
          const A sc = scale ? static_cast<const A*>(scale)[a] : A(1);
          for (int64_t i = 0; i < h; ++i) row[size_t(i)] += sc * to_acc(s[int64_t(a) * h + i]);
        }
        for (int64_t i = 0; i < h; ++i) o[r * out_stride + i] = from_acc<T, A>(row[size_t(i)]);
      }
      return DEEPEP4J_OK;
    });
  }

  int row_dots(int32_t dtype, int64_t count, int64_t h, const void* rows, int64_t stride, const int32_t* row,
               const void* src, void* out) override {
    return with_types(dtype, [&](auto t, auto acc) {
      using T = decltype(t);
      using A = decltype(acc);
      const T* g = static_cast<const T*>(rows);
      const T* s = static_cast<const T*>(src);
      for (int64_t a = 0; a < count; ++a) {
        A d = 0;
        for (int64_t i = 0; i < h && row[a] >= 0; ++i)
          d += to_acc(g[int64_t(row[a]) * stride + i]) * to_acc(s[a * h + i]);
        static_cast<A*>(out)[a] = d;
      }
      return DEEPEP4J_OK;
    });
  }

  int gather_slots(int32_t dtype, int64_t count, int32_t k, const int32_t* slot, const void* values,
                   int32_t values_dtype, int64_t stride, int64_t offset, void* out) override {
    return with_types(dtype, [&](auto, auto acc) {
      using A = decltype(acc);
      for (int64_t a = 0; a < count; ++a) {
        const int64_t sl = slot[a];
        static_cast<A*>(out)[a] =
            sl < 0 ? A(0) : load_value<A>(values, values_dtype, (sl / k) * stride + offset + sl % k);
      }
      return DEEPEP4J_OK;
    });
  }

  int scatter_slots(int32_t dtype, int64_t m, int32_t k, const int32_t* pos, const void* src, void* values,
                    int32_t values_dtype, int64_t stride, int64_t offset) override {
    return with_types(dtype, [&](auto, auto acc) {
      using A = decltype(acc);
      for (int64_t s = 0; s < m * k; ++s)
        store_value<A>(values, values_dtype, (s / k) * stride + offset + s % k,
                       pos[s] >= 0 ? static_cast<const A*>(src)[pos[s]] : A(0));
      return DEEPEP4J_OK;
    });
  }

  int unpack_columns(int32_t dtype, int64_t rows, int32_t k, const void* in, int32_t in_dtype, int64_t stride,
                     int64_t offset, void* out) override {
    return with_types(dtype, [&](auto, auto acc) {
      using A = decltype(acc);
      for (int64_t r = 0; r < rows; ++r)
        for (int32_t j = 0; j < k; ++j) static_cast<A*>(out)[r * k + j] = load_value<A>(in, in_dtype, r * stride + offset + j);
      return DEEPEP4J_OK;
    });
  }

  int pack_columns(int32_t dtype, int64_t rows, int32_t k, const void* in, void* out, int32_t out_dtype,
                   int64_t stride, int64_t offset) override {
    return with_types(dtype, [&](auto, auto acc) {
      using A = decltype(acc);
      for (int64_t r = 0; r < rows; ++r)
        for (int32_t j = 0; j < k; ++j)
          store_value<A>(out, out_dtype, r * stride + offset + j, static_cast<const A*>(in)[r * k + j]);
      return DEEPEP4J_OK;
    });
  }

  int swiglu_forward(int32_t dtype, int64_t count, const void* a, const void* b, void* h) override {
    return with_types(dtype, [&](auto t, auto acc) {
      using T = decltype(t);
      using A = decltype(acc);
      for (int64_t i = 0; i < count; ++i) {
        const A x = to_acc(static_cast<const T*>(a)[i]);
        const A sig = A(1) / (A(1) + std::exp(-x));
        static_cast<T*>(h)[i] = from_acc<T, A>(x * sig * to_acc(static_cast<const T*>(b)[i]));
      }
      return DEEPEP4J_OK;
    });
  }

  int swiglu_backward(int32_t dtype, int64_t count, const void* a, const void* b, const void* gh, void* ga,
                      void* gb) override {
    return with_types(dtype, [&](auto t, auto acc) {
      using T = decltype(t);
      using A = decltype(acc);
      for (int64_t i = 0; i < count; ++i) {
        const A x = to_acc(static_cast<const T*>(a)[i]);
        const A y = to_acc(static_cast<const T*>(b)[i]);
        const A g = to_acc(static_cast<const T*>(gh)[i]);
        const A sig = A(1) / (A(1) + std::exp(-x));
        // d silu(x)/dx = sig * (1 + x * (1 - sig))
        static_cast<T*>(ga)[i] = from_acc<T, A>(g * y * sig * (A(1) + x * (A(1) - sig)));
        static_cast<T*>(gb)[i] = from_acc<T, A>(g * x * sig);
      }
      return DEEPEP4J_OK;
    });
  }

  int optimizer_step(int32_t dtype, int64_t count, const deepep4j_optimizer& o, void* params, const void* grads,
                     void* m, void* v) override {
    return with_types(dtype, [&](auto t, auto acc) {
      using T = decltype(t);
      using A = decltype(acc);
      T* p = static_cast<T*>(params);
      const A* g = static_cast<const A*>(grads);
      A* mm = static_cast<A*>(m);
      A* vv = static_cast<A*>(v);
      const A lr = A(o.learning_rate), b1 = A(o.beta1), b2 = A(o.beta2), eps = A(o.epsilon);
      const A scale = A(o.grad_scale), wd = A(o.weight_decay);
      const A it = A(o.iteration);
      A eps_t = lr * std::sqrt(A(1) - std::pow(b2, it + A(1))) / (A(1) - std::pow(b1, it + A(1)));
      if (std::isnan(eps_t) || eps_t == A(0) || std::isinf(eps_t)) eps_t = eps;
      for (int64_t i = 0; i < count; ++i) {
        const A gi = g[i] * scale;
        const A pi = to_acc(p[i]);
        A update;
        if (o.kind == DEEPEP4J_OPT_SGD) {
          update = lr * gi;
        } else {
          mm[i] = b1 * mm[i] + (A(1) - b1) * gi;
          vv[i] = b2 * vv[i] + (A(1) - b2) * gi * gi;
          update = eps_t * mm[i] / (std::sqrt(vv[i]) + eps);
          if (o.kind == DEEPEP4J_OPT_ADAMW) update += lr * wd * pi;
        }
        p[i] = from_acc<T, A>(pi - update);
      }
      return DEEPEP4J_OK;
    });
  }
};

}  // namespace

int make_cpu_moe_ops(std::unique_ptr<MoeOps>* out) {
  out->reset(new (std::nothrow) CpuMoeOps());
  if (!*out) return set_error(DEEPEP4J_ERR_OUT_OF_MEMORY, "MoE block: host allocation failed");
  return DEEPEP4J_OK;
}

}  // namespace moe
}  // namespace deepep4j
