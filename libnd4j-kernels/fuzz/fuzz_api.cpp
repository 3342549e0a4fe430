// fuzz_api.cpp — libFuzzer harness over the C API's argument checking and the one-rank data path.
//
// Each input is a small program: an opcode byte, then the values that call needs. The harness checks the contract
// on every call and abort()s (a finding) when it breaks:
//   - a failing call returns a known status, sets a non-empty message, and leaves every output untouched;
//   - a succeeding layout equals the naive count; a succeeding one-rank dispatch returns exactly the routed rows in
//     token order, and combine returns x once for every routed token (0 otherwise).
// Run: libnd4j-kernels/fuzz/run.sh [seconds]
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "deepep4j.h"

namespace {

// Reads values from the fuzz input; past the end everything reads as 0.
class Input {
 public:
  Input(const uint8_t* d, size_t n) : d_(d), n_(n) {}
  uint8_t u8() { return i_ < n_ ? d_[i_++] : 0; }
  uint32_t u32() {
    uint32_t v = 0;
    for (int b = 0; b < 4; ++b) v |= uint32_t(u8()) << (8 * b);
    return v;
  }
  int64_t i64() { return int64_t(uint64_t(u32()) | uint64_t(u32()) << 32); }
  bool flag() { return u8() & 1; }
  // Mostly values near the rules' edges, sometimes a raw 32-bit value.
  int32_t small(int32_t lo, int32_t hi) {
    uint8_t sel = u8();
    if (sel < 200) return lo + int32_t(u8() % uint32_t(hi - lo + 1));
    if (sel < 230) return int32_t(u32());
    static const int32_t edges[] = {0, -1, 1, 2, 7, 8, 16, 32, 33, 64, 65, 128, 255, 256, 257, INT32_MAX, INT32_MIN};
    return edges[u8() % (sizeof(edges) / sizeof(edges[0]))];
  }
  size_t left() const { return n_ - i_; }

