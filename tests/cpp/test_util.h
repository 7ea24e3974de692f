// Small helpers shared by the GoogleTest files: tolerances per type, a
// relative/absolute closeness check with a readable message, and a seeded RNG.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <sstream>

namespace tbd_test {

// Tolerances for comparing a header result computed in T against an
// independent reference computed in double (or long double).
template <typename T> struct Tol;
template <> struct Tol<float> {
  static constexpr double rtol = 1e-5;
  static constexpr double atol = 1e-5;
};
template <> struct Tol<double> {
  static constexpr double rtol = 1e-12;
  static constexpr double atol = 1e-12;
};

// |actual - expected| <= atol + rtol * |expected|; NaN only matches NaN and
// infinities only match the same infinity.
inline ::testing::AssertionResult Close(double actual, double expected, double rtol, double atol) {
  if (std::isnan(expected) || std::isnan(actual)) {
    if (std::isnan(expected) && std::isnan(actual)) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "actual " << actual << " vs expected " << expected;
  }
  if (std::isinf(expected) || std::isinf(actual)) {
    if (actual == expected) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "actual " << actual << " vs expected " << expected;
  }
  const double err = std::fabs(actual - expected);
  const double lim = atol + rtol * std::fabs(expected);
  if (err <= lim) return ::testing::AssertionSuccess();
  std::ostringstream os;
  os.precision(17);
  os << "actual " << actual << " vs expected " << expected << " (|diff| " << err << " > tol " << lim
     << ")";
  return ::testing::AssertionFailure() << os.str();
}

template <typename T>
inline ::testing::AssertionResult CloseT(double actual, double expected, double scale = 1.0) {
  return Close(actual, expected, Tol<T>::rtol * scale, Tol<T>::atol * scale);
}

// Deterministic RNG with a few convenience draws.
class Rng {
 public:
  explicit Rng(uint64_t seed) : gen_(seed) {}
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen_); }
  int64_t integer(int64_t lo, int64_t hi) {  // inclusive
    return std::uniform_int_distribution<int64_t>(lo, hi)(gen_);
  }
  bool coin(double p_true = 0.5) { return uniform(0.0, 1.0) < p_true; }

 private:
  std::mt19937_64 gen_;
};

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

}  // namespace tbd_test
