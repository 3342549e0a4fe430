// proc_group.h — R ranks as separate processes: each child creates its buffer and sends its blob to the parent through
// a pipe; the parent sends every blob back to every child, which connects and runs the body. Every wait has a deadline.
#pragma once

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>

#include "harness.h"

namespace proc {

inline int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Reads exactly n bytes before the deadline; false on EOF, error or timeout.
inline bool read_full(int fd, void* p, size_t n, int64_t deadline) {
  uint8_t* b = static_cast<uint8_t*>(p);
  while (n > 0) {
    int64_t left = deadline - now_ms();
    if (left <= 0) return false;
    pollfd pf{fd, POLLIN, 0};
    int pr = poll(&pf, 1, int(left));
    if (pr <= 0) {
      if (pr < 0 && errno == EINTR) continue;
      return false;
    }
    ssize_t got = read(fd, b, n);
    if (got <= 0) return false;
    b += got;
    n -= size_t(got);
  }
  return true;
}

inline bool write_full(int fd, const void* p, size_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  while (n > 0) {
    ssize_t put = write(fd, b, n);
    if (put <= 0) return false;
    b += put;
    n -= size_t(put);
  }
  return true;
}

// Child exit codes beyond the number of failed checks.
constexpr int kChildSetupFailed = 120;
constexpr int kChildTimedOut = 124;

// Forks R ranks. body(rank, connected buffer) runs in the child and returns its exit code (0 = as expected; the number
// of failed CHECKs is added). Returns each child's exit code, kChildTimedOut if it had to be killed after deadline_ms,
// or 128 + signal if it died of a signal. With devices > 0 (CUDA ranks) rank r uses device r % devices.
inline std::vector<int> run_processes(int32_t R, const deepep4j_config& cfg,
                                      const std::function<int(int32_t, deepep4j_buffer*)>& body, int deadline_ms,
                                      int devices = 0) {
  std::fflush(stdout);
  std::fflush(stderr);
  const int64_t deadline = now_ms() + deadline_ms;
  std::vector<pid_t> pids(static_cast<size_t>(R), -1);
  std::vector<int> up(static_cast<size_t>(R)), down(static_cast<size_t>(R));
  for (int32_t r = 0; r < R; ++r) {
    int u[2], d[2];
    if (pipe(u) != 0 || pipe(d) != 0) {
      t::fail(__FILE__, __LINE__, "pipe failed");
      throw t::Abort{};
    }
    pid_t pid = fork();
    if (pid == 0) {
      t::failures() = 0;  // count only this child's checks
      close(u[0]);
      close(d[1]);
      int code = kChildSetupFailed;
      try {
        deepep4j_buffer* b = nullptr;
        uint8_t blob[DEEPEP4J_MAX_BLOB_BYTES];
        size_t len = 0;
        deepep4j_config own = cfg;
        if (devices > 0) own.device_id = r % devices;
        REQUIRE_OK(deepep4j_buffer_create(r, R, &own, &b));
        REQUIRE_OK(deepep4j_buffer_export(b, blob, sizeof(blob), &len));
        uint32_t len32 = uint32_t(len);
        REQUIRE(write_full(u[1], &len32, 4) && write_full(u[1], blob, len));
        std::vector<std::vector<uint8_t>> blobs(static_cast<size_t>(R));
        std::vector<const void*> ptrs;
        std::vector<size_t> lens;
        for (int32_t i = 0; i < R; ++i) {
          uint32_t n = 0;
          REQUIRE(read_full(d[0], &n, 4, deadline) && n <= DEEPEP4J_MAX_BLOB_BYTES);
          blobs[size_t(i)].resize(n);
          REQUIRE(read_full(d[0], blobs[size_t(i)].data(), n, deadline));
          ptrs.push_back(blobs[size_t(i)].data());
          lens.push_back(n);
        }
        REQUIRE_OK(deepep4j_buffer_connect(b, ptrs.data(), lens.data()));
        code = body(r, b);
        deepep4j_buffer_destroy(b);
      } catch (const t::Abort&) {
      }
      long f = t::failures().load();
      std::fflush(stderr);
      _exit(code != 0 ? code : f > 0 ? int(std::min(f, 100L)) : 0);
    }
    close(u[1]);
    close(d[0]);
    pids[size_t(r)] = pid;
    up[size_t(r)] = u[0];
    down[size_t(r)] = d[1];
  }
  // Gather every blob, then hand all of them to every child.
  std::vector<std::vector<uint8_t>> blobs(static_cast<size_t>(R));
  bool gathered = true;
  for (int32_t r = 0; r < R && gathered; ++r) {
    uint32_t n = 0;
    gathered = read_full(up[size_t(r)], &n, 4, deadline) && n <= DEEPEP4J_MAX_BLOB_BYTES;
    if (gathered) {
      blobs[size_t(r)].resize(n);
      gathered = read_full(up[size_t(r)], blobs[size_t(r)].data(), n, deadline);
    }
  }
  if (gathered)
    for (int32_t r = 0; r < R; ++r)
      for (int32_t i = 0; i < R; ++i) {
        uint32_t n = uint32_t(blobs[size_t(i)].size());
        write_full(down[size_t(r)], &n, 4);
        write_full(down[size_t(r)], blobs[size_t(i)].data(), n);
      }
  for (int32_t r = 0; r < R; ++r) {
    close(up[size_t(r)]);
    close(down[size_t(r)]);
  }
  // Reap with a deadline; kill stragglers.
  std::vector<int> codes(static_cast<size_t>(R), -1);
  int left = R;
  while (left > 0) {
    for (int32_t r = 0; r < R; ++r) {
      if (codes[size_t(r)] != -1) continue;
      int status = 0;
      pid_t w = waitpid(pids[size_t(r)], &status, WNOHANG);
      if (w == pids[size_t(r)]) {
        codes[size_t(r)] = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        --left;
      }
    }
    if (left > 0 && now_ms() > deadline) {
      for (int32_t r = 0; r < R; ++r)
        if (codes[size_t(r)] == -1) {
          kill(pids[size_t(r)], SIGKILL);
          waitpid(pids[size_t(r)], nullptr, 0);
          codes[size_t(r)] = kChildTimedOut;
          --left;
        }
    }
    if (left > 0) usleep(2000);
  }
  return codes;
}

}  // namespace proc
