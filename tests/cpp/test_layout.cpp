// tbd_ops/layout.h: offsets of the regression values of prior p in a
// [N, A*4, H, W] tensor with arbitrary strides, and the [N, P, 4] form.
#include "tbd_ops/layout.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <set>
#include <vector>

namespace {

using namespace tbd_ops;

struct Shape {
  int64_t N, A, H, W;
  int64_t C() const { return A * 4; }
  int64_t P() const { return H * W * A; }
};

// Visits every prediction in prior order: p = (h * W + w) * A + a, built by
// counting rather than by formula.
template <typename F> void for_each_prior(const Shape& s, F f) {
  for (int64_t n = 0; n < s.N; ++n) {
    int64_t p = 0;
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t w = 0; w < s.W; ++w)
        for (int64_t a = 0; a < s.A; ++a, ++p)
          for (int64_t k = 0; k < 4; ++k) f(n, p, h, w, a, k);
  }
}

TEST(Layout, ContiguousNCHW) {
  const Shape s{2, 3, 4, 5};
  const PredLayout l{s.A, s.H, s.W, s.C() * s.H * s.W, s.H * s.W, s.W, 1};
  std::set<int64_t> seen;
  for_each_prior(s, [&](int64_t n, int64_t p, int64_t h, int64_t w, int64_t a, int64_t k) {
    const int64_t want = ((n * s.C() + (a * 4 + k)) * s.H + h) * s.W + w;
    EXPECT_EQ(pred_offset(l, n, p, k), want) << "n" << n << " p" << p << " k" << k;
    seen.insert(pred_offset(l, n, p, k));
  });
  // Every element of the tensor is addressed exactly once.
  EXPECT_EQ(static_cast<int64_t>(seen.size()), s.N * s.C() * s.H * s.W);
  EXPECT_EQ(*seen.begin(), 0);
  EXPECT_EQ(*seen.rbegin(), s.N * s.C() * s.H * s.W - 1);
}

TEST(Layout, ChannelsLast) {
  // Memory order N, H, W, C: strides (H*W*C, 1, W*C, C).
  const Shape s{2, 3, 4, 5};
  const PredLayout l{s.A, s.H, s.W, s.H * s.W * s.C(), 1, s.W * s.C(), s.C()};
  std::set<int64_t> seen;
  for_each_prior(s, [&](int64_t n, int64_t p, int64_t h, int64_t w, int64_t a, int64_t k) {
    const int64_t want = ((n * s.H + h) * s.W + w) * s.C() + (a * 4 + k);
    EXPECT_EQ(pred_offset(l, n, p, k), want) << "n" << n << " p" << p << " k" << k;
    seen.insert(pred_offset(l, n, p, k));
  });
  EXPECT_EQ(static_cast<int64_t>(seen.size()), s.N * s.C() * s.H * s.W);
}

TEST(Layout, ChannelsLastSinglePriorIsPerLocationContiguous) {
  // With A = 1 and channels_last, the 4 values of a location are adjacent and
  // consecutive priors are 4 apart.
  const Shape s{1, 1, 3, 7};
  const PredLayout l{1, s.H, s.W, s.H * s.W * 4, 1, s.W * 4, 4};
  for (int64_t p = 0; p < s.P(); ++p)
    for (int64_t k = 0; k < 4; ++k) EXPECT_EQ(pred_offset(l, 0, p, k), 4 * p + k);
}

TEST(Layout, NP4Form) {
  // [N, P, 4] contiguous viewed as A = 1, H = 1, W = P, sH = 0.
  const int64_t N = 3, P = 11;
  const PredLayout l{1, 1, P, P * 4, 1, 0, 4};
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t k = 0; k < 4; ++k) EXPECT_EQ(pred_offset(l, n, p, k), (n * P + p) * 4 + k);
}

TEST(Layout, NP4FormTransposedStorage) {
  // A [N, P, 4] view of [N, 4, P] storage (strides (4P, 1, P)).
  const int64_t N = 2, P = 9;
  const PredLayout l{1, 1, P, 4 * P, P, 0, 1};
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t k = 0; k < 4; ++k) EXPECT_EQ(pred_offset(l, n, p, k), (n * 4 + k) * P + p);
}

