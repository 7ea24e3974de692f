// tbd_ops/math.h: accumulation type, the libm wrappers' precision, |v| and
// sign, NaN-propagating max/min with their autograd derivatives, clamp helpers.
#include "tbd_ops/math.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "test_util.h"

namespace {

using namespace tbd_ops;
using tbd_test::Close;

struct FakeHalf {};  // stands in for a 16-bit storage type

static_assert(std::is_same<acc_t<float>, float>::value, "float accumulates in float");
static_assert(std::is_same<acc_t<double>, double>::value, "double accumulates in double");
static_assert(std::is_same<acc_t<FakeHalf>, float>::value, "other types accumulate in float");
static_assert(std::is_same<decltype(math_exp(1.0f)), float>::value, "math_exp(float) stays float");
static_assert(std::is_same<decltype(math_exp(1.0)), double>::value, "math_exp(double) stays double");
static_assert(std::is_same<decltype(math_log(1.0f)), float>::value, "math_log(float) stays float");
static_assert(std::is_same<decltype(math_log(1.0)), double>::value, "math_log(double) stays double");
static_assert(std::is_same<decltype(math_log1p(1.0f)), float>::value, "math_log1p(float) stays float");
static_assert(std::is_same<decltype(math_tanh(1.0f)), float>::value, "math_tanh(float) stays float");
static_assert(std::is_same<decltype(math_sqrt(1.0f)), float>::value, "math_sqrt(float) stays float");
static_assert(std::is_same<decltype(math_floor(1.0f)), float>::value, "math_floor(float) stays float");
static_assert(std::is_same<decltype(math_pow(1.0f, 2.0f)), float>::value, "math_pow(float) stays float");
static_assert(std::is_same<decltype(math_tanh(1.0)), double>::value, "math_tanh(double) stays double");
static_assert(std::is_same<decltype(CastTo<double>()(1.5f)), double>::value, "CastTo<A> gives A");

template <typename T> class MathTyped : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(MathTyped, FloatTypes);

TYPED_TEST(MathTyped, IsNan) {
  using T = TypeParam;
  EXPECT_TRUE(is_nan(std::numeric_limits<T>::quiet_NaN()));
  EXPECT_FALSE(is_nan(T(0)));
  EXPECT_FALSE(is_nan(std::numeric_limits<T>::infinity()));
  EXPECT_FALSE(is_nan(-std::numeric_limits<T>::infinity()));
}

TYPED_TEST(MathTyped, ExpLogValues) {
  using T = TypeParam;
  const double e = 2.718281828459045235360287;
  EXPECT_TRUE(tbd_test::CloseT<T>(math_exp(T(1)), e));
  EXPECT_TRUE(tbd_test::CloseT<T>(math_exp(T(-2.5)), 0.0820849986238988));
  EXPECT_TRUE(tbd_test::CloseT<T>(math_log(T(e)), 1.0));
  EXPECT_TRUE(tbd_test::CloseT<T>(math_log(T(0.016)), -4.135166556742356));
  EXPECT_EQ(math_exp(-std::numeric_limits<T>::infinity()), T(0));
  EXPECT_EQ(math_log(T(0)), -std::numeric_limits<T>::infinity());
  for (double x = -20; x <= 20; x += 0.37) {
    EXPECT_TRUE(tbd_test::CloseT<T>(math_log(math_exp(T(x))), T(x), 2.0)) << "x=" << x;
  }
}

TYPED_TEST(MathTyped, OtherLibmWrappersMatchTheCLibrary) {
  // The wrappers call the C library in the argument's precision: equal to the
  // float / double function of <cmath> bit for bit.
  using T = TypeParam;
  for (double x : {-3.5, -1.0, -0.25, 0.0, 0.3, 1.0, 2.75, 40.0}) {
    const T v = T(x);
    EXPECT_EQ(math_tanh(v), std::tanh(v)) << x;
    EXPECT_EQ(math_floor(v), std::floor(v)) << x;
    if (x > -1) {
      EXPECT_EQ(math_log1p(v), std::log1p(v)) << x;
    }
    if (x >= 0) {
      EXPECT_EQ(math_sqrt(v), std::sqrt(v)) << x;
      EXPECT_EQ(math_pow(v, T(1.5)), std::pow(v, T(1.5))) << x;
    }
  }
  EXPECT_TRUE(tbd_test::CloseT<T>(math_tanh(T(0.5)), 0.46211715726000974));
  EXPECT_TRUE(tbd_test::CloseT<T>(math_log1p(T(1e-7)), 9.9999995000000333e-08));
  EXPECT_TRUE(tbd_test::CloseT<T>(math_sqrt(T(2)), 1.4142135623730951));
  EXPECT_EQ(math_floor(T(-0.5)), T(-1));
  EXPECT_TRUE(tbd_test::CloseT<T>(math_pow(T(0.25), T(0.5)), 0.5));
}

TYPED_TEST(MathTyped, AbsAndSignAsTorch) {
  // torch.abs and torch.sign (the gradient of |v|): sign(0) = sign(-0) = sign(NaN) = 0.
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  EXPECT_EQ(abs_val(T(-2.5)), T(2.5));
  EXPECT_EQ(abs_val(T(2.5)), T(2.5));
  EXPECT_EQ(abs_val(-inf), inf);
  EXPECT_TRUE(std::isnan(abs_val(nan)));
  EXPECT_EQ(sign_val(T(3)), T(1));
  EXPECT_EQ(sign_val(T(-1e-30)), T(-1));
  EXPECT_EQ(sign_val(T(0)), T(0));
  EXPECT_EQ(sign_val(-T(0)), T(0));
  EXPECT_EQ(sign_val(nan), T(0));
  EXPECT_EQ(sign_val(-inf), T(-1));
}

TYPED_TEST(MathTyped, MaxMinOrdinary) {
  using T = TypeParam;
  EXPECT_EQ(max_nan(T(-1), T(2)), T(2));
  EXPECT_EQ(max_nan(T(2), T(-1)), T(2));
  EXPECT_EQ(min_nan(T(-1), T(2)), T(-1));
  EXPECT_EQ(min_nan(T(2), T(-1)), T(-1));
  EXPECT_EQ(max_nan(T(-3), T(-3)), T(-3));
  const T inf = std::numeric_limits<T>::infinity();
  EXPECT_EQ(max_nan(-inf, T(-1e30)), T(-1e30));
  EXPECT_EQ(min_nan(inf, T(1e30)), T(1e30));
  EXPECT_EQ(max_nan(inf, T(5)), inf);
  EXPECT_EQ(min_nan(-inf, T(5)), -inf);
}

TYPED_TEST(MathTyped, MaxMinPropagateNan) {
  // torch.maximum / torch.minimum: NaN on either side gives NaN.
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  for (T other : {T(0), T(-7), T(7), inf, -inf, nan}) {
    EXPECT_TRUE(std::isnan(max_nan(nan, other))) << other;
    EXPECT_TRUE(std::isnan(max_nan(other, nan))) << other;
    EXPECT_TRUE(std::isnan(min_nan(nan, other))) << other;
    EXPECT_TRUE(std::isnan(min_nan(other, nan))) << other;
  }
}

TYPED_TEST(MathTyped, MaxMinDerivativeTiesSplitHalf) {
  using T = TypeParam;
  EXPECT_EQ(dmax_da(T(2), T(1)), T(1));
  EXPECT_EQ(dmax_da(T(1), T(2)), T(0));
  EXPECT_EQ(dmax_da(T(1), T(1)), T(0.5));
  EXPECT_EQ(dmin_da(T(2), T(1)), T(0));
  EXPECT_EQ(dmin_da(T(1), T(2)), T(1));
  EXPECT_EQ(dmin_da(T(1), T(1)), T(0.5));
  EXPECT_EQ(dmax_da(T(-0.0), T(0.0)), T(0.5));  // -0 == +0 is a tie
  // The two partials of max(a, b) always sum to 1, as do those of min.
  tbd_test::Rng rng(7);
  for (int i = 0; i < 200; ++i) {
    const T a = T(rng.integer(-3, 3));
    const T b = T(rng.integer(-3, 3));
    EXPECT_EQ(dmax_da(a, b) + dmax_da(b, a), T(1)) << a << " " << b;
    EXPECT_EQ(dmin_da(a, b) + dmin_da(b, a), T(1)) << a << " " << b;
    // Gradient goes to the argument that is selected.
    if (a != b) {
      EXPECT_EQ(dmax_da(a, b), max_nan(a, b) == a ? T(1) : T(0));
      EXPECT_EQ(dmin_da(a, b), min_nan(a, b) == a ? T(1) : T(0));
    }
  }
}

TYPED_TEST(MathTyped, ClampValue) {
  using T = TypeParam;
  EXPECT_EQ(clamp_val(T(0.5), T(0), T(1)), T(0.5));
  EXPECT_EQ(clamp_val(T(-0.5), T(0), T(1)), T(0));
  EXPECT_EQ(clamp_val(T(1.5), T(0), T(1)), T(1));
  EXPECT_EQ(clamp_val(T(0), T(0), T(1)), T(0));
  EXPECT_EQ(clamp_val(T(1), T(0), T(1)), T(1));
  EXPECT_EQ(clamp_val(-std::numeric_limits<T>::infinity(), T(-2), T(3)), T(-2));
  EXPECT_EQ(clamp_val(std::numeric_limits<T>::infinity(), T(-2), T(3)), T(3));
  EXPECT_TRUE(std::isnan(clamp_val(std::numeric_limits<T>::quiet_NaN(), T(0), T(1))));
  EXPECT_EQ(clamp_min_val(T(-3), T(0)), T(0));
  EXPECT_EQ(clamp_min_val(T(3), T(0)), T(3));
  EXPECT_EQ(clamp_min_val(T(3), T(5)), T(5));
  EXPECT_TRUE(std::isnan(clamp_min_val(std::numeric_limits<T>::quiet_NaN(), T(0))));
}

TYPED_TEST(MathTyped, ClampGradientClosedInterval) {
  // Autograd's clamp passes the gradient on the closed interval [lo, hi].
  using T = TypeParam;
  EXPECT_EQ(clamp_grad(T(0.5), T(0), T(1)), T(1));
  EXPECT_EQ(clamp_grad(T(0), T(0), T(1)), T(1));
  EXPECT_EQ(clamp_grad(T(1), T(0), T(1)), T(1));
  EXPECT_EQ(clamp_grad(T(-1e-3), T(0), T(1)), T(0));
  EXPECT_EQ(clamp_grad(T(1.001), T(0), T(1)), T(0));
  EXPECT_EQ(clamp_grad(std::numeric_limits<T>::quiet_NaN(), T(0), T(1)), T(0));
  EXPECT_EQ(clamp_min_grad(T(0), T(0)), T(1));
  EXPECT_EQ(clamp_min_grad(T(2), T(0)), T(1));
  EXPECT_EQ(clamp_min_grad(T(-2), T(0)), T(0));
  EXPECT_EQ(clamp_min_grad(std::numeric_limits<T>::quiet_NaN(), T(0)), T(0));
}

TEST(Math, ClampGradientMatchesFiniteDifferenceAwayFromBounds) {
  tbd_test::Rng rng(11);
  const double lo = -1.25, hi = 2.5, h = 1e-6;
  for (int i = 0; i < 500; ++i) {
    const double v = rng.uniform(-4, 5);
    if (std::fabs(v - lo) < 1e-3 || std::fabs(v - hi) < 1e-3) continue;
    const double fd = (clamp_val(v + h, lo, hi) - clamp_val(v - h, lo, hi)) / (2 * h);
    EXPECT_TRUE(Close(clamp_grad(v, lo, hi), fd, 1e-8, 1e-8)) << "v=" << v;
    const double fdm = (clamp_min_val(v + h, lo) - clamp_min_val(v - h, lo)) / (2 * h);
    EXPECT_TRUE(Close(clamp_min_grad(v, lo), fdm, 1e-8, 1e-8)) << "v=" << v;
  }
}

}  // namespace
