// channel_max_spatial_softmax (p_c): schema, argument checks, the CUDA
// registration and autograd. No autocast kernel: the kernels read 16-bit
// logits directly and accumulate in fp32.
// Kernels: csrc/cpu/channel_max_spatial_softmax.cpp, cuda/channel_max_spatial_softmax.cu;
// fake kernels: python/tbd_ops/ops/channel_max_spatial_softmax.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "autograd.h"
#include "channel_max_spatial_softmax.h"

#if TBD_OPS_CUDA_GLUE
#include "../cuda/channel_max_spatial_softmax.h"
#include "cuda_glue.h"
#endif

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
      " SymInt channels, float temperature, bool scale_by_hw, bool channels_last) -> Tensor");
  // Every level of a list in one call (one launch sequence on CUDA).
  m.def(
      "_channel_max_spatial_softmax_levels(Tensor[] x, float temperature=1.0, bool scale_by_hw=False)"
      " -> (Tensor[] out, Tensor[] log_p, Tensor[] argmax)");
  m.def(
      "_channel_max_spatial_softmax_levels_backward(Tensor[] grad, Tensor[] log_p, Tensor[] argmax,"
      " SymInt[] channels, float temperature, bool scale_by_hw, bool[] channels_last) -> Tensor[]");
  // p_c of every level where no gradient will be asked for (e.g. the teacher's): out only, the
  // same values as _channel_max_spatial_softmax_levels' out, without its argmax and log_p.
  m.def(
      "_channel_max_spatial_softmax_no_grad(Tensor x, float temperature=1.0, bool scale_by_hw=False)"
      " -> Tensor");
  m.def(
      "_channel_max_spatial_softmax_levels_no_grad(Tensor[] x, float temperature=1.0,"
      " bool scale_by_hw=False) -> Tensor[]");
}

// ---- autograd: the gradient of x from the saved log_p and argmax (x is not kept); log_p and
// argmax are outputs that are not differentiable (argmax by its dtype, log_p detached).
namespace {

// The layout the gradient of x is given: that of x (the dense layouts the kernels write).
bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

using CmssSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, double, bool);
using CmssLevelsSig = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>(
    at::TensorList, double, bool);

struct CmssFunction : torch::autograd::Function<CmssFunction> {
  static autograd::variable_list forward(autograd::AutogradContext* ctx, const at::Tensor& x,
                                         double temperature, bool scale_by_hw) {
    static auto op = typed_op<CmssSig>(TBD_OPS_LIB_NAME "::channel_max_spatial_softmax");
    at::Tensor out, log_p, argmax;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, log_p, argmax) = op.call(x, temperature, scale_by_hw);
    }
    ctx->set_materialize_grads(false);  // no zero gradients made for log_p and argmax
    ctx->save_for_backward({log_p, argmax});
    ctx->saved_data["channels"] = x.sym_size(1);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["scale_by_hw"] = scale_by_hw;
    ctx->saved_data["channels_last"] = is_channels_last(x);
    return {out, log_p, argmax};
  }

  static autograd::variable_list backward(autograd::AutogradContext* ctx, autograd::variable_list grad) {
    static auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::SymInt,
                                         double, bool, bool)>(
        TBD_OPS_LIB_NAME "::_channel_max_spatial_softmax_backward");
    autograd::Grads out(ctx, grad);
    if (!grad[0].defined() || !ctx->needs_input_grad(0)) return out.none(3).take();
    const auto saved = ctx->get_saved_variables();
    auto& d = ctx->saved_data;
    const at::Tensor dx = op.call(grad[0], saved[0], saved[1], d["channels"].toSymInt(), d["temperature"].toDouble(),
                                  d["scale_by_hw"].toBool(), d["channels_last"].toBool());
    return out.tensor(0, dx).none(2).take();
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cmss_autograd(const at::Tensor& x, double temperature,
                                                             bool scale_by_hw) {
  auto r = CmssFunction::apply(x, temperature, scale_by_hw);
  return {r[0], r[1].detach(), r[2]};
}

