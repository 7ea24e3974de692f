// CUDA registration of channel_max_spatial_softmax: validation, allocation, device guard and
// current stream (see cuda/glue.h).
#include <limits>

#include "../csrc/channel_max_spatial_softmax.h"
#include "channel_max_spatial_softmax.h"
#include "glue.h"

namespace tbd_ops {
namespace {

using cuda_glue::current_stream;
using cuda_glue::DeviceGuard;
using cuda_glue::dtype_of;
using cuda_glue::launch;

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

}  // namespace tbd_ops
