// harmony_distillation_loss (SPEC 1.4): argument checks shared by the CPU and
// CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "tbd_ops/harmony.h"

namespace tbd_ops {

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


// The maps of a call: pc_s, pr_s, pc_t, pr_t, one tensor per level each.
using HarmonyMaps = at::TensorList[4];

// The kernels of harmony_distillation_loss and its backward on one backend,
// from its functions of the validated levels: the arguments are checked, then
// Forward(hl, maps, eps) or Backward(hl, grad, norm, maps, output_mask) runs.
using HarmonyLossForward = std::tuple<at::Tensor, at::Tensor> (*)(const HarmonyLevels& hl,
                                                                  const HarmonyMaps& maps,
                                                                  double eps);
using HarmonyLossBackward = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> (*)(
    const HarmonyLevels& hl, const at::Tensor& grad, const at::Tensor& norm,
    const HarmonyMaps& maps, std::array<bool, 2> output_mask);

template <HarmonyLossForward Forward>
std::tuple<at::Tensor, at::Tensor> harmony_distillation_loss_kernel(
    at::TensorList pc_s, at::TensorList pr_s, at::TensorList pc_t, at::TensorList pr_t,
    c10::string_view mode, double eps) {
  const char* op = "harmony_distillation_loss";
  const HarmonyLevels hl = harmony_loss_check(op, pc_s, pr_s, pc_t, pr_t, std::string(mode));
  harmony_eps_check(op, eps);
  const HarmonyMaps maps = {pc_s, pr_s, pc_t, pr_t};
  return Forward(hl, maps, eps);
}

template <HarmonyLossBackward Backward>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> harmony_distillation_loss_backward_kernel(
    const at::Tensor& grad, const at::Tensor& norm, at::TensorList pc_s, at::TensorList pr_s,
    at::TensorList pc_t, at::TensorList pr_t, c10::string_view mode,
    std::array<bool, 2> output_mask) {
  const HarmonyLevels hl = harmony_loss_backward_check("_harmony_distillation_loss_backward", grad,
                                                       norm, pc_s, pr_s, pc_t, pr_t,
                                                       std::string(mode));
  const HarmonyMaps maps = {pc_s, pr_s, pc_t, pr_t};
  return Backward(hl, grad, norm, maps, output_mask);
}

// Both kernels on one backend (cpu, cuda), for TBD_OPS_IMPL.
#define TBD_OPS_HARMONY_LOSS_KERNELS(backend)                                           \
  "harmony_distillation_loss",                                                          \
      TORCH_FN(harmony_distillation_loss_kernel<harmony_distillation_loss_##backend>),  \
      "_harmony_distillation_loss_backward",                                            \
      TORCH_FN(harmony_distillation_loss_backward_kernel<                               \
               harmony_distillation_loss_backward_##backend>)

}  // namespace tbd_ops
