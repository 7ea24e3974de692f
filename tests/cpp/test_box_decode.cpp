// tbd_ops/box.h, box decoding: decode_box (delta_xywh as MMDetection's
// DeltaXYWHBBoxCoder.decode, distance as distance2bbox, none) and its
// vector-Jacobian product decode_box_backward.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <ostream>
#include <string>

#include "tbd_ops/box.h"
#include "test_util.h"

namespace {

using namespace tbd_ops;
using tbd_test::Close;
using tbd_test::Rng;

using Vec4 = std::array<double, 4>;

const double kWhRatioClip = 0.016;  // MMDetection's default wh_ratio_clip

// ---- independent reference (double) ---------------------------------------

struct RefParams {
  Coder coder = Coder::kDeltaXYWH;
  Vec4 means = {0, 0, 0, 0};
  Vec4 stds = {1, 1, 1, 1};
  double scale = 1;
  bool clip = false;
  double max_h = 0, max_w = 0;  // max_shape = (max_h, max_w)

  // A coder's parameters (scale: distance's), the others the defaults.
  static RefParams of(Coder c, double s = 1) {
    RefParams rp;
    rp.coder = c;
    rp.scale = s;
    return rp;
  }
  // The same parameters, boxes clipped to max_shape = (h, w).
  RefParams clipped(double h, double w) const {
    RefParams rp = *this;
    rp.clip = true;
    rp.max_h = h;
    rp.max_w = w;
    return rp;
  }
};

// MMDetection delta2bbox, written out for a single roi (add_ctr_clamp=False).
Vec4 ref_delta2bbox(const Vec4& roi, const Vec4& delta, const RefParams& rp) {
  Vec4 denorm;
  for (int k = 0; k < 4; ++k) denorm[k] = delta[k] * rp.stds[k] + rp.means[k];
  const double max_ratio = std::abs(std::log(kWhRatioClip));
  const double dx = denorm[0], dy = denorm[1];
  const double dw = std::min(std::max(denorm[2], -max_ratio), max_ratio);
  const double dh = std::min(std::max(denorm[3], -max_ratio), max_ratio);
  const double px = (roi[0] + roi[2]) * 0.5, py = (roi[1] + roi[3]) * 0.5;
  const double pw = roi[2] - roi[0], ph = roi[3] - roi[1];
  const double gx = px + pw * dx, gy = py + ph * dy;
  const double gw = pw * std::exp(dw), gh = ph * std::exp(dh);
  return {gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5};
}

// MMDetection distance2bbox, with the ltrb distances multiplied by scale.
Vec4 ref_distance2bbox(const Vec4& point, const Vec4& dist, double scale) {
  return {point[0] - dist[0] * scale, point[1] - dist[1] * scale, point[0] + dist[2] * scale,
          point[1] + dist[3] * scale};
}

Vec4 ref_decode(const Vec4& d, const Vec4& r, const RefParams& rp) {
  Vec4 b;
  switch (rp.coder) {
    case Coder::kDeltaXYWH: b = ref_delta2bbox(r, d, rp); break;
    case Coder::kDistance: b = ref_distance2bbox(r, d, rp.scale); break;
    default: b = d; break;
  }
  if (rp.clip) {  // x in [0, max_shape[1]], y in [0, max_shape[0]]
    b[0] = std::min(std::max(b[0], 0.0), rp.max_w);
    b[2] = std::min(std::max(b[2], 0.0), rp.max_w);
    b[1] = std::min(std::max(b[1], 0.0), rp.max_h);
    b[3] = std::min(std::max(b[3], 0.0), rp.max_h);
  }
  return b;
}

// The values as the tested type A sees them.
template <typename A> Vec4 rounded(Vec4 v) {
  for (auto& x : v) x = double(A(x));
  return v;
}
template <typename A> RefParams rounded(RefParams rp) {
  rp.means = rounded<A>(rp.means);
  rp.stds = rounded<A>(rp.stds);
  rp.scale = double(A(rp.scale));
  rp.max_h = double(A(rp.max_h));
  rp.max_w = double(A(rp.max_w));
  return rp;
}

template <typename A> CoderParams<A> to_params(const RefParams& rp) {
  CoderParams<A> cp;
  cp.coder = rp.coder;
  for (int k = 0; k < 4; ++k) {
    cp.mean[k] = A(rp.means[k]);
    cp.std[k] = A(rp.stds[k]);
  }
  cp.max_ratio = A(std::abs(std::log(kWhRatioClip)));
  cp.scale = A(rp.scale);
  cp.clip = rp.clip;
  cp.max_h = A(rp.max_h);
  cp.max_w = A(rp.max_w);
  return cp;
}

template <typename A> Vec4 run_decode(const Vec4& d, const Vec4& r, const RefParams& rp) {
  const A da[4] = {A(d[0]), A(d[1]), A(d[2]), A(d[3])};
  const A ra[4] = {A(r[0]), A(r[1]), A(r[2]), A(r[3])};
  const Box<A> b = decode_box(da, ra, to_params<A>(rp));
  return {b.x1, b.y1, b.x2, b.y2};
}

struct Grads {
  Vec4 pred, prior;
};

template <typename A> Grads run_backward(const Vec4& d, const Vec4& r, const RefParams& rp, const Vec4& g,
                                         bool want_prior = true) {
  const A da[4] = {A(d[0]), A(d[1]), A(d[2]), A(d[3])};
  const A ra[4] = {A(r[0]), A(r[1]), A(r[2]), A(r[3])};
  A dp[4] = {A(0), A(0), A(0), A(0)};
  A dr[4] = {A(0), A(0), A(0), A(0)};  // callers zero the prior gradient
  const CoderParams<A> cp = to_params<A>(rp);
  decode_box_backward(da, ra, cp, decode_box_full(da, ra, cp), Box<A>{A(g[0]), A(g[1]), A(g[2]), A(g[3])},
                      dp, want_prior ? dr : nullptr);
  return {{dp[0], dp[1], dp[2], dp[3]}, {dr[0], dr[1], dr[2], dr[3]}};
}

// Central finite differences of L = <g, ref_decode(d, r)> in double.
Grads finite_diff(const Vec4& d, const Vec4& r, const RefParams& rp, const Vec4& g, double h) {
  auto loss = [&](const Vec4& dd, const Vec4& rr) {
    const Vec4 b = ref_decode(dd, rr, rp);
    return g[0] * b[0] + g[1] * b[1] + g[2] * b[2] + g[3] * b[3];
  };
  Grads out;
  for (int k = 0; k < 4; ++k) {
    Vec4 dp = d, dm = d;
    dp[k] += h;
    dm[k] -= h;
    out.pred[k] = (loss(dp, r) - loss(dm, r)) / (2 * h);
    Vec4 rp_ = r, rm = r;
    rp_[k] += h;
    rm[k] -= h;
    out.prior[k] = (loss(d, rp_) - loss(d, rm)) / (2 * h);
  }
  return out;
}

template <typename T> class DecodeTyped : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(DecodeTyped, FloatTypes);

// Coordinates are compared with an absolute tolerance relative to the size
// of the box's coordinates (Tol<A>::atol per unit of magnitude, times factor).
template <typename A> void expect_box(const Vec4& got, const Vec4& want, const std::string& what,
                                      double factor = 1.0) {
  double scale = 1.0;
  for (int k = 0; k < 4; ++k) scale = std::max(scale, 1.0 + std::fabs(want[k]));
  const double tol = factor * tbd_test::Tol<A>::atol * scale;
  for (int k = 0; k < 4; ++k) EXPECT_TRUE(Close(got[k], want[k], 0.0, tol)) << what << " coordinate " << k;
}

// The decoded box against the reference on the inputs as the tested type A sees them.
template <typename A> void expect_decodes_like_reference(const Vec4& d, const Vec4& r, const RefParams& rp, int trial) {
  expect_box<A>(run_decode<A>(d, r, rp), ref_decode(rounded<A>(d), rounded<A>(r), rounded<A>(rp)),
                "trial " + std::to_string(trial));
}

// A random max_shape = (h, w) in [50, hi)^2; clip: whether the boxes are clipped to it.
void random_max_shape(Rng& rng, RefParams* rp, bool clip, double hi) {
  rp->clip = clip;
  rp->max_h = rng.uniform(50, hi);
  rp->max_w = rng.uniform(50, hi);
}

// ---- delta_xywh forward ----------------------------------------------------

TYPED_TEST(DecodeTyped, DeltaZeroIsIdentity) {
  RefParams rp;
  const Vec4 anchor = {10, 20, 30, 60};
  expect_box<TypeParam>(run_decode<TypeParam>({0, 0, 0, 0}, anchor, rp), anchor, "zero delta");
}

TYPED_TEST(DecodeTyped, DeltaHandComputed) {
  // anchor centre (20, 40), size (20, 40); stds (0.1, 0.1, 0.2, 0.2):
  // dx = 0.1 -> cx 22, dy = -0.05 -> cy 38, dw = ln 2 -> w 40, dh = 0 -> h 40.
  RefParams rp;
  rp.stds = {0.1, 0.1, 0.2, 0.2};
  const Vec4 anchor = {10, 20, 30, 60};
  const Vec4 pred = {1.0, -0.5, std::log(2.0) / 0.2, 0.0};
  expect_box<TypeParam>(run_decode<TypeParam>(pred, anchor, rp), {2, 18, 42, 58}, "hand computed");
}

TYPED_TEST(DecodeTyped, DeltaMeansAndStds) {
  // denorm = pred * std + mean: pred 0 with means (0.5, -0.25, ln 3, -ln 2)
  // on anchor (0, 0, 8, 4): centre (4 + 4, 2 - 1) = (8, 1), size (24, 2).
  RefParams rp;
  rp.means = {0.5, -0.25, std::log(3.0), -std::log(2.0)};
  rp.stds = {0.1, 0.1, 0.2, 0.2};
  expect_box<TypeParam>(run_decode<TypeParam>({0, 0, 0, 0}, {0, 0, 8, 4}, rp), {-4, 0, 20, 2}, "means");
  // Same box through the stds: pred * std reproduces the means.
  RefParams rs;
  rs.stds = {0.1, 0.1, 0.2, 0.2};
  const Vec4 pred = {5.0, -2.5, std::log(3.0) / 0.2, -std::log(2.0) / 0.2};
  expect_box<TypeParam>(run_decode<TypeParam>(pred, {0, 0, 8, 4}, rs), {-4, 0, 20, 2}, "stds");
}

TYPED_TEST(DecodeTyped, DeltaWhRatioClamp) {
  // |dw| is clamped to |log(0.016)|: the size scales by at most 1/0.016 = 62.5
  // and at least 0.016.
  RefParams rp;
  const Vec4 anchor = {0, 0, 16, 16};  // centre (8, 8)
  expect_box<TypeParam>(run_decode<TypeParam>({0, 0, 10, 10}, anchor, rp), {8 - 500, 8 - 500, 8 + 500, 8 + 500},
                        "upper clamp");
  expect_box<TypeParam>(run_decode<TypeParam>({0, 0, -10, -10}, anchor, rp), {8 - 0.128, 8 - 0.128, 8 + 0.128, 8 + 0.128},
                        "lower clamp");
  // Just inside the limit nothing is clamped: dw = 4 -> w = 16 e^4.
  const double half = 8 * std::exp(4.0);
  expect_box<TypeParam>(run_decode<TypeParam>({0, 0, 4, 0}, anchor, rp), {8 - half, 0, 8 + half, 16}, "inside");
  // The clamp applies after denormalisation: pred 10 * std 0.5 + mean -1 = 4.
  RefParams rs;
  rs.stds = {1, 1, 0.5, 1};
  rs.means = {0, 0, -1, 0};
  expect_box<TypeParam>(run_decode<TypeParam>({0, 0, 10, 0}, anchor, rs), {8 - half, 0, 8 + half, 16},
                        "denorm then clamp");
}

TYPED_TEST(DecodeTyped, DeltaClipToMaxShape) {
  // max_shape = (h 30, w 50): x is clipped to [0, 50] and y to [0, 30].
  const RefParams rp = RefParams().clipped(30, 50);
  // Anchor (10, 5, 40, 25) doubled about its centre (25, 15): (-5, -5, 55, 35).
  const Vec4 pred = {0, 0, std::log(2.0), std::log(2.0)};
  expect_box<TypeParam>(run_decode<TypeParam>(pred, {10, 5, 40, 25}, rp), {0, 0, 50, 30}, "clip both");
  // Fully inside: unchanged.
  expect_box<TypeParam>(run_decode<TypeParam>({0, 0, 0, 0}, {10, 5, 40, 25}, rp), {10, 5, 40, 25}, "inside");
  // A box entirely beyond the right edge collapses onto x = max_w.
  expect_box<TypeParam>(run_decode<TypeParam>({0, 0, 0, 0}, {60, 40, 70, 45}, rp), {50, 30, 50, 30}, "outside");
}

TYPED_TEST(DecodeTyped, DeltaRandomAgainstReference) {
  using A = TypeParam;
  Rng rng(31337);
  for (int trial = 0; trial < 500; ++trial) {
    RefParams rp;
    for (int k = 0; k < 4; ++k) {
      rp.means[k] = trial % 2 ? rng.uniform(-0.2, 0.2) : 0.0;
      rp.stds[k] = rng.uniform(0.05, 1.0);
    }
    random_max_shape(rng, &rp, trial % 3 == 0, 200);
    const double x1 = rng.uniform(-20, 150), y1 = rng.uniform(-20, 150);
    const Vec4 anchor = {x1, y1, x1 + rng.uniform(1, 60), y1 + rng.uniform(1, 60)};
    const Vec4 pred = {rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(-8, 8), rng.uniform(-8, 8)};
    expect_decodes_like_reference<A>(pred, anchor, rp, trial);
  }
}

// ---- distance and none forward ---------------------------------------------

TYPED_TEST(DecodeTyped, DistanceHandComputed) {
  RefParams rp;
  rp.coder = Coder::kDistance;
  const Vec4 point = {10, 20, 0, 0};
  expect_box<TypeParam>(run_decode<TypeParam>({1, 2, 3, 4}, point, rp), {9, 18, 13, 24}, "scale 1");
  rp.scale = 4;
  expect_box<TypeParam>(run_decode<TypeParam>({1, 2, 3, 4}, point, rp), {6, 12, 22, 36}, "scale 4");
  rp.scale = 0.5;
  expect_box<TypeParam>(run_decode<TypeParam>({1, 2, 3, 4}, point, rp), {9.5, 19, 11.5, 22}, "scale 0.5");
}

TYPED_TEST(DecodeTyped, DistanceIgnoresPriorColumnsTwoAndThree) {
  const RefParams rp = RefParams::of(Coder::kDistance, 2);
  const Vec4 a = run_decode<TypeParam>({1, 2, 3, 4}, {10, 20, 0, 0}, rp);
  const Vec4 b = run_decode<TypeParam>({1, 2, 3, 4}, {10, 20, 123, -456}, rp);
  for (int k = 0; k < 4; ++k) EXPECT_EQ(a[k], b[k]) << k;
}

TYPED_TEST(DecodeTyped, DistanceClip) {
  const RefParams rp = RefParams::of(Coder::kDistance, 8).clipped(30, 50);
  // Unclipped: (10 - 16, 20 - 8, 10 + 48, 20 + 24) = (-6, 12, 58, 44).
  expect_box<TypeParam>(run_decode<TypeParam>({2, 1, 6, 3}, {10, 20, 0, 0}, rp), {0, 12, 50, 30}, "clip");
}

TYPED_TEST(DecodeTyped, DistanceRandomAgainstReference) {
  using A = TypeParam;
  Rng rng(4242);
  for (int trial = 0; trial < 300; ++trial) {
    RefParams rp = RefParams::of(Coder::kDistance, rng.uniform(0.5, 32));
    random_max_shape(rng, &rp, trial % 2 == 0, 300);
    const Vec4 pt = {rng.uniform(-10, 300), rng.uniform(-10, 300), 0, 0};
    Vec4 d;
    for (auto& v : d) v = rng.uniform(-1, 6);
    expect_decodes_like_reference<A>(d, pt, rp, trial);
  }
}

TYPED_TEST(DecodeTyped, NonePassesPredictionThrough) {
  const RefParams rp = RefParams::of(Coder::kNone);
  const Vec4 pred = {-3.5, 2, 40, 70};
  expect_box<TypeParam>(run_decode<TypeParam>(pred, {1e6, -1e6, 7, 7}, rp), pred, "none");
  expect_box<TypeParam>(run_decode<TypeParam>(pred, {0, 0, 0, 0}, rp.clipped(30, 50)), {0, 2, 40, 30}, "none clipped");
}

TYPED_TEST(DecodeTyped, ClipKeepsNanButClampsInfinity) {
  using A = TypeParam;
  const RefParams rp = RefParams::of(Coder::kNone).clipped(30, 50);
  const Vec4 got = run_decode<A>({tbd_test::kNaN, -tbd_test::kInf, tbd_test::kInf, 5}, {0, 0, 0, 0}, rp);
  EXPECT_TRUE(std::isnan(got[0]));
  EXPECT_EQ(got[1], 0.0);
  EXPECT_EQ(got[2], 50.0);
  EXPECT_EQ(got[3], 5.0);
}

// ---- decode_box_backward ---------------------------------------------------

struct Sample {
  Vec4 d, r, g;
  RefParams rp;
};

// Draws a sample whose unclipped box and denormalised dw/dh are at least
// `margin` away from every clamp boundary (finite differences are valid there).
Sample draw_sample(Rng& rng, Coder coder, bool clip, double margin, int* n_clamped_wh, int* n_clipped) {
  const double max_ratio = std::abs(std::log(kWhRatioClip));
  for (;;) {
    Sample s;
    s.rp.coder = coder;
    s.rp.clip = clip;
    s.rp.max_h = rng.uniform(40, 120);
    s.rp.max_w = rng.uniform(40, 120);
    for (auto& v : s.g) v = rng.uniform(-1, 1);
    if (coder == Coder::kDeltaXYWH) {
      for (int k = 0; k < 4; ++k) {
        s.rp.means[k] = rng.uniform(-0.1, 0.1);
        s.rp.stds[k] = rng.uniform(0.1, 0.5);
      }
      const double x1 = rng.uniform(-10, 100), y1 = rng.uniform(-10, 100);
      s.r = {x1, y1, x1 + rng.uniform(2, 40), y1 + rng.uniform(2, 40)};
      s.d = {rng.uniform(-2, 2), rng.uniform(-2, 2), rng.uniform(-14, 14), rng.uniform(-14, 14)};
    } else if (coder == Coder::kDistance) {
      s.rp.scale = rng.uniform(0.5, 16);
      s.r = {rng.uniform(-5, 110), rng.uniform(-5, 110), 0, 0};
      s.d = {rng.uniform(0, 5), rng.uniform(0, 5), rng.uniform(0, 5), rng.uniform(0, 5)};
    } else {
      s.r = {0, 0, 0, 0};
      s.d = {rng.uniform(-20, 100), rng.uniform(-20, 100), rng.uniform(0, 140), rng.uniform(0, 140)};
    }
    bool ok = true;
    int clamped = 0, clipped = 0;
    if (coder == Coder::kDeltaXYWH) {
      for (int k = 2; k < 4; ++k) {
        const double raw = s.d[k] * s.rp.stds[k] + s.rp.means[k];
        if (std::fabs(std::fabs(raw) - max_ratio) < margin) ok = false;
        if (std::fabs(raw) > max_ratio) ++clamped;
      }
    }
    RefParams unclipped = s.rp;
    unclipped.clip = false;
    const Vec4 u = ref_decode(s.d, s.r, unclipped);
    if (clip) {
      for (int k = 0; k < 4; ++k) {
        const double hi = k % 2 == 0 ? s.rp.max_w : s.rp.max_h;
        if (std::fabs(u[k]) < margin || std::fabs(u[k] - hi) < margin) ok = false;
        if (u[k] < 0 || u[k] > hi) ++clipped;
      }
    }
    if (!ok) continue;
    *n_clamped_wh += clamped;
    *n_clipped += clipped;
    return s;
  }
}

const char* coder_name(Coder c) {
  return c == Coder::kDeltaXYWH ? "delta_xywh" : (c == Coder::kDistance ? "distance" : "none");
}

struct BackwardCase {
  Coder coder;
  bool clip;
};
void PrintTo(const BackwardCase& c, std::ostream* os) {
  *os << coder_name(c.coder) << (c.clip ? " clip" : " no clip");
}

class DecodeBackwardFD : public ::testing::TestWithParam<BackwardCase> {};

// The analytic gradients against the finite differences, to tol (relative and absolute).
void expect_grads_close(const Grads& an, const Grads& fd, double tol, Coder coder, int trial) {
  for (int k = 0; k < 4; ++k) {
    EXPECT_TRUE(Close(an.pred[k], fd.pred[k], tol, tol)) << coder_name(coder) << " trial " << trial << " d_pred["
                                                         << k << "]";
    EXPECT_TRUE(Close(an.prior[k], fd.prior[k], tol, tol)) << coder_name(coder) << " trial " << trial << " d_prior["
                                                           << k << "]";
  }
}

TEST_P(DecodeBackwardFD, DoubleMatchesFiniteDifferences) {
  const BackwardCase bc = GetParam();
  Rng rng(1000 + 10 * static_cast<int>(bc.coder) + (bc.clip ? 1 : 0));
  int n_clamped = 0, n_clipped = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const Sample s = draw_sample(rng, bc.coder, bc.clip, 1e-2, &n_clamped, &n_clipped);
    const Grads an = run_backward<double>(s.d, s.r, s.rp, s.g);
    expect_grads_close(an, finite_diff(s.d, s.r, s.rp, s.g, 1e-5), 1e-6, bc.coder, trial);
    // Without a prior buffer the prediction gradient is unchanged.
    const Grads np = run_backward<double>(s.d, s.r, s.rp, s.g, /*want_prior=*/false);
    for (int k = 0; k < 4; ++k) EXPECT_EQ(np.pred[k], an.pred[k]);
  }
  // The random draws must have exercised the clamps being tested.
  if (bc.coder == Coder::kDeltaXYWH) {
    EXPECT_GT(n_clamped, 20);
  }
  if (bc.clip) {
    EXPECT_GT(n_clipped, 20);
  }
}

