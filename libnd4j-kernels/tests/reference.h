// reference.h — the semantics of deepep4j.h written the slow, obvious way, plus the test data that feeds it.
// Every backend result is compared against these functions.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "deepep4j.h"

namespace ref {

// ---------------------------------------------------------------- element conversions (round to nearest even)
inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float fp16_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_fp16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: infinity
  if (a < 0x38800000u) {                                  // below the smallest normal half: subnormal or zero
    float af;
    std::memcpy(&af, &a, 4);
    float scaled = af * 16777216.0f;  // 2^24: one half subnormal step becomes 1.0
    uint32_t m = uint32_t(std::nearbyint(scaled));
    return uint16_t(sign | m);
  }
  uint32_t exp = (a >> 23) - 127 + 15, man = a & 0x7fffffu;
  uint32_t h = (exp << 10) | (man >> 13);
  uint32_t rest = man & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return uint16_t(sign | h);
}

inline size_t elem_size(int32_t dtype) {
  return dtype == DEEPEP4J_FLOAT32 ? 4 : dtype == DEEPEP4J_FP8_E4M3 ? 1 : 2;
}

inline float load(int32_t dtype, const uint8_t* base, int64_t i) {
  if (dtype == DEEPEP4J_FLOAT32) {
    float f;
    std::memcpy(&f, base + 4 * i, 4);
    return f;
  }
  uint16_t h;
  std::memcpy(&h, base + 2 * i, 2);
  return dtype == DEEPEP4J_BFLOAT16 ? bf16_to_float(h) : fp16_to_float(h);
}

inline void store(int32_t dtype, uint8_t* base, int64_t i, float f) {
  if (dtype == DEEPEP4J_FLOAT32) {
    std::memcpy(base + 4 * i, &f, 4);
    return;
  }
  uint16_t h = dtype == DEEPEP4J_BFLOAT16 ? float_to_bf16(f) : float_to_fp16(f);
  std::memcpy(base + 2 * i, &h, 2);
}

// ---------------------------------------------------------------- test data
struct Shape {
  int32_t num_ranks = 2;
  int32_t num_experts = 8;
  int32_t num_topk = 2;
  int64_t hidden = 16;
  int32_t dtype = DEEPEP4J_FLOAT32;
};

// One rank's inputs. x is raw bytes of the shape's dtype; x_scales only for fp8.
struct RankInput {
  int64_t n = 0;
  std::vector<uint8_t> x;
  std::vector<float> x_scales;
  std::vector<int64_t> topk_idx;
  std::vector<float> topk_weights;
};

// Random routing: distinct experts per token, about `p_none` of the entries -1, and about `p_dead` of the tokens
// with every entry -1. Values are small multiples of 1/4 and weights multiples of 1/4 in [0.25, 1], so every fp32 sum
// the tests form is exact and the only rounding is the final conversion to the dtype.
inline RankInput make_input(const Shape& s, int64_t n, uint64_t seed, double p_none = 0.15, double p_dead = 0.05) {
  std::mt19937_64 rng(seed);
  RankInput in;
  in.n = n;
  const int64_t H = s.hidden;
  in.x.resize(size_t(n * H * elem_size(s.dtype)));
  if (s.dtype == DEEPEP4J_FP8_E4M3) {
    for (auto& b : in.x) b = uint8_t(rng());
    in.x_scales.resize(size_t(n * (H / DEEPEP4J_FP8_BLOCK)));
    for (auto& v : in.x_scales) v = float(int(rng() % 64) - 32) / 8.0f;
  } else {
    for (int64_t i = 0; i < n * H; ++i) store(s.dtype, in.x.data(), i, float(int(rng() % 33) - 16) / 4.0f);
  }
  in.topk_idx.assign(size_t(n * s.num_topk), -1);
  in.topk_weights.assign(size_t(n * s.num_topk), 0.0f);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int64_t t = 0; t < n; ++t) {
    bool dead = u(rng) < p_dead;
    std::vector<int64_t> chosen;
    for (int32_t k = 0; k < s.num_topk; ++k) {
      int64_t* slot = &in.topk_idx[size_t(t * s.num_topk + k)];
      in.topk_weights[size_t(t * s.num_topk + k)] = float(1 + rng() % 4) / 4.0f;
      if (dead || u(rng) < p_none || int32_t(chosen.size()) >= s.num_experts) continue;
      int64_t e;
      do e = int64_t(rng() % uint64_t(s.num_experts));
      while (std::find(chosen.begin(), chosen.end(), e) != chosen.end());
      chosen.push_back(e);
      *slot = e;
    }
  }
  return in;
}

// ---------------------------------------------------------------- layout
struct Layout {
  std::vector<int32_t> per_rank, per_expert;
  std::vector<uint8_t> in_rank;
};

