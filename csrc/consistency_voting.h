// consistency_voting (PseCo, SPEC 2.2): the validated problem shared by the
// CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <vector>

#include "common.h"
#include "tbd_ops/voting.h"

namespace tbd_ops {

struct VotingProblem {
  int64_t N = 0;  // images
  int64_t R = 0;  // RoIs of all images
  int64_t M = 0;  // pseudo boxes of all images
  std::vector<int64_t> r_offsets;  // N + 1, into the rows of pred_boxes / gt_inds
  std::vector<int64_t> m_offsets;  // N + 1, into the rows of pseudo_boxes
  at::Tensor pseudo_boxes;         // contiguous [M, 4]
  VotingMode mode = VotingMode::kPseCo;
};

// Checks every argument (raising ValueError/TypeError naming it) and returns
// the problem. pred_boxes and gt_inds are read in place, with their strides.
VotingProblem voting_prepare(const char* op, const at::Tensor& pred_boxes,
                             const at::Tensor& gt_inds, const at::Tensor& pseudo_boxes,
                             at::IntArrayRef roi_counts, at::IntArrayRef pseudo_counts,
                             c10::string_view mode);

}  // namespace tbd_ops
