// tbd_ops/harmony.h: the harmony score, its gradient and the terms of the
// harmony distillation loss, against independent double / long double
// formulas and finite differences.
#include "tbd_ops/harmony.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>

#include "test_util.h"

namespace {

using namespace tbd_ops;

template <typename T> class HarmonyTyped : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(HarmonyTyped, FloatTypes);

long double ref_score(long double c, long double r) { return 1.0L - std::tanh(std::fabs(r - c)); }

// check(c, r) on n pairs (c, r) of type T drawn uniformly from [lo, hi) by mt19937(seed).
template <typename T, typename F> void for_random_pairs(unsigned seed, double lo, double hi, int n, F check) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(lo, hi);
  for (int i = 0; i < n; ++i) {
    const T c = static_cast<T>(u(rng)), r = static_cast<T>(u(rng));
    check(c, r);
  }
}

TYPED_TEST(HarmonyTyped, ScoreMatchesFormula) {
  using T = TypeParam;
  for_random_pairs<T>(1, -3.0, 3.0, 2000, [](T c, T r) {
    EXPECT_TRUE(tbd_test::CloseT<T>(harmony_score(c, r), static_cast<double>(ref_score(c, r))))
        << "c=" << c << " r=" << r;
  });
}

TYPED_TEST(HarmonyTyped, ScoreIsSymmetricAndInRange) {
  using T = TypeParam;
  for_random_pairs<T>(2, -50.0, 50.0, 1000, [](T c, T r) {
    const T s = harmony_score(c, r);
    EXPECT_EQ(s, harmony_score(r, c));  // |r - c| == |c - r| exactly
    EXPECT_GE(s, T(0));
    EXPECT_LE(s, T(1));
  });
  EXPECT_EQ(harmony_score(T(0.25), T(0.25)), T(1));
  EXPECT_EQ(harmony_score(T(0), T(1000)), T(0));
  EXPECT_EQ(harmony_score(T(0), std::numeric_limits<T>::infinity()), T(0));
}

TYPED_TEST(HarmonyTyped, GradientMatchesFiniteDifference) {
  using T = TypeParam;
  for_random_pairs<double>(3, -2.0, 2.0, 500, [](double c, double r) {
    if (std::fabs(r - c) < 1e-3) return;  // the kink at d = 0
    const double h = 1e-6;
    const double fd = static_cast<double>((ref_score(c, r + h) - ref_score(c, r - h)) / (2 * h));
    const T g = harmony_dpr(static_cast<T>(c), static_cast<T>(r));
    EXPECT_TRUE(tbd_test::Close(g, fd, std::is_same<T, float>::value ? 1e-5 : 1e-8, 1e-6))
        << "c=" << c << " r=" << r;
    // d/dp_c is the negation; with an incoming gradient the product.
    EXPECT_EQ(harmony_grad_pr(T(-1.5), static_cast<T>(c), static_cast<T>(r)), T(-1.5) * g);
  });
}

TYPED_TEST(HarmonyTyped, GradientAtEqualInputsIsZero) {
  using T = TypeParam;
  // sign(0) = 0, as autograd's gradient of |x| at 0.
  EXPECT_EQ(harmony_dpr(T(0.3), T(0.3)), T(0));
  EXPECT_EQ(harmony_dpr(T(-2), T(-2)), T(0));
  EXPECT_EQ(sign_val(T(0)), T(0));
  EXPECT_EQ(sign_val(-T(0)), T(0));
  EXPECT_EQ(sign_val(T(1e-30)), T(1));
  EXPECT_EQ(sign_val(T(-1e-30)), T(-1));
}

TYPED_TEST(HarmonyTyped, NanPropagates) {
  using T = TypeParam;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  EXPECT_TRUE(std::isnan(harmony_score(nan, T(0.5))));
  EXPECT_TRUE(std::isnan(harmony_score(T(0.5), nan)));
  EXPECT_TRUE(std::isnan(harmony_dpr(nan, T(0.5))));
  EXPECT_TRUE(std::isnan(hd_term(T(1), nan, T(0.5))));
  EXPECT_TRUE(std::isnan((hd_norm<HarmonyMode::kIouGuided, T>(nan, 4, 2, T(1e-6)))));
  EXPECT_EQ(sign_val(nan), T(0));  // torch.sign(nan) = 0
}

