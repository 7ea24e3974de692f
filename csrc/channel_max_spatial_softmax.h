// channel_max_spatial_softmax (p_c, SPEC 1.1): argument checks shared by the
// CPU and CUDA registrations.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include "common.h"

namespace tbd_ops {

void cmss_check(const at::Tensor& x, double temperature, const char* name = "x");
// Every level as cmss_check (named x[l]), one dtype and one device.
void cmss_levels_check(at::TensorList x, double temperature);
void cmss_levels_backward_check(at::TensorList grad, at::TensorList log_p, at::TensorList argmax,
                                at::IntArrayRef channels, double temperature,
                                const c10::List<bool>& channels_last);
void cmss_backward_check(const at::Tensor& grad, const at::Tensor& log_p,
                         const at::Tensor& argmax, int64_t channels, double temperature);

}  // namespace tbd_ops
