// tbd_ops/masked_reduce.h: the term of each masked reduction (d^2, |d|), its
// derivative as autograd takes it, and the per-element gradient.
#include "tbd_ops/masked_reduce.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "test_util.h"

namespace {

using namespace tbd_ops;

template <typename T> class MaskedTyped : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(MaskedTyped, FloatTypes);

TYPED_TEST(MaskedTyped, Terms) {
  using T = TypeParam;
  for (double d : {-3.5, -1.0, -0.25, 0.0, 0.5, 2.0, 1e-20}) {
    EXPECT_EQ(masked_term<MaskedMode::kSqDist>(T(d)), T(d) * T(d)) << d;
    EXPECT_EQ(masked_term<MaskedMode::kL1>(T(d)), T(std::fabs(d))) << d;
  }
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T inf = std::numeric_limits<T>::infinity();
  EXPECT_TRUE(std::isnan(masked_term<MaskedMode::kSqDist>(nan)));
  EXPECT_TRUE(std::isnan(masked_term<MaskedMode::kL1>(nan)));
  EXPECT_EQ(masked_term<MaskedMode::kL1>(-inf), inf);
  EXPECT_EQ(masked_term<MaskedMode::kSqDist>(-inf), inf);
}

TYPED_TEST(MaskedTyped, TermGradientsAsAutograd) {
  // d(d^2)/dd = 2d; d|d|/dd = sign(d) with sign(0) = 0 (torch.abs's backward),
  // and 0 for NaN (torch.sign(nan) = 0).
  using T = TypeParam;
  EXPECT_EQ(masked_term_grad<MaskedMode::kSqDist>(T(-1.5)), T(-3));
  EXPECT_EQ(masked_term_grad<MaskedMode::kSqDist>(T(0)), T(0));
  EXPECT_EQ(masked_term_grad<MaskedMode::kL1>(T(-1.5)), T(-1));
  EXPECT_EQ(masked_term_grad<MaskedMode::kL1>(T(1e-30)), T(1));
  EXPECT_EQ(masked_term_grad<MaskedMode::kL1>(T(0)), T(0));
  EXPECT_EQ(masked_term_grad<MaskedMode::kL1>(-T(0)), T(0));
  EXPECT_EQ(masked_term_grad<MaskedMode::kL1>(std::numeric_limits<T>::quiet_NaN()), T(0));
}

TEST(Masked, TermGradientsMatchCentralDifferencesAwayFromZero) {
  tbd_test::Rng rng(5);
  const double h = 1e-6;
  for (int i = 0; i < 300; ++i) {
    const double d = rng.uniform(-4, 4);
    if (std::fabs(d) < 1e-3) continue;
    const double fd2 = (masked_term<MaskedMode::kSqDist>(d + h) - masked_term<MaskedMode::kSqDist>(d - h)) / (2 * h);
    const double fd1 = (masked_term<MaskedMode::kL1>(d + h) - masked_term<MaskedMode::kL1>(d - h)) / (2 * h);
    EXPECT_TRUE(tbd_test::Close(masked_term_grad<MaskedMode::kSqDist>(d), fd2, 1e-7, 1e-7)) << d;
    EXPECT_TRUE(tbd_test::Close(masked_term_grad<MaskedMode::kL1>(d), fd1, 1e-7, 1e-7)) << d;
  }
}

TYPED_TEST(MaskedTyped, GradientOfAIsTheTermDerivativeTimesTheMaskWeight) {
  // out = sum_hw m * sum_c term(a - b): d out / d a = term'(a - b) * w with
  // w = sum_k grad_k * m_k; the gradient of b is its negation.
  using T = TypeParam;
  const T w = T(0.75);
  EXPECT_EQ(masked_grad_a<MaskedMode::kSqDist>(T(2), w), T(2) * T(2) * w);
  EXPECT_EQ(masked_grad_a<MaskedMode::kL1>(T(-2), w), -w);
  EXPECT_EQ(masked_grad_a<MaskedMode::kL1>(T(0), w), T(0));
  EXPECT_EQ(masked_grad_a<MaskedMode::kSqDist>(T(1), T(0)), T(0));
}

}  // namespace
