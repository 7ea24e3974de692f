// tbd_ops/argmax.h: running argmax with torch.max(dim) semantics.
#include "tbd_ops/argmax.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "test_util.h"

namespace {

using namespace tbd_ops;

// torch.max(dim): the first NaN if there is one, otherwise the first position
// holding the largest value.
template <typename T> int64_t reference_argmax(const std::vector<T>& v) {
  if (v.empty()) return -1;
  for (size_t i = 0; i < v.size(); ++i)
    if (std::isnan(v[i])) return static_cast<int64_t>(i);
  size_t best = 0;
  for (size_t i = 1; i < v.size(); ++i)
    if (v[i] > v[best]) best = i;
  return static_cast<int64_t>(best);
}

template <typename T> ArgMax<T> run_argmax(const std::vector<T>& v) {
  ArgMax<T> a = argmax_empty<T>();
  for (size_t i = 0; i < v.size(); ++i) argmax_update(a, v[i], static_cast<int64_t>(i));
  return a;
}

template <typename T> class ArgMaxTyped : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(ArgMaxTyped, FloatTypes);

TYPED_TEST(ArgMaxTyped, ArgmaxOfAnArrayIsTheRunningArgmax) {
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const std::vector<std::vector<T>> cases = {
      {}, {T(1)}, {T(1), T(3), T(3), T(2)}, {T(-1), nan, T(5), nan}, {T(4), T(4), T(4)}};
  for (const auto& v : cases) {
    const ArgMax<T> a = argmax_of(v.data(), static_cast<int64_t>(v.size()));
    EXPECT_EQ(a.index, reference_argmax(v));
    if (a.index >= 0 && !std::isnan(v[a.index])) {
      EXPECT_EQ(a.value, v[a.index]);
    }
  }
}

TYPED_TEST(ArgMaxTyped, EmptyHasNoIndex) {
  const ArgMax<TypeParam> a = argmax_empty<TypeParam>();
  EXPECT_EQ(a.index, -1);
}

TYPED_TEST(ArgMaxTyped, SingleNegativeValue) {
  // The empty state's placeholder value (0) must not beat a negative candidate.
  using T = TypeParam;
  const ArgMax<T> a = run_argmax<T>({T(-3)});
  EXPECT_EQ(a.index, 0);
  EXPECT_EQ(a.value, T(-3));
}

TYPED_TEST(ArgMaxTyped, AllNegativeValues) {
  using T = TypeParam;
  const ArgMax<T> a = run_argmax<T>({T(-5), T(-2), T(-7), T(-2), T(-9)});
  EXPECT_EQ(a.index, 1);
  EXPECT_EQ(a.value, T(-2));
}

TYPED_TEST(ArgMaxTyped, TiesGoToLowestIndex) {
  using T = TypeParam;
  const ArgMax<T> a = run_argmax<T>({T(1), T(3), T(3), T(2), T(3)});
  EXPECT_EQ(a.index, 1);
  EXPECT_EQ(a.value, T(3));
  const ArgMax<T> b = run_argmax<T>({T(4), T(4), T(4)});
  EXPECT_EQ(b.index, 0);
}

TYPED_TEST(ArgMaxTyped, SignedZerosTie) {
  using T = TypeParam;
  EXPECT_EQ(run_argmax<T>({T(-0.0), T(0.0)}).index, 0);
  EXPECT_EQ(run_argmax<T>({T(0.0), T(-0.0)}).index, 0);
}

TYPED_TEST(ArgMaxTyped, FirstNanWins) {
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  {
    const ArgMax<T> a = run_argmax<T>({T(1), nan, T(5), nan, inf});
    EXPECT_EQ(a.index, 1);
    EXPECT_TRUE(std::isnan(a.value));
  }
  {
    const ArgMax<T> a = run_argmax<T>({nan, inf, T(3)});
    EXPECT_EQ(a.index, 0);
    EXPECT_TRUE(std::isnan(a.value));
  }
  {
    const ArgMax<T> a = run_argmax<T>({T(1), T(2), nan});
    EXPECT_EQ(a.index, 2);
    EXPECT_TRUE(std::isnan(a.value));
  }
}

TYPED_TEST(ArgMaxTyped, Infinities) {
  using T = TypeParam;
  const T inf = std::numeric_limits<T>::infinity();
  {
    const ArgMax<T> a = run_argmax<T>({-inf, -inf});
    EXPECT_EQ(a.index, 0);
    EXPECT_EQ(a.value, -inf);
  }
  {
    const ArgMax<T> a = run_argmax<T>({-inf, T(-1e30), -inf});
    EXPECT_EQ(a.index, 1);
  }
  {
    const ArgMax<T> a = run_argmax<T>({T(1), inf, inf});
    EXPECT_EQ(a.index, 1);
    EXPECT_EQ(a.value, inf);
  }
}

TYPED_TEST(ArgMaxTyped, KeepsCallerIndices) {
  // Indices need only increase, not be contiguous (e.g. a strided walk).
  using T = TypeParam;
  ArgMax<T> a = argmax_empty<T>();
  const T vals[] = {T(-1), T(4), T(2), T(4)};
  for (int i = 0; i < 4; ++i) argmax_update(a, vals[i], int64_t(100) + 7 * i);
  EXPECT_EQ(a.index, 107);
  EXPECT_EQ(a.value, T(4));
}

TYPED_TEST(ArgMaxTyped, TakesPredicate) {
  // argmax_takes(best, v): a later candidate replaces the current best iff the
  // best is not NaN and v is NaN or strictly larger.
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  EXPECT_TRUE(argmax_takes(T(1), T(2)));
  EXPECT_FALSE(argmax_takes(T(2), T(1)));
  EXPECT_FALSE(argmax_takes(T(2), T(2)));      // tie: keep the earlier index
  EXPECT_FALSE(argmax_takes(T(0.0), T(-0.0)));
  EXPECT_FALSE(argmax_takes(T(-0.0), T(0.0)));
  EXPECT_TRUE(argmax_takes(T(-5), T(-4)));
  EXPECT_TRUE(argmax_takes(-inf, T(-1e30)));
  EXPECT_FALSE(argmax_takes(inf, inf));
  EXPECT_TRUE(argmax_takes(T(1), nan));        // first NaN wins
  EXPECT_TRUE(argmax_takes(inf, nan));
  EXPECT_FALSE(argmax_takes(nan, nan));        // ... and stays
  EXPECT_FALSE(argmax_takes(nan, inf));
  EXPECT_FALSE(argmax_takes(nan, T(3)));
}

TYPED_TEST(ArgMaxTyped, RandomAgainstReference) {
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  tbd_test::Rng rng(1234);
  for (int trial = 0; trial < 2000; ++trial) {
    const int n = static_cast<int>(rng.integer(1, 12));
    const double p_nan = trial % 3 == 0 ? 0.08 : 0.0;
    std::vector<T> v(n);
    for (int i = 0; i < n; ++i) {
      const double u = rng.uniform(0, 1);
      if (u < p_nan) v[i] = nan;
      else if (u < p_nan + 0.03) v[i] = rng.coin() ? inf : -inf;
      else v[i] = T(rng.integer(-4, 2));  // small integers: many ties, many negatives
    }
    const ArgMax<T> a = run_argmax(v);
    const int64_t ref = reference_argmax(v);
    ASSERT_EQ(a.index, ref) << "trial " << trial;
    if (std::isnan(v[ref])) {
      EXPECT_TRUE(std::isnan(a.value));
    } else {
      EXPECT_EQ(a.value, v[ref]);
    }
  }
}

// argmax_update_above started below every candidate: the same value bits and
// index as argmax_update started empty, for every sequence of length <= 4 over
// {NaN, -0.0, +0.0, 0.5, 1, inf} (IoUs are NaN or >= -0.0).
template <typename T> void check_update_above() {
  const T vals[] = {std::numeric_limits<T>::quiet_NaN(), T(-0.0), T(0.0), T(0.5), T(1),
                    std::numeric_limits<T>::infinity()};
  int checked = 0;
  for (int len = 0; len <= 4; ++len) {
    int count = 1;
    for (int k = 0; k < len; ++k) count *= 6;
    for (int code = 0; code < count; ++code) {
      ArgMax<T> a = argmax_empty<T>(), b = argmax_below(T(-1));
      T v2 = T(-1);
      int j2 = -1;
      for (int k = 0, c = code; k < len; ++k, c /= 6) {
        argmax_update(a, vals[c % 6], k);
        argmax_update_above(b, vals[c % 6], k);
        argmax_update_above(v2, j2, vals[c % 6], k);
      }
      ASSERT_EQ(a.index, b.index) << len << " " << code;
      ASSERT_EQ(a.index, j2) << len << " " << code;
      if (a.index >= 0) {
        ASSERT_EQ(std::memcmp(&a.value, &b.value, sizeof(T)), 0) << len << " " << code;
        ASSERT_EQ(std::memcmp(&a.value, &v2, sizeof(T)), 0) << len << " " << code;
      }
      ++checked;
    }
  }
  EXPECT_EQ(checked, 1 + 6 + 36 + 216 + 1296);
}

TEST(ArgMaxAbove, SameAsArgMaxUpdateFloat) { check_update_above<float>(); }
TEST(ArgMaxAbove, SameAsArgMaxUpdateDouble) { check_update_above<double>(); }

}  // namespace
