// tbd_ops/assign.h: the quality s^alpha * u^(1 - alpha), the ranking order of
// bag members and the dynamic k.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "tbd_ops/assign.h"

namespace {

using namespace tbd_ops;

const double kNaN = std::numeric_limits<double>::quiet_NaN();

TEST(Assign, PowUnitSpecialExponents) {
  EXPECT_EQ(pow_unit(0.3f, 0.0), 1.0f);
  EXPECT_EQ(pow_unit(std::nanf(""), 0.0), 1.0f);  // torch.pow(nan, 0) = 1
  EXPECT_EQ(pow_unit(0.3f, 1.0), 0.3f);
  EXPECT_EQ(pow_unit(0.3f, 0.5), std::sqrt(0.3f));
  EXPECT_EQ(pow_unit(0.0, 0.5), 0.0);
  EXPECT_TRUE(std::isnan(pow_unit(-0.25, 0.5)));
  EXPECT_EQ(pow_unit(0.3, 0.25), std::pow(0.3, 0.25));
  // float inputs: evaluated in double, rounded once.
  EXPECT_EQ(pow_unit(0.3f, 0.7), static_cast<float>(std::pow(static_cast<double>(0.3f), 0.7)));
}

TEST(Assign, QualityIsGeometricMean) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> d(0.0, 1.0);
  for (int i = 0; i < 200; ++i) {
    const double s = d(rng), u = d(rng), a = d(rng);
    const double q = assign_quality(s, u, a, 1.0 - a);
    EXPECT_NEAR(q, std::exp(a * std::log(s) + (1 - a) * std::log(u)), 1e-12);
  }
  EXPECT_EQ(assign_quality(0.64, 0.25, 0.5, 0.5), 0.8 * 0.5);
  EXPECT_EQ(assign_quality(0.64, 0.25, 0.0, 1.0), 0.25);
  EXPECT_EQ(assign_quality(0.64, 0.25, 1.0, 0.0), 0.64);
  EXPECT_EQ(assign_quality(0.0, 0.25, 0.5, 0.5), 0.0);
}

TEST(Assign, RanksBeforeIsAStrictTotalOrder) {
  // Values with ties and NaN; sorting by ranks_before must equal a stable
  // descending sort with NaN first (torch.sort(descending=True, stable=True)).
  const std::vector<double> v = {0.5, kNaN, 0.7, 0.5, -1.0, kNaN, 0.7, 0.0, 0.5};
  std::vector<int64_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::vector<int64_t> sorted = idx;
  std::sort(sorted.begin(), sorted.end(),
            [&](int64_t a, int64_t b) { return ranks_before(v[a], a, v[b], b); });
  const std::vector<int64_t> expected = {1, 5, 2, 6, 0, 3, 8, 7, 4};
  EXPECT_EQ(sorted, expected);
  for (int64_t a : idx) {
    EXPECT_FALSE(ranks_before(v[a], a, v[a], a));  // irreflexive
    // Each element's rank (the number ranked before it) is its sorted position.
    int64_t rank = 0;
    for (int64_t b : idx) rank += ranks_before(v[b], b, v[a], a);
    EXPECT_EQ(sorted[rank], a);
    for (int64_t b : idx) {
      if (a != b) EXPECT_NE(ranks_before(v[a], a, v[b], b), ranks_before(v[b], b, v[a], a));
    }
  }
}

// k of the values added in the given order (the kernels add them in descending order).
template <typename T> int64_t k_of(const std::vector<T>& values) {
  BagSum s = bag_sum_empty();
  for (T v : values) bag_sum_add(s, static_cast<double>(v));
  return dynamic_k(s);
}

// floor of the exact sum of doubles in [0.25, 1]: each is an integer multiple
// of 2^-54, so the sum is exact in int64 units of 2^-54.
int64_t exact_floor(const std::vector<double>& values) {
  int64_t units = 0;
  for (double v : values) units += static_cast<int64_t>(std::ldexp(v, 54));
  return units >> 54;
}

