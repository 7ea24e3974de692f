// CUDA registration of decode_max_iou: validation, allocation, device guard and
// current stream (see cuda/glue.h).
#include <limits>

#include "../csrc/decode_max_iou.h"
#include "decode_max_iou.h"
#include "glue.h"

namespace tbd_ops {
namespace {

using cuda_glue::current_stream;
using cuda_glue::DeviceGuard;
using cuda_glue::dtype_of;
using cuda_glue::launch;

cuda::DecodeIouArgs make_args(const DecodeProblem& pb, const at::Tensor& bbox_pred,
                              const c10::optional<at::Tensor>& priors) {
  cuda::DecodeIouArgs a{};
  a.pred = bbox_pred.const_data_ptr();
  a.pl = pb.pl;
  const bool use_priors = pb.prior_dim > 0;
  a.priors = use_priors ? priors->const_data_ptr() : nullptr;
  a.prior_s0 = use_priors ? priors->stride(0) : 0;
  a.prior_s1 = use_priors ? priors->stride(1) : 0;
  a.prior_dim = pb.prior_dim;
  a.gts = pb.gts.const_data_ptr();
  a.gt_offsets = pb.gt_offsets.data();
  a.N = pb.N;
  a.P = pb.P;
  a.params = pb.params;
  a.max_shapes = pb.max_shapes.defined() ? pb.max_shapes.const_data_ptr() : nullptr;
  a.eps = kIouEps;
  return a;
}

std::tuple<at::Tensor, at::Tensor> decode_max_iou_cuda(
    const at::Tensor& bbox_pred, const c10::optional<at::Tensor>& priors,
    const at::Tensor& gt_bboxes, at::IntArrayRef gt_counts, c10::string_view coder,
    at::ArrayRef<double> means, at::ArrayRef<double> stds, double scale,
    c10::optional<at::ArrayRef<double>> max_shape, double wh_ratio_clip,
    const c10::optional<at::Tensor>& max_shapes) {
  const DecodeProblem pb = decode_prepare("decode_max_iou", bbox_pred, priors, gt_bboxes,
                                          gt_counts, coder, means, stds, scale, max_shape,
                                          wh_ratio_clip, max_shapes);
  const DeviceGuard guard(bbox_pred.device());
  auto iou = cuda_glue::empty({pb.N, pb.P}, bbox_pred.options());
  auto arg = cuda_glue::empty({pb.N, pb.P}, bbox_pred.options().dtype(at::kLong));
  const auto a = make_args(pb, bbox_pred, priors);
  launch([&] {
    cuda::decode_max_iou_forward(dtype_of(bbox_pred), a, iou.mutable_data_ptr(),
                                 arg.mutable_data_ptr<int64_t>(), current_stream());
  });
  return {iou, arg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_max_iou_backward_cuda(
    const at::Tensor& grad_iou, const at::Tensor& arg, const at::Tensor& bbox_pred,
    const c10::optional<at::Tensor>& priors, const at::Tensor& gt_bboxes,
    at::IntArrayRef gt_counts, c10::string_view coder, at::ArrayRef<double> means,
    at::ArrayRef<double> stds, double scale, c10::optional<at::ArrayRef<double>> max_shape,
    double wh_ratio_clip, std::array<bool, 3> output_mask,
    const c10::optional<at::Tensor>& max_shapes) {
  const DecodeProblem pb = decode_prepare("_decode_max_iou_backward", bbox_pred, priors,
                                          gt_bboxes, gt_counts, coder, means, stds, scale,
                                          max_shape, wh_ratio_clip, max_shapes);
  decode_backward_check(pb, bbox_pred, grad_iou, arg);
  const DeviceGuard guard(bbox_pred.device());
  const bool want_priors = output_mask[1] && pb.prior_dim > 0;
  at::Tensor grad_pred = output_mask[0] ? cuda_glue::empty_like(bbox_pred)
                                        : at::empty({0}, bbox_pred.options());
  // The kernels write [P, prior_dim]; points given as [P, 4] get zero stride columns.
  at::Tensor grad_priors_k = want_priors
                                 ? cuda_glue::empty({pb.P, pb.prior_dim}, bbox_pred.options())
                                 : at::empty({0}, bbox_pred.options());
  at::Tensor grad_gts = output_mask[2] ? cuda_glue::empty({pb.gts.size(0), 4}, bbox_pred.options())
                                       : at::empty({0}, bbox_pred.options());
  TORCH_CHECK_VALUE(pb.gts.size(0) < std::numeric_limits<int32_t>::max(),
                    "_decode_max_iou_backward: at most 2^31 - 2 ground-truth boxes per call, got ",
                    pb.gts.size(0));
  const auto argc = arg.contiguous();
  const auto a = make_args(pb, bbox_pred, priors);
  const auto dt = dtype_of(bbox_pred);
  const size_t ws_bytes =
      cuda::decode_max_iou_backward_workspace(dt, a, want_priors, output_mask[2]);
  at::Tensor workspace = cuda_glue::empty({static_cast<int64_t>(ws_bytes)},
                                          bbox_pred.options().dtype(at::kByte));
  launch([&] {
    cuda::decode_max_iou_backward(
        dt, a, grad_iou.const_data_ptr(), grad_iou.stride(0), grad_iou.stride(1),
        argc.const_data_ptr<int64_t>(), output_mask[0] ? grad_pred.mutable_data_ptr() : nullptr,
        output_mask[0] ? pred_layout_of(grad_pred) : pb.pl,
        want_priors ? grad_priors_k.mutable_data_ptr() : nullptr,
        output_mask[2] ? grad_gts.mutable_data_ptr() : nullptr,
        ws_bytes ? workspace.mutable_data_ptr() : nullptr, current_stream());
  });
  at::Tensor grad_priors = grad_priors_k;
  if (want_priors && priors->size(1) != pb.prior_dim) {
    grad_priors = at::zeros({pb.P, priors->size(1)}, bbox_pred.options());
    grad_priors.narrow(1, 0, pb.prior_dim).copy_(grad_priors_k);
  }
  return {grad_pred, grad_priors, grad_gts};
}

}  // namespace

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, TBD_OPS_CUDA_KEY, m) {
  m.impl("decode_max_iou", TORCH_FN(decode_max_iou_cuda));
  m.impl("_decode_max_iou_backward", TORCH_FN(decode_max_iou_backward_cuda));
}

}  // namespace tbd_ops
