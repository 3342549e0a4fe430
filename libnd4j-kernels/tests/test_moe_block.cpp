// test_moe_block.cpp — the MoE block on the CPU (the reference): forward against an independent fp64 implementation
// (moe_reference.h), fp64 finite-difference gradients of x, router weights and expert weights, 1 rank vs 2 ranks,
// DL4J's optimizer formulas, and bad input on one rank ending as the same error on every rank with outputs untouched.
#include "moe_reference.h"

namespace {

using moeref::Model;

struct Inputs {
  std::vector<std::vector<double>> xs, gs;
  std::vector<int64_t> ns;
};

Inputs make_inputs(const Model& m, const std::vector<int64_t>& ns, uint64_t seed) {
  Inputs in;
  in.ns = ns;
  for (size_t r = 0; r < ns.size(); ++r) {
    in.xs.push_back(moeref::random_vec(size_t(ns[r] * m.H), seed + 10 * r, 1.0));
    in.gs.push_back(moeref::random_vec(size_t(ns[r] * m.H), seed + 10 * r + 5, 1.0));
  }
  return in;
}

// The model and inputs as the block sees them in `dtype`.
Model rounded_model(const Model& m, int32_t dtype) {
  Model r = m;
  r.wr = moeref::rounded(m.wr, dtype);
  r.experts = moeref::rounded(m.experts, dtype);
  return r;
}

void check_forward(const Model& m, int32_t dtype, int32_t R, const std::vector<int64_t>& ns, double tol,
                   const char* label) {
  Inputs in = make_inputs(m, ns, 7);
  for (auto& x : in.xs) x = moeref::rounded(x, dtype);
  Model mr = rounded_model(m, dtype);
  moeref::Result res = moeref::run_block(m, dtype, R, in.xs, in.gs, in.ns, DEEPEP4J_DEVICE_CPU);
  for (int32_t r = 0; r < R; ++r) {
    moeref::Forward f = moeref::forward(mr, in.xs[size_t(r)], in.ns[size_t(r)]);
    CHECK_MSG(res.topk[size_t(r)] == f.topk, "%s rank %d: top-k differs", label, r);
    // Relative to the output's scale: bf16 rounds a, b, h and the rows it returns.
    double scale = 0;
    for (double v : f.y) scale = std::max(scale, std::fabs(v));
    double e = moeref::max_rel(res.y[size_t(r)], f.y, dtype == DEEPEP4J_BFLOAT16 ? scale : 1e-3);
    CHECK_MSG(e <= tol, "%s rank %d: y relative error %.3g > %.3g", label, r, e, tol);
    CHECK_MSG(std::fabs(res.aux[size_t(r)] - f.aux) <= 1e-6 * (1 + std::fabs(f.aux)), "%s rank %d: aux %.9g vs %.9g",
              label, r, res.aux[size_t(r)], f.aux);
  }
}

TEST(forward_matches_reference) {
  Model m = moeref::make_model(8, 6, 4, 2, 1);
  check_forward(m, DEEPEP4J_FLOAT64, 1, {9}, 1e-12, "fp64 1 rank");
  check_forward(m, DEEPEP4J_FLOAT64, 2, {9, 5}, 1e-12, "fp64 2 ranks");
  check_forward(m, DEEPEP4J_FLOAT32, 2, {9, 5}, 1e-4, "fp32 2 ranks");
  check_forward(m, DEEPEP4J_BFLOAT16, 2, {9, 5}, 2e-2, "bf16 2 ranks");
  m.score = DEEPEP4J_SCORE_SIGMOID;
  m.normalize = 0;
  m.aux = 0.05;
  check_forward(m, DEEPEP4J_FLOAT64, 2, {6, 11}, 1e-12, "fp64 sigmoid, aux");
  Model big = moeref::make_model(16, 12, 8, 3, 3);
  check_forward(big, DEEPEP4J_FLOAT32, 2, {20, 0}, 1e-4, "fp32 E8 K3, one rank without tokens");
}

// Analytic gradients of the engine against central differences of the reference loss, in fp64.
void gradient_check(Model m, int32_t R, const std::vector<int64_t>& ns, const char* label) {
  Inputs in = make_inputs(m, ns, 21);
  moeref::Result res = moeref::run_block(m, DEEPEP4J_FLOAT64, R, in.xs, in.gs, in.ns, DEEPEP4J_DEVICE_CPU);
  const double eps = 1e-5, tol = 1e-6;
  auto fd = [&](double* p) {
    const double keep = *p;
    *p = keep + eps;
    double up = moeref::loss(m, in.xs, in.gs, in.ns);
    *p = keep - eps;
    double down = moeref::loss(m, in.xs, in.gs, in.ns);
    *p = keep;
    return (up - down) / (2 * eps);
  };
  auto near = [&](double got, double want) { return std::fabs(got - want) <= tol * (1 + std::fabs(want)); };
  for (int32_t r = 0; r < R; ++r)
    for (size_t i = 0; i < in.xs[size_t(r)].size(); i += 3) {
      double want = fd(&in.xs[size_t(r)][i]);
      CHECK_MSG(near(res.gx[size_t(r)][i], want), "%s: grad_x rank %d [%zu] = %.12g, finite difference %.12g", label, r,
                i, res.gx[size_t(r)][i], want);
    }
  for (size_t i = 0; i < m.wr.size(); ++i) {
    double got = 0;
    for (int32_t r = 0; r < R; ++r) got += res.gwr[size_t(r)][i];  // replicas' router gradients sum
    double want = fd(&m.wr[i]);
    CHECK_MSG(near(got, want), "%s: grad_router_weight[%zu] = %.12g, finite difference %.12g", label, i, got, want);
  }
  for (size_t i = 0; i < m.experts.size(); i += 5) {
    double want = fd(&m.experts[i]);
    CHECK_MSG(near(res.grads[i], want), "%s: expert grad [%zu] = %.12g, finite difference %.12g", label, i,
              res.grads[i], want);
  }
}

TEST(gradients_match_finite_differences_fp64) {
  Model m = moeref::make_model(8, 6, 4, 2, 2);
  gradient_check(m, 1, {7}, "softmax, normalised, 1 rank");
  gradient_check(m, 2, {7, 4}, "softmax, normalised, 2 ranks");
  m.aux = 0.1;
  gradient_check(m, 2, {5, 8}, "softmax, normalised, aux loss, 2 ranks");
  m.score = DEEPEP4J_SCORE_SIGMOID;
  m.normalize = 0;
  gradient_check(m, 2, {6, 3}, "sigmoid, unnormalised, aux loss, 2 ranks");
}

// The same global tokens on 1 rank and split over 2 ranks give the same outputs and gradients.
TEST(one_rank_equals_two_ranks) {
  for (int32_t dtype : {DEEPEP4J_FLOAT64, DEEPEP4J_FLOAT32}) {
    Model m = moeref::make_model(16, 8, 4, 2, 4);  // no aux loss: it is defined over each rank's own tokens
    Inputs two = make_inputs(m, {6, 9}, 33);
    Inputs one;
    one.ns = {15};
    one.xs = {two.xs[0]};
    one.xs[0].insert(one.xs[0].end(), two.xs[1].begin(), two.xs[1].end());
    one.gs = {two.gs[0]};
    one.gs[0].insert(one.gs[0].end(), two.gs[1].begin(), two.gs[1].end());
    moeref::Result a = moeref::run_block(m, dtype, 1, one.xs, one.gs, one.ns, DEEPEP4J_DEVICE_CPU);
    moeref::Result b = moeref::run_block(m, dtype, 2, two.xs, two.gs, two.ns, DEEPEP4J_DEVICE_CPU);
    const double tol = dtype == DEEPEP4J_FLOAT64 ? 1e-12 : 1e-5;
    std::vector<double> y = b.y[0], gx = b.gx[0], gwr = b.gwr[0];
    y.insert(y.end(), b.y[1].begin(), b.y[1].end());
    gx.insert(gx.end(), b.gx[1].begin(), b.gx[1].end());
    for (size_t i = 0; i < gwr.size(); ++i) gwr[i] += b.gwr[1][i];
    const char* d = dtype == DEEPEP4J_FLOAT64 ? "fp64" : "fp32";
    CHECK_MSG(moeref::max_rel(y, a.y[0], 1e-3) <= tol, "%s: y differs", d);
    CHECK_MSG(moeref::max_rel(gx, a.gx[0], 1e-3) <= tol, "%s: grad_x differs", d);
    CHECK_MSG(moeref::max_rel(gwr, a.gwr[0], 1e-3) <= 10 * tol, "%s: grad_router_weight differs", d);
    CHECK_MSG(moeref::max_rel(b.grads, a.grads, 1e-3) <= 10 * tol, "%s: expert grads differ", d);
  }
}

// DL4J 1.0.0-M2.1's updaters, written out plainly (see moe_block.cpp for where they come from).
// T is the precision DL4J computes in for that parameter type (its native op casts the hyper-parameters to T).
template <class T>
void plain_step(const deepep4j_optimizer& o, std::vector<double>& p, const std::vector<double>& g,
                std::vector<double>& m, std::vector<double>& v) {
  const T lr = T(o.learning_rate), b1 = T(o.beta1), b2 = T(o.beta2), eps = T(o.epsilon), wd = T(o.weight_decay);
  const T t = T(o.iteration + 1);
  const T a = lr * std::sqrt(T(1) - std::pow(b2, t)) / (T(1) - std::pow(b1, t));
  for (size_t i = 0; i < p.size(); ++i) {
    const T gi = T(g[i]) * T(o.grad_scale);
    T pi = T(p[i]);
    if (o.kind == DEEPEP4J_OPT_SGD) {
      p[i] = pi - lr * gi;
      continue;
    }
    const T mi = b1 * T(m[i]) + (T(1) - b1) * gi;
    const T vi = b2 * T(v[i]) + (T(1) - b2) * gi * gi;
    T update = a * mi / (std::sqrt(vi) + eps);
    if (o.kind == DEEPEP4J_OPT_ADAMW) update += lr * wd * pi;
    m[i] = mi;
    v[i] = vi;
    p[i] = pi - update;
  }
}

TEST(optimizer_steps_follow_dl4j) {
  Model m = moeref::make_model(8, 4, 2, 1, 5);
  for (int32_t kind : {DEEPEP4J_OPT_SGD, DEEPEP4J_OPT_ADAM, DEEPEP4J_OPT_ADAMW}) {
    for (int32_t dtype : {DEEPEP4J_FLOAT64, DEEPEP4J_FLOAT32}) {
      ep::Group g(1, moeref::buffer_config(m, 1, DEEPEP4J_DEVICE_CPU));
      deepep4j_moe_config mc = moeref::moe_config(m, dtype, 16);
      deepep4j_moe* moe = nullptr;
      REQUIRE_OK(deepep4j_moe_create(g[0], &mc, &moe));
      const int64_t count = 2 * 3 * m.H * m.F;
      std::vector<double> p = moeref::rounded(moeref::random_vec(size_t(count), 50, 1.0), dtype);
      std::vector<double> mm(size_t(count), 0.0), vv(size_t(count), 0.0);
      REQUIRE_OK(deepep4j_moe_write(moe, DEEPEP4J_MOE_PARAMS, DEEPEP4J_FLOAT64, p.data(), count));
      deepep4j_optimizer o;
      deepep4j_optimizer_init(&o, kind);
      CHECK(o.learning_rate == 1e-3 && o.beta1 == 0.9 && o.beta2 == 0.999 && o.epsilon == 1e-8 && o.grad_scale == 1.0);
      o.learning_rate = 0.05;
      o.weight_decay = 0.1;
      o.grad_scale = 0.25;
      for (int it = 0; it < 3; ++it) {
        std::vector<double> grad = moeref::rounded(moeref::random_vec(size_t(count), 60 + it, 2.0), dtype);
        REQUIRE_OK(deepep4j_moe_write(moe, DEEPEP4J_MOE_GRADS, DEEPEP4J_FLOAT64, grad.data(), count));
        o.iteration = it;
        REQUIRE_OK(deepep4j_moe_step(moe, &o, nullptr));
        if (dtype == DEEPEP4J_FLOAT64)
          plain_step<double>(o, p, grad, mm, vv);
        else
          plain_step<float>(o, p, grad, mm, vv);
      }
      std::vector<double> got(static_cast<size_t>(count)), got_m(got), got_v(got);
      REQUIRE_OK(deepep4j_moe_read(moe, DEEPEP4J_MOE_PARAMS, DEEPEP4J_FLOAT64, got.data(), count));
      REQUIRE_OK(deepep4j_moe_read(moe, DEEPEP4J_MOE_STATE_M, DEEPEP4J_FLOAT64, got_m.data(), count));
      REQUIRE_OK(deepep4j_moe_read(moe, DEEPEP4J_MOE_STATE_V, DEEPEP4J_FLOAT64, got_v.data(), count));
      const double tol = dtype == DEEPEP4J_FLOAT64 ? 1e-13 : 1e-5;
      CHECK_MSG(moeref::max_rel(got, p, 1e-2) <= tol, "kind %d dtype %d: params differ by %.3g", kind, dtype,
                moeref::max_rel(got, p, 1e-2));
      if (kind != DEEPEP4J_OPT_SGD) {
        CHECK_MSG(moeref::max_rel(got_m, mm, 1e-3) <= tol, "kind %d: STATE_M differs", kind);
        CHECK_MSG(moeref::max_rel(got_v, vv, 1e-6) <= tol, "kind %d: STATE_V differs", kind);
      }
      deepep4j_moe_destroy(moe);
    }
  }
}

// Replayed routing, the selection bias, the load / receive counts and an asynchronous forward finished by wait.
TEST(replay_bias_counts_and_async_forward) {
  Model m = moeref::make_model(8, 6, 4, 2, 9);
  m.bias = {0.0f, 0.0f, 0.0f, 5.0f};  // steers every token to expert 3 without changing its weight
  ep::Group g(2, moeref::buffer_config(m, 2, DEEPEP4J_DEVICE_CPU));
  deepep4j_moe_config mc = moeref::moe_config(m, DEEPEP4J_FLOAT64, 16);
  Inputs in = make_inputs(m, {6, 4}, 40);
  std::vector<std::vector<int32_t>> recv(2, std::vector<int32_t>(2, -1));
  ep::run_ranks(2, [&](int32_t r) {
    deepep4j_moe* moe = nullptr;
    REQUIRE_OK(deepep4j_moe_create(g[r], &mc, &moe));
    const int64_t per = 2 * 3 * m.H * m.F;
    REQUIRE_OK(deepep4j_moe_write(moe, DEEPEP4J_MOE_PARAMS, DEEPEP4J_FLOAT64, m.experts.data() + r * per, per));
    const int64_t n = in.ns[size_t(r)];
    std::vector<double> y(size_t(n * m.H), -1.0);
    std::vector<int64_t> topk(size_t(n * m.K), -1);
    std::vector<float> w(size_t(n * m.K), -1.0f);
    std::vector<int32_t> load(4, -1);
    deepep4j_moe_forward_args fa{};
    fa.memory = DEEPEP4J_MEMORY_HOST;
    fa.x = in.xs[size_t(r)].data();
    fa.router_weight = m.wr.data();
    fa.router_bias = m.bias.data();
    fa.y = y.data();
    fa.topk_idx = topk.data();
    fa.topk_weights = w.data();
    fa.expert_load = load.data();
    fa.recv_per_local_expert = recv[size_t(r)].data();
    fa.async_combine = 1;
    REQUIRE_OK(deepep4j_moe_forward(moe, n, &fa, nullptr));
    REQUIRE_OK(deepep4j_moe_wait(moe));
    moeref::Forward f = moeref::forward(m, in.xs[size_t(r)], n);
    CHECK_MSG(topk == f.topk, "rank %d: biased top-k differs from the reference", r);
    for (int64_t t = 0; t < n; ++t) CHECK_MSG(topk[size_t(t * m.K)] == 3, "rank %d token %lld: bias ignored", r, (long long)t);
    CHECK(moeref::max_rel(y, f.y, 1e-3) <= 1e-12);
    for (size_t i = 0; i < w.size(); ++i) CHECK(std::fabs(w[i] - f.weights[i]) <= 1e-6);
    CHECK(load == f.load);
    // Replay: the reference's choices in reverse slot order route the same experts, with the weights in that order.
    std::vector<int64_t> replay(topk.size());
    for (int64_t t = 0; t < n; ++t)
      for (int32_t k = 0; k < m.K; ++k) replay[size_t(t * m.K + k)] = topk[size_t(t * m.K + m.K - 1 - k)];
    Model plain = m;
    plain.bias.clear();
    fa.router_bias = nullptr;
    fa.replay_topk_idx = replay.data();
    fa.async_combine = 0;
    REQUIRE_OK(deepep4j_moe_forward(moe, n, &fa, nullptr));
    moeref::Forward fr = moeref::forward(plain, in.xs[size_t(r)], n, &replay);
    CHECK(topk == replay);
    CHECK(moeref::max_rel(y, fr.y, 1e-3) <= 1e-12);
    // A replayed expert id out of range is an argument error (and the peer's forward a PEER_ERROR).
    replay[0] = r == 0 ? 4 : replay[0];
    int st = deepep4j_moe_forward(moe, n, &fa, nullptr);
    CHECK_MSG(st == (r == 0 ? DEEPEP4J_ERR_INVALID_ARGUMENT : DEEPEP4J_ERR_PEER_ERROR), "rank %d: %s", r,
              deepep4j_last_error());
    deepep4j_moe_destroy(moe);
  });
  // Every assignment is received once: per local expert, over both ranks, the global load.
  int32_t total = 0;
  for (auto& v : recv)
    for (int32_t c : v) total += c;
  CHECK_EQ(total, (6 + 4) * m.K);
}

// Rank 1 calls forward with a bad argument: it gets INVALID_ARGUMENT, rank 0 PEER_ERROR with its message, and neither's
// outputs change (the same check runs on the GPU in test_gpu_moe_block).
TEST(bad_input_on_one_rank_fails_every_rank) { moeref::check_bad_input_on_one_rank(DEEPEP4J_DEVICE_CPU); }

TEST(create_checks_config_on_every_rank) {
  Model m = moeref::make_model(8, 6, 4, 2, 6);
  ep::Group g(2, moeref::buffer_config(m, 2, DEEPEP4J_DEVICE_CPU));
  // Different ffn on rank 1: PEER_MISMATCH naming the field on both ranks.
  ep::run_ranks(2, [&](int32_t r) {
    deepep4j_moe_config mc = moeref::moe_config(m, DEEPEP4J_FLOAT32, 16);
    if (r == 1) mc.ffn = 7;
    deepep4j_moe* moe = reinterpret_cast<deepep4j_moe*>(0x1);
    int st = deepep4j_moe_create(g[r], &mc, &moe);
    std::string msg = deepep4j_last_error();
    CHECK_MSG(st == DEEPEP4J_ERR_PEER_MISMATCH, "rank %d: %s: %s", r, deepep4j_status_name(st), msg.c_str());
    CHECK_MSG(msg.find("ffn") != std::string::npos, "rank %d: %s", r, msg.c_str());
    CHECK(moe == reinterpret_cast<deepep4j_moe*>(0x1));
  });
  // An invalid config on rank 0: INVALID_ARGUMENT there, PEER_ERROR on rank 1.
  ep::run_ranks(2, [&](int32_t r) {
    deepep4j_moe_config mc = moeref::moe_config(m, DEEPEP4J_FLOAT32, 16);
    if (r == 0) mc.num_topk = 9;
    deepep4j_moe* moe = nullptr;
    int st = deepep4j_moe_create(g[r], &mc, &moe);
    std::string msg = deepep4j_last_error();
    CHECK_MSG(st == (r == 0 ? DEEPEP4J_ERR_INVALID_ARGUMENT : DEEPEP4J_ERR_PEER_ERROR), "rank %d: %s", r, msg.c_str());
    CHECK_MSG(msg.find("config.num_topk = 9") != std::string::npos, "rank %d: %s", r, msg.c_str());
    CHECK(moe == nullptr);
  });
}

TEST(local_argument_rules) {
  Model m = moeref::make_model(8, 6, 4, 2, 6);
  ep::Group g(1, moeref::buffer_config(m, 1, DEEPEP4J_DEVICE_CPU));
  deepep4j_moe_config mc = moeref::moe_config(m, DEEPEP4J_FLOAT32, 16);
  deepep4j_moe* moe = nullptr;
  REQUIRE_OK(deepep4j_moe_create(g[0], &mc, &moe));
  std::vector<double> buf(size_t(4 * 3 * m.H * m.F));
  CHECK_ERR(deepep4j_moe_read(moe, DEEPEP4J_MOE_PARAMS, DEEPEP4J_FLOAT64, buf.data(), 5), DEEPEP4J_ERR_INVALID_ARGUMENT,
            "count = 5");
  CHECK_ERR(deepep4j_moe_write(moe, 9, DEEPEP4J_FLOAT64, buf.data(), int64_t(buf.size())), DEEPEP4J_ERR_INVALID_ARGUMENT,
            "tensor = 9");
  deepep4j_optimizer o;
  deepep4j_optimizer_init(&o, DEEPEP4J_OPT_ADAM);
  o.beta1 = 1.0;
  CHECK_ERR(deepep4j_moe_step(moe, &o, nullptr), DEEPEP4J_ERR_INVALID_ARGUMENT, "opt.beta1 = 1");
  deepep4j_moe_backward_args ba{};
  CHECK_ERR(deepep4j_moe_backward(moe, &ba, nullptr), DEEPEP4J_ERR_STATE, "no forward");
  deepep4j_moe_destroy(moe);
  CHECK_EQ(deepep4j_moe_destroy(nullptr), DEEPEP4J_OK);
}

}  // namespace

TEST_MAIN()