TEST(Assign, DynamicK) {
  EXPECT_EQ(k_of(std::vector<double>{}), 1);
  EXPECT_EQ(k_of(std::vector<double>{0.0}), 1);
  EXPECT_EQ(k_of(std::vector<float>{0.99f}), 1);
  EXPECT_EQ(k_of(std::vector<double>{1.0}), 1);
  EXPECT_EQ(k_of(std::vector<double>{1.0, 0.999999}), 1);
  EXPECT_EQ(k_of(std::vector<float>{1.0f, 1.0f}), 2);
  EXPECT_EQ(k_of(std::vector<double>{1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.9999}), 7);
  EXPECT_EQ(k_of(std::vector<double>(12, 1.0)), 12);
  EXPECT_EQ(k_of(std::vector<double>{1.0, kNaN, 1.0}), 1);
  EXPECT_EQ(k_of(std::vector<double>{-3.0}), 1);
  EXPECT_GT(k_of(std::vector<double>{1e30}), int64_t(1) << 60);
}

TEST(Assign, DynamicKFloorsTheExactSumOfFloat32IoUs) {
  // PseCo's example: the float32 IoUs 1, .85, .85, .75, .65, .45, .45 sum to
  // exactly 5 (as real numbers); a float32 running sum in descending order
  // gives 4.9999995, floor 4.
  const std::vector<float> u = {1.0f, 0.85f, 0.85f, 0.75f, 0.65f, 0.45f, 0.45f};
  float running = 0.f;
  for (float v : u) running += v;
  ASSERT_LT(running, 5.0f);  // the failure mode this guards against
  EXPECT_EQ(k_of(u), 5);
  // float32 values in [2^-20, 1]: the double sum alone is exact (lo stays 0).
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> d(std::ldexp(1.f, -20), 1.f);
  for (int t = 0; t < 2000; ++t) {
    BagSum s = bag_sum_empty();
    for (int i = 0; i < 12; ++i) bag_sum_add(s, static_cast<double>(d(rng)));
    ASSERT_EQ(s.lo, 0.0);
  }
}

TEST(Assign, DynamicKFloorsTheExactSumOfFloat64IoUs) {
  // 0.96 + 0.87 + 0.8 + 0.72 + 0.65 (as doubles) is exactly 4; the double
  // running sum is 3.9999999999999996.
  const std::vector<double> u = {0.96, 0.87, 0.8, 0.72, 0.65};
  double running = 0.0;
  for (double v : u) running += v;
  ASSERT_LT(running, 4.0);
  ASSERT_EQ(exact_floor(u), 4);
  EXPECT_EQ(k_of(u), 4);
  // Random bags of up to 12 values in [0.25, 1] in descending order, half of
  // them completed so that the exact sum is an integer: k is the floor of the
  // exact sum; a plain double running sum misses some of them.
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> d(0.25, 1.0);
  int integer_sums = 0, running_wrong = 0;
  for (int t = 0; t < 20000; ++t) {
    std::vector<double> v(1 + rng() % 12);
    for (double& x : v) x = d(rng);
    if (t % 2 == 0 && v.size() >= 2) {
      // Replace the last value by K - (the exact sum of the others).
      int64_t units = 0;
      for (size_t i = 0; i + 1 < v.size(); ++i) units += static_cast<int64_t>(std::ldexp(v[i], 54));
      const int64_t one = int64_t(1) << 54;
      const int64_t last = (units / one + 1) * one - units;  // in (0, 1] of a unit
      const double x = std::ldexp(static_cast<double>(last), -54);
      if (last < one / 4 || static_cast<int64_t>(std::ldexp(x, 54)) != last) continue;
      v.back() = x;
      ++integer_sums;
    }
    std::sort(v.begin(), v.end(), std::greater<double>());
    double r = 0.0;
    for (double x : v) r += x;
    const int64_t expected = std::max<int64_t>(1, exact_floor(v));
    running_wrong += std::max<int64_t>(1, static_cast<int64_t>(std::floor(r))) != expected;
    ASSERT_EQ(k_of(v), expected) << "bag of " << v.size() << ", running sum " << r;
  }
  EXPECT_GT(integer_sums, 1000);
  EXPECT_GT(running_wrong, 0);
}

}  // namespace