inline Layout layout(const Shape& s, const RankInput& in) {
  Layout l;
  const int32_t R = s.num_ranks, E = s.num_experts, K = s.num_topk, L = E / R;
  l.per_rank.assign(size_t(R), 0);
  l.per_expert.assign(size_t(E), 0);
  l.in_rank.assign(size_t(in.n * R), 0);
  for (int64_t t = 0; t < in.n; ++t) {
    for (int32_t k = 0; k < K; ++k) {
      int64_t e = in.topk_idx[size_t(t * K + k)];
      if (e < 0) continue;
      l.per_expert[size_t(e)]++;
      l.in_rank[size_t(t * R + e / L)] = 1;
    }
    for (int32_t r = 0; r < R; ++r) l.per_rank[size_t(r)] += l.in_rank[size_t(t * R + r)];
  }
  return l;
}

// ---------------------------------------------------------------- dispatch
struct Received {
  int64_t m = 0;
  std::vector<uint8_t> x;
  std::vector<float> x_scales;
  std::vector<int64_t> topk_idx;
  std::vector<float> topk_weights;
  std::vector<int64_t> src_token;
  std::vector<int32_t> src_rank;
  std::vector<int32_t> per_local_expert;
  std::vector<int32_t> per_source_rank;
};

// What rank `d` receives from every rank's inputs.
inline Received dispatch(const Shape& s, const std::vector<RankInput>& all, int32_t d) {
  const int32_t R = s.num_ranks, K = s.num_topk, L = s.num_experts / R;
  const size_t row = size_t(s.hidden) * elem_size(s.dtype);
  const size_t srow = s.dtype == DEEPEP4J_FP8_E4M3 ? size_t(s.hidden / DEEPEP4J_FP8_BLOCK) : 0;
  Received r;
  r.per_local_expert.assign(size_t(L), 0);
  r.per_source_rank.assign(size_t(R), 0);
  for (int32_t src = 0; src < R; ++src) {
    const RankInput& in = all[size_t(src)];
    for (int64_t t = 0; t < in.n; ++t) {
      bool here = false;
      for (int32_t k = 0; k < K; ++k) {
        int64_t e = in.topk_idx[size_t(t * K + k)];
        if (e >= 0 && e / L == d) here = true;
      }
      if (!here) continue;
      r.x.insert(r.x.end(), in.x.begin() + long(t * row), in.x.begin() + long((t + 1) * row));
      if (srow)
        r.x_scales.insert(r.x_scales.end(), in.x_scales.begin() + long(t * srow),
                          in.x_scales.begin() + long((t + 1) * srow));
      for (int32_t k = 0; k < K; ++k) {
        int64_t e = in.topk_idx[size_t(t * K + k)];
        bool local = e >= 0 && e / L == d;
        r.topk_idx.push_back(local ? e - int64_t(d) * L : -1);
        r.topk_weights.push_back(local ? in.topk_weights[size_t(t * K + k)] : 0.0f);
        if (local) r.per_local_expert[size_t(e - int64_t(d) * L)]++;
      }
      r.src_token.push_back(t);
      r.src_rank.push_back(src);
      r.per_source_rank[size_t(src)]++;
      r.m++;
    }
  }
  return r;
}

// ---------------------------------------------------------------- combine
struct Combined {
  std::vector<uint8_t> out;
  std::vector<float> out_topk_weights;
};

// What source rank `src` gets back when each rank d returns y[d] ([M_d, H] of dtype) for its received rows;
// `weighted` scales each returned row by the sum of its local recv_topk_weights; with_w: ranks also return
// y_topk_weights[d] ([M_d, K]) and out_topk_weights is their per-token sum.
inline Combined combine(const Shape& s, const std::vector<Received>& recv, const std::vector<std::vector<uint8_t>>& y,
                        const std::vector<std::vector<float>>& y_topk_weights, bool with_w, bool weighted,
                        int32_t src, int64_t n, int32_t dtype) {
  const int64_t H = s.hidden;
  const int32_t K = s.num_topk;
  std::vector<float> acc(size_t(n * H), 0.0f);
  Combined c;
  if (with_w) c.out_topk_weights.assign(size_t(n * K), 0.0f);
  for (int32_t d = 0; d < s.num_ranks; ++d) {
    const Received& r = recv[size_t(d)];
    for (int64_t m = 0; m < r.m; ++m) {
      if (r.src_rank[size_t(m)] != src) continue;
      int64_t t = r.src_token[size_t(m)];
      float scale = 1.0f;
      if (weighted) {
        scale = 0.0f;
        for (int32_t k = 0; k < K; ++k)
          if (r.topk_idx[size_t(m * K + k)] >= 0) scale += r.topk_weights[size_t(m * K + k)];
      }
      for (int64_t h = 0; h < H; ++h) acc[size_t(t * H + h)] += scale * load(dtype, y[size_t(d)].data(), m * H + h);
      if (with_w)
        for (int32_t k = 0; k < K; ++k)
          c.out_topk_weights[size_t(t * K + k)] += y_topk_weights[size_t(d)][size_t(m * K + k)];
    }
  }
  c.out.resize(size_t(n * H) * elem_size(dtype));
  for (int64_t i = 0; i < n * H; ++i) store(dtype, c.out.data(), i, acc[size_t(i)]);
  return c;
}

}  // namespace ref
