// tbd_ops/box.h, overlaps: box_area, box_iou and box_iou_backward.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "tbd_ops/box.h"
#include "test_util.h"

namespace {

using namespace tbd_ops;
using tbd_test::Close;
using tbd_test::Rng;

using Vec4 = std::array<double, 4>;  // x1, y1, x2, y2

// ---- independent reference (double) ---------------------------------------

double overlap_1d(double a1, double a2, double b1, double b2) {
  const double lo = a1 > b1 ? a1 : b1;
  const double hi = a2 < b2 ? a2 : b2;
  return hi > lo ? hi - lo : 0.0;
}
double ref_area(const Vec4& a) {
  const double w = a[2] > a[0] ? a[2] - a[0] : 0.0;
  const double h = a[3] > a[1] ? a[3] - a[1] : 0.0;
  return w * h;
}
double ref_iou(const Vec4& a, const Vec4& b, double eps) {
  const double inter = overlap_1d(a[0], a[2], b[0], b[2]) * overlap_1d(a[1], a[3], b[1], b[3]);
  const double uni = ref_area(a) + ref_area(b) - inter;
  return inter / (uni > eps ? uni : eps);
}

template <typename A> Box<A> to_box(const Vec4& v) { return {A(v[0]), A(v[1]), A(v[2]), A(v[3])}; }
Vec4 to_vec(const Box<double>& b) { return {b.x1, b.y1, b.x2, b.y2}; }
Vec4 to_vec(const Box<float>& b) { return {b.x1, b.y1, b.x2, b.y2}; }

template <typename A> double iou(const Vec4& a, const Vec4& b, double eps = 1e-6) {
  return box_iou(to_box<A>(a), to_box<A>(b), A(eps));
}

template <typename A> void iou_grad(const Vec4& a, const Vec4& b, double eps, double g, Vec4& ga, Vec4& gb) {
  Box<A> oa, ob;
  box_iou_backward(to_box<A>(a), to_box<A>(b), A(eps), A(g), oa, ob);
  ga = to_vec(oa);
  gb = to_vec(ob);
}

// Central differences of g * ref_iou with respect to every coordinate of a and b.
void iou_fd(const Vec4& a, const Vec4& b, double eps, double g, double h, Vec4& ga, Vec4& gb) {
  for (int k = 0; k < 4; ++k) {
    Vec4 ap = a, am = a, bp = b, bm = b;
    ap[k] += h;
    am[k] -= h;
    bp[k] += h;
    bm[k] -= h;
    ga[k] = g * (ref_iou(ap, b, eps) - ref_iou(am, b, eps)) / (2 * h);
    gb[k] = g * (ref_iou(a, bp, eps) - ref_iou(a, bm, eps)) / (2 * h);
  }
}

template <typename T> class IouTyped : public ::testing::Test {};
using FloatTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(IouTyped, FloatTypes);

// ---- box_area --------------------------------------------------------------

TYPED_TEST(IouTyped, LoadBoxReadsStridedRows) {
  using T = TypeParam;
  // Three boxes stored column-major ([4, 3] transposed: row stride 1, coordinate stride 3).
  const float cols[12] = {0, 10, 20, 1, 11, 21, 2, 12, 22, 3, 13, 23};
  const Box<T> b = load_box<T>(cols, 1, 1, 3, CastTo<T>());
  EXPECT_EQ(b.x1, T(10));
  EXPECT_EQ(b.y1, T(11));
  EXPECT_EQ(b.x2, T(12));
  EXPECT_EQ(b.y2, T(13));
  const double rows[8] = {1, 2, 3, 4, 5, 6, 7, 8};  // contiguous [2, 4]
  const Box<T> c = load_box<T>(rows, 1, CastTo<T>());
  EXPECT_EQ(c.x1, T(5));
  EXPECT_EQ(c.y2, T(8));
}

TYPED_TEST(IouTyped, AreaOrdinaryAndDegenerate) {
  using A = TypeParam;
  EXPECT_EQ(box_area(to_box<A>({1, 2, 4, 6})), A(12));
  EXPECT_EQ(box_area(to_box<A>({1, 2, 1, 6})), A(0));   // zero width
  EXPECT_EQ(box_area(to_box<A>({1, 2, 4, 2})), A(0));   // zero height
  EXPECT_EQ(box_area(to_box<A>({3, 3, 1, 1})), A(0));   // inverted in x and y: not (+2)*(+2)
  EXPECT_EQ(box_area(to_box<A>({3, 0, 1, 2})), A(0));   // inverted in x only: not -4
  EXPECT_EQ(box_area(to_box<A>({0, 3, 2, 1})), A(0));   // inverted in y only
}

// ---- box_iou forward -------------------------------------------------------

TYPED_TEST(IouTyped, IdenticalIsOne) {
  using A = TypeParam;
  EXPECT_TRUE(tbd_test::CloseT<A>(iou<A>({0, 0, 2, 2}, {0, 0, 2, 2}), 1.0));
  EXPECT_TRUE(tbd_test::CloseT<A>(iou<A>({-3.5, 10, 17.25, 40}, {-3.5, 10, 17.25, 40}), 1.0));
}

TYPED_TEST(IouTyped, DisjointIsZero) {
  using A = TypeParam;
  EXPECT_EQ(iou<A>({0, 0, 1, 1}, {2, 2, 3, 3}), A(0));
  EXPECT_EQ(iou<A>({0, 0, 1, 1}, {2, 0, 3, 1}), A(0));  // apart in x only
  EXPECT_EQ(iou<A>({0, 0, 1, 1}, {0, 5, 1, 6}), A(0));  // apart in y only
}

TYPED_TEST(IouTyped, TouchingEdgesIsZero) {
  using A = TypeParam;
  EXPECT_EQ(iou<A>({0, 0, 1, 1}, {1, 0, 2, 1}), A(0));  // shared vertical edge
  EXPECT_EQ(iou<A>({0, 0, 1, 1}, {0, 1, 1, 2}), A(0));  // shared horizontal edge
  EXPECT_EQ(iou<A>({0, 0, 1, 1}, {1, 1, 2, 2}), A(0));  // shared corner
}

TYPED_TEST(IouTyped, ContainedAndPartial) {
  using A = TypeParam;
  // b inside a: inter 4 * 5 = 20, union 100.
  EXPECT_TRUE(tbd_test::CloseT<A>(iou<A>({0, 0, 10, 10}, {2, 3, 6, 8}), 0.2));
  EXPECT_TRUE(tbd_test::CloseT<A>(iou<A>({2, 3, 6, 8}, {0, 0, 10, 10}), 0.2));
  // Offset unit squares of side 2: inter 1, union 7.
  EXPECT_TRUE(tbd_test::CloseT<A>(iou<A>({0, 0, 2, 2}, {1, 1, 3, 3}), 1.0 / 7.0));
  // Shared left edge (a tie in max(x1)): inter 2 * 1, union 4 + 6 - 2.
  EXPECT_TRUE(tbd_test::CloseT<A>(iou<A>({0, 0, 2, 2}, {0, 1, 3, 3}), 0.25));
}

TYPED_TEST(IouTyped, ZeroAreaBoxes) {
  using A = TypeParam;
  EXPECT_EQ(iou<A>({1, 1, 1, 3}, {0, 0, 4, 4}), A(0));  // zero width inside b
  EXPECT_EQ(iou<A>({0, 2, 4, 2}, {0, 0, 4, 4}), A(0));  // zero height inside b
  EXPECT_EQ(iou<A>({2, 2, 2, 2}, {0, 0, 4, 4}), A(0));  // a point
}

TYPED_TEST(IouTyped, InvertedBoxesAreEmpty) {
  using A = TypeParam;
  for (const Vec4& inv : {Vec4{3, 3, 1, 1}, Vec4{3, 0, 1, 2}, Vec4{0, 3, 2, 1}}) {
    for (const Vec4& other : {Vec4{0, 0, 4, 4}, Vec4{1, 1, 3, 3}, inv, Vec4{1.5, 1.5, 2.5, 2.5}}) {
      const A v = A(iou<A>(inv, other));
      const A w = A(iou<A>(other, inv));
      EXPECT_EQ(v, A(0)) << inv[0] << "," << inv[1] << "," << inv[2] << "," << inv[3];
      EXPECT_EQ(w, A(0));
    }
  }
}

TYPED_TEST(IouTyped, EpsAvoidsNanForTwoZeroAreaBoxes) {
  using A = TypeParam;
  const A same = A(iou<A>({1, 1, 1, 1}, {1, 1, 1, 1}, 1e-6));
  EXPECT_FALSE(std::isnan(same));
  EXPECT_EQ(same, A(0));
  EXPECT_EQ(A(iou<A>({1, 1, 1, 3}, {2, 0, 2, 5}, 1e-6)), A(0));
  EXPECT_EQ(A(iou<A>({3, 3, 1, 1}, {3, 3, 1, 1}, 1e-6)), A(0));
}

TEST(Iou, EpsBoundsTheDenominator) {
  // Identical boxes of area 1e-8: the union is replaced by eps when smaller.
  const Vec4 tiny = {0, 0, 1e-4, 1e-4};
  EXPECT_TRUE(Close(iou<double>(tiny, tiny, 1e-6), 1e-8 / 1e-6, 1e-9, 0));
  EXPECT_TRUE(Close(iou<double>(tiny, tiny, 1e-12), 1.0, 1e-9, 0));
  // Union exactly eps: either branch gives inter / eps.
  EXPECT_TRUE(Close(iou<double>({0, 0, 1, 1}, {0, 0, 1, 1}, 1.0), 1.0, 1e-15, 0));
  EXPECT_TRUE(Close(iou<double>({0, 0, 1, 1}, {0, 0, 1, 1}, 4.0), 0.25, 1e-15, 0));
}

TYPED_TEST(IouTyped, NanCoordinatePropagates) {
  using A = TypeParam;
  EXPECT_TRUE(std::isnan(iou<A>({tbd_test::kNaN, 0, 2, 2}, {0, 0, 2, 2})));
  EXPECT_TRUE(std::isnan(iou<A>({0, 0, 2, 2}, {0, 0, tbd_test::kNaN, 2})));
}

TYPED_TEST(IouTyped, RandomAgainstReference) {
  using A = TypeParam;
  Rng rng(555);
  for (int trial = 0; trial < 2000; ++trial) {
    Vec4 a, b;
    for (Vec4* v : {&a, &b}) {
      const double x = rng.uniform(0, 20), y = rng.uniform(0, 20);
      // Mostly proper boxes, some degenerate or inverted ones.
      *v = {x, y, x + rng.uniform(-2, 12), y + rng.uniform(-2, 12)};
      for (auto& c : *v) c = double(A(c));
    }
    const double want = ref_iou(a, b, 1e-6);
    const double got = iou<A>(a, b);
    EXPECT_TRUE(tbd_test::CloseT<A>(got, want, 10)) << "trial " << trial;
    EXPECT_GE(got, 0.0);
    EXPECT_LE(got, 1.0 + 1e-6);
    EXPECT_EQ(got, iou<A>(b, a)) << "symmetry, trial " << trial;
  }
}

// ---- box_iou_backward ------------------------------------------------------

// Random overlapping pair with every compared coordinate pair and the overlap
// extents at least `margin` from a kink.
void draw_overlapping(Rng& rng, double margin, Vec4& a, Vec4& b) {
  for (;;) {
    const double ax = rng.uniform(0, 10), ay = rng.uniform(0, 10);
    a = {ax, ay, ax + rng.uniform(1, 8), ay + rng.uniform(1, 8)};
    const double bx = rng.uniform(ax - 6, a[2] - 0.5), by = rng.uniform(ay - 6, a[3] - 0.5);
    b = {bx, by, bx + rng.uniform(1, 8), by + rng.uniform(1, 8)};
    bool ok = true;
    for (int k = 0; k < 4; ++k) ok = ok && std::fabs(a[k] - b[k]) > margin;
    ok = ok && overlap_1d(a[0], a[2], b[0], b[2]) > margin && overlap_1d(a[1], a[3], b[1], b[3]) > margin;
    if (ok) return;
  }
}

// The gradients of g * IoU(a, b) (eps 1e-6) in type A against central finite differences in double.
template <typename A>
void expect_grads_match_fd(const Vec4& a, const Vec4& b, double g, double rtol, double atol, int trial) {
  Vec4 ga, gb, fa, fb;
  iou_grad<A>(a, b, 1e-6, g, ga, gb);
  iou_fd(a, b, 1e-6, g, 1e-6, fa, fb);
  for (int k = 0; k < 4; ++k) {
    EXPECT_TRUE(Close(ga[k], fa[k], rtol, atol)) << "trial " << trial << " ga[" << k << "]";
    EXPECT_TRUE(Close(gb[k], fb[k], rtol, atol)) << "trial " << trial << " gb[" << k << "]";
  }
}

TEST(IouBackward, DoubleMatchesFiniteDifferencesOnOverlappingPairs) {
  Rng rng(8080);
  int contained = 0;
  for (int trial = 0; trial < 500; ++trial) {
    Vec4 a, b;
    draw_overlapping(rng, 1e-2, a, b);
    if ((a[0] < b[0] && a[1] < b[1] && a[2] > b[2] && a[3] > b[3]) ||
        (b[0] < a[0] && b[1] < a[1] && b[2] > a[2] && b[3] > a[3]))
      ++contained;
    expect_grads_match_fd<double>(a, b, rng.uniform(-2, 2), 1e-6, 1e-8, trial);
  }
  EXPECT_GT(contained, 5);  // containment cases were exercised
}

TEST(IouBackward, FloatMatchesFiniteDifferencesOnOverlappingPairs) {
  Rng rng(8081);
  for (int trial = 0; trial < 300; ++trial) {
    Vec4 a, b;
    draw_overlapping(rng, 5e-2, a, b);
    for (auto& c : a) c = double(float(c));
    for (auto& c : b) c = double(float(c));
    expect_grads_match_fd<float>(a, b, double(float(rng.uniform(-2, 2))), 1e-4, 1e-5, trial);
  }
}

TEST(IouBackward, DisjointPairsHaveZeroGradient) {
  Rng rng(8082);
  for (int trial = 0; trial < 200; ++trial) {
    const double ax = rng.uniform(0, 10), ay = rng.uniform(0, 10);
    const Vec4 a = {ax, ay, ax + rng.uniform(1, 5), ay + rng.uniform(1, 5)};
    const double gap = rng.uniform(0.1, 3);
    const Vec4 b = trial % 2 ? Vec4{a[2] + gap, ay - 2, a[2] + gap + 3, ay + 4}
                             : Vec4{ax - 1, a[3] + gap, ax + 2, a[3] + gap + 1};
    Vec4 ga, gb;
    iou_grad<double>(a, b, 1e-6, 1.0, ga, gb);
    for (int k = 0; k < 4; ++k) {
      EXPECT_EQ(ga[k], 0.0) << trial << " " << k;
      EXPECT_EQ(gb[k], 0.0) << trial << " " << k;
    }
  }
}

TEST(IouBackward, HandComputedPartialOverlap) {
  // a = (0,0,2,2), b = (1,1,3,3): inter I = 1, union U = 7, iou = I / U.
  // d iou / d I = 1/U + I/U^2 = 8/49, d iou / d area = -I/U^2 = -1/49.
  // a.x1 moves the area only (max(x1) is b's): -(-1/49) * ah(2) = 2/49.
  // a.x2 moves both: 8/49 * ih(1) + (-1/49) * 2 = 6/49.
  Vec4 ga, gb;
  iou_grad<double>({0, 0, 2, 2}, {1, 1, 3, 3}, 1e-6, 1.0, ga, gb);
  EXPECT_NEAR(ga[0], 2.0 / 49, 1e-14);
  EXPECT_NEAR(ga[1], 2.0 / 49, 1e-14);
  EXPECT_NEAR(ga[2], 6.0 / 49, 1e-14);
  EXPECT_NEAR(ga[3], 6.0 / 49, 1e-14);
  EXPECT_NEAR(gb[0], -6.0 / 49, 1e-14);
  EXPECT_NEAR(gb[1], -6.0 / 49, 1e-14);
  EXPECT_NEAR(gb[2], -2.0 / 49, 1e-14);
  EXPECT_NEAR(gb[3], -2.0 / 49, 1e-14);
}

TEST(IouBackward, ScalesLinearlyWithUpstreamGradient) {
  Vec4 g1a, g1b, g3a, g3b;
  iou_grad<double>({0, 0, 2, 2}, {1, 1, 3, 3}, 1e-6, 1.0, g1a, g1b);
  iou_grad<double>({0, 0, 2, 2}, {1, 1, 3, 3}, 1e-6, -3.0, g3a, g3b);
  for (int k = 0; k < 4; ++k) {
    EXPECT_NEAR(g3a[k], -3.0 * g1a[k], 1e-14);
    EXPECT_NEAR(g3b[k], -3.0 * g1b[k], 1e-14);
  }
}

TEST(IouBackward, TieSplitsGradientHalfHalf) {
  // a = (0,0,2,2), b = (0,1,3,3): a.x1 == b.x1, so max(a.x1, b.x1) is a tie and
  // torch.maximum gives each side half of d iou / d max = -(d iou / d I) * ih.
  // I = 2 (iw 2, ih 1), U = 4 + 6 - 2 = 8: d iou/d I = 1/8 + 2/64 = 5/32,
  // d iou/d area = -2/64 = -1/32.
  const double g = 1.0;
  Vec4 ga, gb;
  iou_grad<double>({0, 0, 2, 2}, {0, 1, 3, 3}, 1e-6, g, ga, gb);
  const double d_inter = 5.0 / 32, d_area = -1.0 / 32;
  const double ih = 1, ah = 2, bh = 2;
  EXPECT_NEAR(ga[0], -0.5 * d_inter * ih - d_area * ah, 1e-14);
  EXPECT_NEAR(gb[0], -0.5 * d_inter * ih - d_area * bh, 1e-14);
  // Not a tie elsewhere: a.x2 = 2 < b.x2 = 3 takes all of d/d min(x2).
  EXPECT_NEAR(ga[2], d_inter * ih + d_area * ah, 1e-14);
  EXPECT_NEAR(gb[2], d_area * bh, 1e-14);

  // The half split is the mean of the one-sided derivatives (central
  // difference across the kink), and the two halves add up to the derivative
  // of moving both x1 together.
  const double h = 1e-7;
  auto f = [](const Vec4& a, const Vec4& b) { return ref_iou(a, b, 1e-6); };
  const Vec4 a = {0, 0, 2, 2}, b = {0, 1, 3, 3};
  const double right = (f({h, 0, 2, 2}, b) - f(a, b)) / h;
  const double left = (f(a, b) - f({-h, 0, 2, 2}, b)) / h;
  EXPECT_NEAR(ga[0], 0.5 * (left + right), 1e-6);
  EXPECT_GT(std::fabs(left - right), 0.1);  // it really is a kink
  const double both = (f({h, 0, 2, 2}, {h, 1, 3, 3}) - f({-h, 0, 2, 2}, {-h, 1, 3, 3})) / (2 * h);
  EXPECT_NEAR(ga[0] + gb[0], both, 1e-6);
}

TEST(IouBackward, TiesMatchCentralDifferences) {
  // Configurations with shared edges (ties in max(x1,y1) / min(x2,y2)) but
  // strictly positive overlap: each tied coordinate gets the mean of its
  // one-sided derivatives, which a central difference measures.
  const Vec4 pairs[][2] = {
      {{0, 0, 2, 2}, {0, 1, 3, 3}},      // x1 tie
      {{0, 0, 2, 2}, {1, 0, 2, 3}},      // y1 tie and x2 tie
      {{0, 0, 4, 3}, {1, 0, 4, 3}},      // y1, x2, y2 ties
      {{0, 0, 2, 2}, {0, 0, 2, 2}},      // identical: all ties
      {{-1, 2, 5, 7}, {2, 2, 5, 4.5}},   // contained with two shared edges
  };
  for (const auto& p : pairs) {
    Vec4 ga, gb, fa, fb;
    iou_grad<double>(p[0], p[1], 1e-6, 1.0, ga, gb);
    iou_fd(p[0], p[1], 1e-6, 1.0, 1e-7, fa, fb);
    for (int k = 0; k < 4; ++k) {
      EXPECT_NEAR(ga[k], fa[k], 1e-6) << "a[" << k << "] of (" << p[0][0] << "," << p[0][1] << ")";
      EXPECT_NEAR(gb[k], fb[k], 1e-6) << "b[" << k << "] of (" << p[1][0] << "," << p[1][1] << ")";
    }
  }
}

TEST(IouBackward, IdenticalBoxesHaveZeroGradient) {
  // IoU is at its maximum (1): each coordinate's one-sided slopes cancel.
  Vec4 ga, gb;
  iou_grad<double>({0, 0, 2, 2}, {0, 0, 2, 2}, 1e-6, 1.0, ga, gb);
  for (int k = 0; k < 4; ++k) {
    EXPECT_NEAR(ga[k], 0.0, 1e-15);
    EXPECT_NEAR(gb[k], 0.0, 1e-15);
  }
}

TEST(IouBackward, TouchingEdgesUseClampMinConvention) {
  // a = (0,0,1,1), b = (1,0,2,1): iw = min(x2) - max(x1) = 0 exactly. Autograd's
  // clamp(min=0) passes the gradient at 0, so the derivative is the one-sided
  // slope into the overlap: d iou / d a.x2 = ih / U = 1/2, d iou / d b.x1 = -1/2.
  Vec4 ga, gb;
  iou_grad<double>({0, 0, 1, 1}, {1, 0, 2, 1}, 1e-6, 1.0, ga, gb);
  EXPECT_DOUBLE_EQ(ga[2], 0.5);
  EXPECT_DOUBLE_EQ(gb[0], -0.5);
  for (int k : {0, 1, 3}) EXPECT_EQ(ga[k], 0.0) << k;
  for (int k : {1, 2, 3}) EXPECT_EQ(gb[k], 0.0) << k;
  // Cross-check against the one-sided difference into the overlap.
  const double h = 1e-7;
  EXPECT_NEAR(ga[2], (ref_iou({0, 0, 1 + h, 1}, {1, 0, 2, 1}, 1e-6) - 0.0) / h, 1e-6);
  EXPECT_NEAR(gb[0], (0.0 - ref_iou({0, 0, 1, 1}, {1 - h, 0, 2, 1}, 1e-6)) / h, 1e-6);
}

TEST(IouBackward, DegenerateBoxesGiveFiniteZeroGradient) {
  const Vec4 cases[][2] = {
      {{1, 1, 1, 1}, {1, 1, 1, 1}},  // two identical points: union 0 < eps
      {{3, 3, 1, 1}, {0, 0, 4, 4}},  // inverted vs proper
      {{0, 0, 4, 4}, {3, 3, 1, 1}},  // proper vs inverted
      {{3, 3, 1, 1}, {3, 3, 1, 1}},  // two inverted
      {{2, 0, 2, 3}, {5, 0, 5, 3}},  // two zero-width boxes apart
  };
  for (const auto& c : cases) {
    Vec4 ga, gb, fa, fb;
    iou_grad<double>(c[0], c[1], 1e-6, 1.0, ga, gb);
    iou_grad<float>(c[0], c[1], 1e-6, 1.0, fa, fb);
    for (int k = 0; k < 4; ++k) {
      EXPECT_TRUE(std::isfinite(ga[k]) && std::isfinite(gb[k])) << k;
      EXPECT_TRUE(std::isfinite(fa[k]) && std::isfinite(fb[k])) << k;
      EXPECT_EQ(ga[k], 0.0) << k;
      EXPECT_EQ(gb[k], 0.0) << k;
      EXPECT_EQ(fa[k], 0.0) << k;
      EXPECT_EQ(fb[k], 0.0) << k;
    }
  }
}

TEST(IouBackward, ZeroWidthBoxInsideUsesOneSidedSlopeIntoOverlap) {
  // a = (1,1,1,3) has zero width inside b = (0,0,4,4): iw = min(x2) - max(x1)
  // is exactly 0, where autograd's clamp(min=0) passes the gradient. Widening
  // a gives inter = 2 t and union 16, so d iou / d a.x2 = 2/16 and
  // d iou / d a.x1 = -2/16; nothing reaches b (its edges are not selected).
  Vec4 ga, gb;
  iou_grad<double>({1, 1, 1, 3}, {0, 0, 4, 4}, 1e-6, 1.0, ga, gb);
  const Vec4 want_a = {-2.0 / 16, 0, 2.0 / 16, 0};
  for (int k = 0; k < 4; ++k) {
    EXPECT_NEAR(ga[k], want_a[k], 1e-15) << k;
    EXPECT_EQ(gb[k], 0.0) << k;
  }
  const double h = 1e-7;
  EXPECT_NEAR(ga[2], ref_iou({1, 1, 1 + h, 3}, {0, 0, 4, 4}, 1e-6) / h, 1e-6);
  EXPECT_NEAR(ga[0], -ref_iou({1 - h, 1, 1, 3}, {0, 0, 4, 4}, 1e-6) / h, 1e-6);
  // Swapped roles: same numbers on the other side.
  iou_grad<double>({0, 0, 4, 4}, {1, 1, 1, 3}, 1e-6, 1.0, ga, gb);
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(ga[k], 0.0) << k;
    EXPECT_NEAR(gb[k], want_a[k], 1e-15) << k;
  }
}

