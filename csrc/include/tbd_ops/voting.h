// Positive-proposal consistency voting (PseCo, SPEC 2.2): the per-RoI weight
// and the batch factor from the per-pseudo-box mean IoU. Shared by the CPU and
// CUDA kernels; the IoU is box_iou of tbd_ops/box.h.
#pragma once

#include "tbd_ops/math.h"

namespace tbd_ops {

enum class VotingMode : int { kPseCo = 0, kPaper = 1 };

// eps of the batch factor's denominator.
constexpr double kVotingEps = 1e-6;

// sigma_j: the mean of the `count` IoUs adding up to `sum`; 0 without positives.
template <typename A> TBD_HD A voting_mean(A sum, int64_t count) {
  return count > 0 ? sum / static_cast<A>(count) : A(0);
}

// The regression weight of a positive of a pseudo box with mean IoU sigma:
// sigma^2 (PseCo's implementation) or sigma (the paper).
template <typename A> TBD_HD A voting_weight(A sigma, VotingMode mode) {
  return mode == VotingMode::kPseCo ? sigma * sigma : sigma;
}

// The batch factor: sum sigma(r) / max(sum sigma(r)^2, eps) over the positives
// (0 when there is none); 1 in the paper's mode.
template <typename A> TBD_HD A voting_scale(A num, A den, VotingMode mode) {
  if (mode == VotingMode::kPaper) return A(1);
  return num / clamp_min_val(den, static_cast<A>(kVotingEps));
}

// Whether gt is a positive of one of the image's M pseudo boxes (1 <= gt <= M).
TBD_HD bool voting_positive(int64_t gt, int64_t M) { return gt >= 1 && gt <= M; }

}  // namespace tbd_ops