TEST_P(DecodeBackwardFD, FloatMatchesFiniteDifferences) {
  const BackwardCase bc = GetParam();
  Rng rng(2000 + 10 * static_cast<int>(bc.coder) + (bc.clip ? 1 : 0));
  int n_clamped = 0, n_clipped = 0;
  for (int trial = 0; trial < 200; ++trial) {
    Sample s = draw_sample(rng, bc.coder, bc.clip, 5e-2, &n_clamped, &n_clipped);
    // Finite differences (double) at the inputs as float sees them.
    s.d = rounded<float>(s.d);
    s.r = rounded<float>(s.r);
    s.g = rounded<float>(s.g);
    s.rp = rounded<float>(s.rp);
    const Grads an = run_backward<float>(s.d, s.r, s.rp, s.g);
    expect_grads_close(an, finite_diff(s.d, s.r, s.rp, s.g, 1e-5), 1e-4, bc.coder, trial);
  }
}

INSTANTIATE_TEST_SUITE_P(AllCoders, DecodeBackwardFD,
                         ::testing::Values(BackwardCase{Coder::kDeltaXYWH, false}, BackwardCase{Coder::kDeltaXYWH, true},
                                           BackwardCase{Coder::kDistance, false}, BackwardCase{Coder::kDistance, true},
                                           BackwardCase{Coder::kNone, false}, BackwardCase{Coder::kNone, true}),
                         [](const ::testing::TestParamInfo<BackwardCase>& param_info) {
                           std::string n = param_info.param.coder == Coder::kDeltaXYWH
                                               ? "DeltaXYWH"
                                               : (param_info.param.coder == Coder::kDistance ? "Distance" : "None");
                           return n + (param_info.param.clip ? "Clip" : "NoClip");
                         });

