// prediction_guided_assign (PseCo's prediction-guided label assignment):
// schema, argument checks, autocast, CUDA registration, autograd. Kernels:
// csrc/cpu/prediction_guided_assign.cpp, cuda/prediction_guided_assign.cu; fake kernel:
// python/tbd_ops/ops/prediction_guided_assign.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "prediction_guided_assign.h"

#if TBD_OPS_CUDA_GLUE
#include "../cuda/prediction_guided_assign.h"
#include "cuda_glue.h"
#endif

namespace tbd_ops {

AssignProblem assign_prepare(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                             const at::Tensor& pseudo_boxes, const at::Tensor& pseudo_labels,
                             at::IntArrayRef proposal_counts, at::IntArrayRef pseudo_counts,
                             const c10::optional<at::Tensor>& valid, double iou_thr, int64_t topk,
                             double alpha) {
  AssignProblem pb;
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, op,
                    ": boxes must be [P, 4], got shape ", boxes.sizes());
  check_float(op, "boxes", boxes);
  pb.P = boxes.size(0);
  TORCH_CHECK_VALUE(scores.dim() == 2 && scores.size(0) == pb.P && scores.size(1) >= 1, op,
                    ": scores must be [P, C] with P = ", pb.P, " (the rows of boxes) and C >= 1,"
                    " got shape ", scores.sizes());
  check_same_dtype(op, "scores", scores, "boxes", boxes);
  pb.C = scores.size(1);
  TORCH_CHECK_VALUE(pseudo_boxes.dim() == 2 && pseudo_boxes.size(1) == 4, op,
                    ": pseudo_boxes must be [M, 4], got shape ", pseudo_boxes.sizes());
  check_same_dtype(op, "pseudo_boxes", pseudo_boxes, "boxes", boxes);
  pb.M = pseudo_boxes.size(0);
  TORCH_CHECK_VALUE(pseudo_labels.dim() == 1 && pseudo_labels.size(0) == pb.M, op,
                    ": pseudo_labels must be [M] with M = ", pb.M,
                    " (the rows of pseudo_boxes), got shape ", pseudo_labels.sizes());
  check_dtype(op, "pseudo_labels", pseudo_labels, at::kLong);
  check_same_device(op, "scores", scores, "boxes", boxes);
  check_same_device(op, "pseudo_boxes", pseudo_boxes, "boxes", boxes);
  check_same_device(op, "pseudo_labels", pseudo_labels, "boxes", boxes);
  if (valid.has_value() && valid->defined()) {
    const at::Tensor& v = *valid;
    TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == pb.P, op, ": valid must be [P] with P = ",
                      pb.P, " (the rows of boxes), got shape ", v.sizes());
    check_dtype(op, "valid", v, at::kBool);
    check_same_device(op, "valid", v, "boxes", boxes);
    pb.valid = v.contiguous();
  }
  pb.N = image_count(op, "proposal_counts", proposal_counts, "pseudo_counts", pseudo_counts);
  pb.p_offsets = image_offsets(op, "proposal_counts", proposal_counts, pb.P, "boxes");
  pb.m_offsets = image_offsets(op, "pseudo_counts", pseudo_counts, pb.M, "pseudo_boxes");
  TORCH_CHECK_VALUE(pb.P < std::numeric_limits<int32_t>::max() &&
                        pb.M < std::numeric_limits<int32_t>::max(),
                    op, ": at most 2^31 - 2 proposals and pseudo boxes per call, got ", pb.P,
                    " and ", pb.M);
  TORCH_CHECK_VALUE(std::isfinite(iou_thr) && iou_thr > 0 && iou_thr <= 1, op,
                    ": iou_thr must be a finite number in (0, 1], got ", iou_thr);
  TORCH_CHECK_VALUE(topk >= 1, op, ": topk must be >= 1, got ", topk);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, op, ": alpha must be a number in [0, 1], got ",
                    alpha);
  pb.iou_thr = iou_thr;
  pb.topk = topk;
  pb.alpha = alpha;
  pb.pseudo_boxes = pseudo_boxes.contiguous();
  pb.pseudo_labels = pseudo_labels.contiguous();
  return pb;
}

namespace {

using AssignSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef,
    c10::SymIntArrayRef, const c10::optional<at::Tensor>&, double, int64_t, double);

