// CUDA registration of channel_max_spatial_softmax: validation, allocation, device guard and
// current stream (see cuda/glue.h). One level and a list of levels take the same launchers
// (every level of a list in the same launches).
#include <vector>

#include "../csrc/channel_max_spatial_softmax.h"
#include "channel_max_spatial_softmax.h"
#include "glue.h"

namespace tbd_ops {
namespace {

using cuda_glue::current_stream;
using cuda_glue::DeviceGuard;
using cuda_glue::dtype_of;
using cuda_glue::launch;

using Outputs = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

Outputs forward_levels(at::TensorList x, double temperature, bool scale_by_hw) {
  std::vector<at::Tensor> out, log_p, argmax;
  if (x.empty()) return {out, log_p, argmax};
  const DeviceGuard guard(x[0].device());
  std::vector<cuda::CmssLevel> lv(x.size());
  for (size_t l = 0; l < x.size(); ++l) {
    const at::Tensor& t = x[l];
    const int64_t N = t.size(0), H = t.size(2), W = t.size(3);
    out.push_back(cuda_glue::empty({N, H, W}, t.options()));
    log_p.push_back(cuda_glue::empty({N, H, W}, t.options().dtype(acc_dtype(t.scalar_type()))));
    argmax.push_back(cuda_glue::empty({N, H, W}, t.options().dtype(at::kLong)));
    cuda::CmssLevel& v = lv[l];
    v.x = t.const_data_ptr();
    for (int d = 0; d < 4; ++d) v.xs[d] = t.stride(d);
    v.N = N;
    v.K = t.size(1);
    v.H = H;
    v.W = W;
    v.out = out.back().mutable_data_ptr();
    v.log_p = log_p.back().mutable_data_ptr();
    v.argmax = argmax.back().mutable_data_ptr<int64_t>();
  }
  const int64_t ws = cuda::cmss_forward_workspace(lv.data(), static_cast<int64_t>(lv.size()));
  if (ws == 0) return {out, log_p, argmax};
  auto workspace = cuda_glue::empty({ws}, x[0].options().dtype(acc_dtype(x[0].scalar_type())));
  launch([&] {
    cuda::cmss_forward(dtype_of(x[0]), lv.data(), static_cast<int64_t>(lv.size()), temperature,
                       scale_by_hw, workspace.mutable_data_ptr(), current_stream());
  });
  return {out, log_p, argmax};
}

std::vector<at::Tensor> backward_levels(at::TensorList grad, at::TensorList log_p,
                                        at::TensorList argmax, at::IntArrayRef channels,
                                        double temperature, bool scale_by_hw,
                                        const std::vector<bool>& channels_last) {
  std::vector<at::Tensor> dx;
  if (grad.empty()) return dx;
  const DeviceGuard guard(grad[0].device());
  std::vector<at::Tensor> keep;  // contiguous copies of log_p / argmax, alive until launched
  std::vector<cuda::CmssGradLevel> lv(grad.size());
  for (size_t l = 0; l < grad.size(); ++l) {
    const at::Tensor& g = grad[l];
    const int64_t N = g.size(0), H = g.size(1), W = g.size(2);
    dx.push_back(cuda_glue::empty({N, channels[l], H, W}, g.options(),
                                  channels_last[l] ? at::MemoryFormat::ChannelsLast
                                                   : at::MemoryFormat::Contiguous));
    keep.push_back(log_p[l].contiguous());
    keep.push_back(argmax[l].contiguous());
    cuda::CmssGradLevel& v = lv[l];
    v.grad = g.const_data_ptr();
    for (int d = 0; d < 3; ++d) v.gs[d] = g.stride(d);
    v.log_p = keep[2 * l].const_data_ptr();
    v.argmax = keep[2 * l + 1].const_data_ptr<int64_t>();
    v.N = N;
    v.K = channels[l];
    v.H = H;
    v.W = W;
    v.dx = dx.back().mutable_data_ptr();
    for (int d = 0; d < 4; ++d) v.ds[d] = dx.back().stride(d);
  }
  const int64_t ws = cuda::cmss_backward_workspace(lv.data(), static_cast<int64_t>(lv.size()));
  if (ws == 0) return dx;
  auto workspace = cuda_glue::empty({ws}, keep[0].options());
  launch([&] {
    cuda::cmss_backward(dtype_of(grad[0]), lv.data(), static_cast<int64_t>(lv.size()), temperature,
                        scale_by_hw, workspace.mutable_data_ptr(), current_stream());
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cmss_cuda(const at::Tensor& x, double temperature,
                                                         bool scale_by_hw) {
  cmss_check(x, temperature);
  auto r = forward_levels({x}, temperature, scale_by_hw);
  return {std::get<0>(r)[0], std::get<1>(r)[0], std::get<2>(r)[0]};
}

Outputs cmss_levels_cuda(at::TensorList x, double temperature, bool scale_by_hw) {
  cmss_levels_check(x, temperature);
  return forward_levels(x, temperature, scale_by_hw);
}

at::Tensor cmss_backward_cuda(const at::Tensor& grad, const at::Tensor& log_p,
                              const at::Tensor& argmax, int64_t channels, double temperature,
                              bool scale_by_hw, bool channels_last) {
  cmss_backward_check(grad, log_p, argmax, channels, temperature);
  return backward_levels({grad}, {log_p}, {argmax}, {channels}, temperature, scale_by_hw,
                         {channels_last})[0];
}

std::vector<at::Tensor> cmss_levels_backward_cuda(at::TensorList grad, at::TensorList log_p,
                                                  at::TensorList argmax, at::IntArrayRef channels,
                                                  double temperature, bool scale_by_hw,
                                                  const c10::List<bool>& channels_last) {
  cmss_levels_backward_check(grad, log_p, argmax, channels, temperature, channels_last);
  std::vector<bool> cl(channels_last.begin(), channels_last.end());
  return backward_levels(grad, log_p, argmax, channels, temperature, scale_by_hw, cl);
}

}  // namespace

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, TBD_OPS_CUDA_KEY, m) {
  m.impl("channel_max_spatial_softmax", TORCH_FN(cmss_cuda));
  m.impl("_channel_max_spatial_softmax_backward", TORCH_FN(cmss_backward_cuda));
  m.impl("_channel_max_spatial_softmax_levels", TORCH_FN(cmss_levels_cuda));
  m.impl("_channel_max_spatial_softmax_levels_backward", TORCH_FN(cmss_levels_backward_cuda));
}

}  // namespace tbd_ops
