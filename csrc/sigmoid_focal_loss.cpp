// sigmoid_focal_loss (SPEC 2.4): schemas, argument checks, autocast, the
// CUDA registration and autograd.
// Kernels: csrc/cpu/sigmoid_focal_loss.cpp, cuda/sigmoid_focal_loss.cu; fake
// kernels: python/tbd_ops/ops/sigmoid_focal_loss.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>

#include "autograd.h"
#include "sigmoid_focal_loss.h"

#if TBD_OPS_CUDA_GLUE
#include "../cuda/sigmoid_focal_loss.h"
#include "cuda_glue.h"
#endif

namespace tbd_ops {

namespace {
constexpr Option<FocalReduction> kReductions[] = {
    {"none", FocalReduction::kNone}, {"sum", FocalReduction::kSum}, {"mean", FocalReduction::kMean}};
}  // namespace

FocalReduction focal_check(const char* op, const at::Tensor& logits, const at::Tensor& targets,
                           const c10::optional<at::Tensor>& weight, double gamma, double alpha,
                           c10::string_view reduction) {
  const FocalReduction red = parse_option(op, "reduction", reduction, kReductions);
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be a 2-D tensor [R, C], got a ",
                    logits.dim(), "-D tensor of shape ", logits.sizes());
  check_float(op, "logits", logits);
  const int64_t R = logits.size(0);
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == R, op,
                    ": targets must be [R] with R = ", R, " (the rows of logits), got shape ",
                    targets.sizes());
  check_dtype(op, "targets", targets, at::kLong);
  check_same_device(op, "targets", targets, "logits", logits);
  if (weight.has_value() && weight->defined()) {
    const at::Tensor& w = *weight;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == R, op, ": weight must be [R] with R = ", R,
                      " (the rows of logits), got shape ", w.sizes());
    check_float(op, "weight", w);
    check_same_device(op, "weight", w, "logits", logits);
  }
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0, op,
                    ": gamma must be a finite number >= 0, got ", gamma);
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, op, ": alpha must be a number in [0, 1], got ",
                    alpha);
  return red;
}

FocalReduction focal_backward_check(const char* op, const at::Tensor& grad,
                                    const at::Tensor& logits, const at::Tensor& targets,
                                    const c10::optional<at::Tensor>& weight, double gamma,
                                    double alpha, c10::string_view reduction) {
  const FocalReduction red = focal_check(op, logits, targets, weight, gamma, alpha, reduction);
  if (red == FocalReduction::kNone) {
    TORCH_CHECK_VALUE(grad.sizes() == logits.sizes(), op, ": grad must have the shape of logits ",
                      logits.sizes(), " for reduction \"none\", got ", grad.sizes());
    check_same_dtype(op, "grad", grad, "logits", logits);
  } else {
    TORCH_CHECK_VALUE(grad.dim() == 0, op, ": grad must be a 0-d tensor for reduction \"",
                      reduction, "\", got shape ", grad.sizes());
    check_dtype(op, "grad", grad, acc_dtype(logits.scalar_type()));
  }
  check_same_device(op, "grad", grad, "logits", logits);
  return red;
}

at::Tensor focal_weight_acc(const at::Tensor& logits, const c10::optional<at::Tensor>& weight) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  return weight->to(acc_dtype(logits.scalar_type())).contiguous();
}

namespace {

using FocalSig = at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                            double, double, c10::string_view);

// Autocast: logits and a weight of different floating dtypes run in the
// widest of them; the per-element loss ("none") comes back in the dtype of
// the logits. 16-bit logits with a float32 weight (mixed-precision training)
// are not copied to float32: the kernels compute 16-bit logits in float32
// and read the weight in it, which gives the same values bit for bit.
at::Tensor focal_autocast(const at::Tensor& logits, const at::Tensor& targets,
                          const c10::optional<at::Tensor>& weight, double gamma, double alpha,
                          c10::string_view reduction) {
  const AutocastOff off;
  static auto op = typed_op<FocalSig>(TBD_OPS_LIB_NAME "::sigmoid_focal_loss");
  const auto t = promote_dtype(logits, weight);
  if (!t || *t == at::kFloat) return op.call(logits, targets, weight, gamma, alpha, reduction);
  at::Tensor out = op.call(logits.to(*t), targets, cast_to(weight, *t), gamma, alpha, reduction);
  return reduction == "none" ? out.to(logits.scalar_type()) : out;
}

// ---- autograd: the gradients of logits and weight (targets are constants of the loss).
struct FocalFunction : torch::autograd::Function<FocalFunction> {
  static at::Tensor forward(autograd::AutogradContext* ctx, const at::Tensor& logits,
                            const at::Tensor& targets, const c10::optional<at::Tensor>& weight,
                            double gamma, double alpha, c10::string_view reduction) {
    static auto op = typed_op<FocalSig>(TBD_OPS_LIB_NAME "::sigmoid_focal_loss");
    ctx->save_for_backward({logits, targets, autograd::or_undefined(weight)});
    ctx->saved_data["gamma"] = gamma;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["reduction"] = std::string(reduction);
    const at::AutoDispatchBelowADInplaceOrView below;
    return op.call(logits, targets, weight, gamma, alpha, reduction);
  }

  static autograd::variable_list backward(autograd::AutogradContext* ctx, autograd::variable_list grad) {
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
        double, double, c10::string_view, std::array<bool, 2>)>(TBD_OPS_LIB_NAME "::_sigmoid_focal_loss_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& weight = saved[2];
    // Positions among the tensors: logits 0, targets 1, weight 2 (when given).
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), weight.defined() && ctx->needs_input_grad(2)};
    autograd::Grads out(ctx, grad);
    if (!grad[0].defined() || !(mask[0] || mask[1])) return out.none(6).take();
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    auto [gx, gw] = op.call(grad[0], saved[0], saved[1], autograd::to_optional(weight),
                            ctx->saved_data["gamma"].toDouble(), ctx->saved_data["alpha"].toDouble(),
                            reduction, mask);
    out.tensor(0, mask[0] ? gx : at::Tensor()).none();
    if (weight.defined()) {
      out.tensor(2, mask[1] ? gw : at::Tensor());
    } else {
      out.none();
    }
    return out.none(3).take();
  }
};

at::Tensor focal_autograd(const at::Tensor& logits, const at::Tensor& targets,
                          const c10::optional<at::Tensor>& weight, double gamma, double alpha,
                          c10::string_view reduction) {
  return FocalFunction::apply(logits, targets, weight, gamma, alpha, reduction);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def(
      "sigmoid_focal_loss(Tensor logits, Tensor targets, Tensor? weight=None, float gamma=2.0,"
      " float alpha=0.25, str reduction=\"sum\") -> Tensor");
  m.def(
      "_sigmoid_focal_loss_backward(Tensor grad, Tensor logits, Tensor targets, Tensor? weight,"
      " float gamma, float alpha, str reduction, bool[2] output_mask)"
      " -> (Tensor grad_logits, Tensor grad_weight)");
}

TBD_OPS_AUTOCAST_IMPL("sigmoid_focal_loss", TORCH_FN(focal_autocast))
TBD_OPS_IMPL(Autograd, "sigmoid_focal_loss", TORCH_FN(focal_autograd))

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/sigmoid_focal_loss.cu, the shared pieces csrc/cuda_glue.h.
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

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

TBD_OPS_IMPL(TBD_OPS_CUDA_KEY,
    "sigmoid_focal_loss", TORCH_FN(sigmoid_focal_loss_cuda),
    "_sigmoid_focal_loss_backward", TORCH_FN(sigmoid_focal_loss_backward_cuda))

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
