// moe_reference.h — an independent, straightforward fp64 MoE block (the Java MoELayer's rules, written token by token
// with no grouping, permutation or dispatch), and a driver that runs the engine's block on R in-process ranks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "ep_group.h"
#include "harness.h"

namespace moeref {

struct Model {
  int64_t H = 8, F = 6;
  int32_t E = 4, K = 2;
  int32_t score = DEEPEP4J_SCORE_SOFTMAX;
  int32_t normalize = 1;
  double aux = 0.0;
  std::vector<double> wr;       // [H, E]
  std::vector<double> experts;  // [E][W1 H*F, W3 H*F, W2 F*H]
  std::vector<float> bias;      // [E] or empty
};

inline std::vector<double> random_vec(size_t n, uint64_t seed, double scale) {
  std::mt19937_64 g(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = u(g);
  return v;
}

inline Model make_model(int64_t H, int64_t F, int32_t E, int32_t K, uint64_t seed) {
  Model m;
  m.H = H;
  m.F = F;
  m.E = E;
  m.K = K;
  m.wr = random_vec(size_t(H * E), seed, 1.0);
  m.experts = random_vec(size_t(E) * 3 * H * F, seed + 1, 0.5);
  return m;
}

struct Forward {
  std::vector<double> y;       // [N, H]
  std::vector<int64_t> topk;   // [N, K]
  std::vector<double> weights; // [N, K]
  std::vector<int32_t> load;   // [E]
  double aux = 0;
};

inline double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }

// f_e(x) = (silu(x W1) * (x W3)) W2 for one token.
inline std::vector<double> expert_out(const Model& m, int32_t e, const double* x) {
  const double* w1 = m.experts.data() + size_t(e) * 3 * m.H * m.F;
  const double* w3 = w1 + m.H * m.F;
  const double* w2 = w3 + m.H * m.F;
  std::vector<double> h(size_t(m.F)), y(size_t(m.H), 0.0);
  for (int64_t f = 0; f < m.F; ++f) {
    double a = 0, b = 0;
    for (int64_t i = 0; i < m.H; ++i) {
      a += x[i] * w1[i * m.F + f];
      b += x[i] * w3[i * m.F + f];
    }
    h[size_t(f)] = a * sigmoid(a) * b;
  }
  for (int64_t i = 0; i < m.H; ++i)
    for (int64_t f = 0; f < m.F; ++f) y[size_t(i)] += h[size_t(f)] * w2[f * m.H + i];
  return y;
}

inline Forward forward(const Model& m, const std::vector<double>& x, int64_t n,
                       const std::vector<int64_t>* replay = nullptr) {
  Forward out;
  out.y.assign(size_t(n * m.H), 0.0);
  out.topk.assign(size_t(n * m.K), -1);
  out.weights.assign(size_t(n * m.K), 0.0);
  out.load.assign(size_t(m.E), 0);
  std::vector<double> psum(size_t(m.E), 0.0);
  for (int64_t t = 0; t < n; ++t) {
    std::vector<double> s(size_t(m.E), 0.0);
    for (int32_t e = 0; e < m.E; ++e)
      for (int64_t i = 0; i < m.H; ++i) s[size_t(e)] += x[size_t(t * m.H + i)] * m.wr[size_t(i * m.E + e)];
    if (m.score == DEEPEP4J_SCORE_SIGMOID) {
      for (auto& v : s) v = sigmoid(v);
    } else {
      double mx = *std::max_element(s.begin(), s.end()), sum = 0;
      for (auto& v : s) sum += (v = std::exp(v - mx));
      for (auto& v : s) v /= sum;
    }
    for (int32_t e = 0; e < m.E; ++e) psum[size_t(e)] += s[size_t(e)];
    std::vector<bool> taken(static_cast<size_t>(m.E), false);
    double gsum = 0;
    for (int32_t k = 0; k < m.K; ++k) {
      int32_t best = -1;
      if (replay) {
        best = int32_t((*replay)[size_t(t * m.K + k)]);
      } else {
        for (int32_t e = 0; e < m.E; ++e) {
          double v = s[size_t(e)] + (m.bias.empty() ? 0.0 : double(m.bias[size_t(e)]));
          double bv = best < 0 ? 0 : s[size_t(best)] + (m.bias.empty() ? 0.0 : double(m.bias[size_t(best)]));
          if (!taken[size_t(e)] && (best < 0 || v > bv)) best = e;
        }
        taken[size_t(best)] = true;
      }
      out.topk[size_t(t * m.K + k)] = best;
      out.weights[size_t(t * m.K + k)] = s[size_t(best)];
      gsum += s[size_t(best)];
      out.load[size_t(best)]++;
    }
    for (int32_t k = 0; k < m.K; ++k) {
      if (m.normalize) out.weights[size_t(t * m.K + k)] /= gsum;
      std::vector<double> f = expert_out(m, int32_t(out.topk[size_t(t * m.K + k)]), &x[size_t(t * m.H)]);
      for (int64_t i = 0; i < m.H; ++i) out.y[size_t(t * m.H + i)] += out.weights[size_t(t * m.K + k)] * f[size_t(i)];
    }
  }
  if (m.aux > 0 && n > 0) {
    double total = 0;
    for (int32_t e = 0; e < m.E; ++e) total += (out.load[size_t(e)] / double(n * m.K)) * (psum[size_t(e)] / double(n));
    out.aux = m.aux * m.E * total;
  }
  return out;
}

// The scalar whose gradient backward computes (grad_y = g, aux_loss_scale = 1): sum over ranks of <y, g> + aux.
inline double loss(const Model& m, const std::vector<std::vector<double>>& xs, const std::vector<std::vector<double>>& gs,
                   const std::vector<int64_t>& ns) {
  double l = 0;
  for (size_t r = 0; r < xs.size(); ++r) {
    Forward f = forward(m, xs[r], ns[r]);
    for (size_t i = 0; i < f.y.size(); ++i) l += f.y[i] * gs[r][i];
    l += f.aux;
  }
  return l;
}

// Values of one dtype as raw bytes, and back.
inline std::vector<uint8_t> to_bytes(const std::vector<double>& v, int32_t dtype) {
  const size_t es = dtype == DEEPEP4J_FLOAT64 ? 8 : dtype == DEEPEP4J_BFLOAT16 ? 2 : 4;
  std::vector<uint8_t> b(v.size() * es);
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DEEPEP4J_FLOAT64) {
      std::memcpy(&b[i * 8], &v[i], 8);
    } else if (dtype == DEEPEP4J_FLOAT32) {
      float f = float(v[i]);
      std::memcpy(&b[i * 4], &f, 4);
    } else {
      ref::store(DEEPEP4J_BFLOAT16, b.data(), int64_t(i), float(v[i]));
    }
  }
  return b;
}

