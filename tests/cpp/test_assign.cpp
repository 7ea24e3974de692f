// tbd_ops/assign.h: the quality s^alpha * u^(1 - alpha), the ranking order of
// bag members and the dynamic k.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

TEST(Assign, DynamicK) {
  EXPECT_EQ(dynamic_k(0.0), 1);
  EXPECT_EQ(dynamic_k(0.99f), 1);
  EXPECT_EQ(dynamic_k(1.0), 1);
  EXPECT_EQ(dynamic_k(1.999999), 1);
  EXPECT_EQ(dynamic_k(2.0f), 2);
  EXPECT_EQ(dynamic_k(7.9999), 7);
  EXPECT_EQ(dynamic_k(12.0), 12);
  EXPECT_EQ(dynamic_k(kNaN), 1);
  EXPECT_EQ(dynamic_k(-3.0), 1);
  EXPECT_GT(dynamic_k(1e30), int64_t(1) << 60);
  // The float sum of the u's, not the double one, decides k near an integer.
  float s = 0.f;
  for (int i = 0; i < 10; ++i) s += 0.3f;  // 3.0000001f in float
  EXPECT_EQ(dynamic_k(s), static_cast<int64_t>(std::floor(s)));
}

}  // namespace
