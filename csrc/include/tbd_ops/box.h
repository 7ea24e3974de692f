// Box coders and IoU: forward and backward for one box / one pair.
// Formulas follow MMDetection's DeltaXYWHBBoxCoder / distance2bbox operation by
// operation, so results agree to rounding; gradients follow autograd's
// conventions for clamp / maximum / minimum so that they match a PyTorch
// reference exactly, including at ties.
#pragma once

#include "tbd_ops/math.h"

namespace tbd_ops {

template <typename A> struct Box {
  A x1, y1, x2, y2;
};

// Row `row` of an [n, 4] array of boxes with element strides (s0, s1),
// converted to A by cvt (CastTo<A> on the host, the CUDA kernels' to_acc).
template <typename A, typename T, typename Cvt>
TBD_HD Box<A> load_box(const T* boxes, int64_t row, int64_t s0, int64_t s1, Cvt cvt) {
  const T* b = boxes + row * s0;
  return {cvt(b[0]), cvt(b[s1]), cvt(b[2 * s1]), cvt(b[3 * s1])};
}

// The same for a contiguous [n, 4] array.
template <typename A, typename T, typename Cvt>
TBD_HD Box<A> load_box(const T* boxes, int64_t row, Cvt cvt) {
  return load_box<A>(boxes, row, 4, 1, cvt);
}

enum class Coder : int { kDeltaXYWH = 0, kDistance = 1, kNone = 2 };

template <typename A> struct CoderParams {
  Coder coder;
  A mean[4];
  A std[4];
  A max_ratio;  // |log(wh_ratio_clip)|
  A scale;      // distance coder: multiplies the ltrb prediction
  bool clip;    // clip to [0, max_w] x [0, max_h]
  A max_h, max_w;
};

// Parameters of image n: with per-image clip shapes (`shapes`: [N, 2] rows
// (h, w), contiguous, in A), image n's row replaces max_h and max_w.
template <typename A>
TBD_HD CoderParams<A> image_params(CoderParams<A> cp, const A* shapes, int64_t n) {
  if (shapes) {
    cp.max_h = shapes[2 * n];
    cp.max_w = shapes[2 * n + 1];
  }
  return cp;
}

// The parameters with every number converted by cvt: to an accumulation type
// (cast_params) or, on the CPU, broadcast to a vector type.
template <typename B, typename A, typename Cvt>
TBD_HD CoderParams<B> convert_params(const CoderParams<A>& p, Cvt cvt) {
  CoderParams<B> c;
  c.coder = p.coder;
  for (int k = 0; k < 4; ++k) {
    c.mean[k] = cvt(p.mean[k]);
    c.std[k] = cvt(p.std[k]);
  }
  c.max_ratio = cvt(p.max_ratio);
  c.scale = cvt(p.scale);
  c.clip = p.clip;
  c.max_h = cvt(p.max_h);
  c.max_w = cvt(p.max_w);
  return c;
}

// Parameters in the accumulation type A (they are validated and stored in double).
template <typename A> TBD_HD CoderParams<A> cast_params(const CoderParams<double>& p) {
  return convert_params<A>(p, CastTo<A>());
}

// decode_box and what its backward needs, computed once: the box before
// clipping, and for delta_xywh the exponentials of the clamped log-size deltas.
template <typename A> struct DecodedBox {
  Box<A> box;        // decode_box(d, r, cp)
  Box<A> unclipped;  // the same before clipping
  A ew, eh;          // delta_xywh: exp(clamped dw), exp(clamped dh); 1 otherwise
};

// d = pred, r = prior (4 anchor coordinates, or the point (x, y) in r[0], r[1]).
template <typename A>
TBD_HD DecodedBox<A> decode_box_full(const A d[4], const A r[4], const CoderParams<A>& cp) {
  DecodedBox<A> o;
  o.ew = lit<A>(1);
  o.eh = lit<A>(1);
  Box<A> b;
  if (cp.coder == Coder::kDeltaXYWH) {
    const A dx = d[0] * cp.std[0] + cp.mean[0];
    const A dy = d[1] * cp.std[1] + cp.mean[1];
    const A dw = clamp_val(d[2] * cp.std[2] + cp.mean[2], -cp.max_ratio, cp.max_ratio);
    const A dh = clamp_val(d[3] * cp.std[3] + cp.mean[3], -cp.max_ratio, cp.max_ratio);
    const A px = (r[0] + r[2]) * lit<A>(0.5f);
    const A py = (r[1] + r[3]) * lit<A>(0.5f);
    const A pw = r[2] - r[0];
    const A ph = r[3] - r[1];
    const A gx = px + pw * dx;
    const A gy = py + ph * dy;
    o.ew = math_exp(dw);
    o.eh = math_exp(dh);
    const A gw = pw * o.ew;
    const A gh = ph * o.eh;
    b = {gx - gw * lit<A>(0.5f), gy - gh * lit<A>(0.5f), gx + gw * lit<A>(0.5f), gy + gh * lit<A>(0.5f)};
  } else if (cp.coder == Coder::kDistance) {
    b = {r[0] - d[0] * cp.scale, r[1] - d[1] * cp.scale,
         r[0] + d[2] * cp.scale, r[1] + d[3] * cp.scale};
  } else {
    b = {d[0], d[1], d[2], d[3]};
  }
  o.unclipped = b;
  if (cp.clip) {
    b.x1 = clamp_val(b.x1, lit<A>(0), cp.max_w);
    b.y1 = clamp_val(b.y1, lit<A>(0), cp.max_h);
    b.x2 = clamp_val(b.x2, lit<A>(0), cp.max_w);
    b.y2 = clamp_val(b.y2, lit<A>(0), cp.max_h);
  }
  o.box = b;
  return o;
}

// The decoded (and, with cp.clip, clipped) box.
template <typename A>
TBD_HD Box<A> decode_box(const A d[4], const A r[4], const CoderParams<A>& cp) {
  return decode_box_full(d, r, cp).box;
}

// Vector-Jacobian product of decode_box: given g = dL/d(box) and dec =
// decode_box_full(d, r, cp), writes dL/d(pred) into d_pred[4] and, when
// d_prior is non-null, dL/d(prior) into d_prior[0..3] (anchors) or
// d_prior[0..1] (points).
template <typename A>
TBD_HD void decode_box_backward(const A d[4], const A r[4], const CoderParams<A>& cp,
                                const DecodedBox<A>& dec, Box<A> g, A d_pred[4], A* d_prior) {
  if (cp.clip) {
    // Masks from the unclipped box.
    const Box<A>& u = dec.unclipped;
    g.x1 *= clamp_grad(u.x1, lit<A>(0), cp.max_w);
    g.y1 *= clamp_grad(u.y1, lit<A>(0), cp.max_h);
    g.x2 *= clamp_grad(u.x2, lit<A>(0), cp.max_w);
    g.y2 *= clamp_grad(u.y2, lit<A>(0), cp.max_h);
  }
  if (cp.coder == Coder::kDeltaXYWH) {
    const A dx = d[0] * cp.std[0] + cp.mean[0];
    const A dy = d[1] * cp.std[1] + cp.mean[1];
    const A dw_raw = d[2] * cp.std[2] + cp.mean[2];
    const A dh_raw = d[3] * cp.std[3] + cp.mean[3];
    const A ew = dec.ew, eh = dec.eh;
    const A pw = r[2] - r[0];
    const A ph = r[3] - r[1];
    const A g_gx = g.x1 + g.x2, g_gy = g.y1 + g.y2;
    const A g_gw = (g.x2 - g.x1) * lit<A>(0.5f), g_gh = (g.y2 - g.y1) * lit<A>(0.5f);
    d_pred[0] = g_gx * pw * cp.std[0];
    d_pred[1] = g_gy * ph * cp.std[1];
    d_pred[2] = g_gw * pw * ew * clamp_grad(dw_raw, -cp.max_ratio, cp.max_ratio) * cp.std[2];
    d_pred[3] = g_gh * ph * eh * clamp_grad(dh_raw, -cp.max_ratio, cp.max_ratio) * cp.std[3];
    if (d_prior) {
      const A g_pw = g_gx * dx + g_gw * ew;  // d/d(pw)
      const A g_ph = g_gy * dy + g_gh * eh;
      d_prior[0] = g_gx * lit<A>(0.5f) - g_pw;
      d_prior[1] = g_gy * lit<A>(0.5f) - g_ph;
      d_prior[2] = g_gx * lit<A>(0.5f) + g_pw;
      d_prior[3] = g_gy * lit<A>(0.5f) + g_ph;
    }
  } else if (cp.coder == Coder::kDistance) {
    d_pred[0] = -g.x1 * cp.scale;
    d_pred[1] = -g.y1 * cp.scale;
    d_pred[2] = g.x2 * cp.scale;
    d_pred[3] = g.y2 * cp.scale;
    if (d_prior) {
      d_prior[0] = g.x1 + g.x2;
      d_prior[1] = g.y1 + g.y2;
    }
  } else {
    d_pred[0] = g.x1;
    d_pred[1] = g.y1;
    d_pred[2] = g.x2;
    d_pred[3] = g.y2;
  }
}

// Area with widths and heights clamped at 0 (a degenerate box has area 0).
template <typename A> TBD_HD A box_area(const Box<A>& b) {
  return clamp_min_val(b.x2 - b.x1, lit<A>(0)) * clamp_min_val(b.y2 - b.y1, lit<A>(0));
}

// inter / max(area_a + area_b - inter, eps).
template <typename A> TBD_HD A box_iou(const Box<A>& a, const Box<A>& b, A eps) {
  const A iw = clamp_min_val(min_nan(a.x2, b.x2) - max_nan(a.x1, b.x1), lit<A>(0));
  const A ih = clamp_min_val(min_nan(a.y2, b.y2) - max_nan(a.y1, b.y1), lit<A>(0));
  const A inter = iw * ih;
  const A uni = box_area(a) + box_area(b) - inter;
  return inter / clamp_min_val(uni, eps);
}

// box_iou(a, b, eps) bit for bit, from the areas box_area(a) and box_area(b)
// computed once per box, for boxes whose areas are not NaN (check it once per
// box, not per pair; with a NaN area use box_iou). A NaN coordinate makes the
// area NaN, so here no coordinate is NaN and the min/max are plain compares
// that return a's coordinate on ties (-0.0 vs +0.0 included), as min_nan and
// max_nan do; `v < lo ? lo : v` is clamp_min_val (a NaN stays NaN), so the
// operations and their order are those of box_iou. Written with selects only,
// so that A may also be a CPU vector type (GCC vector extensions: a lane per
// pair, the same operations lane by lane); A{} is +0.
template <typename A>
TBD_HD A box_iou_with_areas(const Box<A>& a, A area_a, const Box<A>& b, A area_b, A eps) {
  const A x1 = b.x1 > a.x1 ? b.x1 : a.x1;
  const A y1 = b.y1 > a.y1 ? b.y1 : a.y1;
  const A x2 = b.x2 < a.x2 ? b.x2 : a.x2;
  const A y2 = b.y2 < a.y2 ? b.y2 : a.y2;
  const A iw_raw = x2 - x1, ih_raw = y2 - y1;
  const A zero = A{};
  const A iw = iw_raw < zero ? zero : iw_raw;
  const A ih = ih_raw < zero ? zero : ih_raw;
  const A inter = iw * ih;
  const A uni = area_a + area_b - inter;
  return inter / (uni < eps ? eps : uni);
}

// Whether every coordinate of b is +0.0 or -0.0 (false if one is NaN).
template <typename A> TBD_HD bool box_is_zero(const Box<A>& b) {
  return b.x1 == A(0) && b.y1 == A(0) && b.x2 == A(0) && b.y2 == A(0);
}

// Gradient of box_iou(a, b) scaled by g, with respect to both boxes.
template <typename A>
TBD_HD void box_iou_backward(const Box<A>& a, const Box<A>& b, A eps, A g,
                             Box<A>& ga, Box<A>& gb) {
  const A iw_raw = min_nan(a.x2, b.x2) - max_nan(a.x1, b.x1);
  const A ih_raw = min_nan(a.y2, b.y2) - max_nan(a.y1, b.y1);
  const A iw = clamp_min_val(iw_raw, lit<A>(0));
  const A ih = clamp_min_val(ih_raw, lit<A>(0));
  const A inter = iw * ih;
  const A aw_raw = a.x2 - a.x1, ah_raw = a.y2 - a.y1;
  const A bw_raw = b.x2 - b.x1, bh_raw = b.y2 - b.y1;
  const A aw = clamp_min_val(aw_raw, lit<A>(0)), ah = clamp_min_val(ah_raw, lit<A>(0));
  const A bw = clamp_min_val(bw_raw, lit<A>(0)), bh = clamp_min_val(bh_raw, lit<A>(0));
  const A uni = aw * ah + bw * bh - inter;
  const A u = clamp_min_val(uni, eps);
  const A g_u = -g * inter / (u * u);
  const A g_uni = g_u * clamp_min_grad(uni, eps);
  const A g_inter = g / u - g_uni;
  const A g_iw = g_inter * ih * clamp_min_grad(iw_raw, lit<A>(0));
  const A g_ih = g_inter * iw * clamp_min_grad(ih_raw, lit<A>(0));
  const A g_aw = g_uni * ah * clamp_min_grad(aw_raw, lit<A>(0));
  const A g_ah = g_uni * aw * clamp_min_grad(ah_raw, lit<A>(0));
  const A g_bw = g_uni * bh * clamp_min_grad(bw_raw, lit<A>(0));
  const A g_bh = g_uni * bw * clamp_min_grad(bh_raw, lit<A>(0));
  ga.x1 = -g_iw * dmax_da(a.x1, b.x1) - g_aw;
  ga.x2 = g_iw * dmin_da(a.x2, b.x2) + g_aw;
  ga.y1 = -g_ih * dmax_da(a.y1, b.y1) - g_ah;
  ga.y2 = g_ih * dmin_da(a.y2, b.y2) + g_ah;
  gb.x1 = -g_iw * dmax_da(b.x1, a.x1) - g_bw;
  gb.x2 = g_iw * dmin_da(b.x2, a.x2) + g_bw;
  gb.y1 = -g_ih * dmax_da(b.y1, a.y1) - g_bh;
  gb.y2 = g_ih * dmin_da(b.y2, a.y2) + g_bh;
}

}  // namespace tbd_ops