TEST(Layout, StridedBatchAndRows) {
  // A slice of a larger buffer: padded rows and a padded batch stride.
  const Shape s{3, 2, 3, 4};
  const int64_t row = 6, plane = s.H * row + 5, image = s.C() * plane + 17;
  const PredLayout l{s.A, s.H, s.W, image, plane, row, 1};
  for_each_prior(s, [&](int64_t n, int64_t p, int64_t h, int64_t w, int64_t a, int64_t k) {
    EXPECT_EQ(pred_offset(l, n, p, k), n * image + (a * 4 + k) * plane + h * row + w);
  });
}

// Fill an NCHW buffer with a code of (n, c, h, w) and read it back per prior,
// counting h, w and a: by load_pred, and by load_pred_at at the offsets of a
// walk from prediction 0.
TEST(Layout, LoadPredReadsTheFourChannels) {
  const Shape s{2, 3, 4, 5};
  const int64_t C = s.C();
  std::vector<int32_t> buf(s.N * C * s.H * s.W);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t h = 0; h < s.H; ++h)
        for (int64_t w = 0; w < s.W; ++w)
          buf[((n * C + c) * s.H + h) * s.W + w] = static_cast<int32_t>(n * 1000000 + c * 10000 + h * 100 + w);
  const PredLayout l{s.A, s.H, s.W, C * s.H * s.W, s.H * s.W, s.W, 1};
  auto cvt = [](int32_t v) { return static_cast<double>(v) + 0.5; };
  for (int64_t n = 0; n < s.N; ++n) {
    PredWalk walk(l, n, 0);
    int64_t p = 0;
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t w = 0; w < s.W; ++w)
        for (int64_t a = 0; a < s.A; ++a, ++p, walk.next()) {
          double out[4], walked[4];
          load_pred(buf.data(), l, n, p, out, cvt);
          load_pred_at(buf.data(), l, walk.offset(), walked, cvt);
          for (int64_t k = 0; k < 4; ++k) {
            const double want = n * 1000000 + (a * 4 + k) * 10000 + h * 100 + w + 0.5;
            EXPECT_EQ(out[k], want) << "n" << n << " p" << p << " k" << k;
            EXPECT_EQ(walked[k], want) << "walk: n" << n << " p" << p << " k" << k;
          }
        }
  }
}

TEST(Layout, LoadPredChannelsLast) {
  const Shape s{1, 2, 3, 2};
  const int64_t C = s.C();
  std::vector<float> buf(s.N * s.H * s.W * C);
  for (int64_t h = 0; h < s.H; ++h)
    for (int64_t w = 0; w < s.W; ++w)
      for (int64_t c = 0; c < C; ++c) buf[(h * s.W + w) * C + c] = float(c * 100 + h * 10 + w);
  const PredLayout l{s.A, s.H, s.W, s.H * s.W * C, 1, s.W * C, C};
  auto cvt = [](float v) { return v; };
  int64_t p = 0;
  for (int64_t h = 0; h < s.H; ++h)
    for (int64_t w = 0; w < s.W; ++w)
      for (int64_t a = 0; a < s.A; ++a, ++p) {
        float out[4];
        load_pred(buf.data(), l, 0, p, out, cvt);
        for (int64_t k = 0; k < 4; ++k) EXPECT_EQ(out[k], float((a * 4 + k) * 100 + h * 10 + w));
      }
}

TEST(Layout, LoadPriorAnchorsPointsAndNull) {
  const int64_t P = 5;
  auto cvt = [](double v) { return v; };
  // [P, 4] contiguous.
  std::vector<double> anchors(P * 4);
  for (int64_t i = 0; i < P * 4; ++i) anchors[i] = double(i) + 0.25;
  for (int64_t p = 0; p < P; ++p) {
    double out[4];
    load_prior(anchors.data(), 4, 1, 4, p, out, cvt);
    for (int k = 0; k < 4; ++k) EXPECT_EQ(out[k], double(p * 4 + k) + 0.25);
  }
  // [P, 2] points stored transposed ([2, P] memory: strides (1, P)); the
  // unused columns read as 0.
  std::vector<double> pts(2 * P);
  for (int64_t k = 0; k < 2; ++k)
    for (int64_t p = 0; p < P; ++p) pts[k * P + p] = 10.0 * k + p;
  for (int64_t p = 0; p < P; ++p) {
    double out[4] = {-1, -1, -1, -1};
    load_prior(pts.data(), 1, P, 2, p, out, cvt);
    EXPECT_EQ(out[0], double(p));
    EXPECT_EQ(out[1], 10.0 + p);
    EXPECT_EQ(out[2], 0.0);
    EXPECT_EQ(out[3], 0.0);
  }
  // No priors (coder none): zeros.
  double out[4] = {7, 7, 7, 7};
  load_prior(static_cast<const double*>(nullptr), 4, 1, 4, 2, out, cvt);
  for (int k = 0; k < 4; ++k) EXPECT_EQ(out[k], 0.0);
}