inline std::vector<double> from_bytes(const std::vector<uint8_t>& b, int32_t dtype) {
  const size_t es = dtype == DEEPEP4J_FLOAT64 ? 8 : dtype == DEEPEP4J_BFLOAT16 ? 2 : 4;
  std::vector<double> v(b.size() / es);
  for (size_t i = 0; i < v.size(); ++i) {
    if (dtype == DEEPEP4J_FLOAT64) {
      std::memcpy(&v[i], &b[i * 8], 8);
    } else if (dtype == DEEPEP4J_FLOAT32) {
      float f;
      std::memcpy(&f, &b[i * 4], 4);
      v[i] = f;
    } else {
      v[i] = ref::load(DEEPEP4J_BFLOAT16, b.data(), int64_t(i));
    }
  }
  return v;
}

// The same values rounded to a dtype (what the block sees).
inline std::vector<double> rounded(const std::vector<double>& v, int32_t dtype) { return from_bytes(to_bytes(v, dtype), dtype); }

inline deepep4j_config buffer_config(const Model& m, int32_t num_ranks, int32_t device) {
  deepep4j_config c;
  deepep4j_config_init(&c);
  c.num_sms = 4;
  c.ring_tokens = 32;
  c.max_send_tokens_per_chunk = 8;
  c.timeout_ms = 20000;
  c.num_threads = 2;
  c.device = device;
  int64_t bytes = 0;
  deepep4j_buffer_size_hint(m.H + 32, DEEPEP4J_FLOAT64, num_ranks, &c, &bytes);
  c.buffer_bytes = std::max<int64_t>(bytes, 1 << 20);
  return c;
}

inline deepep4j_moe_config moe_config(const Model& m, int32_t dtype, int64_t max_tokens) {
  deepep4j_moe_config c;
  deepep4j_moe_config_init(&c);
  c.hidden = m.H;
  c.ffn = m.F;
  c.num_experts = m.E;
  c.num_topk = m.K;
  c.dtype = dtype;
  c.score_function = m.score;
  c.normalize_topk = m.normalize;
  c.aux_loss_coef = m.aux;
  c.max_tokens = max_tokens;
  return c;
}

