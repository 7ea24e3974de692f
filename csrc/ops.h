// Argument validation and problem descriptions shared by the CPU and CUDA
// registrations. Every check raises a Python ValueError/TypeError naming the
// argument, the expected and the actual value.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "tbd_ops/box.h"
#include "tbd_ops/layout.h"

namespace tbd_ops {

constexpr double kIouEps = 1e-6;

// ---- channel_max_spatial_softmax --------------------------------------------
void cmss_check(const at::Tensor& x, double temperature);
void cmss_backward_check(const at::Tensor& grad, const at::Tensor& log_p,
                         const at::Tensor& argmax, int64_t channels, double temperature);
// Output dtype of log_p: float32, or float64 for float64 input.
at::ScalarType acc_dtype(at::ScalarType t);

// ---- decode_max_iou ----------------------------------------------------------
struct DecodeProblem {
  int64_t N = 0, P = 0;
  PredLayout pl{};
  int prior_dim = 0;         // columns of priors read by the coder (0: no priors)
  CoderParams<double> params{};
  std::vector<int64_t> gt_offsets;  // N + 1
  at::Tensor gts;            // contiguous [sum G, 4]
};

DecodeProblem decode_prepare(const char* op, const at::Tensor& bbox_pred,
                             const c10::optional<at::Tensor>& priors, const at::Tensor& gt_bboxes,
                             at::IntArrayRef gt_counts, c10::string_view coder,
                             at::ArrayRef<double> means, at::ArrayRef<double> stds, double scale,
                             c10::optional<at::ArrayRef<double>> max_shape, double wh_ratio_clip);

PredLayout pred_layout_of(const at::Tensor& t);

void decode_backward_check(const DecodeProblem& pb, const at::Tensor& bbox_pred,
                           const at::Tensor& grad_iou, const at::Tensor& arg);

}  // namespace tbd_ops