struct CmssLevelsFunction : torch::autograd::Function<CmssLevelsFunction> {
  static autograd::variable_list forward(autograd::AutogradContext* ctx, at::TensorList x,
                                         double temperature, bool scale_by_hw) {
    static auto op = typed_op<CmssLevelsSig>(TBD_OPS_LIB_NAME "::_channel_max_spatial_softmax_levels");
    std::vector<at::Tensor> out, log_p, argmax;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, log_p, argmax) = op.call(x, temperature, scale_by_hw);
    }
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(autograd::concat({&log_p, &argmax}));
    std::vector<c10::SymInt> channels;
    c10::List<bool> channels_last;
    for (const at::Tensor& t : x) {
      channels.push_back(t.sym_size(1));
      channels_last.push_back(is_channels_last(t));
    }
    ctx->saved_data["levels"] = static_cast<int64_t>(x.size());
    ctx->saved_data["channels"] = channels;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["scale_by_hw"] = scale_by_hw;
    ctx->saved_data["channels_last"] = channels_last;
    return autograd::concat({&out, &log_p, &argmax});
  }

  // The levels with an incoming gradient whose input needs one, in one call.
  static autograd::variable_list backward(autograd::AutogradContext* ctx, autograd::variable_list grad) {
    static auto op = typed_op<std::vector<at::Tensor>(at::TensorList, at::TensorList, at::TensorList,
                                                      c10::SymIntArrayRef, double, bool, const c10::List<bool>&)>(
        TBD_OPS_LIB_NAME "::_channel_max_spatial_softmax_levels_backward");
    autograd::Grads out(ctx, grad);
    auto& d = ctx->saved_data;
    const auto L = static_cast<size_t>(d["levels"].toInt());
    const auto channels = d["channels"].toSymIntVector();
    const auto channels_last = d["channels_last"].toBoolList();
    const auto saved = ctx->get_saved_variables();
    std::vector<size_t> todo;
    std::vector<at::Tensor> g, log_p, argmax;
    std::vector<c10::SymInt> k;
    c10::List<bool> cl;
    for (size_t l = 0; l < L; ++l) {
      if (!grad[l].defined() || !ctx->needs_input_grad(l)) continue;
      todo.push_back(l);
      g.push_back(grad[l]);
      log_p.push_back(saved[l]);
      argmax.push_back(saved[L + l]);
      k.push_back(channels[l]);
      cl.push_back(channels_last.get(l));
    }
    std::vector<at::Tensor> dx(L);
    if (!todo.empty()) {
      const auto got = op.call(g, log_p, argmax, k, d["temperature"].toDouble(), d["scale_by_hw"].toBool(), cl);
      for (size_t i = 0; i < todo.size(); ++i) dx[todo[i]] = got[i];
    }
    return out.list(0, L, dx).none(2).take();
  }
};

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>> cmss_levels_autograd(
    at::TensorList x, double temperature, bool scale_by_hw) {
  auto flat = CmssLevelsFunction::apply(x, temperature, scale_by_hw);
  const size_t L = x.size();
  return {autograd::slice(flat, 0, L), autograd::detached(autograd::slice(flat, L, L)),
          autograd::slice(flat, 2 * L, L)};
}

// The no-grad variants have no backward: under grad mode an input that requires grad is an
// error (channel_max_spatial_softmax is the op to call), not a silently missing gradient.
void check_no_grad_needed(const char* op, at::TensorList x) {
  if (!at::GradMode::is_enabled()) return;
  for (size_t l = 0; l < x.size(); ++l) {
    TORCH_CHECK_VALUE(!x[l].requires_grad(), op, ": x", (x.size() > 1 ? "[" + std::to_string(l) + "]" : ""),
                      " requires grad, and this op has no backward; call channel_max_spatial_softmax");
  }
}

at::Tensor cmss_no_grad_autograd(const at::Tensor& x, double temperature, bool scale_by_hw) {
  static auto op = typed_op<at::Tensor(const at::Tensor&, double, bool)>(
      TBD_OPS_LIB_NAME "::_channel_max_spatial_softmax_no_grad");
  check_no_grad_needed("_channel_max_spatial_softmax_no_grad", {x});
  const at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, temperature, scale_by_hw);
}

