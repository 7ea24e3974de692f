// Per-element math of the masked reductions (SPEC 1.5), one op family holding
// masked_sq_dist and masked_l1:
//   out[n, k] = sum_hw masks[n, k, hw] * s[n, hw],  s[n, hw] = sum_c term(a - b)
// with term(d) = d^2 (masked_sq_dist) or |d| (masked_l1). Shared by the CPU and
// CUDA kernels so that per-element results (s, the gradients) agree bit for bit.
#pragma once

#include "tbd_ops/dispatch.h"
#include "tbd_ops/math.h"

namespace tbd_ops {

enum class MaskedMode : int { kSqDist = 0, kL1 = 1 };

// f(std::integral_constant<MaskedMode, mode>{}) for the code of each mode (host code).
template <typename F> void dispatch_masked_mode(MaskedMode mode, F&& f) {
  dispatch_mode<MaskedMode::kSqDist, MaskedMode::kL1>(mode, f);
}

// term(d): d * d or |d| (NaN stays NaN).
template <MaskedMode M, typename A> TBD_HD A masked_term(A d) {
  if (M == MaskedMode::kSqDist) return d * d;
  return abs_val(d);
}

// d term / d d: 2 d, or sign(d) as autograd takes it for |d| (torch.sign:
// sign(0) = 0, and sign(NaN) = 0 too).
template <MaskedMode M, typename A> TBD_HD A masked_term_grad(A d) {
  if (M == MaskedMode::kSqDist) return A(2) * d;
  return sign_val(d);
}

// Gradient of out with respect to a at one element: term'(a - b) * w, where
// w[n, hw] = sum_k grad[n, k] * masks[n, k, hw] (summed in k order). The
// gradient with respect to b is its negation.
template <MaskedMode M, typename A> TBD_HD A masked_grad_a(A d, A w) {
  return masked_term_grad<M>(d) * w;
}

}  // namespace tbd_ops
