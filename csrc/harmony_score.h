// harmony_score (SPEC 1.3): argument checks shared by the CPU and CUDA
// registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"
#include "tbd_ops/harmony.h"

namespace tbd_ops {

// p_c, p_r: one shape, dtype and device (floating).
void harmony_score_check(const char* op, const at::Tensor& p_c, const at::Tensor& p_r);
// grad: the shape and dtype of p_c.
void harmony_score_backward_check(const char* op, const at::Tensor& grad, const at::Tensor& p_c,
                                  const at::Tensor& p_r);

}  // namespace tbd_ops