// What the engine's block gave, per rank (in doubles), with the expert gradients assembled in global order.
struct Result {
  std::vector<std::vector<double>> y, gx, gwr;
  std::vector<std::vector<int64_t>> topk;
  std::vector<double> grads;  // [E * 3 * H * F]
  std::vector<double> aux;
};

// Memory hooks so the same driver runs on the GPU: to_device copies host bytes to the block's memory, from_device back.
struct Memory {
  int32_t memory = DEEPEP4J_MEMORY_HOST;
  std::function<void*(const std::vector<uint8_t>&)> to_device;   // NULL: host memory is used directly
  std::function<void(void*, std::vector<uint8_t>*)> from_device;
  std::function<void(void*)> release;
};

// Runs forward + backward of the block on R ranks (threads); rank r gets xs[r] and grad_y gs[r].
inline Result run_block(const Model& m, int32_t dtype, int32_t num_ranks, const std::vector<std::vector<double>>& xs,
                        const std::vector<std::vector<double>>& gs, const std::vector<int64_t>& ns, int32_t device,
                        int32_t gemm = DEEPEP4J_MOE_GEMM_AUTO, const Memory* mem = nullptr) {
  const int32_t R = num_ranks;
  ep::Group g(R, buffer_config(m, R, device));
  deepep4j_moe_config mc = moe_config(m, dtype, 64);
  mc.gemm = gemm;
  Result res;
  res.y.resize(size_t(R));
  res.gx.resize(size_t(R));
  res.gwr.resize(size_t(R));
  res.topk.resize(size_t(R));
  res.aux.resize(size_t(R));
  const int32_t L = m.E / R;
  const int64_t per_expert = 3 * m.H * m.F;
  res.grads.assign(size_t(m.E * per_expert), 0.0);
  const size_t es = dtype == DEEPEP4J_FLOAT64 ? 8 : dtype == DEEPEP4J_BFLOAT16 ? 2 : 4;
  ep::run_ranks(R, [&](int32_t r) {
    std::vector<double> mine(m.experts.begin() + r * L * per_expert, m.experts.begin() + (r + 1) * L * per_expert);
    const int64_t n = ns[size_t(r)];
    std::vector<uint8_t> x = to_bytes(xs[size_t(r)], dtype), wr = to_bytes(m.wr, dtype), gy = to_bytes(gs[size_t(r)], dtype);
    std::vector<uint8_t> y(size_t(n * m.H) * es), gx(size_t(n * m.H) * es), gwr(size_t(m.H * m.E) * es);
    std::vector<uint8_t> topk(size_t(n * m.K) * 8);
    auto dev = [&](const std::vector<uint8_t>& v) -> void* {
      return mem && mem->to_device ? mem->to_device(v) : const_cast<uint8_t*>(v.data());
    };
    // Device arrays are made before the first collective: allocation may wait for the device, where the other
    // rank's kernels may be waiting for this one.
    void *dx = dev(x), *dwr = dev(wr), *dgy = dev(gy), *dy = dev(y), *dgx = dev(gx), *dgwr = dev(gwr), *dtopk = dev(topk);
    deepep4j_moe* moe = nullptr;
    REQUIRE_OK(deepep4j_moe_create(g[r], &mc, &moe));
    REQUIRE_OK(deepep4j_moe_write(moe, DEEPEP4J_MOE_PARAMS, DEEPEP4J_FLOAT64, mine.data(), int64_t(mine.size())));
    double aux = -1;
    deepep4j_moe_forward_args fa{};
    fa.memory = mem ? mem->memory : DEEPEP4J_MEMORY_HOST;
    fa.x = dx;
    fa.router_weight = dwr;
    fa.y = dy;
    fa.topk_idx = static_cast<int64_t*>(dtopk);
    fa.aux_loss = &aux;
    REQUIRE_OK(deepep4j_moe_forward(moe, n, &fa, nullptr));
    deepep4j_moe_backward_args ba{};
    ba.memory = fa.memory;
    ba.grad_y = dgy;
    ba.grad_x = dgx;
    ba.grad_router_weight = dgwr;
    ba.aux_loss_scale = 1.0;
    REQUIRE_OK(deepep4j_moe_backward(moe, &ba, nullptr));
    if (mem && mem->from_device) {
      mem->from_device(dy, &y);
      mem->from_device(dgx, &gx);
      mem->from_device(dgwr, &gwr);
      mem->from_device(dtopk, &topk);
      for (void* p : {dx, dwr, dgy, dy, dgx, dgwr, dtopk}) mem->release(p);
    }
    res.y[size_t(r)] = from_bytes(y, dtype);
    res.gx[size_t(r)] = from_bytes(gx, dtype);
    res.gwr[size_t(r)] = from_bytes(gwr, dtype);
    res.topk[size_t(r)].resize(size_t(n * m.K));
    std::memcpy(res.topk[size_t(r)].data(), topk.data(), topk.size());
    res.aux[size_t(r)] = aux;
    std::vector<double> grads(mine.size());
    REQUIRE_OK(deepep4j_moe_read(moe, DEEPEP4J_MOE_GRADS, DEEPEP4J_FLOAT64, grads.data(), int64_t(grads.size())));
    std::copy(grads.begin(), grads.end(), res.grads.begin() + r * L * per_expert);
    REQUIRE_OK(deepep4j_moe_destroy(moe));
  });
  return res;
}

