// Minimal test harness for the C++ tests (one executable per file, run by ctest).
// TEST(name) { ... } registers a test; CHECK / CHECK_NEAR / CHECK_THROWS record
// failures with file and line; main() runs every test and returns non-zero on failure.
#pragma once

#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <string>
#include <vector>

namespace rq_test {

struct Case {
  const char* name;
  std::function<void()> body;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

inline int& failures() {
  static int count = 0;
  return count;
}

struct Registrar {
  Registrar(const char* name, std::function<void()> body) { registry().push_back({name, std::move(body)}); }
};

inline void fail(const char* file, int line, const std::string& message) {
  ++failures();
  std::fprintf(stderr, "%s:%d: FAILED: %s\n", file, line, message.c_str());
}

}  // namespace rq_test

#define RQ_CONCAT_INNER(a, b) a##b
#define RQ_CONCAT(a, b) RQ_CONCAT_INNER(a, b)

#define TEST(name)                                                               \
  static void RQ_CONCAT(rq_test_fn_, name)();                                    \
  static ::rq_test::Registrar RQ_CONCAT(rq_test_reg_, name)(#name, RQ_CONCAT(rq_test_fn_, name)); \
  static void RQ_CONCAT(rq_test_fn_, name)()

#define CHECK(cond)                                                  \
  do {                                                               \
    if (!(cond)) ::rq_test::fail(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define CHECK_NEAR(a, b, tol)                                                          \
  do {                                                                                 \
    const double rq_a_ = static_cast<double>(a), rq_b_ = static_cast<double>(b);       \
    if (!(std::fabs(rq_a_ - rq_b_) <= static_cast<double>(tol))) {                    \
      char rq_buf_[256];                                                               \
      std::snprintf(rq_buf_, sizeof rq_buf_, "%s = %.17g vs %s = %.17g (tol %.3g)", #a, \
                    rq_a_, #b, rq_b_, static_cast<double>(tol));                       \
      ::rq_test::fail(__FILE__, __LINE__, rq_buf_);                                    \
    }                                                                                  \
  } while (0)

#define CHECK_THROWS(expr, exception_type)                                                 \
  do {                                                                                     \
    bool rq_thrown_ = false;                                                               \
    try {                                                                                  \
      (void)(expr);                                                                        \
    } catch (const exception_type&) {                                                      \
      rq_thrown_ = true;                                                                   \
    } catch (...) {                                                                        \
    }                                                                                      \
    if (!rq_thrown_) ::rq_test::fail(__FILE__, __LINE__, "expected " #exception_type " from " #expr); \
  } while (0)

int main() {
  int failed_cases = 0;
  for (const auto& test_case : rq_test::registry()) {
    const int before = rq_test::failures();
    try {
      test_case.body();
    } catch (const std::exception& e) {
      rq_test::fail(__FILE__, __LINE__, std::string("uncaught exception in ") + test_case.name + ": " + e.what());
    }
    const bool ok = rq_test::failures() == before;
    if (!ok) ++failed_cases;
    std::printf("[%s] %s\n", ok ? "  OK  " : "FAILED", test_case.name);
  }
  std::printf("%zu tests, %d failed\n", rq_test::registry().size(), failed_cases);
  return failed_cases == 0 ? 0 : 1;
}