TEST(IouBackward, EpsActiveUsesInterOverEps) {
  // Union below eps: iou = inter / eps, so d iou / d a.x2 = ih / eps (here
  // a.x2 < b.x2 selects a) and the union does not contribute.
  const double eps = 1e-3;
  const Vec4 a = {0, 0, 1e-3, 1e-3}, b = {5e-4, 5e-4, 1.5e-3, 1.5e-3};
  // union = 1e-6 + 1e-6 - 2.5e-7 < eps.
  Vec4 ga, gb;
  iou_grad<double>(a, b, eps, 2.0, ga, gb);
  const double ih = 5e-4, iw = 5e-4;
  EXPECT_NEAR(ga[2], 2.0 * ih / eps, 1e-12);
  EXPECT_NEAR(ga[3], 2.0 * iw / eps, 1e-12);
  EXPECT_NEAR(ga[0], 0.0, 1e-12);
  EXPECT_NEAR(gb[0], -2.0 * ih / eps, 1e-12);
  EXPECT_NEAR(gb[2], 0.0, 1e-12);
  Vec4 fa, fb;
  iou_fd(a, b, eps, 2.0, 1e-9, fa, fb);
  for (int k = 0; k < 4; ++k) {
    EXPECT_NEAR(ga[k], fa[k], 1e-6) << k;
    EXPECT_NEAR(gb[k], fb[k], 1e-6) << k;
  }
}

