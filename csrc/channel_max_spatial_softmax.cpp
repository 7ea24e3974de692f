// channel_max_spatial_softmax (p_c): schema, argument checks and the CUDA
// registration. No autocast kernel: the kernels read 16-bit logits directly
// and accumulate in fp32.
// Kernels: csrc/cpu/channel_max_spatial_softmax.cpp, cuda/channel_max_spatial_softmax.cu;
// fake kernel and autograd: python/tbd_ops/ops/channel_max_spatial_softmax.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "channel_max_spatial_softmax.h"

#if TBD_OPS_CUDA_GLUE
#include "../cuda/channel_max_spatial_softmax.h"
#include "cuda_glue.h"
#endif

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

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/channel_max_spatial_softmax.cu, the shared pieces csrc/cuda_glue.h.
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> cmss_cuda(const at::Tensor& x, double temperature,
                                                         bool scale_by_hw) {
  cmss_check(x, temperature);
  const DeviceGuard guard(x.device());
  const int64_t N = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  auto out = cuda_glue::empty({N, H, W}, x.options());
  auto log_p = cuda_glue::empty({N, H, W}, x.options().dtype(acc_dtype(x.scalar_type())));
  auto argmax = cuda_glue::empty({N, H, W}, x.options().dtype(at::kLong));
  if (N == 0 || H * W == 0) return {out, log_p, argmax};
  const int64_t bpi = cuda::cmss_blocks_per_image(H * W);
  auto partials = cuda_glue::empty({2 * N * bpi}, log_p.options());
  const int64_t xs[4] = {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
  launch([&] {
    cuda::cmss_forward(dtype_of(x), x.const_data_ptr(), xs, N, K, H, W, temperature, scale_by_hw,
                       out.mutable_data_ptr(), log_p.mutable_data_ptr(),
                       argmax.mutable_data_ptr<int64_t>(), partials.mutable_data_ptr(),
                       current_stream());
  });
  return {out, log_p, argmax};
}

at::Tensor cmss_backward_cuda(const at::Tensor& grad, const at::Tensor& log_p,
                              const at::Tensor& argmax, int64_t channels, double temperature,
                              bool scale_by_hw, bool channels_last) {
  cmss_backward_check(grad, log_p, argmax, channels, temperature);
  const DeviceGuard guard(grad.device());
  const int64_t N = grad.size(0), H = grad.size(1), W = grad.size(2);
  auto dx = cuda_glue::empty({N, channels, H, W}, grad.options(),
                      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (N == 0 || H * W == 0) return dx;
  const auto lpc = log_p.contiguous();
  const auto amc = argmax.contiguous();
  auto partials = cuda_glue::empty({N * cuda::cmss_blocks_per_image(H * W)}, lpc.options());
  const int64_t gs[3] = {grad.stride(0), grad.stride(1), grad.stride(2)};
  const int64_t ds[4] = {dx.stride(0), dx.stride(1), dx.stride(2), dx.stride(3)};
  launch([&] {
    cuda::cmss_backward(dtype_of(grad), grad.const_data_ptr(), gs, lpc.const_data_ptr(),
                        amc.const_data_ptr<int64_t>(), N, channels, H, W, temperature,
                        scale_by_hw, dx.mutable_data_ptr(), ds, partials.mutable_data_ptr(),
                        current_stream());
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, TBD_OPS_CUDA_KEY, m) {
  m.impl("channel_max_spatial_softmax", TORCH_FN(cmss_cuda));
  m.impl("_channel_max_spatial_softmax_backward", TORCH_FN(cmss_backward_cuda));
}

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
