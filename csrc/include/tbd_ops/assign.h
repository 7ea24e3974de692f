// Prediction-guided label assignment (PseCo, SPEC 2.1): the per-proposal
// quality, the dynamic k of a bag and the order bag members are ranked in.
// Shared by the CPU and CUDA kernels; the IoU is box_iou of tbd_ops/box.h.
#pragma once

#include "tbd_ops/math.h"

namespace tbd_ops {

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

// The sum of a bag's min(|bag|, topk) largest IoUs, for the dynamic k, kept
// exactly: `hi` is the double sum and `lo` gathers the exact rounding error of
// each addition (Knuth's TwoSum), so hi + lo is the exact sum of the added
// values whenever those errors add up exactly in `lo` (for IoUs, values in
// [2^-30, 1], up to 2^10 of them: float32 and float64 inputs alike). float32
// IoUs even add up exactly in `hi` alone (lo stays 0). No multiplication, so
// no FMA contraction can change the result.
struct BagSum {
  double hi, lo;
};

TBD_HD BagSum bag_sum_empty() { return BagSum{0.0, 0.0}; }

TBD_HD void bag_sum_add(BagSum& s, double v) {
  const double t = s.hi + v;
  const double vt = t - s.hi;  // the part of v that made it into t
  s.lo += (s.hi - (t - vt)) + (v - vt);
  s.hi = t;
}

// k of a bag, max(1, floor(hi + lo)) with the floor of the exact sum, not of
// a rounded one: a sum of IoUs that is exactly an integer (the official
// example 1 + .85 + .85 + .75 + .65 + .45 + .45 = 5 in float32) gives that
// integer, where a float32 running sum gives 4.9999995.
TBD_HD int64_t dynamic_k(const BagSum& s) {
  if (!(s.hi >= 1.0)) return 1;  // the exact sum is below 2 (also NaN)
  if (s.hi >= 4.0e18) return int64_t(4000000000000000000);
  double f = math_floor(s.hi);
  const double r = s.hi - f;  // exact: 0 <= r < 1
  if (s.lo < -r) {
    f -= 1.0;  // the exact sum lies below floor(hi)
  } else if (s.lo >= 1.0 - r) {
    f += 1.0;  // the exact sum reaches floor(hi) + 1
  }
  return f < 2.0 ? int64_t(1) : static_cast<int64_t>(f);
}

}  // namespace tbd_ops