// ---- box_iou_with_areas: box_iou without the NaN checks, bit for bit ---------
// Every pair of boxes whose coordinates are drawn from {NaN, +-inf, -0.0, +0.0,
// 1, 2, 1e30} (7^4 boxes, all 7^8 pairs): where neither area is NaN, the same
// bits as box_iou (the sign of a zero IoU included); a NaN area makes box_iou
// NaN (which is why a NaN area is the only thing to check per box).
template <typename A> void check_with_areas_exhaustive() {
  const A inf = std::numeric_limits<A>::infinity();
  const A vals[] = {std::numeric_limits<A>::quiet_NaN(), inf, -inf, A(-0.0), A(0.0), A(1), A(2), A(1e30)};
  std::vector<Box<A>> boxes;
  for (A x1 : vals) for (A y1 : vals) for (A x2 : vals) for (A y2 : vals) {
    if (std::isnan(x1) && std::isnan(y1)) continue;  // one NaN per box is enough
    boxes.push_back({x1, y1, x2, y2});
  }
  std::vector<A> areas;
  for (const auto& b : boxes) areas.push_back(box_area(b));
  const A eps = A(1e-6);
  int64_t fast = 0, zeros = 0, neg_zeros = 0, mismatches = 0;
  for (size_t i = 0; i < boxes.size(); ++i) {
    for (size_t j = 0; j < boxes.size(); ++j) {
      const A want = box_iou(boxes[i], boxes[j], eps);
      if (std::isnan(areas[i]) || std::isnan(areas[j])) {
        if (!std::isnan(want)) ++mismatches;
        continue;
      }
      const A got = box_iou_with_areas(boxes[i], areas[i], boxes[j], areas[j], eps);
      ++fast;
      if (std::isnan(want) ? !std::isnan(got) : std::memcmp(&got, &want, sizeof(A)) != 0) {
        if (++mismatches < 5) {
          ADD_FAILURE() << "pair " << i << ", " << j << ": " << got << " vs " << want;
        }
      }
      zeros += want == A(0);
      neg_zeros += want == A(0) && std::signbit(want);
    }
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_GT(fast, 1000000);
  EXPECT_GT(neg_zeros, 0);  // signed zeros were exercised
  EXPECT_GT(zeros, neg_zeros);
}

TEST(BoxIouWithAreas, EqualsBoxIouBitwiseFloat) { check_with_areas_exhaustive<float>(); }
TEST(BoxIouWithAreas, EqualsBoxIouBitwiseDouble) { check_with_areas_exhaustive<double>(); }

TEST(BoxIsZero, SignedZerosAndNaN) {
  EXPECT_TRUE(box_is_zero(Box<float>{0.0f, -0.0f, 0.0f, -0.0f}));
  EXPECT_FALSE(box_is_zero(Box<float>{0.0f, 0.0f, 1e-45f, 0.0f}));
  EXPECT_FALSE(box_is_zero(Box<double>{0.0, 0.0, 0.0, std::nan("")}));
}

}  // namespace