TEST(DecodeBackward, DeltaHandComputed) {
  // anchor (10, 20, 30, 60): pw 20, ph 40; stds (0.1, 0.1, 0.2, 0.2);
  // pred (1, -0.5, ln2 / 0.2, 0): dx 0.1, dy -0.05, e^dw 2, e^dh 1.
  // x1 = gx - gw/2, x2 = gx + gw/2 with gx = px + pw dx, gw = pw e^dw.
  RefParams rp;
  rp.stds = {0.1, 0.1, 0.2, 0.2};
  const Vec4 anchor = {10, 20, 30, 60};
  const Vec4 pred = {1.0, -0.5, std::log(2.0) / 0.2, 0.0};
  // g = dL/dx1 only: dL/dgx = 1, dL/dgw = -1/2.
  const Grads gx1 = run_backward<double>(pred, anchor, rp, {1, 0, 0, 0});
  EXPECT_NEAR(gx1.pred[0], 20 * 0.1, 1e-12);              // pw * std0
  EXPECT_NEAR(gx1.pred[1], 0, 1e-12);
  EXPECT_NEAR(gx1.pred[2], -0.5 * 20 * 2 * 0.2, 1e-12);   // dL/dgw * pw e^dw std2
  EXPECT_NEAR(gx1.pred[3], 0, 1e-12);
  // dL/dpx = 1, dL/dpw = dx + (-1/2) e^dw = 0.1 - 1 = -0.9.
  EXPECT_NEAR(gx1.prior[0], 0.5 - (-0.9), 1e-12);
  EXPECT_NEAR(gx1.prior[2], 0.5 + (-0.9), 1e-12);
  EXPECT_NEAR(gx1.prior[1], 0, 1e-12);
  EXPECT_NEAR(gx1.prior[3], 0, 1e-12);
  // g = dL/dy2 only: dL/dgy = 1, dL/dgh = 1/2, dL/dph = dy + 1/2 = 0.45.
  const Grads gy2 = run_backward<double>(pred, anchor, rp, {0, 0, 0, 1});
  EXPECT_NEAR(gy2.pred[1], 40 * 0.1, 1e-12);
  EXPECT_NEAR(gy2.pred[3], 0.5 * 40 * 1 * 0.2, 1e-12);
  EXPECT_NEAR(gy2.prior[1], 0.5 - 0.45, 1e-12);
  EXPECT_NEAR(gy2.prior[3], 0.5 + 0.45, 1e-12);
}

