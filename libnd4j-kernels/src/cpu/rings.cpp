// rings.cpp — the data path of a step: per-(source, channel) rings in the receiver's region, senders publish the
// tail (release) and the receiver the head; rows between ranks of one process may skip the rings (direct copies).
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdlib>
#include <cstring>

#include "../common/dtype.h"
#include "cpu_backend.h"

namespace deepep4j {
namespace cpu {

int CpuBackend::run_transfer(Transfer& tr) {
  std::atomic<int> status{DEEPEP4J_OK};
  std::mutex err_mu;
  std::string err;
  pool_->run([&](int w) {
    int st = drive_channels(tr, w, pool_->size(), status, &err, err_mu);
    if (st != DEEPEP4J_OK) {
      int expected = DEEPEP4J_OK;
      status.compare_exchange_strong(expected, st);
    }
  });
  if (status.load() != DEEPEP4J_OK) return set_error(status.load(), "%s", err.c_str());
  return ok();
}

int CpuBackend::drive_channels(Transfer& tr, int w, int threads, std::atomic<int>& status, std::string* err,
                   std::mutex& err_mu) {
  std::vector<SendState> sends;
  std::vector<std::vector<RecvState>> recvs;  // per channel, in source order
  std::vector<int> channels;
  for (int c = w; c < C_; c += threads) channels.push_back(c);
  for (int c : channels) {
    if (tr.channel_begin) tr.channel_begin(c);
    std::vector<RecvState> rc;
    for (int p = 0; p < R_; ++p) {
      int64_t ns = tr.send_count(p, c);
      if (peer_direct_[p] && !tr.ordered_sources) {  // pushed straight into p's arrays, before any ring work
        for (int64_t i = 0; i < ns; ++i) tr.direct_copy(p, c, i);
      } else if (!peer_direct_[p] && ns > 0) {
        RingHeader* hdr = views_[p].ring_header(rank_, c);
        uint64_t tail = hdr->tail.load(std::memory_order_relaxed);  // only this rank writes it
        sends.push_back(SendState{p, c, 0, ns, hdr, views_[p].ring_data(rank_, c), tail, tail});
      }
      int64_t nr = tr.recv_count(p, c);
      if (nr > 0 && !(peer_direct_[p] && !tr.ordered_sources)) {  // pushed rows need no receive step
        RingHeader* hdr = views_[rank_].ring_header(p, c);
        uint64_t head = hdr->head.load(std::memory_order_relaxed);
        rc.push_back(RecvState{p, c, 0, nr, hdr, views_[rank_].ring_data(p, c), head, head});
      }
    }
    recvs.push_back(std::move(rc));
  }
  // Ordered transfer whose sources are all direct: walk the channel token by token, adding each token's rows in
  // source order while its accumulator is still in cache (same sums, same order, one pass over the output).
  if (tr.ordered_sources)
    for (auto& rc : recvs) {
      bool all_direct = !rc.empty();
      for (auto& r : rc) all_direct = all_direct && peer_direct_[r.peer];
      if (!all_direct) continue;
      for (;;) {
        int64_t tok = INT64_MAX;
        for (auto& r : rc)
          if (r.done < r.count) tok = std::min(tok, tr.token_of(r.peer, r.channel, r.done));
        if (tok == INT64_MAX) break;
        for (auto& r : rc)
          if (r.done < r.count && tr.token_of(r.peer, r.channel, r.done) == tok) tr.direct_copy(r.peer, r.channel, r.done++);
        if (tr.token_done) tr.token_done(tok);
      }
    }

  std::vector<size_t> cursor(channels.size(), 0);  // ordered: the source each channel consumes now
  Deadline deadline(cfg_.timeout_ms);
  Backoff backoff;
  const uint64_t slots = uint64_t(tr.slots);
  const int64_t chunk = cfg_.max_send_tokens_per_chunk;
  for (;;) {
    bool progress = false, pending = false;
    for (auto& s : sends) {
      if (s.done == s.count) continue;
      pending = true;
      uint64_t head = s.hdr->head.load(std::memory_order_acquire);
      if (head < s.base) continue;  // the previous step's rows are still being read (other slot geometry)
      int64_t space = int64_t(slots - (s.tail - head));
      int64_t nrows = std::min({space, chunk, s.count - s.done});
      if (nrows <= 0) continue;
      for (int64_t i = 0; i < nrows; ++i)
        tr.pack(s.peer, s.channel, s.done + i, s.data + ((s.tail - s.base + i) % slots) * tr.slot_bytes);
      s.tail += nrows;
      s.done += nrows;
      s.hdr->tail.store(s.tail, std::memory_order_release);
      progress = true;
    }
    for (size_t ci = 0; ci < channels.size(); ++ci) {
      auto& rc = recvs[ci];
      for (size_t k = (tr.ordered_sources ? cursor[ci] : 0); k < rc.size(); ++k) {
        RecvState& r = rc[k];
        if (r.done == r.count) {
          if (tr.ordered_sources && k == cursor[ci]) ++cursor[ci];
          continue;
        }
        pending = true;
        if (peer_direct_[r.peer]) {  // ordered transfer: pulled from a direct peer, at its turn
          for (int64_t i = 0; i < r.count; ++i) tr.direct_copy(r.peer, r.channel, i);
          r.done = r.count;
          progress = true;
        } else {
          uint64_t tail = r.hdr->tail.load(std::memory_order_acquire);
          int64_t avail = int64_t(tail - r.head);
          for (int64_t i = 0; i < avail; ++i)
            tr.unpack(r.peer, r.channel, r.done + i, r.data + ((r.head - r.base + i) % slots) * tr.slot_bytes);
          if (avail > 0) {
            r.head += avail;
            r.done += avail;
            r.hdr->head.store(r.head, std::memory_order_release);
            progress = true;
          }
        }
        if (tr.ordered_sources) {
          if (r.done == r.count) {
            ++cursor[ci];
            continue;
          }
          break;  // later sources wait their turn
        }
      }
    }
    if (!pending) break;
    if (progress) {
      backoff.reset();
      continue;
    }
    if (status.load(std::memory_order_relaxed) != DEEPEP4J_OK) return status.load();
    if (deadline.passed()) {
      int peer = -1;
      for (auto& s : sends)
        if (s.done < s.count) peer = s.peer;
      for (auto& rc : recvs)
        for (auto& r : rc)
          if (r.done < r.count && peer < 0) peer = r.peer;
      std::lock_guard<std::mutex> g(err_mu);
      char buf[256];
      snprintf(buf, sizeof(buf),
               "rank %d: timed out after %d ms in %s waiting for rank %d (the peer did not arrive or died)", rank_,
               cfg_.timeout_ms, step_name(tr.kind), peer);
      *err = buf;
      return DEEPEP4J_ERR_TIMEOUT;
    }
    backoff.pause();
  }
  for (int c : channels)
    if (tr.channel_end) tr.channel_end(c);
  return DEEPEP4J_OK;
}

}  // namespace cpu
}  // namespace deepep4j
