// Per-element math of the harmony family (SPEC 1.3, 1.4): the harmony score
//   HS(p_c, p_r) = 1 - tanh(|p_r - p_c|)
// and the terms of the harmony distillation loss
//   plain:      L = sum_l mean_n (1 / (H_l W_l)) sum_hw |HS^t - HS^s|
//   iou_guided: L = sum_l mean_n sum_hw psi |HS^t - HS^s| / max(sum_hw psi, eps),
//               psi = p_r^t * sqrt(1 + |p_c^t - p_c^s|)   (a constant: no gradient)
// Shared by the CPU and CUDA kernels so that per-element results (the score,
// the gradients) agree bit for bit between the CPU kernels and the emulated
// CUDA build: both call the same libm tanhf / tanh. On a real GPU, CUDA's
// tanhf / tanh may differ from the host's by a few ulps (sqrt is correctly
// rounded on both).
#pragma once

#include "tbd_ops/dispatch.h"
#include "tbd_ops/math.h"

namespace tbd_ops {

enum class HarmonyMode : int { kIouGuided = 0, kPlain = 1 };

// f(std::integral_constant<HarmonyMode, mode>{}) for the code of each mode (host code).
template <typename F> void dispatch_harmony_mode(HarmonyMode mode, F&& f) {
  dispatch_mode<HarmonyMode::kIouGuided, HarmonyMode::kPlain>(mode, f);
}

// tanh(|p_r - p_c|), the quantity the score and its gradient are built from.
template <typename A> TBD_HD A harmony_tanh(A p_c, A p_r) { return math_tanh(abs_val(p_r - p_c)); }

// HS = 1 - tanh(|p_r - p_c|).
template <typename A> TBD_HD A harmony_score(A p_c, A p_r) { return A(1) - harmony_tanh(p_c, p_r); }

// dHS / dp_r = -(1 - tanh^2(|d|)) * sign(d), d = p_r - p_c; dHS / dp_c is its
// negation. Written as autograd chains 1 - tanh(|d|): tanh' from the output.
template <typename A> TBD_HD A harmony_dpr(A p_c, A p_r) {
  const A d = p_r - p_c;
  const A t = math_tanh(abs_val(d));
  return -((A(1) - t * t) * sign_val(d));
}

// Gradient of the score with respect to p_r for an incoming gradient g
// (the gradient with respect to p_c is its negation).
template <typename A> TBD_HD A harmony_grad_pr(A g, A p_c, A p_r) { return g * harmony_dpr(p_c, p_r); }

// Weight of one location in the loss: psi (iou_guided) or 1 (plain).
template <HarmonyMode M, typename A> TBD_HD A hd_weight(A pc_s, A pc_t, A pr_t) {
  if (M == HarmonyMode::kPlain) return A(1);
  return pr_t * math_sqrt(A(1) + abs_val(pc_t - pc_s));
}

// One location's contribution before normalization: w * |HS^t - HS^s|.
template <typename A> TBD_HD A hd_term(A w, A hs_s, A hs_t) { return w * abs_val(hs_t - hs_s); }

// Normalizer of image n at a level: the factor its sum_hw w |HS^t - HS^s| is
// multiplied by in the loss, mean over the N images included:
//   plain 1 / (HW * N); iou_guided 1 / (max(sum_hw psi, eps) * N)
// (NaN in the sum propagates). A level without locations contributes 0.
template <HarmonyMode M, typename A> TBD_HD A hd_norm(A weight_sum, int64_t hw, int64_t n, A eps) {
  if (hw == 0) return A(0);
  const A denom = M == HarmonyMode::kPlain ? A(hw) : max_nan(weight_sum, eps);
  return A(1) / (denom * A(n));
}

// Gradients of the loss at one location of the student: coef = grad * norm
// (the incoming gradient times the normalizer of the location's image and
// level). d loss / d HS^s = coef * w * sign(HS^s - HS^t); then through the
// score. Returns d loss / d p_r^s; d loss / d p_c^s is its negation (psi is a
// constant, so p_c^s gets nothing through the weight).
template <typename A> TBD_HD A hd_grad_pr(A coef, A w, A pc_s, A pr_s, A hs_t) {
  const A d = pr_s - pc_s;
  const A t = math_tanh(abs_val(d));  // the same operations as harmony_score / harmony_dpr
  const A hs_s = A(1) - t;
  const A g_hs = coef * w * sign_val(hs_s - hs_t);
  return g_hs * -((A(1) - t * t) * sign_val(d));
}

}  // namespace tbd_ops
