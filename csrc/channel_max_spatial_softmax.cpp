// channel_max_spatial_softmax (p_c): schema and argument checks. No autocast
// kernel: the kernels read 16-bit logits directly and accumulate in fp32.
// Kernels: csrc/cpu/channel_max_spatial_softmax.cpp, cuda/channel_max_spatial_softmax.cu;
// fake kernel and autograd: python/tbd_ops/ops/channel_max_spatial_softmax.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>

#include "channel_max_spatial_softmax.h"

namespace tbd_ops {

void cmss_check(const at::Tensor& x, double temperature) {
  constexpr const char* op = "channel_max_spatial_softmax";
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be a 4-D tensor [N, K, H, W], got a ", x.dim(),
                    "-D tensor of shape ", x.sizes());
  check_float(op, "x", x);
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(1) <= INT32_MAX, op,
                    ": x must have between 1 and 2^31 - 1 channels, got shape ", x.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be a finite number > 0, got ", temperature);
}

void cmss_backward_check(const at::Tensor& grad, const at::Tensor& log_p,
                         const at::Tensor& argmax, int64_t channels, double temperature) {
  constexpr const char* op = "_channel_max_spatial_softmax_backward";
  TORCH_CHECK_VALUE(grad.dim() == 3, op, ": grad must be [N, H, W], got shape ", grad.sizes());
  check_float(op, "grad", grad);
  TORCH_CHECK_VALUE(log_p.sizes() == grad.sizes() && argmax.sizes() == grad.sizes(), op,
                    ": grad, log_p and argmax must have the same shape, got ", grad.sizes(), ", ",
                    log_p.sizes(), " and ", argmax.sizes());
  check_dtype(op, "log_p", log_p, acc_dtype(grad.scalar_type()));
  check_dtype(op, "argmax", argmax, at::kLong);
  check_same_device(op, "log_p", log_p, "grad", grad);
  check_same_device(op, "argmax", argmax, "grad", grad);
  TORCH_CHECK_VALUE(channels >= 1, op, ": channels must be >= 1, got ", channels);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be a finite number > 0, got ", temperature);
}

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def(
      "channel_max_spatial_softmax(Tensor x, float temperature=1.0, bool scale_by_hw=False)"
      " -> (Tensor out, Tensor log_p, Tensor argmax)");
  m.def(
      "_channel_max_spatial_softmax_backward(Tensor grad, Tensor log_p, Tensor argmax,"
      " int channels, float temperature, bool scale_by_hw, bool channels_last) -> Tensor");
}

}  // namespace tbd_ops
