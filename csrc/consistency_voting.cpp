// consistency_voting (PseCo's positive-proposal consistency voting): schema,
// argument checks, autocast, CUDA registration, autograd. Kernels: csrc/cpu/consistency_voting.cpp,
// cuda/consistency_voting.cu; fake kernel: python/tbd_ops/ops/consistency_voting.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "consistency_voting.h"

#if TBD_OPS_CUDA_GLUE
#include "../cuda/consistency_voting.h"
#include "cuda_glue.h"
#endif

namespace tbd_ops {

namespace {
constexpr Option<VotingMode> kVotingModes[] = {{"pseco", VotingMode::kPseCo}, {"paper", VotingMode::kPaper}};
}  // namespace

VotingProblem voting_prepare(const char* op, const at::Tensor& pred_boxes,
                             const at::Tensor& gt_inds, const at::Tensor& pseudo_boxes,
                             at::IntArrayRef roi_counts, at::IntArrayRef pseudo_counts,
                             c10::string_view mode) {
  VotingProblem pb;
  pb.mode = parse_option(op, "mode", mode, kVotingModes);
  TORCH_CHECK_VALUE(pred_boxes.dim() == 2 && pred_boxes.size(1) == 4, op,
                    ": pred_boxes must be [R, 4], got shape ", pred_boxes.sizes());
  check_float(op, "pred_boxes", pred_boxes);
  pb.R = pred_boxes.size(0);
  TORCH_CHECK_VALUE(gt_inds.dim() == 1 && gt_inds.size(0) == pb.R, op,
                    ": gt_inds must be [R] with R = ", pb.R, " (the rows of pred_boxes), got shape ",
                    gt_inds.sizes());
  check_dtype(op, "gt_inds", gt_inds, at::kLong);
  TORCH_CHECK_VALUE(pseudo_boxes.dim() == 2 && pseudo_boxes.size(1) == 4, op,
                    ": pseudo_boxes must be [M, 4], got shape ", pseudo_boxes.sizes());
  check_same_dtype(op, "pseudo_boxes", pseudo_boxes, "pred_boxes", pred_boxes);
  pb.M = pseudo_boxes.size(0);
  check_same_device(op, "gt_inds", gt_inds, "pred_boxes", pred_boxes);
  check_same_device(op, "pseudo_boxes", pseudo_boxes, "pred_boxes", pred_boxes);
  pb.N = image_count(op, "roi_counts", roi_counts, "pseudo_counts", pseudo_counts);
  pb.r_offsets = image_offsets(op, "roi_counts", roi_counts, pb.R, "pred_boxes");
  pb.m_offsets = image_offsets(op, "pseudo_counts", pseudo_counts, pb.M, "pseudo_boxes");
  TORCH_CHECK_VALUE(pb.M < std::numeric_limits<int32_t>::max(), op,
                    ": at most 2^31 - 2 pseudo boxes per call, got ", pb.M);
  pb.pseudo_boxes = pseudo_boxes.contiguous();
  return pb;
}

namespace {

using VotingSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymIntArrayRef, c10::SymIntArrayRef,
    c10::string_view);

// Autocast: mixed floating dtypes of the boxes run in the widest of them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> voting_autocast(
    const at::Tensor& pred_boxes, const at::Tensor& gt_inds, const at::Tensor& pseudo_boxes,
    c10::SymIntArrayRef roi_counts, c10::SymIntArrayRef pseudo_counts, c10::string_view mode) {
  const AutocastOff off;
  static auto op = typed_op<VotingSig>(TBD_OPS_LIB_NAME "::consistency_voting");
  const auto t = promote_dtype(pred_boxes, pseudo_boxes);
  if (!t) return op.call(pred_boxes, gt_inds, pseudo_boxes, roi_counts, pseudo_counts, mode);
  return op.call(pred_boxes.to(*t), gt_inds, pseudo_boxes.to(*t), roi_counts, pseudo_counts, mode);
}

// Autograd: the outputs are constants of the loss they weight; no gradient flows through
// them, whatever requires one (they come back with requires_grad false).
std::tuple<at::Tensor, at::Tensor, at::Tensor> voting_autograd(
    const at::Tensor& pred_boxes, const at::Tensor& gt_inds, const at::Tensor& pseudo_boxes,
    c10::SymIntArrayRef roi_counts, c10::SymIntArrayRef pseudo_counts, c10::string_view mode) {
  static auto op = typed_op<VotingSig>(TBD_OPS_LIB_NAME "::consistency_voting");
  const at::AutoDispatchBelowADInplaceOrView below;
  return op.call(pred_boxes, gt_inds, pseudo_boxes, roi_counts, pseudo_counts, mode);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def(
      "consistency_voting(Tensor pred_boxes, Tensor gt_inds, Tensor pseudo_boxes,"
      " SymInt[] roi_counts, SymInt[] pseudo_counts, str mode=\"pseco\")"
      " -> (Tensor sigma, Tensor w, Tensor reg_scale)");
}

TBD_OPS_AUTOCAST_IMPL("consistency_voting", TORCH_FN(voting_autocast))
TBD_OPS_IMPL(Autograd, "consistency_voting", TORCH_FN(voting_autograd))

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/consistency_voting.cu, the shared pieces csrc/cuda_glue.h.
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_voting_cuda(
    const at::Tensor& pred_boxes, const at::Tensor& gt_inds, const at::Tensor& pseudo_boxes,
    at::IntArrayRef roi_counts, at::IntArrayRef pseudo_counts, c10::string_view mode) {
  const VotingProblem pb = voting_prepare("consistency_voting", pred_boxes, gt_inds, pseudo_boxes,
                                          roi_counts, pseudo_counts, mode);
  const DeviceGuard guard(pred_boxes.device());
  const auto acc_opts = pred_boxes.options().dtype(acc_dtype(pred_boxes.scalar_type()));
  auto sigma = cuda_glue::empty({pb.M}, acc_opts);
  auto w = cuda_glue::empty({pb.R}, acc_opts);
  auto reg_scale = cuda_glue::empty({}, acc_opts);
  auto sigma_r = cuda_glue::empty({pb.R}, acc_opts);
  cuda::VotingArgs a{};
  a.pred_boxes = pred_boxes.const_data_ptr();
  a.bs0 = pred_boxes.stride(0);
  a.bs1 = pred_boxes.stride(1);
  a.gt_inds = gt_inds.const_data_ptr<int64_t>();
  a.gs0 = gt_inds.stride(0);
  a.pseudo_boxes = pb.pseudo_boxes.const_data_ptr();
  a.r_offsets = pb.r_offsets.data();
  a.m_offsets = pb.m_offsets.data();
  a.N = pb.N;
  a.eps = kIouEps;
  a.mode = pb.mode;
  launch([&] {
    cuda::consistency_voting(dtype_of(pred_boxes), a, sigma.mutable_data_ptr(),
                             w.mutable_data_ptr(), reg_scale.mutable_data_ptr(),
                             pb.R ? sigma_r.mutable_data_ptr() : nullptr, current_stream());
  });
  return {sigma, w, reg_scale};
}

}  // namespace

TBD_OPS_IMPL(TBD_OPS_CUDA_KEY, "consistency_voting", TORCH_FN(consistency_voting_cuda))

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
