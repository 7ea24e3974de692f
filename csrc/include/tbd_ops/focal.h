// Sigmoid focal loss (RetinaNet; SPEC 2.4) of one logit against a one-hot
// target bit, and its derivative. Shared by the CPU and CUDA kernels.
//
// With p = sigmoid(x) and q = 1 - p = sigmoid(-x):
//   target 1: loss = -alpha       * q^gamma * log(p)
//   target 0: loss = -(1 - alpha) * p^gamma * log(q)
// p and q are computed separately from e = exp(-|x|) (no 1 - p cancellation):
// 1 / (1 + e) and e times it; log(p) and log(q) as log-sigmoids,
// min(x, 0) - log1p(e), finite for every finite logit and equal to
// binary_cross_entropy_with_logits (torchvision) to rounding. In float, exp
// and log1p are the branch-free polynomials of math.h (within 1 ulp of the
// correctly rounded values) and the selects work on bit patterns, so that CPU
// loops vectorize and every device computes the same bits; in double, libm.
// Both logs are clamped below at log(FLT_MIN) (the SPEC's "log clamped at the
// smallest positive float", mmcv's log(max(p, FLT_MIN)), taken in log space),
// for every accumulation type: the clamp binds only for |x| > 87.3 (and
// infinite logits), so the loss is finite for every non-NaN logit. NaN
// propagates.
// Derivative (as mmcv's backward: d log(p)/dx = q also where the clamp binds,
// so a confidently wrong logit keeps its gradient):
//   target 1: dloss/dx = alpha       * q^gamma * (gamma * p * log(p) - q)
//   target 0: dloss/dx = (1 - alpha) * p^gamma * (p - gamma * q * log(q))
#pragma once

#include "tbd_ops/math.h"

namespace tbd_ops {

enum class FocalReduction : int { kNone = 0, kSum = 1, kMean = 2 };

// log(FLT_MIN) = -126 * log(2): the floor of log(p) and log(1 - p).
constexpr double kFocalLogMin = -87.336544750553102;

// b^gamma as torch.pow(tensor, gamma) computes it for the common exponents
// (gamma = 0 gives 1, NaN included; 1 gives b; 2 gives b * b); any other
// gamma >= 0 by pow in the accumulation type. G = 0, 1, 2 fixes the exponent
// at compile time (for loops that vectorize), with the same results as the
// run-time choice (G = kFocalGammaAny) for that gamma.
constexpr int kFocalGammaAny = -1;
template <typename A, int G = kFocalGammaAny> TBD_HD_INLINE A focal_pow(A b, A gamma) {
  if (G == 0 || (G == kFocalGammaAny && gamma == A(0))) return A(1);
  if (G == 1 || (G == kFocalGammaAny && gamma == A(1))) return b;
  if (G == 2 || (G == kFocalGammaAny && gamma == A(2))) return b * b;
  return math_pow(b, gamma);
}

// exp(-|x|) and log1p(exp(-|x|)): float by the branch-free polynomials of
// math.h (loops over them vectorize; the same bits on every device); double by
// libm (full double precision).
TBD_HD_INLINE float focal_exp_neg_abs(float x) { return exp_nonpositive(x); }  // exp(-|x|)
TBD_HD_INLINE double focal_exp_neg_abs(double x) { return math_exp(x < 0.0 ? x : -x); }
TBD_HD_INLINE float focal_log1p(float e) { return log1p_unit(e); }
TBD_HD_INLINE double focal_log1p(double e) { return math_log1p(e); }

template <typename A> struct FocalParts {
  A p, q;          // sigmoid(x), sigmoid(-x)
  A log_p, log_q;  // clamped log-sigmoids
};

template <typename A> TBD_HD_INLINE FocalParts<A> focal_parts(A x) {
  // x < 0 decided by the sign bit in float (select_sign): -0 and +0 give the
  // same parts, and a NaN gives NaN parts either way.
  const A e = focal_exp_neg_abs(x);  // exp(-|x|) in [0, 1]; NaN propagates from here
  const A big = A(1) / (A(1) + e);   // sigmoid(|x|)
  const A small = e * big;           // sigmoid(-|x|)
  const A l1p = focal_log1p(e);
  FocalParts<A> f;
  f.p = select_sign(x, small, big);
  f.q = select_sign(x, big, small);
  const A lo = static_cast<A>(kFocalLogMin);
  // log sigmoid(x) = min(x, 0) - log1p(e); log sigmoid(-x) = min(-x, 0) - log1p(e).
  f.log_p = clamp_min_negative(select_sign(x, x, A(0)) - l1p, lo);
  f.log_q = clamp_min_negative(select_sign(x, A(0), -x) - l1p, lo);
  return f;
}

// Loss and derivative of one element from its parts (target bit `pos`: the
// element's class is the RoI's target), for callers that need both.
template <typename A, int G = kFocalGammaAny>
TBD_HD_INLINE A focal_loss_of(const FocalParts<A>& f, bool pos, A gamma, A alpha) {
  if (pos) return -alpha * focal_pow<A, G>(f.q, gamma) * f.log_p;
  return -(A(1) - alpha) * focal_pow<A, G>(f.p, gamma) * f.log_q;
}

template <typename A, int G = kFocalGammaAny>
TBD_HD_INLINE A focal_grad_of(const FocalParts<A>& f, bool pos, A gamma, A alpha) {
  if (pos) return alpha * focal_pow<A, G>(f.q, gamma) * (gamma * f.p * f.log_p - f.q);
  return (A(1) - alpha) * focal_pow<A, G>(f.p, gamma) * (f.p - gamma * f.q * f.log_q);
}

// Loss of one element.
template <typename A, int G = kFocalGammaAny> TBD_HD_INLINE A focal_loss(A x, bool pos, A gamma, A alpha) {
  return focal_loss_of<A, G>(focal_parts(x), pos, gamma, alpha);
}

// d focal_loss / dx.
template <typename A, int G = kFocalGammaAny> TBD_HD_INLINE A focal_grad(A x, bool pos, A gamma, A alpha) {
  return focal_grad_of<A, G>(focal_parts(x), pos, gamma, alpha);
}

// Whether a target lies in [0, C] (C = background).
TBD_HD bool focal_target_ok(int64_t t, int64_t C) { return t >= 0 && t <= C; }

}  // namespace tbd_ops