TEST(DecodeBackward, DeltaWhClampBlocksPredictionGradient) {
  // dw beyond |log 0.016|: no gradient to pred[2], but the (clamped) width
  // factor still reaches the prior.
  RefParams rp;
  const Vec4 anchor = {0, 0, 16, 16};
  const Grads gr = run_backward<double>({0, 0, 10, -10}, anchor, rp, {0, 0, 1, 1});
  EXPECT_EQ(gr.pred[2], 0.0);
  EXPECT_EQ(gr.pred[3], 0.0);
  // dL/dpw = dx (0) + dL/dgw (1/2) * 62.5; dL/dph = 0 + 1/2 * 0.016.
  EXPECT_NEAR(gr.prior[0], 0.5 - 31.25, 1e-9);
  EXPECT_NEAR(gr.prior[2], 0.5 + 31.25, 1e-9);
  EXPECT_NEAR(gr.prior[1], 0.5 - 0.008, 1e-12);
  EXPECT_NEAR(gr.prior[3], 0.5 + 0.008, 1e-12);
}

TEST(DecodeBackward, DistanceClosedForm) {
  const RefParams rp = RefParams::of(Coder::kDistance, 3);
  const Vec4 g = {0.25, -1.5, 2.0, 0.75};
  const Grads gr = run_backward<double>({1, 2, 3, 4}, {10, 20, 0, 0}, rp, g);
  EXPECT_EQ(gr.pred[0], -0.25 * 3);
  EXPECT_EQ(gr.pred[1], 1.5 * 3);
  EXPECT_EQ(gr.pred[2], 2.0 * 3);
  EXPECT_EQ(gr.pred[3], 0.75 * 3);
  EXPECT_EQ(gr.prior[0], 0.25 + 2.0);
  EXPECT_EQ(gr.prior[1], -1.5 + 0.75);
  EXPECT_EQ(gr.prior[2], 0.0);  // a point prior has 2 columns
  EXPECT_EQ(gr.prior[3], 0.0);
}

