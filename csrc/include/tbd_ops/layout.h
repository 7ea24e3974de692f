// Index arithmetic for the detector layouts (SPEC 0): prior p of a level with
// A anchors per location is p = (h * W + w) * A + a, and its 4 regression
// values sit in channels a*4 + k of a [N, A*4, H, W] tensor. A [N, P, 4] tensor
// is the same layout with A = 1, H = 1, W = P.
#pragma once

#include "tbd_ops/math.h"

namespace tbd_ops {

struct PredLayout {
  int64_t A, H, W;
  int64_t sN, sC, sH, sW;  // element strides
};

// Anchor a, row h and column w of prediction p = (h * W + w) * A + a.
struct PredIndex {
  int64_t a, h, w;
};

TBD_HD PredIndex pred_index(const PredLayout& l, int64_t p) {
  const int64_t hw = p / l.A;
  return {p % l.A, hw / l.W, hw % l.W};
}

// Offset of regression value k of prediction i of image n.
TBD_HD int64_t pred_offset(const PredLayout& l, int64_t n, const PredIndex& i, int64_t k) {
  return n * l.sN + (i.a * 4 + k) * l.sC + i.h * l.sH + i.w * l.sW;
}

// Offset of regression value k of prediction p of image n.
TBD_HD int64_t pred_offset(const PredLayout& l, int64_t n, int64_t p, int64_t k) {
  return pred_offset(l, n, pred_index(l, p), k);
}

// pred_offset(l, n, p, 0) of predictions p, p + 1, p + 2, ... of image n in
// turn, for loops over consecutive predictions: two divisions when it starts,
// then counting (pred_offset divides twice per prediction).
struct PredWalk {
  PredLayout l;
  int64_t n;
  PredIndex i;  // of the current prediction
  TBD_HD PredWalk(const PredLayout& layout, int64_t image, int64_t p)
      : l(layout), n(image), i(pred_index(layout, p)) {}
  TBD_HD int64_t offset() const { return pred_offset(l, n, i, 0); }
  TBD_HD void next() {
    if (++i.a == l.A) {
      i.a = 0;
      if (++i.w == l.W) {
        i.w = 0;
        ++i.h;
      }
    }
  }
};

// Loads the 4 regression values at offset base (pred_offset(l, n, p, 0) of
// prediction (n, p)) converted to A.
template <typename A, typename T, typename Cvt>
TBD_HD void load_pred_at(const T* pred, const PredLayout& l, int64_t base, A out[4], Cvt cvt) {
  for (int k = 0; k < 4; ++k) out[k] = cvt(pred[base + k * l.sC]);
}

// Loads the 4 regression values of prediction (n, p) converted to A.
template <typename A, typename T, typename Cvt>
TBD_HD void load_pred(const T* pred, const PredLayout& l, int64_t n, int64_t p, A out[4], Cvt cvt) {
  load_pred_at(pred, l, pred_offset(l, n, p, 0), out, cvt);
}

// Loads prior p ([P, D] with strides s0, s1; D = 4 anchors or 2 points).
template <typename A, typename T, typename Cvt>
TBD_HD void load_prior(const T* priors, int64_t s0, int64_t s1, int dim, int64_t p, A out[4], Cvt cvt) {
  out[0] = out[1] = out[2] = out[3] = A(0);
  if (!priors) return;
  for (int k = 0; k < dim; ++k) out[k] = cvt(priors[p * s0 + k * s1]);
}

// Row and column of the flat index i = r * C + c of an [R, C] array, stepped by
// a fixed stride (a grid-stride loop) with additions only: two divisions when
// it starts instead of a 64-bit division per element. Needs C > 0.
struct RowColWalk {
  int64_t r, c;    // the current element
  int64_t dr, dc;  // the stride as rows and columns, dc < C
  int64_t C;
  TBD_HD RowColWalk(int64_t i, int64_t stride, int64_t cols)
      : r(i / cols), c(i % cols), dr(stride / cols), dc(stride % cols), C(cols) {}
  TBD_HD void step() {
    r += dr;
    c += dc;
    if (c >= C) {
      c -= C;
      ++r;
    }
  }
};

}  // namespace tbd_ops
