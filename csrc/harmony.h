// harmony (SPEC 1.3, 1.4): the op family holding harmony_score and
// harmony_distillation_loss. Argument checks shared by the CPU and CUDA
// registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "common.h"
#include "tbd_ops/harmony.h"

namespace tbd_ops {

// p_c, p_r: one shape, dtype and device (floating).
void harmony_score_check(const char* op, const at::Tensor& p_c, const at::Tensor& p_r);
// grad: the shape and dtype of p_c.
void harmony_score_backward_check(const char* op, const at::Tensor& grad, const at::Tensor& p_c,
                                  const at::Tensor& p_r);

// The levels of a harmony_distillation_loss call: L levels, N images.
struct HarmonyLevels {
  int64_t L = 0, N = 0;
  HarmonyMode mode = HarmonyMode::kIouGuided;
};

// pc_s, pr_s, pc_t, pr_t: L >= 1 levels each, level l [N, H_l, W_l] in all four
// lists, one dtype and device; mode "iou_guided" or "plain".
HarmonyLevels harmony_loss_check(const char* op, at::TensorList pc_s, at::TensorList pr_s,
                                 at::TensorList pc_t, at::TensorList pr_t,
                                 const std::string& mode);
// eps: finite and > 0.
void harmony_eps_check(const char* op, double eps);
// grad: 0-d, norm: [L, N], both in the accumulator dtype of the inputs.
HarmonyLevels harmony_loss_backward_check(const char* op, const at::Tensor& grad,
                                          const at::Tensor& norm, at::TensorList pc_s,
                                          at::TensorList pr_s, at::TensorList pc_t,
                                          at::TensorList pr_t, const std::string& mode);

}  // namespace tbd_ops
