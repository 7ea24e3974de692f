// channel_max_spatial_softmax (p_c): schema and argument checks. No autocast
// kernel: the kernels read 16-bit logits directly and accumulate in fp32.
// Kernels: csrc/cpu/channel_max_spatial_softmax.cpp, cuda/channel_max_spatial_softmax.cu;
// fake kernel and autograd: python/tbd_ops/ops/channel_max_spatial_softmax.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "channel_max_spatial_softmax.h"

namespace tbd_ops {

void cmss_check(const at::Tensor& x, double temperature, const char* name) {
  constexpr const char* op = "channel_max_spatial_softmax";
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": ", name, " must be a 4-D tensor [N, K, H, W], got a ",
                    x.dim(), "-D tensor of shape ", x.sizes());
  check_float(op, name, x);
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(1) <= INT32_MAX, op, ": ", name,
                    " must have between 1 and 2^31 - 1 channels, got shape ", x.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be a finite number > 0, got ", temperature);
}

void cmss_levels_check(at::TensorList x, double temperature) {
  constexpr const char* op = "channel_max_spatial_softmax";
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, op,
                    ": temperature must be a finite number > 0, got ", temperature);
  for (size_t l = 0; l < x.size(); ++l) {
    const std::string name = "x[" + std::to_string(l) + "]";
    cmss_check(x[l], temperature, name.c_str());
    check_same_dtype(op, name, x[l], "x[0]", x[0]);
    check_same_device(op, name, x[l], "x[0]", x[0]);
  }
}

void cmss_levels_backward_check(at::TensorList grad, at::TensorList log_p, at::TensorList argmax,
                                at::IntArrayRef channels, double temperature,
                                const c10::List<bool>& channels_last) {
  constexpr const char* op = "_channel_max_spatial_softmax_backward";
  const size_t L = grad.size();
  TORCH_CHECK_VALUE(log_p.size() == L && argmax.size() == L && channels.size() == L &&
                        channels_last.size() == L,
                    op, ": grad, log_p, argmax, channels and channels_last must have one entry per "
                    "level, got ", L, ", ", log_p.size(), ", ", argmax.size(), ", ",
                    channels.size(), " and ", channels_last.size());
  for (size_t l = 0; l < L; ++l) {
    cmss_backward_check(grad[l], log_p[l], argmax[l], channels[l], temperature);
    const std::string name = "grad[" + std::to_string(l) + "]";
    check_same_dtype(op, name, grad[l], "grad[0]", grad[0]);
    check_same_device(op, name, grad[l], "grad[0]", grad[0]);
  }
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
  // Every level of a list in one call (one launch sequence on CUDA).
  m.def(
      "_channel_max_spatial_softmax_levels(Tensor[] x, float temperature=1.0, bool scale_by_hw=False)"
      " -> (Tensor[] out, Tensor[] log_p, Tensor[] argmax)");
  m.def(
      "_channel_max_spatial_softmax_levels_backward(Tensor[] grad, Tensor[] log_p, Tensor[] argmax,"
      " int[] channels, float temperature, bool scale_by_hw, bool[] channels_last) -> Tensor[]");
}

}  // namespace tbd_ops
