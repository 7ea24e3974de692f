// channel_max_spatial_softmax (p_c, SPEC 1.1): argument checks shared by the
// CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"

namespace tbd_ops {

void cmss_check(const at::Tensor& x, double temperature);
void cmss_backward_check(const at::Tensor& grad, const at::Tensor& log_p,
                         const at::Tensor& argmax, int64_t channels, double temperature);

}  // namespace tbd_ops
