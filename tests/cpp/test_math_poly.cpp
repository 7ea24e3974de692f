// tbd_ops/math.h: the branch-free float32 exp_nonpositive and log1p_unit
// against libm in double (rounded results within 1 ulp of it), over a dense
// sweep of float bit patterns (subnormals included) and at the special
// points: the range-reduction boundaries, the underflow threshold, +-0,
// +-inf, NaN of either sign. Also the integer-domain selects.
#include "tbd_ops/math.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using namespace tbd_ops;

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

// |got - ref| in units of the last place of ref as a float (2^-149 below FLT_MIN).
double ulp_error(float got, double ref) {
  if (std::isnan(ref)) return std::isnan(got) ? 0.0 : INFINITY;
  if (std::isinf(ref)) return static_cast<double>(got) == ref ? 0.0 : INFINITY;
  const double a = std::fabs(ref);
  double ulp = std::ldexp(1.0, -149);
  if (a >= std::numeric_limits<float>::min()) {
    int ex = 0;
    std::frexp(a, &ex);  // a in [2^(ex-1), 2^ex)
    ulp = std::ldexp(1.0, ex - 24);
  }
  return std::fabs(static_cast<double>(got) - ref) / ulp;
}

struct Worst {
  double ulps = 0.0;
  float at = 0.0f;
  void add(double e, float x) {
    if (!(e <= ulps)) {
      ulps = e;
      at = x;
    }
  }
};

constexpr double kMaxUlps = 1.0;  // measured over every float: 0.98 (exp), 0.90 (log1p)

double exp_ref(float x) { return std::exp(-std::fabs(static_cast<double>(x))); }

TEST(MathPoly, ExpNonpositiveWithinOneUlpOfLibm) {
  Worst w;
  // Every 61st bit pattern of the negative floats, -0 .. -inf (subnormals included).
  for (uint64_t b = 0x80000000u; b <= 0xff800000u; b += 61) {
    const float x = from_bits(static_cast<uint32_t>(b));
    w.add(ulp_error(exp_nonpositive(x), exp_ref(x)), x);
  }
  // Every float in [-1, 0] near 0 (p = 1 + r + ... with tiny r) and around the
  // range-reduction boundaries x = (k + 1/2) ln 2, where n changes.
  for (uint32_t b = 0x80000000u; b < 0x80000000u + 2000000u; ++b) {
    const float x = from_bits(b);
    w.add(ulp_error(exp_nonpositive(x), exp_ref(x)), x);
  }
  for (int k = 0; k <= 150; ++k) {
    const float c = static_cast<float>(-(k + 0.5) * std::log(2.0));
    float x = c;
    for (int i = 0; i < 200; ++i) x = std::nextafter(x, 0.0f);
    for (int i = 0; i < 400; ++i, x = std::nextafter(x, -INFINITY))
      w.add(ulp_error(exp_nonpositive(x), exp_ref(x)), x);
  }
  EXPECT_LE(w.ulps, kMaxUlps) << "at x = " << w.at;
}

TEST(MathPoly, ExpNonpositiveSpecialValues) {
  EXPECT_EQ(exp_nonpositive(0.0f), 1.0f);
  EXPECT_EQ(exp_nonpositive(-0.0f), 1.0f);
  EXPECT_EQ(exp_nonpositive(-INFINITY), 0.0f);
  EXPECT_EQ(exp_nonpositive(-1e30f), 0.0f);
  EXPECT_EQ(exp_nonpositive(-std::numeric_limits<float>::max()), 0.0f);
  // exp(-|x|) for positive x too.
  EXPECT_EQ(exp_nonpositive(2.5f), exp_nonpositive(-2.5f));
  EXPECT_EQ(exp_nonpositive(INFINITY), 0.0f);
  // Underflow: the smallest subnormal and the last nonzero result, then 0.
  const float tiny = std::numeric_limits<float>::denorm_min();
  EXPECT_EQ(exp_nonpositive(-103.2f), static_cast<float>(std::exp(-103.2)));
  EXPECT_GT(exp_nonpositive(-103.27f), 0.0f);
  EXPECT_EQ(exp_nonpositive(-103.98f), 0.0f);
  EXPECT_EQ(exp_nonpositive(std::nextafter(-103.98f, -INFINITY)), 0.0f);
  EXPECT_LE(exp_nonpositive(-103.0f), 8 * tiny);
  // Subnormal results, the normal/subnormal boundary (2^-126 at x = -87.34).
  for (float x : {-87.0f, -87.33f, -87.3365f, -87.34f, -88.0f, -95.0f, -100.0f, -103.0f}) {
    EXPECT_LE(ulp_error(exp_nonpositive(x), exp_ref(x)), kMaxUlps) << x;
  }
  for (uint32_t nan_bits : {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0xff800001u, 0x7fffffffu}) {
    EXPECT_TRUE(std::isnan(exp_nonpositive(from_bits(nan_bits)))) << std::hex << nan_bits;
  }
}