// Largest |a - b| / (atol + |b|) over two arrays.
inline double max_rel(const std::vector<double>& a, const std::vector<double>& b, double atol) {
  double worst = a.size() == b.size() ? 0.0 : 1e300;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i)
    worst = std::max(worst, std::fabs(a[i] - b[i]) / (atol + std::fabs(b[i])));
  return worst;
}

// Rank 1 calls forward with a bad argument: it gets INVALID_ARGUMENT, rank 0 PEER_ERROR with its message (at once, by
// deepep4j_fail_step, not after a timeout), and neither's outputs change; then the group still works. On `device`
// (CPU, or CUDA with both ranks on device 0), host memory.
inline void check_bad_input_on_one_rank(int32_t device) {
  Model m = make_model(8, 6, 4, 2, 6);
  ep::Group g(2, buffer_config(m, 2, device));
  deepep4j_moe_config mc = moe_config(m, DEEPEP4J_FLOAT32, 16);
  std::vector<float> wr(m.wr.begin(), m.wr.end());
  ep::run_ranks(2, [&](int32_t r) {
    deepep4j_moe* moe = nullptr;
    REQUIRE_OK(deepep4j_moe_create(g[r], &mc, &moe));
    const int64_t n = 5;
    std::vector<float> x(size_t(n * m.H), 0.5f), y(size_t(n * m.H), -7.0f);
    std::vector<int64_t> topk(size_t(n * m.K), -9);
    deepep4j_moe_forward_args fa{};
    fa.memory = DEEPEP4J_MEMORY_HOST;
    fa.x = r == 1 ? nullptr : x.data();
    fa.router_weight = wr.data();
    fa.y = y.data();
    fa.topk_idx = topk.data();
    int st = deepep4j_moe_forward(moe, n, &fa, nullptr);
    std::string msg = deepep4j_last_error();
    CHECK_MSG(st == (r == 1 ? DEEPEP4J_ERR_INVALID_ARGUMENT : DEEPEP4J_ERR_PEER_ERROR), "rank %d: %s: %s", r,
              deepep4j_status_name(st), msg.c_str());
    CHECK_MSG(msg.find("args.x = NULL") != std::string::npos, "rank %d: %s", r, msg.c_str());
    for (float v : y) CHECK(v == -7.0f);
    for (int64_t v : topk) CHECK_EQ(v, -9);
    // Too many tokens on rank 0 this time.
    fa.x = x.data();
    st = deepep4j_moe_forward(moe, r == 0 ? 17 : n, &fa, nullptr);
    msg = deepep4j_last_error();
    CHECK_MSG(st == (r == 0 ? DEEPEP4J_ERR_INVALID_ARGUMENT : DEEPEP4J_ERR_PEER_ERROR), "rank %d: %s", r, msg.c_str());
    CHECK_MSG(msg.find("num_tokens = 17") != std::string::npos, "rank %d: %s", r, msg.c_str());
    for (float v : y) CHECK(v == -7.0f);
    // Backward after a failed forward is a state error on both ranks.
    std::vector<float> gwr(wr.size(), -3.0f);
    deepep4j_moe_backward_args ba{};
    ba.memory = DEEPEP4J_MEMORY_HOST;
    ba.grad_y = x.data();
    ba.grad_x = y.data();
    ba.grad_router_weight = gwr.data();
    st = deepep4j_moe_backward(moe, &ba, nullptr);
    CHECK_MSG(st == DEEPEP4J_ERR_STATE || st == DEEPEP4J_ERR_PEER_ERROR, "rank %d: %s", r, deepep4j_status_name(st));
    for (float v : gwr) CHECK(v == -3.0f);
    // And the group still works.
    REQUIRE_OK(deepep4j_moe_forward(moe, n, &fa, nullptr));
    CHECK(y[0] != -7.0f);
    deepep4j_moe_destroy(moe);
  });
}

}  // namespace moeref
