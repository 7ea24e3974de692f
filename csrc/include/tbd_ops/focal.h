// Sigmoid focal loss (RetinaNet; SPEC 2.4) of one logit against a one-hot
// target bit, and its derivative. Shared by the CPU and CUDA kernels.
//
// With p = sigmoid(x) and q = 1 - p = sigmoid(-x):
//   target 1: loss = -alpha       * q^gamma * log(p)
//   target 0: loss = -(1 - alpha) * p^gamma * log(q)
// p and q are computed separately from e = exp(-|x|) (no 1 - p cancellation),
// log(p) and log(q) as log-sigmoids: min(x, 0) - log1p(e), finite for every
// finite logit and equal to binary_cross_entropy_with_logits (torchvision) to
// rounding. Both logs are clamped below at log(FLT_MIN) (the SPEC's "log
// clamped at the smallest positive float", mmcv's log(max(p, FLT_MIN)), taken
// in log space), for every accumulation type: the clamp binds only for
// |x| > 87.3 (and infinite logits), so the loss is finite for every non-NaN
// logit. NaN propagates.
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
// gamma >= 0 by pow in the accumulation type.
template <typename A> TBD_HD A focal_pow(A b, A gamma) {
  if (gamma == A(0)) return A(1);
  if (gamma == A(1)) return b;
  if (gamma == A(2)) return b * b;
  return math_pow(b, gamma);
}

template <typename A> struct FocalParts {
  A p, q;          // sigmoid(x), sigmoid(-x)
  A log_p, log_q;  // clamped log-sigmoids
};

template <typename A> TBD_HD FocalParts<A> focal_parts(A x) {
  const bool neg = x < A(0);
  const A e = math_exp(neg ? x : -x);  // exp(-|x|); NaN propagates from here
  const A big = A(1) / (A(1) + e);  // sigmoid(|x|)
  const A small = e / (A(1) + e);   // sigmoid(-|x|)
  const A l1p = math_log1p(e);
  FocalParts<A> f;
  f.p = neg ? small : big;
  f.q = neg ? big : small;
  const A lo = static_cast<A>(kFocalLogMin);
  // log sigmoid(x) = min(x, 0) - log1p(e); log sigmoid(-x) = min(-x, 0) - log1p(e).
  f.log_p = clamp_min_val((neg ? x : A(0)) - l1p, lo);
  f.log_q = clamp_min_val((neg ? A(0) : -x) - l1p, lo);
  return f;
}

// Loss and derivative of one element from its parts (target bit `pos`: the
// element's class is the RoI's target), for callers that need both.
template <typename A> TBD_HD A focal_loss_of(const FocalParts<A>& f, bool pos, A gamma, A alpha) {
  if (pos) return -alpha * focal_pow(f.q, gamma) * f.log_p;
  return -(A(1) - alpha) * focal_pow(f.p, gamma) * f.log_q;
}

template <typename A> TBD_HD A focal_grad_of(const FocalParts<A>& f, bool pos, A gamma, A alpha) {
  if (pos) return alpha * focal_pow(f.q, gamma) * (gamma * f.p * f.log_p - f.q);
  return (A(1) - alpha) * focal_pow(f.p, gamma) * (f.p - gamma * f.q * f.log_q);
}

// Loss of one element.
template <typename A> TBD_HD A focal_loss(A x, bool pos, A gamma, A alpha) {
  return focal_loss_of(focal_parts(x), pos, gamma, alpha);
}

// d focal_loss / dx.
template <typename A> TBD_HD A focal_grad(A x, bool pos, A gamma, A alpha) {
  return focal_grad_of(focal_parts(x), pos, gamma, alpha);
}

// Whether a target lies in [0, C] (C = background).
TBD_HD bool focal_target_ok(int64_t t, int64_t C) { return t >= 0 && t <= C; }

}  // namespace tbd_ops
