// harness.h — a tiny test framework: TEST cases registered at start-up, CHECK macros that record failures (from any
// thread) and keep going, REQUIRE macros that end the current case. Exit status is the number of failed cases (capped).
#pragma once

#include <atomic>
#include <cinttypes>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <mutex>
#include <string>
#include <vector>

#include "deepep4j.h"

namespace t {

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& cases() {
  static std::vector<Case> all;
  return all;
}

inline std::atomic<long>& failures() {
  static std::atomic<long> n{0};
  return n;
}

inline std::mutex& print_mutex() {
  static std::mutex m;
  return m;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { cases().push_back({name, std::move(fn)}); }
};

// Thrown by REQUIRE to leave the current case.
struct Abort {};

inline void fail(const char* file, int line, const std::string& what) {
  failures()++;
  std::lock_guard<std::mutex> lock(print_mutex());
  std::fprintf(stderr, "  FAIL %s:%d: %s\n", file, line, what.c_str());
}

inline std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
inline std::string fmt(const char* f, ...) {
  char buf[2048];
  va_list ap;
  va_start(ap, f);
  std::vsnprintf(buf, sizeof(buf), f, ap);
  va_end(ap);
  return buf;
}

inline std::string status_str(int s) { return fmt("%s (%d)", deepep4j_status_name(s), s); }

// Runs the cases whose name contains argv[1] (all without an argument).
inline int main(int argc, char** argv) {
  const char* filter = argc > 1 ? argv[1] : "";
  int failed_cases = 0, run = 0;
  for (const Case& c : cases()) {
    if (std::strstr(c.name, filter) == nullptr) continue;
    ++run;
    long before = failures().load();
    std::fprintf(stderr, "[ RUN  ] %s\n", c.name);
    try {
      c.fn();
    } catch (const Abort&) {
    }
    bool ok = failures().load() == before;
    if (!ok) ++failed_cases;
    std::fprintf(stderr, "[ %s ] %s\n", ok ? " OK " : "FAIL", c.name);
  }
  std::fprintf(stderr, "%d case(s) run, %d failed\n", run, failed_cases);
  if (run == 0) {
    std::fprintf(stderr, "no case matches '%s'\n", filter);
    return 1;
  }
  return failed_cases > 100 ? 100 : failed_cases;
}

}  // namespace t

#define T_CAT2(a, b) a##b
#define T_CAT(a, b) T_CAT2(a, b)
#define TEST(name)                                                             \
  static void T_CAT(test_fn_, name)();                                         \
  static t::Register T_CAT(test_reg_, name)(#name, &T_CAT(test_fn_, name));    \
  static void T_CAT(test_fn_, name)()

#define CHECK(cond)                                        \
  do {                                                     \
    if (!(cond)) t::fail(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_MSG(cond, ...)                                                  \
  do {                                                                        \
    if (!(cond)) t::fail(__FILE__, __LINE__, "CHECK(" #cond "): " + t::fmt(__VA_ARGS__)); \
  } while (0)

#define REQUIRE(cond)                                                           \
  do {                                                                          \
    if (!(cond)) {                                                              \
      t::fail(__FILE__, __LINE__, "REQUIRE(" #cond ")");                        \
      throw t::Abort{};                                                         \
    }                                                                           \
  } while (0)

#define CHECK_EQ(a, b)                                                                       \
  do {                                                                                       \
    auto t_a_ = (a);                                                                         \
    auto t_b_ = (b);                                                                         \
    if (!(t_a_ == t_b_))                                                                     \
      t::fail(__FILE__, __LINE__,                                                            \
              t::fmt("CHECK_EQ(%s, %s): %lld != %lld", #a, #b, (long long)t_a_, (long long)t_b_)); \
  } while (0)

// A deepep4j call that must succeed; on failure prints the status and the thread's last error, and ends the case.
#define REQUIRE_OK(call)                                                                          \
  do {                                                                                            \
    int t_s_ = (call);                                                                            \
    if (t_s_ != DEEPEP4J_OK) {                                                                    \
      t::fail(__FILE__, __LINE__,                                                                 \
              t::fmt("%s -> %s: %s", #call, t::status_str(t_s_).c_str(), deepep4j_last_error())); \
      throw t::Abort{};                                                                           \
    }                                                                                             \
  } while (0)

// A deepep4j call that must fail with `status` and a last error containing every listed fragment.
#define CHECK_ERR(call, status, ...)                                                                           \
  do {                                                                                                         \
    int t_s_ = (call);                                                                                         \
    std::string t_m_ = deepep4j_last_error();                                                                  \
    if (t_s_ != (status))                                                                                      \
      t::fail(__FILE__, __LINE__,                                                                              \
              t::fmt("%s -> %s, expected %s; message: %s", #call, t::status_str(t_s_).c_str(),                 \
                     t::status_str(status).c_str(), t_m_.c_str()));                                            \
    for (const char* t_f_ : std::initializer_list<const char*>{__VA_ARGS__})                                   \
      if (t_m_.find(t_f_) == std::string::npos)                                                                \
        t::fail(__FILE__, __LINE__, t::fmt("%s: message lacks \"%s\": %s", #call, t_f_, t_m_.c_str()));        \
  } while (0)

#define TEST_MAIN() \
  int main(int argc, char** argv) { return t::main(argc, argv); }
