// decode_max_iou (p_r, SPEC 1.2): the validated problem description shared by
// the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>
#include <vector>

#include "common.h"
#include "tbd_ops/box.h"
#include "tbd_ops/layout.h"

namespace tbd_ops {

struct DecodeProblem {
  int64_t N = 0, P = 0;
  PredLayout pl{};
  int prior_dim = 0;         // columns of priors read by the coder (0: no priors)
  CoderParams<double> params{};
  std::vector<int64_t> gt_offsets;  // N + 1
  at::Tensor gts;            // contiguous [sum G, 4]
  // Per-image clip shapes: contiguous [N, 2] (h, w) in the accumulation dtype
  // (float, double for double inputs) on the device of bbox_pred; undefined
  // when every image has the same clip (params.max_h/max_w) or none.
  at::Tensor max_shapes;
};

DecodeProblem decode_prepare(const char* op, const at::Tensor& bbox_pred,
                             const c10::optional<at::Tensor>& priors, const at::Tensor& gt_bboxes,
                             at::IntArrayRef gt_counts, c10::string_view coder,
                             at::ArrayRef<double> means, at::ArrayRef<double> stds, double scale,
                             c10::optional<at::ArrayRef<double>> max_shape, double wh_ratio_clip,
                             const c10::optional<at::Tensor>& max_shapes);

PredLayout pred_layout_of(const at::Tensor& t);

void decode_backward_check(const DecodeProblem& pb, const at::Tensor& bbox_pred,
                           const at::Tensor& grad_iou, const at::Tensor& arg);

// The kernels of decode_max_iou and _decode_max_iou_backward on one backend,
// from its functions of the validated problem: the arguments are checked
// (decode_prepare, decode_backward_check), then Forward(pb, bbox_pred, priors)
// or Backward(pb, grad_iou, arg, bbox_pred, priors, output_mask) runs.
using DecodeForward = std::tuple<at::Tensor, at::Tensor> (*)(
    const DecodeProblem& pb, const at::Tensor& bbox_pred, const c10::optional<at::Tensor>& priors);
using DecodeBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const DecodeProblem& pb, const at::Tensor& grad_iou, const at::Tensor& arg,
    const at::Tensor& bbox_pred, const c10::optional<at::Tensor>& priors,
    std::array<bool, 3> output_mask);

template <DecodeForward Forward>
std::tuple<at::Tensor, at::Tensor> decode_max_iou_kernel(
    const at::Tensor& bbox_pred, const c10::optional<at::Tensor>& priors,
    const at::Tensor& gt_bboxes, at::IntArrayRef gt_counts, c10::string_view coder,
    at::ArrayRef<double> means, at::ArrayRef<double> stds, double scale,
    c10::optional<at::ArrayRef<double>> max_shape, double wh_ratio_clip,
    const c10::optional<at::Tensor>& max_shapes) {
  const DecodeProblem pb = decode_prepare("decode_max_iou", bbox_pred, priors, gt_bboxes,
                                          gt_counts, coder, means, stds, scale, max_shape,
                                          wh_ratio_clip, max_shapes);
  return Forward(pb, bbox_pred, priors);
}

template <DecodeBackward Backward>
std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_max_iou_backward_kernel(
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
  return Backward(pb, grad_iou, arg, bbox_pred, priors, output_mask);
}

// Both kernels on one backend (cpu, cuda), for TBD_OPS_IMPL.
#define TBD_OPS_DECODE_KERNELS(backend)                                              \
  "decode_max_iou", TORCH_FN(decode_max_iou_kernel<decode_max_iou_##backend>),       \
      "_decode_max_iou_backward",                                                    \
      TORCH_FN(decode_max_iou_backward_kernel<decode_max_iou_backward_##backend>)

}  // namespace tbd_ops
