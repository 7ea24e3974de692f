// sigmoid_focal_loss (SPEC 2.4): argument checks shared by the CPU and CUDA
// registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

#include "common.h"
#include "tbd_ops/focal.h"

namespace tbd_ops {

// logits [R, C] floating; targets [R] int64; weight None or [R] floating (any
// of the four float dtypes; the kernels read it in the accumulation dtype);
// gamma >= 0 finite; alpha in [0, 1]; reduction "none", "sum" or "mean".
// Raises ValueError/TypeError naming the argument.
FocalReduction focal_check(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                           const c10::optional<at::Tensor>& weight, double gamma, double alpha,
                           c10::string_view reduction);

// grad: [R, C] in the dtype of logits (reduction "none"), else a 0-d tensor in
// the accumulation dtype (float32, or float64 for float64 logits).
FocalReduction focal_backward_check(const char* op, const at::Tensor& grad,
                                    const at::Tensor& logits, const at::Tensor& targets,
                                    const c10::optional<at::Tensor>& weight, double gamma,
                                    double alpha, c10::string_view reduction);

// The weight in the accumulation dtype of logits, contiguous (undefined when absent).
at::Tensor focal_weight_acc(const at::Tensor& logits, const c10::optional<at::Tensor>& weight);

}  // namespace tbd_ops
