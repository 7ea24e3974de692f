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

TBD_HD int64_t pred_offset(const PredLayout& l, int64_t n, int64_t p, int64_t k) {
  const int64_t a = p % l.A;
  const int64_t hw = p / l.A;
  const int64_t w = hw % l.W;
  const int64_t h = hw / l.W;
  return n * l.sN + (a * 4 + k) * l.sC + h * l.sH + w * l.sW;
}

// pred_offset(l, n, p, 0) of predictions p, p + 1, p + 2, ... of image n in
// turn, for loops over consecutive predictions: two divisions when it starts,
// then counting (pred_offset divides twice per prediction).
struct PredWalk {
  PredLayout l;
  int64_t base;     // n * sN
  int64_t a, w, h;  // of the current prediction
  TBD_HD PredWalk(const PredLayout& layout, int64_t n, int64_t p) : l(layout), base(n * layout.sN) {
    a = p % l.A;
    const int64_t hw = p / l.A;
    w = hw % l.W;
    h = hw / l.W;
  }
  TBD_HD int64_t offset() const { return base + a * 4 * l.sC + h * l.sH + w * l.sW; }
  TBD_HD void next() {
    if (++a == l.A) {
      a = 0;
      if (++w == l.W) {
        w = 0;
        ++h;
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
