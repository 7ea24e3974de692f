// CUDA registration of sigmoid_focal_loss: validation, allocation, device
// guard and current stream (see cuda/glue.h). Targets are not range-checked
// here (that would synchronize with the host): the kernels give NaN for the
// rows of targets outside [0, C].
#include <array>

#include "../csrc/sigmoid_focal_loss.h"
#include "glue.h"
#include "sigmoid_focal_loss.h"

namespace tbd_ops {
namespace {

using cuda_glue::current_stream;
using cuda_glue::DeviceGuard;
using cuda_glue::dtype_of;
using cuda_glue::launch;

cuda::FocalArgs focal_args(const at::Tensor& logits, const at::Tensor& targets,
                           const at::Tensor& w, double gamma, double alpha, FocalReduction red) {
  cuda::FocalArgs a{};
  a.logits = logits.const_data_ptr();
  a.xs0 = logits.stride(0);
  a.xs1 = logits.stride(1);
  a.targets = targets.const_data_ptr<int64_t>();
  a.ts0 = targets.stride(0);
  a.weight = w.defined() ? w.const_data_ptr() : nullptr;
  a.R = logits.size(0);
  a.C = logits.size(1);
  a.gamma = gamma;
  a.alpha = alpha;
  a.reduction = red;
  return a;
}

at::Tensor sigmoid_focal_loss_cuda(const at::Tensor& logits, const at::Tensor& targets,
                                   const c10::optional<at::Tensor>& weight, double gamma,
                                   double alpha, c10::string_view reduction) {
  const FocalReduction red =
      focal_check("sigmoid_focal_loss", logits, targets, weight, gamma, alpha, reduction);
  const DeviceGuard guard(logits.device());
  const at::Tensor w = focal_weight_acc(logits, weight);
  const auto acc_opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  const cuda::FocalArgs a = focal_args(logits, targets, w, gamma, alpha, red);
  at::Tensor out = red == FocalReduction::kNone ? cuda_glue::empty({a.R, a.C}, logits.options())
                                                : cuda_glue::empty({}, acc_opts);
  at::Tensor partials = cuda_glue::empty({cuda::focal_partials(a)}, acc_opts);
  launch([&] {
    cuda::sigmoid_focal_loss_forward(dtype_of(logits), a, out.mutable_data_ptr(),
                                     partials.numel() ? partials.mutable_data_ptr() : nullptr,
                                     current_stream());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
    const c10::optional<at::Tensor>& weight, double gamma, double alpha,
    c10::string_view reduction, std::array<bool, 2> output_mask) {
  const FocalReduction red = focal_backward_check("_sigmoid_focal_loss_backward", grad, logits,
                                                  targets, weight, gamma, alpha, reduction);
  const DeviceGuard guard(logits.device());
  const bool want_x = output_mask[0];
  const bool want_w = output_mask[1] && weight.has_value() && weight->defined();
  const at::Tensor w = focal_weight_acc(logits, weight);
  const auto acc_opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  const cuda::FocalArgs a = focal_args(logits, targets, w, gamma, alpha, red);
  at::Tensor gx = want_x ? cuda_glue::empty({a.R, a.C}, logits.options())
                         : at::empty({0}, logits.options());
  at::Tensor gw = want_w ? cuda_glue::empty({a.R}, acc_opts) : at::empty({0}, acc_opts);
  const int64_t gs0 = red == FocalReduction::kNone ? grad.stride(0) : 0;
  const int64_t gs1 = red == FocalReduction::kNone ? grad.stride(1) : 0;
  if (want_x || want_w) {
    launch([&] {
      cuda::sigmoid_focal_loss_backward(dtype_of(logits), a, grad.const_data_ptr(), gs0, gs1,
                                        want_x ? gx.mutable_data_ptr() : nullptr,
                                        want_w ? gw.mutable_data_ptr() : nullptr,
                                        current_stream());
    });
  }
  return {gx, want_w ? gw.to(weight->scalar_type()) : gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, TBD_OPS_CUDA_KEY, m) {
  m.impl("sigmoid_focal_loss", TORCH_FN(sigmoid_focal_loss_cuda));
  m.impl("_sigmoid_focal_loss_backward", TORCH_FN(sigmoid_focal_loss_backward_cuda));
}

}  // namespace tbd_ops
