// masked_reduce (SPEC 1.5): the op family holding masked_sq_dist and masked_l1.
// Argument checks shared by the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"

namespace tbd_ops {

// a, b: [N, C, H, W]; masks: [N, K, H, W]; one dtype, one device.
void masked_reduce_check(const char* op, const at::Tensor& a, const at::Tensor& b,
                         const at::Tensor& masks);
// grad: [N, K] in the accumulator dtype of a (float32, or float64 for float64).
void masked_reduce_backward_check(const char* op, const at::Tensor& grad, const at::Tensor& a,
                                  const at::Tensor& b, const at::Tensor& masks);
// Lists of levels: every level as above, one dtype and one device; term (the
// forward's [N, H, W] per-location sums) checked when want_masks.
void masked_reduce_levels_check(const char* op, at::TensorList a, at::TensorList b,
                                at::TensorList masks);
void masked_reduce_levels_backward_check(const char* op, at::TensorList grad, at::TensorList a,
                                         at::TensorList b, at::TensorList masks,
                                         at::TensorList term, bool want_masks);

// The kernels of every operator of the family on one backend (cpu, cuda), for
// TBD_OPS_IMPL: masked_{forward,backward}[_levels]_<backend><MaskedMode>.
#define TBD_OPS_MASKED_KERNELS(backend)                                                          \
  "masked_sq_dist", TORCH_FN(masked_forward_##backend<MaskedMode::kSqDist>),                     \
  "masked_l1", TORCH_FN(masked_forward_##backend<MaskedMode::kL1>),                              \
  "_masked_sq_dist_backward", TORCH_FN(masked_backward_##backend<MaskedMode::kSqDist>),          \
  "_masked_l1_backward", TORCH_FN(masked_backward_##backend<MaskedMode::kL1>),                   \
  "_masked_sq_dist_levels", TORCH_FN(masked_forward_levels_##backend<MaskedMode::kSqDist>),      \
  "_masked_l1_levels", TORCH_FN(masked_forward_levels_##backend<MaskedMode::kL1>),               \
  "_masked_sq_dist_levels_backward",                                                             \
  TORCH_FN(masked_backward_levels_##backend<MaskedMode::kSqDist>),                               \
  "_masked_l1_levels_backward", TORCH_FN(masked_backward_levels_##backend<MaskedMode::kL1>)

}  // namespace tbd_ops