std::vector<at::Tensor> cmss_levels_no_grad_autograd(at::TensorList x, double temperature, bool scale_by_hw) {
  static auto op = typed_op<std::vector<at::Tensor>(at::TensorList, double, bool)>(
      TBD_OPS_LIB_NAME "::_channel_max_spatial_softmax_levels_no_grad");
  check_no_grad_needed("_channel_max_spatial_softmax_levels_no_grad", x);
  const at::AutoDispatchBelowADInplaceOrView below;
  return op.call(x, temperature, scale_by_hw);
}

}  // namespace

TBD_OPS_IMPL(Autograd,
    "channel_max_spatial_softmax", TORCH_FN(cmss_autograd),
    "_channel_max_spatial_softmax_levels", TORCH_FN(cmss_levels_autograd),
    "_channel_max_spatial_softmax_no_grad", TORCH_FN(cmss_no_grad_autograd),
    "_channel_max_spatial_softmax_levels_no_grad", TORCH_FN(cmss_levels_no_grad_autograd))

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/channel_max_spatial_softmax.cu, the shared
// pieces csrc/cuda_glue.h. One level and a list of levels take the same launchers (every level
// of a list in the same launches).
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

using Outputs = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// with_argmax false: no argmax tensors (the kernels skip its stores).
Outputs forward_levels(at::TensorList x, double temperature, bool scale_by_hw, bool with_argmax = true) {
  std::vector<at::Tensor> out, log_p, argmax;
  if (x.empty()) return {out, log_p, argmax};
  const DeviceGuard guard(x[0].device());
  std::vector<cuda::CmssLevel> lv(x.size());
  for (size_t l = 0; l < x.size(); ++l) {
    const at::Tensor& t = x[l];
    const int64_t N = t.size(0), H = t.size(2), W = t.size(3);
    out.push_back(cuda_glue::empty({N, H, W}, t.options()));
    log_p.push_back(cuda_glue::empty({N, H, W}, t.options().dtype(acc_dtype(t.scalar_type()))));
    argmax.push_back(with_argmax ? cuda_glue::empty({N, H, W}, t.options().dtype(at::kLong)) : at::Tensor());
    cuda::CmssLevel& v = lv[l];
    v.x = t.const_data_ptr();
    for (int d = 0; d < 4; ++d) v.xs[d] = t.stride(d);
    v.N = N;
    v.K = t.size(1);
    v.H = H;
    v.W = W;
    v.out = out.back().mutable_data_ptr();
    v.log_p = log_p.back().mutable_data_ptr();
    v.argmax = with_argmax ? argmax.back().mutable_data_ptr<int64_t>() : nullptr;
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

at::Tensor cmss_no_grad_cuda(const at::Tensor& x, double temperature, bool scale_by_hw) {
  cmss_check(x, temperature);
  return std::get<0>(forward_levels({x}, temperature, scale_by_hw, false))[0];
}

std::vector<at::Tensor> cmss_levels_no_grad_cuda(at::TensorList x, double temperature, bool scale_by_hw) {
  cmss_levels_check(x, temperature);
  return std::get<0>(forward_levels(x, temperature, scale_by_hw, false));
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

TBD_OPS_IMPL(TBD_OPS_CUDA_KEY,
    "channel_max_spatial_softmax", TORCH_FN(cmss_cuda),
    "_channel_max_spatial_softmax_backward", TORCH_FN(cmss_backward_cuda),
    "_channel_max_spatial_softmax_levels", TORCH_FN(cmss_levels_cuda),
    "_channel_max_spatial_softmax_no_grad", TORCH_FN(cmss_no_grad_cuda),
    "_channel_max_spatial_softmax_levels_no_grad", TORCH_FN(cmss_levels_no_grad_cuda),
    "_channel_max_spatial_softmax_levels_backward", TORCH_FN(cmss_levels_backward_cuda))

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
