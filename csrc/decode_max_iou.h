// decode_max_iou (p_r, SPEC 1.2): the validated problem description shared by
// the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

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

}  // namespace tbd_ops