TEST(DecodeBackward, NoneIsIdentityWithNoPriorGradient) {
  RefParams rp;
  rp.coder = Coder::kNone;
  const Vec4 g = {0.25, -1.5, 2.0, 0.75};
  const Grads gr = run_backward<double>({1, 2, 3, 4}, {10, 20, 30, 40}, rp, g);
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(gr.pred[k], g[k]);
    EXPECT_EQ(gr.prior[k], 0.0);
  }
}

TEST(DecodeBackward, ClipMasksClippedCoordinates) {
  const RefParams rp = RefParams::of(Coder::kNone).clipped(30, 50);
  // x1 < 0 and y2 > max_h are clipped; y1, x2 are inside.
  const Grads gr = run_backward<double>({-5, 10, 40, 31}, {0, 0, 0, 0}, rp, {1, 2, 3, 4});
  EXPECT_EQ(gr.pred[0], 0.0);
  EXPECT_EQ(gr.pred[1], 2.0);
  EXPECT_EQ(gr.pred[2], 3.0);
  EXPECT_EQ(gr.pred[3], 0.0);
  // x2 beyond max_w (not max_h): the bound for x is max_w.
  const Grads gx = run_backward<double>({1, 1, 45, 25}, {0, 0, 0, 0}, rp, {1, 1, 1, 1});
  for (int k = 0; k < 4; ++k) EXPECT_EQ(gx.pred[k], 1.0) << k;
}

TEST(DecodeBackward, ClipBoundaryIsClosedInterval) {
  // Exactly on the clip boundary the gradient passes, as autograd's clamp.
  const RefParams rp = RefParams::of(Coder::kNone).clipped(30, 50);
  const Grads gr = run_backward<double>({0, 0, 50, 30}, {0, 0, 0, 0}, rp, {1, 2, 3, 4});
  EXPECT_EQ(gr.pred[0], 1.0);
  EXPECT_EQ(gr.pred[1], 2.0);
  EXPECT_EQ(gr.pred[2], 3.0);
  EXPECT_EQ(gr.pred[3], 4.0);
}

TEST(DecodeBackward, DeltaClipMasksBeforeChainRule) {
  // Delta box (-5, -5, 55, 35) clipped to (0, 0, 50, 30): every coordinate is
  // clipped, so nothing flows back to the prediction or the anchor.
  const RefParams rp = RefParams().clipped(30, 50);
  const Grads gr = run_backward<double>({0, 0, std::log(2.0), std::log(2.0)}, {10, 5, 40, 25}, rp, {1, -2, 3, -4});
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(gr.pred[k], 0.0) << k;
    EXPECT_EQ(gr.prior[k], 0.0) << k;
  }
}

}  // namespace
