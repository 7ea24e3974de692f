// sigmoid_focal_loss (SPEC 2.4): schemas and argument checks.
// Kernels: csrc/cpu/sigmoid_focal_loss.cpp, cuda/sigmoid_focal_loss.cu; fake
// kernels and autograd: python/tbd_ops/ops/sigmoid_focal_loss.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "sigmoid_focal_loss.h"

namespace tbd_ops {

FocalReduction focal_check(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                           const c10::optional<at::Tensor>& weight, double gamma, double alpha,
                           c10::string_view reduction) {
  FocalReduction red = FocalReduction::kSum;
  if (reduction == "none") {
    red = FocalReduction::kNone;
  } else if (reduction == "sum") {
    red = FocalReduction::kSum;
  } else if (reduction == "mean") {
    red = FocalReduction::kMean;
  } else {
    TORCH_CHECK_VALUE(false, op, ": reduction must be \"none\", \"sum\" or \"mean\", got \"",
                      reduction, "\"");
  }
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be a 2-D tensor [R, C], got a ",
                    logits.dim(), "-D tensor of shape ", logits.sizes());
  check_float(op, "logits", logits);
  const int64_t R = logits.size(0);
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == R, op,
                    ": targets must be [R] with R = ", R, " (the rows of logits), got shape ",
                    targets.sizes());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, op, ": targets must be int64, got ",
                   targets.scalar_type());
  TORCH_CHECK_VALUE(targets.device() == logits.device(), op,
                    ": targets must be on the device of logits (", logits.device(), "), got ",
                    targets.device());
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == R, op, ": weight must be [R] with R = ", R,
                      " (the rows of logits), got shape ", w.sizes());
    check_float(op, "weight", w);
    TORCH_CHECK_VALUE(w.device() == logits.device(), op,
                      ": weight must be on the device of logits (", logits.device(), "), got ",
                      w.device());
  }
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0, op,
                    ": gamma must be a finite number >= 0, got ", gamma);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, op, ": alpha must be a number in [0, 1], got ",
                    alpha);
  return red;
}

FocalReduction focal_backward_check(const char* op, const at::Tensor& grad,
                                    const at::Tensor& logits, const at::Tensor& targets,
                                    const c10::optional<at::Tensor>& weight, double gamma,
                                    double alpha, c10::string_view reduction) {
  const FocalReduction red = focal_check(op, logits, targets, weight, gamma, alpha, reduction);
  if (red == FocalReduction::kNone) {
    TORCH_CHECK_VALUE(grad.sizes() == logits.sizes(), op, ": grad must have the shape of logits ",
                      logits.sizes(), " for reduction \"none\", got ", grad.sizes());
    TORCH_CHECK_TYPE(grad.scalar_type() == logits.scalar_type(), op,
                     ": grad must have the dtype of logits (", logits.scalar_type(), "), got ",
                     grad.scalar_type());
  } else {
    TORCH_CHECK_VALUE(grad.dim() == 0, op, ": grad must be a 0-d tensor for reduction \"",
                      reduction, "\", got shape ", grad.sizes());
    TORCH_CHECK_TYPE(grad.scalar_type() == acc_dtype(logits.scalar_type()), op,
                     ": grad must be ", acc_dtype(logits.scalar_type()), ", got ",
                     grad.scalar_type());
  }
  TORCH_CHECK_VALUE(grad.device() == logits.device(), op, ": grad must be on the device of logits (",
                    logits.device(), "), got ", grad.device());
  return red;
}

at::Tensor focal_weight_acc(const at::Tensor& logits, const c10::optional<at::Tensor>& weight) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  return weight->to(acc_dtype(logits.scalar_type())).contiguous();
}

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def(
      "sigmoid_focal_loss(Tensor logits, Tensor targets, Tensor? weight=None, float gamma=2.0,"
      " float alpha=0.25, str reduction=\"sum\") -> Tensor");
  m.def(
      "_sigmoid_focal_loss_backward(Tensor grad, Tensor logits, Tensor targets, Tensor? weight,"
      " float gamma, float alpha, str reduction, bool[2] output_mask)"
      " -> (Tensor grad_logits, Tensor grad_weight)");
}

}  // namespace tbd_ops
