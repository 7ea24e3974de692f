// Per-element math of the masked reductions (SPEC 1.5), one op family holding
// masked_sq_dist and masked_l1:
//   out[n, k] = sum_hw masks[n, k, hw] * s[n, hw],  s[n, hw] = sum_c term(a - b)
// with term(d) = d^2 (masked_sq_dist) or |d| (masked_l1). Shared by the CPU and
// CUDA kernels so that per-element results (s, the gradients) agree bit for bit.
//
// s[n, hw] is summed in kMaskedGroups groups: channel c goes to group c % 8,
// each group sums its channels in increasing order from +0, and the groups are
// combined by masked_group_tree. Every kernel (CPU, and each CUDA variant: one
// thread per location, a warp per group, a lane per group) keeps this order.
#pragma once

#include "tbd_ops/dispatch.h"
#include "tbd_ops/math.h"

namespace tbd_ops {

enum class MaskedMode : int { kSqDist = 0, kL1 = 1 };

// f(std::integral_constant<MaskedMode, mode>{}) for the code of each mode (host code).
template <typename F> void dispatch_masked_mode(MaskedMode mode, F&& f) {
  dispatch_mode<MaskedMode::kSqDist, MaskedMode::kL1>(mode, f);
}

constexpr int kMaskedGroups = 8;

// The fixed combination of the 8 group sums: ((g0 + g4) + (g2 + g6)) +
// ((g1 + g5) + (g3 + g7)) -- the order of a butterfly over lanes 4, 2, 1.
template <typename A> TBD_HD A masked_group_tree(const A g[kMaskedGroups]) {
  return ((g[0] + g[4]) + (g[2] + g[6])) + ((g[1] + g[5]) + (g[3] + g[7]));
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