 private:
  const uint8_t* d_;
  size_t n_, i_ = 0;
};

[[noreturn]] void finding(const char* what) {
  std::fprintf(stderr, "contract broken: %s (last error: %s)\n", what, deepep4j_last_error());
  std::abort();
}

// A failure must carry a known status and a message; success must not leave a stale message behind.
void check_status(int st) {
  if (st < DEEPEP4J_OK || st > DEEPEP4J_ERR_INTERNAL) finding("unknown status");
  if (st != DEEPEP4J_OK && deepep4j_last_error()[0] == '\0') finding("error without a message");
}

template <class T>
bool all_equal(const std::vector<T>& v, T x) {
  for (const T& e : v)
    if (!(e == x)) return false;
  return true;
}

deepep4j_config fuzz_config(Input& in) {
  deepep4j_config c;
  deepep4j_config_init(&c);
  // Shared-memory regions are real allocations: keep the size modest, but try the edges too.
  switch (in.u8() % 4) {
    case 0: c.buffer_bytes = int64_t(in.u32() % (16u << 20)); break;
    case 1: c.buffer_bytes = -int64_t(in.u32() % 1024); break;
    case 2: c.buffer_bytes = in.flag() ? INT64_MAX : INT64_MIN; break;
    default: c.buffer_bytes = 1 << 20; break;
  }
  c.num_sms = in.small(-2, 12);
  c.max_send_tokens_per_chunk = in.small(-1, 8);
  c.ring_tokens = in.small(-1, 16);
  c.timeout_ms = in.small(-1, 30);
  c.device = in.small(-1, 2);
  c.device_id = in.small(-1, 2);
  c.backend = in.small(-1, 2);
  c.num_threads = in.small(-1, 3);
  c.max_hidden_bytes = in.small(-16, 8192);
  return c;
}

// op 0: buffer_create / export / one-rank connect with fuzzed config, capacity and blob bytes.
void fuzz_create(Input& in) {
  deepep4j_config c = fuzz_config(in);
  int32_t rank = in.small(-1, 3), ranks = in.small(-1, 4);
  deepep4j_buffer* sentinel = reinterpret_cast<deepep4j_buffer*>(uintptr_t(0x5a5a));
  deepep4j_buffer* b = sentinel;
  int st = deepep4j_buffer_create(rank, ranks, &c, &b);
  check_status(st);
  if (st != DEEPEP4J_OK) {
    if (b != sentinel) finding("buffer_create wrote *out on failure");
    return;
  }
  uint8_t blob[DEEPEP4J_MAX_BLOB_BYTES + 16];
  std::memset(blob, 0xcd, sizeof(blob));
  size_t cap = in.flag() ? sizeof(blob) : size_t(in.u8()) * 3, len = 12345;
  st = deepep4j_buffer_export(b, blob, cap, &len);
  check_status(st);
  if (st == DEEPEP4J_OK && (len == 0 || len > DEEPEP4J_MAX_BLOB_BYTES || len > cap)) finding("export length");
  if (st != DEEPEP4J_OK && len != 12345) finding("export wrote len on failure");
  if (st == DEEPEP4J_OK && ranks == 1 && rank == 0) {
    // Flip fuzzed bytes of the own blob: connect must either accept an intact blob or refuse with a message.
    size_t flips = in.u8() % 4;
    for (size_t f = 0; f < flips; ++f) blob[in.u8() % len] ^= uint8_t(1 + in.u8() % 255);
    const void* blobs[1] = {blob};
    size_t lens[1] = {in.flag() ? len : size_t(in.u8() % (DEEPEP4J_MAX_BLOB_BYTES + 2))};
    check_status(deepep4j_buffer_connect(b, blobs, lens));
  }
  deepep4j_buffer_destroy(b);
}

// op 1: connect of rank 0 of 2 with a fuzzed peer blob (the peer never exists: error or timeout, never a crash).
void fuzz_peer_blob(Input& in) {
  deepep4j_config c;
  deepep4j_config_init(&c);
  c.buffer_bytes = 1 << 16;
  c.num_sms = 2;
  c.ring_tokens = 2;
  c.max_send_tokens_per_chunk = 1;
  c.timeout_ms = 5;
  deepep4j_buffer* b = nullptr;
  if (deepep4j_buffer_create(0, 2, &c, &b) != DEEPEP4J_OK) finding("create of a valid config failed");
  uint8_t own[DEEPEP4J_MAX_BLOB_BYTES], peer[DEEPEP4J_MAX_BLOB_BYTES];
  size_t own_len = 0;
  if (deepep4j_buffer_export(b, own, sizeof(own), &own_len) != DEEPEP4J_OK) finding("export failed");
  // Start from our own blob (well-formed framing) or from raw bytes, then overwrite fuzzed positions.
  size_t peer_len = in.flag() ? own_len : 1 + in.u8() % DEEPEP4J_MAX_BLOB_BYTES;
  if (peer_len == own_len) std::memcpy(peer, own, own_len);
  else for (size_t i = 0; i < peer_len; ++i) peer[i] = in.u8();
  size_t edits = in.u8() % 8;
  for (size_t e = 0; e < edits; ++e) peer[in.u8() % peer_len] = in.u8();
  const void* blobs[2] = {own, peer};
  size_t lens[2] = {own_len, peer_len};
  int st = deepep4j_buffer_connect(b, blobs, lens);
  check_status(st);
  if (st == DEEPEP4J_OK) finding("connect succeeded with a peer that does not exist");
  deepep4j_buffer_destroy(b);
}

// A one-rank buffer kept across inputs (connect once), sized for rows up to 2048 x fp32 with K <= 32.
deepep4j_buffer* one_rank() {
  static deepep4j_buffer* b = [] {
    deepep4j_config c;
    deepep4j_config_init(&c);
    c.num_sms = 2;
    c.ring_tokens = 4;
    c.max_send_tokens_per_chunk = 2;
    c.timeout_ms = 1000;
    c.num_threads = 1;
    if (deepep4j_buffer_size_hint(2048, DEEPEP4J_FLOAT32, 1, &c, &c.buffer_bytes) != DEEPEP4J_OK) finding("hint");
    deepep4j_buffer* buf = nullptr;
    if (deepep4j_buffer_create(0, 1, &c, &buf) != DEEPEP4J_OK) finding("create one rank");
    uint8_t blob[DEEPEP4J_MAX_BLOB_BYTES];
    size_t len = 0;
    if (deepep4j_buffer_export(buf, blob, sizeof(blob), &len) != DEEPEP4J_OK) finding("export one rank");
    const void* blobs[1] = {blob};
    if (deepep4j_buffer_connect(buf, blobs, &len) != DEEPEP4J_OK) finding("connect one rank");
    return buf;
  }();
  return b;
}

// Unconnected buffers of 1..4 ranks for the (local) layout call.
deepep4j_buffer* layout_buffer(int32_t ranks) {
  static deepep4j_buffer* bufs[5] = {};
  if (!bufs[ranks]) {
    deepep4j_config c;
    deepep4j_config_init(&c);
    c.buffer_bytes = 1 << 16;
    c.num_sms = 2;
    c.ring_tokens = 2;
    c.max_send_tokens_per_chunk = 1;
    if (deepep4j_buffer_create(0, ranks, &c, &bufs[ranks]) != DEEPEP4J_OK) finding("create layout buffer");
  }
  return bufs[ranks];
}

struct Routing {
  int64_t n;
  int32_t k, e;
  std::vector<int64_t> idx;
};

Routing fuzz_routing(Input& in) {
  Routing r;
  r.n = in.u8() < 240 ? int64_t(in.u8() % 48) : int64_t(in.small(-4, 4));
  r.k = in.small(0, DEEPEP4J_MAX_TOPK + 2);
  r.e = in.small(0, 24);
  int64_t cells = (r.n > 0 && r.n <= 64 && r.k > 0 && r.k <= 64) ? r.n * r.k : 0;
  r.idx.resize(size_t(cells));
  for (auto& v : r.idx) {
    uint8_t sel = in.u8();
    v = sel < 220 ? int64_t(sel % uint8_t(r.e > 0 && r.e < 200 ? r.e + 1 : 1)) - 1 : int64_t(in.u32()) - (1 << 16);
  }
  return r;
}

// op 2: layout on 1..4 ranks against the naive count.
void fuzz_layout(Input& in) {
  int32_t ranks = 1 + in.u8() % 4;
  Routing r = fuzz_routing(in);
  bool null_idx = in.u8() < 8;
  if (r.n > 64 || r.n < 0) {  // no arrays of that size here: only the rules that need none can be exercised
    int st = deepep4j_get_dispatch_layout(layout_buffer(ranks), nullptr, r.n, r.k, r.e, nullptr, nullptr, nullptr,
                                          nullptr);
    check_status(st);
    if (st == DEEPEP4J_OK && r.n != 0) finding("layout accepted NULL topk_idx with tokens");
    return;
  }
  std::vector<int32_t> per_rank(size_t(ranks), -7), per_expert(size_t(r.e > 0 && r.e < 4096 ? r.e : 1), -7);
  std::vector<uint8_t> in_rank(size_t(r.n > 0 ? r.n * ranks : 1), 0xab);
  bool want_rank = in.flag(), want_expert = in.flag(), want_in = in.flag();
  if (size_t(r.n > 0 ? r.n * r.k : 0) > r.idx.size() && !null_idx) return;  // the harness could not size idx
  int st = deepep4j_get_dispatch_layout(layout_buffer(ranks), null_idx ? nullptr : r.idx.data(), r.n, r.k, r.e,
                                        want_rank ? per_rank.data() : nullptr,
                                        want_expert ? per_expert.data() : nullptr,
                                        want_in ? in_rank.data() : nullptr, nullptr);
  check_status(st);
  if (st != DEEPEP4J_OK) {
    if (!all_equal(per_rank, -7) || !all_equal(per_expert, -7) || !all_equal(in_rank, uint8_t(0xab)))
      finding("layout wrote outputs on failure");
    return;
  }
  const int32_t L = r.e / ranks;
  std::vector<int32_t> pr(size_t(ranks), 0), pe(size_t(r.e), 0);
  for (int64_t t = 0; t < r.n; ++t) {
    std::vector<uint8_t> hit(size_t(ranks), 0);
    for (int32_t j = 0; j < r.k; ++j) {
      int64_t x = r.idx[size_t(t * r.k + j)];
      if (x < 0) continue;
      pe[size_t(x)]++;
      hit[size_t(x / L)] = 1;
    }
    for (int32_t d = 0; d < ranks; ++d) {
      pr[size_t(d)] += hit[size_t(d)];
      if (want_in && in_rank[size_t(t * ranks + d)] != hit[size_t(d)]) finding("is_token_in_rank");
    }
  }
  if (want_rank && per_rank != pr) finding("num_tokens_per_rank");
  if (want_expert && per_expert != pe) finding("num_tokens_per_expert");
}

// op 3: notify + dispatch + combine on one rank with fuzzed shapes, dtypes and missing pointers.
void fuzz_step(Input& in) {
  deepep4j_buffer* b = one_rank();
  Routing r = fuzz_routing(in);
  static const int64_t hiddens[] = {0, -16, 1, 4, 6, 8, 12, 16, 64, 100, 128, 256, 384, 2048, 4096, 1 << 20, (1 << 20) + 128};
  int64_t hidden = in.u8() < 230 ? hiddens[in.u8() % (sizeof(hiddens) / sizeof(hiddens[0]))] : int64_t(in.small(-8, 512));
  int32_t dtype = in.u8() < 240 ? int32_t(in.u8() % 4) : in.small(-2, 6);
  if (r.n > 0 && r.k > 0 && size_t(r.n * r.k) > r.idx.size()) return;
  bool null_idx = in.u8() < 8 || r.n > 64;  // the harness holds no topk_idx for more tokens
  deepep4j_handle* sentinel = reinterpret_cast<deepep4j_handle*>(uintptr_t(0x7e7e));
  deepep4j_handle* h = sentinel;
  int64_t m = -5;
  std::vector<int32_t> per_expert(1025, -5);  // E / R entries; notify refuses more than 1024 per rank
  int st = deepep4j_notify_dispatch(b, null_idx ? nullptr : r.idx.data(), r.n, r.k, r.e, hidden, dtype, &h, &m,
                                    per_expert.data(), nullptr);
  check_status(st);
  if (st != DEEPEP4J_OK) {
    if (h != sentinel || m != -5 || !all_equal(per_expert, -5)) finding("notify wrote outputs on failure");
    return;
  }
  // One rank: M = tokens with at least one valid expert.
  int64_t routed = 0;
  std::vector<int64_t> rows;
  for (int64_t t = 0; t < r.n; ++t) {
    bool any = false;
    for (int32_t j = 0; j < r.k; ++j) any |= r.idx[size_t(t * r.k + j)] >= 0;
    if (any) rows.push_back(t), ++routed;
  }
  if (m != routed) finding("num_recv_tokens on one rank");
  if (hidden > 2048) {  // the harness does not allocate rows this wide; the handle alone must still be sound
    deepep4j_handle_destroy(h);
    return;
  }
  // Dispatch: maybe with another dtype, maybe with missing pointers.
  int32_t ddt = in.u8() < 200 ? -1 : in.small(-2, 5);
  int32_t eff = ddt == -1 ? dtype : ddt;
  size_t es = eff == 0 ? 4 : eff == 3 ? 1 : 2;
  std::vector<uint8_t> x(size_t(r.n * hidden) * es + 1), recv(size_t(m * hidden) * es + 1, 0xee);
  for (size_t i = 0; i < x.size(); ++i) x[i] = uint8_t(i * 131 + 7);
  int64_t sc = hidden / DEEPEP4J_FP8_BLOCK;
  std::vector<float> xs(size_t(r.n * sc) + 1, 1.5f), rxs(size_t(m * sc) + 1, -1.0f);
  std::vector<float> w(size_t(r.n * r.k) + 1, 0.25f), rw(size_t(m * r.k) + 1, -1.0f);
  std::vector<int64_t> ridx(size_t(m * r.k) + 1, -9), rsrc(size_t(m) + 1, -9);
  std::vector<int32_t> rrank(size_t(m) + 1, -9);
  deepep4j_dispatch_args a{};
  uint8_t mask = in.u8();
  a.x = (mask & 1) ? nullptr : x.data();
  a.x_scales = (eff == 3) != bool(mask & 2) ? xs.data() : nullptr;
  a.topk_weights = (mask & 4) ? nullptr : w.data();
  a.recv_x = (mask & 8) ? nullptr : recv.data();
  a.recv_x_scales = (eff == 3) != bool(mask & 16) ? rxs.data() : nullptr;
  a.recv_topk_idx = ridx.data();
  a.recv_topk_weights = (mask & 32) ? nullptr : rw.data();
  a.recv_src_token = rsrc.data();
  a.recv_src_rank = rrank.data();
  bool null_args = mask == 0xff;
  std::vector<uint8_t> recv_before = recv;
  st = deepep4j_dispatch(b, h, ddt, null_args ? nullptr : &a, nullptr);
  check_status(st);
  if (st != DEEPEP4J_OK) {
    if (recv != recv_before || !all_equal(ridx, int64_t(-9)) || !all_equal(rsrc, int64_t(-9)))
      finding("dispatch wrote outputs on failure");
    deepep4j_handle_destroy(h);
    return;
  }
  const size_t row = size_t(hidden) * es;
  for (int64_t i = 0; i < m; ++i) {
    int64_t t = rows[size_t(i)];
    if (rsrc[size_t(i)] != t || rrank[size_t(i)] != 0) finding("recv_src_token / recv_src_rank");
    if (a.x && std::memcmp(recv.data() + size_t(i) * row, x.data() + size_t(t) * row, row) != 0) finding("recv_x row");
    for (int32_t j = 0; j < r.k; ++j)
      if (ridx[size_t(i * r.k + j)] != r.idx[size_t(t * r.k + j)]) finding("recv_topk_idx (one rank: ids unchanged)");
  }
  // Combine (fp32 only checked exactly): identity experts return each routed token once.
  int32_t cdt = in.u8() < 200 ? DEEPEP4J_FLOAT32 : in.small(-2, 5);
  if (cdt != DEEPEP4J_FLOAT32 || hidden <= 0 || !a.x) {
    deepep4j_handle_destroy(h);
    return;
  }
  std::vector<float> y(size_t(m * hidden) + 1), out(size_t(r.n * hidden) + 1, -3.0f);
  if (eff == DEEPEP4J_FLOAT32) std::memcpy(y.data(), recv.data(), size_t(m * hidden) * 4);
  deepep4j_combine_args c{};
  c.y = y.data();
  c.out = out.data();
  st = deepep4j_combine(b, h, cdt, &c, nullptr);
  check_status(st);
  if (st == DEEPEP4J_OK && eff == DEEPEP4J_FLOAT32) {
    const float* xf = reinterpret_cast<const float*>(x.data());
    std::vector<uint8_t> hit(size_t(r.n), 0);
    for (int64_t t : rows) hit[size_t(t)] = 1;
    for (int64_t t = 0; t < r.n; ++t)
      for (int64_t k = 0; k < hidden; ++k) {
        float want = hit[size_t(t)] ? xf[t * hidden + k] : 0.0f;
        float got = out[size_t(t * hidden + k)];
        if (std::memcmp(&want, &got, 4) != 0 && !(want != want && got != got)) finding("combine of identity experts");
      }
  }
  deepep4j_handle_destroy(h);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Input in(data, size);
  switch (in.u8() % 4) {
    case 0: fuzz_create(in); break;
    case 1: fuzz_peer_blob(in); break;
    case 2: fuzz_layout(in); break;
    default: fuzz_step(in); break;
  }
  return 0;
}
