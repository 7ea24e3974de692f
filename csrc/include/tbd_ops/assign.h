// Prediction-guided label assignment (PseCo, SPEC 2.1): the per-proposal
// quality, the dynamic k of a bag and the order bag members are ranked in.
// Shared by the CPU and CUDA kernels; the IoU is box_iou of tbd_ops/box.h.
#pragma once

#include "tbd_ops/macros.h"

namespace tbd_ops {

TBD_HD float math_sqrt(float v) { return sqrtf(v); }
TBD_HD double math_sqrt(double v) { return sqrt(v); }
TBD_HD float math_floor(float v) { return floorf(v); }
TBD_HD double math_floor(double v) { return floor(v); }

// v^e for an exponent e in [0, 1], as torch.pow(tensor, e) computes it:
// e = 0 gives 1 (NaN included), e = 1 gives v, e = 0.5 the correctly rounded
// square root; any other exponent is evaluated in double and rounded once.
template <typename A> TBD_HD A pow_unit(A v, double e) {
  if (e == 0.0) return A(1);
  if (e == 1.0) return v;
  if (e == 0.5) return math_sqrt(v);
  return static_cast<A>(pow(static_cast<double>(v), e));
}

// Quality of a proposal with teacher score s (for the pseudo box's class) and
// IoU u: s^alpha * u^(1 - alpha); beta = 1 - alpha, computed in double.
template <typename A> TBD_HD A assign_quality(A s, A u, double alpha, double beta) {
  return pow_unit(s, alpha) * pow_unit(u, beta);
}

// Whether member a (value va, proposal index pa) is ranked before member b:
// values in descending order with NaN above everything (torch.sort's order),
// equal values by increasing proposal index. A strict total order, so every
// member of a bag has a unique rank: the number of members ranked before it.
template <typename A> TBD_HD bool ranks_before(A va, int64_t pa, A vb, int64_t pb) {
  const bool na = is_nan(va), nb = is_nan(vb);
  if (na || nb) return na && (!nb || pa < pb);
  return va > vb || (va == vb && pa < pb);
}

// k of a bag from the sum of its largest IoUs (added in descending order):
// max(1, floor(sum)).
template <typename A> TBD_HD int64_t dynamic_k(A sum) {
  if (!(sum >= A(2))) return 1;  // also NaN
  if (sum >= A(4.0e18)) return int64_t(4000000000000000000);
  return static_cast<int64_t>(math_floor(sum));
}

}  // namespace tbd_ops
