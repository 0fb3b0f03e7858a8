// Typed exceptions of the rotorquant core. The Python bindings map them to
// ValueError / TypeError / RuntimeError; the core never aborts on user input.
#pragma once

#include <stdexcept>
#include <string>

namespace rotorquant {

// A parameter or input has a value outside what is supported
// (shape, range, non-finite where finite is required, corrupted buffer...).
class ValueError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// An input has the wrong kind (dtype, device, unknown enum name...).
class TypeError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// Something failed that is not the caller's fault (CUDA error, allocation...).
class RuntimeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
// Builds "what: expected X, got Y" messages in one style across the library.
inline std::string expected_got(const std::string& what, const std::string& expected,
                                const std::string& got) {
  return what + ": expected " + expected + ", got " + got;
}
}  // namespace detail

}  // namespace rotorquant
