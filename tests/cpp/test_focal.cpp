// tbd_ops/focal.h: the sigmoid focal loss of one element and its derivative
// against long double formulas, the log(FLT_MIN) clamp, infinities and NaN.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "tbd_ops/focal.h"
#include "test_util.h"

namespace {

using namespace tbd_ops;
using tbd_test::Close;

long double sig(long double x) { return 1.0L / (1.0L + std::exp(-x)); }
long double log_sig(long double x) {  // stable, clamped at log(FLT_MIN)
  const long double v = std::min(x, 0.0L) - std::log1p(std::exp(-std::fabs(x)));
  return std::max(v, static_cast<long double>(kFocalLogMin));
}

long double loss_ref(long double x, bool pos, long double g, long double a) {
  if (pos) return -a * std::pow(sig(-x), g) * log_sig(x);
  return -(1 - a) * std::pow(sig(x), g) * log_sig(-x);
}

long double grad_ref(long double x, bool pos, long double g, long double a) {
  const long double p = sig(x), q = sig(-x);
  if (pos) return a * std::pow(q, g) * (g * p * log_sig(x) - q);
  return (1 - a) * std::pow(p, g) * (p - g * q * log_sig(-x));
}

template <typename T> void check_grid(double rtol, double atol) {
  for (double gamma : {0.0, 0.5, 1.0, 1.5, 2.0, 3.0}) {
    for (double alpha : {0.0, 0.25, 0.5, 1.0}) {
      for (int k = -400; k <= 400; ++k) {
        const T x = static_cast<T>(k * 0.2);  // [-80, 80]
        for (bool pos : {false, true}) {
          const long double lx = x;
          EXPECT_TRUE(Close(focal_loss<T>(x, pos, T(gamma), T(alpha)),
                            static_cast<double>(loss_ref(lx, pos, gamma, alpha)), rtol, atol))
              << "x " << x << " pos " << pos << " gamma " << gamma << " alpha " << alpha;
          EXPECT_TRUE(Close(focal_grad<T>(x, pos, T(gamma), T(alpha)),
                            static_cast<double>(grad_ref(lx, pos, gamma, alpha)), rtol, atol))
              << "grad x " << x << " pos " << pos << " gamma " << gamma << " alpha " << alpha;
        }
      }
    }
  }
}

TEST(Focal, DoubleMatchesLongDouble) { check_grid<double>(1e-13, 1e-300); }
TEST(Focal, FloatMatchesLongDouble) { check_grid<float>(5e-6, 1e-37); }

TEST(Focal, GradientIsTheDerivativeOfTheLoss) {
  for (double gamma : {0.0, 1.0, 2.0, 2.5}) {
    for (double x = -12.0; x <= 12.0; x += 0.37) {
      for (bool pos : {false, true}) {
        const double h = 1e-6;
        const double fd = (focal_loss(x + h, pos, gamma, 0.3) - focal_loss(x - h, pos, gamma, 0.3)) / (2 * h);
        EXPECT_NEAR(focal_grad(x, pos, gamma, 0.3), fd, 1e-7) << "x " << x << " pos " << pos;
      }
    }
  }
}

TEST(Focal, ProbabilitiesWithoutCancellation) {
  // p and 1 - p come from exp(-|x|) separately: both keep full relative accuracy.
  const FocalParts<double> f = focal_parts(-50.0);
  EXPECT_NEAR(f.p, std::exp(-50.0), 1e-15 * std::exp(-50.0));
  EXPECT_EQ(f.q, 1.0);
  EXPECT_DOUBLE_EQ(f.log_p, -50.0 - std::log1p(std::exp(-50.0)));
  const FocalParts<float> g = focal_parts(30.0f);
  EXPECT_NEAR(g.q, std::exp(-30.0f), 1e-6f * std::exp(-30.0f));
  EXPECT_FLOAT_EQ(g.log_q, -30.0f);
}

TEST(Focal, LogClampedAtFltMin) {
  EXPECT_NEAR(kFocalLogMin, std::log(static_cast<double>(std::numeric_limits<float>::min())), 1e-13);
  for (double x : {-88.0, -100.0, -1e4, -std::numeric_limits<double>::infinity()}) {
    EXPECT_EQ(focal_parts(x).log_p, kFocalLogMin) << x;
    EXPECT_EQ(focal_parts(-x).log_q, kFocalLogMin) << x;
  }
  EXPECT_EQ(focal_parts(-87.0).log_p, -87.0 - std::log1p(std::exp(-87.0)));  // not yet clamped
  // A confidently wrong positive: alpha * 87.34 (mmcv's value); its gradient stays -alpha.
  EXPECT_NEAR(focal_loss(-1000.0f, true, 2.0f, 0.25f), 0.25f * 87.336544750553102f, 1e-5f);
  EXPECT_FLOAT_EQ(focal_grad(-1000.0f, true, 2.0f, 0.25f), -0.25f);
  EXPECT_FLOAT_EQ(focal_grad(1000.0f, false, 2.0f, 0.25f), 0.75f);
}

TEST(Focal, InfinitiesAreFiniteAndNaNPropagates) {
  const float inf = std::numeric_limits<float>::infinity();
  for (float x : {inf, -inf}) {
    for (bool pos : {false, true}) {
      for (float gamma : {0.0f, 2.0f, 1.5f}) {
        EXPECT_TRUE(std::isfinite(focal_loss(x, pos, gamma, 0.25f))) << x << " " << pos << " " << gamma;
        EXPECT_TRUE(std::isfinite(focal_grad(x, pos, gamma, 0.25f))) << x << " " << pos << " " << gamma;
      }
    }
  }
  EXPECT_EQ(focal_loss(inf, true, 2.0f, 0.25f), 0.0f);
  EXPECT_EQ(focal_loss(-inf, false, 2.0f, 0.25f), 0.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (bool pos : {false, true}) {
    for (float gamma : {0.0f, 2.0f}) {
      EXPECT_TRUE(std::isnan(focal_loss(nan, pos, gamma, 0.25f)));
      EXPECT_TRUE(std::isnan(focal_grad(nan, pos, gamma, 0.25f)));
    }
  }
}

TEST(Focal, PowSpecialCases) {
  EXPECT_EQ(focal_pow(0.3f, 0.0f), 1.0f);
  EXPECT_EQ(focal_pow(std::nanf(""), 0.0f), 1.0f);  // torch.pow(nan, 0) = 1
  EXPECT_EQ(focal_pow(0.0f, 0.0f), 1.0f);
  EXPECT_EQ(focal_pow(0.3f, 1.0f), 0.3f);
  EXPECT_EQ(focal_pow(0.3f, 2.0f), 0.3f * 0.3f);
  EXPECT_EQ(focal_pow(0.3, 1.5), std::pow(0.3, 1.5));
}

TEST(Focal, TargetRange) {
  EXPECT_TRUE(focal_target_ok(0, 3));
  EXPECT_TRUE(focal_target_ok(3, 3));  // background
  EXPECT_FALSE(focal_target_ok(4, 3));
  EXPECT_FALSE(focal_target_ok(-1, 3));
  EXPECT_TRUE(focal_target_ok(0, 0));
}

}  // namespace
