// test_cached.cpp — cached mode: dispatch and combine again with the handle of an earlier step (no count exchange) on
// new data of the same routing, as backward does; also with another precision than the handle's.
#include "ep_group.h"

namespace {

// New values for the same routing: a different seed for x, the same topk_idx and weights.
std::vector<ref::RankInput> new_values(const ref::Shape& s, const std::vector<ref::RankInput>& old, uint64_t seed) {
  std::vector<ref::RankInput> in;
  for (size_t r = 0; r < old.size(); ++r) {
    ref::RankInput x = ref::make_input(s, old[r].n, seed + r);
    x.topk_idx = old[r].topk_idx;
    x.topk_weights = old[r].topk_weights;
    in.push_back(std::move(x));
  }
  return in;
}

// Same data in another dtype (values are exact in every dtype the tests use).
ref::RankInput convert(const ref::RankInput& in, int64_t H, int32_t from, int32_t to) {
  ref::RankInput out = in;
  out.x.assign(size_t(in.n * H) * ref::elem_size(to), 0);
  for (int64_t i = 0; i < in.n * H; ++i) ref::store(to, out.x.data(), i, ref::load(from, in.x.data(), i));
  return out;
}

void cached_steps(int32_t R, int32_t ring_tokens, int32_t chunk) {
  ref::Shape s;
  s.num_ranks = R;
  s.num_experts = 2 * R;
  s.num_topk = std::min(3, s.num_experts);
  s.hidden = 48;
  std::vector<int64_t> tokens;
  for (int32_t r = 0; r < R; ++r) tokens.push_back(r == 1 ? 0 : 70 + 5 * r);
  std::vector<ref::RankInput> in = ep::make_inputs(s, tokens, 900 + R);
  ep::Group g(R, ep::small_config(s, ring_tokens, chunk));
  std::vector<ep::RankResult> res(static_cast<size_t>(R));
  ep::StepOptions o;
  o.weighted_combine = true;
  ep::run_ranks(R, [&](int32_t r) { ep::run_rank(g[r], r, s, in[size_t(r)], o, &res[size_t(r)], true); });
  ep::verify(s, in, res, o, t::fmt("R=%d first step", R));

  // Forward again with the cached handle, several times: new x, same routing.
  for (int iter = 0; iter < 3; ++iter) {
    std::vector<ref::RankInput> in2 = new_values(s, in, 5000 + 10 * iter);
    std::vector<ep::RankResult> res2(static_cast<size_t>(R));
    ep::StepOptions o2;
    o2.weighted_combine = iter % 2 == 0;
    o2.combine_weights = iter == 1;
    ep::run_ranks(R, [&](int32_t r) {
      ep::RankResult& x = res2[size_t(r)];
      deepep4j_handle* h = res[size_t(r)].handle;
      x.layout = ref::layout(s, in2[size_t(r)]);  // layout is not re-run in cached mode
      x.recv.m = deepep4j_handle_num_recv_tokens(h);
      x.recv.per_local_expert = res[size_t(r)].recv.per_local_expert;
      x.recv.per_source_rank = res[size_t(r)].recv.per_source_rank;
      ep::dispatch_into(g[r], h, s, s.dtype, in2[size_t(r)], true, &x.recv, iter == 2 ? s.dtype : -1);
      x.y = ep::make_y(x.recv, s.hidden, s.dtype, s.dtype, r);
      ep::combine_into(g[r], h, s, s.dtype, in2[size_t(r)].n, o2, &x);
    });
    ep::verify(s, in2, res2, o2, t::fmt("R=%d cached iteration %d", R, iter));
  }

  // Backward in another precision: the fp32 handle carries bf16 rows (dispatch dtype override and combine dtype).
  ref::Shape sb = s;
  sb.dtype = DEEPEP4J_BFLOAT16;
  std::vector<ref::RankInput> inb;
  for (auto& x : new_values(s, in, 7000)) inb.push_back(convert(x, s.hidden, s.dtype, sb.dtype));
  std::vector<ep::RankResult> resb(static_cast<size_t>(R));
  ep::StepOptions ob;
  ep::run_ranks(R, [&](int32_t r) {
    ep::RankResult& x = resb[size_t(r)];
    deepep4j_handle* h = res[size_t(r)].handle;
    x.layout = ref::layout(sb, inb[size_t(r)]);
    x.recv.m = deepep4j_handle_num_recv_tokens(h);
    x.recv.per_local_expert = res[size_t(r)].recv.per_local_expert;
    x.recv.per_source_rank = res[size_t(r)].recv.per_source_rank;
    ep::dispatch_into(g[r], h, sb, sb.dtype, inb[size_t(r)], true, &x.recv, sb.dtype);
    x.y = ep::make_y(x.recv, sb.hidden, sb.dtype, sb.dtype, r);
    ep::combine_into(g[r], h, sb, sb.dtype, inb[size_t(r)].n, ob, &x);
  });
  ep::verify(sb, inb, resb, ob, t::fmt("R=%d bf16 over an fp32 handle", R));

  for (auto& r : res) deepep4j_handle_destroy(r.handle);
}

}  // namespace

TEST(cached_two_ranks) { cached_steps(2, 32, 8); }
TEST(cached_three_ranks_small_ring) { cached_steps(3, 4, 2); }
TEST(cached_four_ranks) { cached_steps(4, 16, 16); }

// Combine first (grad of dispatch) straight after notify+dispatch, then dispatch (grad of combine): the handle
// serves either order.
TEST(cached_combine_before_second_dispatch) {
  ref::Shape s;
  s.num_ranks = 2;
  s.num_experts = 4;
  s.num_topk = 2;
  s.hidden = 32;
  std::vector<ref::RankInput> in = ep::make_inputs(s, {30, 45}, 31);
  ep::Group g(2, ep::small_config(s));
  std::vector<ep::RankResult> res(2);
  ep::StepOptions o;
  o.run_combine = false;
  ep::run_ranks(2, [&](int32_t r) { ep::run_rank(g[r], r, s, in[size_t(r)], o, &res[size_t(r)], true); });
  ep::verify(s, in, res, o, "dispatch only");
  // Two combines in a row on the same handle, then a dispatch.
  ep::StepOptions oc;
  for (int i = 0; i < 2; ++i) {
    ep::run_ranks(2, [&](int32_t r) {
      res[size_t(r)].y = ep::make_y(res[size_t(r)].recv, s.hidden, s.dtype, s.dtype, r);
      ep::combine_into(g[r], res[size_t(r)].handle, s, s.dtype, in[size_t(r)].n, oc, &res[size_t(r)]);
    });
    ep::verify(s, in, res, oc, t::fmt("combine %d", i));
  }
  ep::run_ranks(2, [&](int32_t r) {
    ep::dispatch_into(g[r], res[size_t(r)].handle, s, s.dtype, in[size_t(r)], true, &res[size_t(r)].recv, -1);
  });
  ep::verify(s, in, res, o, "dispatch after combines");
  for (auto& r : res) deepep4j_handle_destroy(r.handle);
}

TEST_MAIN()