TEST(Layout, LoadPriorConvertsType) {
  const float anchors[8] = {1.5f, 2.5f, 3.5f, 4.5f, 5.5f, 6.5f, 7.5f, 8.5f};
  double out[4];
  load_prior(anchors, 4, 1, 4, 1, out, [](float v) { return static_cast<double>(v) * 2; });
  EXPECT_EQ(out[0], 11.0);
  EXPECT_EQ(out[3], 17.0);
}

// The walk of a grid-stride loop visits the (r, c) of i = r * C + c for every
// start, stride and column count, including strides under, equal to and over C
// and steps that wrap the column several times.
TEST(Layout, RowColWalkMatchesDivision) {
  for (int64_t C : {1, 2, 3, 7, 80, 81, 256}) {
    for (int64_t stride : {1, 2, 5, 79, 80, 81, 255, 256, 257, 1000}) {
      for (int64_t start : {0, 1, 5, 78, 79, 80, 300}) {
        const int64_t n = start + 40 * stride + 3;
        RowColWalk w(start, stride, C);
        int64_t steps = 0;
        for (int64_t i = start; i < n; i += stride, w.step(), ++steps) {
          ASSERT_EQ(w.r, i / C) << "C=" << C << " stride=" << stride << " start=" << start << " i=" << i;
          ASSERT_EQ(w.c, i % C) << "C=" << C << " stride=" << stride << " start=" << start << " i=" << i;
          ASSERT_LT(w.c, C);
        }
        EXPECT_GT(steps, 40);
      }
    }
  }
  // A 64-bit index past 2^32 (the grid-stride loops index in int64).
  const int64_t big = (int64_t(1) << 33) + 12345, C = 91;
  RowColWalk w(big, (int64_t(1) << 24) + 7, C);
  for (int k = 0; k < 100; ++k, w.step()) {
    const int64_t i = big + k * ((int64_t(1) << 24) + 7);
    ASSERT_EQ(w.r, i / C);
    ASSERT_EQ(w.c, i % C);
  }
}

// From every start, the walk gives pred_offset(l, n, p, 0) of each following
// prediction of the image (pred_offset is checked against counting above), in
// the head layouts (contiguous, channels_last, padded rows and images, one
// column: the row changes at every location) and the [N, P, 4] form.
TEST(Layout, PredWalkMatchesPredOffset) {
  const int64_t N = 3, A = 9, H = 5, W = 7, C = A * 4, P = H * W * A, Wp = W + 3;
  const PredLayout layouts[] = {
      {A, H, W, C * H * W, H * W, W, 1},              // NCHW
      {A, H, W, H * W * C, 1, W * C, C},              // channels_last
      {A, H, W, 2 * C * H * Wp, H * Wp, Wp, 1},       // NCHW, rows padded to Wp, every other image
      {2, 6, 1, 8 * 6, 6, 1, 1},                      // NCHW, W = 1
      {1, 1, P, P * 4, 1, 0, 4},                      // [N, P, 4]
      {1, 1, P, 1, P * N, 0, N},                      // [N, P, 4] view of [4, P, N] storage
  };
  for (const PredLayout& l : layouts) {
    const int64_t np = l.A * l.H * l.W;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t p0 = 0; p0 < np; ++p0) {
        PredWalk w(l, n, p0);
        for (int64_t p = p0; p < np; ++p, w.next()) {
          ASSERT_EQ(w.offset(), pred_offset(l, n, p, 0))
              << "A=" << l.A << " W=" << l.W << " sC=" << l.sC << " n=" << n << " p0=" << p0 << " p=" << p;
        }
      }
    }
  }
}

}  // namespace
