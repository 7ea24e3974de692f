// consistency_voting (PseCo's positive-proposal consistency voting): schema
// and argument checks. Kernels: csrc/cpu/consistency_voting.cpp,
// cuda/consistency_voting.cu; fake kernel and autograd:
// python/tbd_ops/ops/consistency_voting.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "consistency_voting.h"

namespace tbd_ops {

VotingProblem voting_prepare(const char* op, const at::Tensor& pred_boxes,
                             const at::Tensor& gt_inds, const at::Tensor& pseudo_boxes,
                             at::IntArrayRef roi_counts, at::IntArrayRef pseudo_counts,
                             c10::string_view mode) {
  VotingProblem pb;
  if (mode == "pseco") {
    pb.mode = VotingMode::kPseCo;
  } else if (mode == "paper") {
    pb.mode = VotingMode::kPaper;
  } else {
    TORCH_CHECK_VALUE(false, op, ": mode must be \"pseco\" or \"paper\", got \"", mode, "\"");
  }
  TORCH_CHECK_VALUE(pred_boxes.dim() == 2 && pred_boxes.size(1) == 4, op,
                    ": pred_boxes must be [R, 4], got shape ", pred_boxes.sizes());
  check_float(op, "pred_boxes", pred_boxes);
  pb.R = pred_boxes.size(0);
  TORCH_CHECK_VALUE(gt_inds.dim() == 1 && gt_inds.size(0) == pb.R, op,
                    ": gt_inds must be [R] with R = ", pb.R, " (the rows of pred_boxes), got shape ",
                    gt_inds.sizes());
  TORCH_CHECK_TYPE(gt_inds.scalar_type() == at::kLong, op, ": gt_inds must be int64, got ",
                   gt_inds.scalar_type());
  TORCH_CHECK_VALUE(pseudo_boxes.dim() == 2 && pseudo_boxes.size(1) == 4, op,
                    ": pseudo_boxes must be [M, 4], got shape ", pseudo_boxes.sizes());
  TORCH_CHECK_TYPE(pseudo_boxes.scalar_type() == pred_boxes.scalar_type(), op,
                   ": pseudo_boxes must have the dtype of pred_boxes (", pred_boxes.scalar_type(),
                   "), got ", pseudo_boxes.scalar_type());
  pb.M = pseudo_boxes.size(0);
  const auto dev = pred_boxes.device();
  TORCH_CHECK_VALUE(gt_inds.device() == dev, op, ": gt_inds must be on the device of pred_boxes (",
                    dev, "), got ", gt_inds.device());
  TORCH_CHECK_VALUE(pseudo_boxes.device() == dev, op,
                    ": pseudo_boxes must be on the device of pred_boxes (", dev, "), got ",
                    pseudo_boxes.device());
  TORCH_CHECK_VALUE(roi_counts.size() == pseudo_counts.size(), op,
                    ": roi_counts and pseudo_counts must have one count per image each, got ",
                    roi_counts.size(), " and ", pseudo_counts.size());
  pb.N = static_cast<int64_t>(roi_counts.size());
  pb.r_offsets = image_offsets(op, "roi_counts", roi_counts, pb.R, "pred_boxes");
  pb.m_offsets = image_offsets(op, "pseudo_counts", pseudo_counts, pb.M, "pseudo_boxes");
  TORCH_CHECK_VALUE(pb.M < std::numeric_limits<int32_t>::max(), op,
                    ": at most 2^31 - 2 pseudo boxes per call, got ", pb.M);
  pb.pseudo_boxes = pseudo_boxes.contiguous();
  return pb;
}

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def(
      "consistency_voting(Tensor pred_boxes, Tensor gt_inds, Tensor pseudo_boxes,"
      " int[] roi_counts, int[] pseudo_counts, str mode=\"pseco\")"
      " -> (Tensor sigma, Tensor w, Tensor reg_scale)");
}

}  // namespace tbd_ops