// Autocast: mixed floating dtypes (e.g. fp16 teacher scores, fp32 boxes) run
// in the widest of them; q comes back in that dtype.
std::tuple<at::Tensor, at::Tensor> assign_autocast(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& pseudo_boxes,
    const at::Tensor& pseudo_labels, c10::SymIntArrayRef proposal_counts,
    c10::SymIntArrayRef pseudo_counts, const c10::optional<at::Tensor>& valid, double iou_thr,
    int64_t topk, double alpha) {
  const AutocastOff off;
  static auto op = typed_op<AssignSig>(TBD_OPS_LIB_NAME "::prediction_guided_assign");
  const auto t = promote_dtype(boxes, scores, pseudo_boxes);
  if (!t) {
    return op.call(boxes, scores, pseudo_boxes, pseudo_labels, proposal_counts, pseudo_counts,
                   valid, iou_thr, topk, alpha);
  }
  return op.call(boxes.to(*t), scores.to(*t), pseudo_boxes.to(*t), pseudo_labels, proposal_counts,
                 pseudo_counts, valid, iou_thr, topk, alpha);
}

// Autograd: the assignment and its quality are targets of the loss, not differentiable;
// they come back with requires_grad false whatever requires a gradient.
std::tuple<at::Tensor, at::Tensor> assign_autograd(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& pseudo_boxes,
    const at::Tensor& pseudo_labels, c10::SymIntArrayRef proposal_counts,
    c10::SymIntArrayRef pseudo_counts, const c10::optional<at::Tensor>& valid, double iou_thr,
    int64_t topk, double alpha) {
  static auto op = typed_op<AssignSig>(TBD_OPS_LIB_NAME "::prediction_guided_assign");
  const at::AutoDispatchBelowADInplaceOrView below;
  return op.call(boxes, scores, pseudo_boxes, pseudo_labels, proposal_counts, pseudo_counts, valid, iou_thr,
                 topk, alpha);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def(
      "prediction_guided_assign(Tensor boxes, Tensor scores, Tensor pseudo_boxes,"
      " Tensor pseudo_labels, SymInt[] proposal_counts, SymInt[] pseudo_counts, Tensor? valid=None,"
      " float iou_thr=0.4, int topk=12, float alpha=0.5) -> (Tensor gt_inds, Tensor q)");
}

TBD_OPS_AUTOCAST_IMPL("prediction_guided_assign", TORCH_FN(assign_autocast))
TBD_OPS_IMPL(Autograd, "prediction_guided_assign", TORCH_FN(assign_autograd))

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/prediction_guided_assign.cu, the shared pieces csrc/cuda_glue.h.
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

std::tuple<at::Tensor, at::Tensor> prediction_guided_assign_cuda(const AssignProblem& pb,
                                                                 const at::Tensor& boxes,
                                                                 const at::Tensor& scores) {
  const DeviceGuard guard(boxes.device());
  auto gt_inds = cuda_glue::empty({pb.P}, boxes.options().dtype(at::kLong));
  auto q = cuda_glue::empty({pb.P}, boxes.options());
  cuda::AssignArgs a{};
  a.boxes = boxes.const_data_ptr();
  a.bs0 = boxes.stride(0);
  a.bs1 = boxes.stride(1);
  a.scores = scores.const_data_ptr();
  a.ss0 = scores.stride(0);
  a.ss1 = scores.stride(1);
  a.C = pb.C;
  a.pseudo_boxes = pb.pseudo_boxes.const_data_ptr();
  a.pseudo_labels = pb.pseudo_labels.const_data_ptr<int64_t>();
  a.valid = pb.valid.defined() ? pb.valid.const_data_ptr<bool>() : nullptr;
  a.p_offsets = pb.p_offsets.data();
  a.m_offsets = pb.m_offsets.data();
  a.N = pb.N;
  a.iou_thr = pb.iou_thr;
  a.alpha = pb.alpha;
  a.eps = kIouEps;
  a.topk = pb.topk;
  const auto dt = dtype_of(boxes);
  const size_t ws_bytes = cuda::prediction_guided_assign_workspace(dt, a);
  at::Tensor workspace = cuda_glue::empty({static_cast<int64_t>(ws_bytes)},
                                          boxes.options().dtype(at::kByte));
  launch([&] {
    cuda::prediction_guided_assign(dt, a, gt_inds.mutable_data_ptr<int64_t>(),
                                   q.mutable_data_ptr(),
                                   ws_bytes ? workspace.mutable_data_ptr() : nullptr,
                                   current_stream());
  });
  return {gt_inds, q};
}

}  // namespace

TBD_OPS_IMPL(TBD_OPS_CUDA_KEY, "prediction_guided_assign",
    TORCH_FN(prediction_guided_assign_kernel<prediction_guided_assign_cuda>))

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