TEST(MathPoly, Log1pUnitWithinOneUlpOfLibm) {
  Worst w;
  // Every 13th bit pattern of [0, 1] (subnormals included).
  for (uint32_t b = 0; b <= 0x3f800000u; b += 13) {
    const float e = from_bits(b);
    w.add(ulp_error(log1p_unit(e), std::log1p(static_cast<double>(e))), e);
  }
  // Every float around the reduction boundary 1 + e = sqrt(2) and near 1.
  const float b0 = static_cast<float>(std::sqrt(2.0) - 1.0);
  float e = b0;
  for (int i = 0; i < 100000; ++i) e = std::nextafter(e, 0.0f);
  for (int i = 0; i < 200000; ++i, e = std::nextafter(e, 2.0f))
    w.add(ulp_error(log1p_unit(e), std::log1p(static_cast<double>(e))), e);
  for (e = 1.0f; e > 0.999f; e = std::nextafter(e, 0.0f))
    w.add(ulp_error(log1p_unit(e), std::log1p(static_cast<double>(e))), e);
  EXPECT_LE(w.ulps, kMaxUlps) << "at e = " << w.at;
}

TEST(MathPoly, Log1pUnitSpecialValues) {
  EXPECT_EQ(log1p_unit(0.0f), 0.0f);
  EXPECT_EQ(log1p_unit(1.0f), static_cast<float>(std::log(2.0)));
  // Tiny and subnormal e: log1p(e) = e exactly (1 + e rounds to 1; the
  // rounding error carries e).
  for (float e : {std::numeric_limits<float>::denorm_min(), 1e-40f, std::numeric_limits<float>::min(),
                  1e-30f, 1e-10f, 5e-8f}) {
    EXPECT_EQ(log1p_unit(e), e) << e;
  }
  for (uint32_t nan_bits : {0x7fc00000u, 0xffc00000u, 0x7f800001u}) {
    EXPECT_TRUE(std::isnan(log1p_unit(from_bits(nan_bits)))) << std::hex << nan_bits;
  }
}

TEST(MathPoly, ExpLog1pComposeAsSoftplus) {
  // log1p(exp(-|x|)), the softplus term of the focal loss, against libm.
  for (double x = 0.0; x <= 110.0; x += 0.013) {
    const float xf = static_cast<float>(x);
    const double ref = std::log1p(std::exp(-static_cast<double>(xf)));
    EXPECT_LE(std::fabs(log1p_unit(exp_nonpositive(xf)) - ref), 4e-7 * ref + 1e-45) << x;
  }
}

TEST(MathPoly, SelectsMatchTheComparisons) {
  const float lo = -87.336544750553102f;
  std::vector<float> vals = {0.0f, -0.0f, 1.0f, -1.0f, lo, std::nextafter(lo, 0.0f),
                             std::nextafter(lo, -INFINITY), -88.0f, -1e30f, INFINITY, -INFINITY,
                             std::numeric_limits<float>::denorm_min(), -std::numeric_limits<float>::denorm_min(),
                             std::numeric_limits<float>::max(), -std::numeric_limits<float>::max()};
  for (float v : vals) {
    const float want = v < lo ? lo : v;
    EXPECT_EQ(clamp_min_negative(v, lo), want) << v;
    EXPECT_EQ(std::signbit(clamp_min_negative(v, lo)), std::signbit(want)) << v;
    if (v != 0.0f) {
      EXPECT_EQ(select_sign(v, 1.0f, 2.0f), v < 0.0f ? 1.0f : 2.0f) << v;
    }
  }
  EXPECT_EQ(select_sign(-0.0f, 1.0f, 2.0f), 1.0f);  // the sign bit decides
  EXPECT_EQ(select_sign(0.0f, 1.0f, 2.0f), 2.0f);
  for (uint32_t nan_bits : {0x7fc00000u, 0xffc00000u, 0xff800001u}) {
    EXPECT_TRUE(std::isnan(clamp_min_negative(from_bits(nan_bits), lo))) << std::hex << nan_bits;
  }
  EXPECT_EQ(clamp_min_negative(-100.0, -87.0), -87.0);
  EXPECT_TRUE(std::isnan(clamp_min_negative(std::nan(""), -87.0)));
}

}  // namespace
