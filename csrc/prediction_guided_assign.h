// prediction_guided_assign (PseCo, SPEC 2.1): the validated problem shared by
// the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>
#include <vector>

#include "common.h"

namespace tbd_ops {

struct AssignProblem {
  int64_t N = 0;   // images
  int64_t P = 0;   // proposals of all images
  int64_t M = 0;   // pseudo boxes of all images
  int64_t C = 0;   // classes (columns of scores)
  std::vector<int64_t> p_offsets;  // N + 1, into the rows of boxes / scores / valid
  std::vector<int64_t> m_offsets;  // N + 1, into the rows of pseudo_boxes / pseudo_labels
  at::Tensor pseudo_boxes;         // contiguous [M, 4]
  at::Tensor pseudo_labels;        // contiguous [M] int64
  at::Tensor valid;                // contiguous [P] bool, or undefined
  double iou_thr = 0.4, alpha = 0.5;
  int64_t topk = 12;
};

// Checks every argument (raising ValueError/TypeError naming it) and returns
// the problem. boxes and scores are read in place, with their strides.
AssignProblem assign_prepare(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                             const at::Tensor& pseudo_boxes, const at::Tensor& pseudo_labels,
                             at::IntArrayRef proposal_counts, at::IntArrayRef pseudo_counts,
                             const c10::optional<at::Tensor>& valid, double iou_thr, int64_t topk,
                             double alpha);

// The kernel of prediction_guided_assign on one backend, from its function of
// the validated problem: the arguments are checked (assign_prepare), then
// Impl(pb, boxes, scores) runs.
using AssignImpl = std::tuple<at::Tensor, at::Tensor> (*)(const AssignProblem& pb,
                                                          const at::Tensor& boxes,
                                                          const at::Tensor& scores);

template <AssignImpl Impl>
std::tuple<at::Tensor, at::Tensor> prediction_guided_assign_kernel(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& pseudo_boxes,
    const at::Tensor& pseudo_labels, at::IntArrayRef proposal_counts,
    at::IntArrayRef pseudo_counts, const c10::optional<at::Tensor>& valid, double iou_thr,
    int64_t topk, double alpha) {
  return Impl(assign_prepare("prediction_guided_assign", boxes, scores, pseudo_boxes,
                             pseudo_labels, proposal_counts, pseudo_counts, valid, iou_thr, topk,
                             alpha),
              boxes, scores);
}

}  // namespace tbd_ops