TYPED_TEST(HarmonyTyped, Weights) {
  using T = TypeParam;
  EXPECT_EQ((hd_weight<HarmonyMode::kPlain, T>(T(0.1), T(0.9), T(0.4))), T(1));
  const T w = hd_weight<HarmonyMode::kIouGuided, T>(T(0.1), T(0.9), T(0.4));
  EXPECT_TRUE(tbd_test::CloseT<T>(w, 0.4 * std::sqrt(1.0 + 0.8)));
  EXPECT_EQ((hd_weight<HarmonyMode::kIouGuided, T>(T(0.9), T(0.1), T(0.4))), w);
  EXPECT_EQ((hd_weight<HarmonyMode::kIouGuided, T>(T(0.1), T(0.9), T(0))), T(0));  // no gt: 0
}

TYPED_TEST(HarmonyTyped, Normalizers) {
  using T = TypeParam;
  const T eps = T(1e-6);
  // A level without locations contributes nothing (not 1 / 0).
  EXPECT_EQ((hd_norm<HarmonyMode::kPlain, T>(T(0), 0, 3, eps)), T(0));
  EXPECT_EQ((hd_norm<HarmonyMode::kIouGuided, T>(T(0), 0, 3, eps)), T(0));
  EXPECT_TRUE(tbd_test::CloseT<T>(hd_norm<HarmonyMode::kPlain, T>(T(123), 35, 3, eps), 1.0 / 105));
  EXPECT_TRUE(tbd_test::CloseT<T>(hd_norm<HarmonyMode::kIouGuided, T>(T(2.5), 35, 4, eps), 1.0 / 10));
  // sum psi below eps: the eps floor.
  EXPECT_TRUE(tbd_test::CloseT<T>(hd_norm<HarmonyMode::kIouGuided, T>(T(0), 35, 2, eps), 1.0 / (2 * 1e-6)));
}

TYPED_TEST(HarmonyTyped, LossGradientMatchesFiniteDifference) {
  using T = TypeParam;
  std::mt19937 rng(4);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int i = 0; i < 500; ++i) {
    const double pc = u(rng), pr = u(rng), hs_t = u(rng), w = u(rng), coef = u(rng) * 3 - 1.5;
    const auto term = [&](double c, double r) {
      return coef * w * std::fabs(hs_t - static_cast<double>(ref_score(c, r)));
    };
    if (std::fabs(pr - pc) < 1e-3 || std::fabs(hs_t - static_cast<double>(ref_score(pc, pr))) < 1e-3) continue;
    const double h = 1e-7;
    const double fd_r = (term(pc, pr + h) - term(pc, pr - h)) / (2 * h);
    const double fd_c = (term(pc + h, pr) - term(pc - h, pr)) / (2 * h);
    const T g = hd_grad_pr(static_cast<T>(coef), static_cast<T>(w), static_cast<T>(pc),
                           static_cast<T>(pr), static_cast<T>(hs_t));
    const double tol = std::is_same<T, float>::value ? 1e-4 : 1e-6;
    EXPECT_TRUE(tbd_test::Close(g, fd_r, tol, tol)) << i;
    EXPECT_TRUE(tbd_test::Close(-g, fd_c, tol, tol)) << i;
  }
}

TYPED_TEST(HarmonyTyped, LossGradientIsTheScoreGradientChained) {
  // The same operations as harmony_score / harmony_dpr: bit for bit.
  using T = TypeParam;
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  for (int i = 0; i < 500; ++i) {
    const T pc = static_cast<T>(u(rng)), pr = static_cast<T>(u(rng)), hs_t = static_cast<T>(u(rng));
    const T coef = static_cast<T>(u(rng)), w = static_cast<T>(u(rng) + 1);
    const T g_hs = coef * w * sign_val(harmony_score(pc, pr) - hs_t);
    EXPECT_EQ(hd_grad_pr(coef, w, pc, pr, hs_t), harmony_grad_pr(g_hs, pc, pr));
  }
}

}  // namespace
