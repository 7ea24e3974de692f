// harmony_distillation_loss (SPEC 1.4): schemas, argument checks, autocast,
// the CUDA registration and autograd.
// Kernels: csrc/cpu/harmony_loss.cpp, cuda/harmony_loss.cu; fake kernels:
// python/tbd_ops/ops/harmony.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <string>
#include <vector>

#include "autograd.h"
#include "harmony_loss.h"

#if TBD_OPS_CUDA_GLUE
#include "../cuda/harmony_loss.h"
#include "cuda_glue.h"
#endif

namespace tbd_ops {

namespace {
constexpr Option<HarmonyMode> kHarmonyModes[] = {{"iou_guided", HarmonyMode::kIouGuided},
                                                 {"plain", HarmonyMode::kPlain}};
}  // namespace

HarmonyLevels harmony_loss_check(const char* op, at::TensorList pc_s, at::TensorList pr_s,
                                 at::TensorList pc_t, at::TensorList pr_t,
                                 const std::string& mode) {
  HarmonyLevels lv;
  lv.mode = parse_option(op, "mode", mode, kHarmonyModes);
  const int64_t L = static_cast<int64_t>(pc_s.size());
  TORCH_CHECK_VALUE(L >= 1, op, ": pc_s must hold at least one level, got 0");
  TORCH_CHECK_VALUE(static_cast<int64_t>(pr_s.size()) == L && static_cast<int64_t>(pc_t.size()) == L &&
                        static_cast<int64_t>(pr_t.size()) == L,
                    op, ": pc_s, pr_s, pc_t and pr_t must hold one map per level, got ", L, ", ",
                    pr_s.size(), ", ", pc_t.size(), " and ", pr_t.size(), " levels");
  const at::Tensor& first = pc_s[0];
  const at::TensorList lists[4] = {pc_s, pr_s, pc_t, pr_t};
  const char* names[4] = {"pc_s", "pr_s", "pc_t", "pr_t"};
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& ref = pc_s[l];
    for (int k = 0; k < 4; ++k) {
      const at::Tensor& t = lists[k][l];
      const std::string name = std::string(names[k]) + "[" + std::to_string(l) + "]";
      TORCH_CHECK_VALUE(t.dim() == 3, op, ": ", name, " must be a 3-D tensor [N, H, W], got a ",
                        t.dim(), "-D tensor of shape ", t.sizes());
      check_float(op, name, t);
      if (k > 0) {
        TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of pc_s[",
                          l, "] ", ref.sizes(), ", got ", t.sizes());
      }
      check_same_dtype(op, name, t, "pc_s[0]", first);
      check_same_device(op, name, t, "pc_s[0]", first);
    }
    TORCH_CHECK_VALUE(ref.size(0) == first.size(0), op, ": pc_s[", l, "] must hold N = ",
                      first.size(0), " images (as pc_s[0]), got ", ref.size(0), " (shape ",
                      ref.sizes(), ")");
  }
  lv.L = L;
  lv.N = first.size(0);
  return lv;
}

void harmony_eps_check(const char* op, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, op, ": eps must be finite and > 0, got ", eps);
}

HarmonyLevels harmony_loss_backward_check(const char* op, const at::Tensor& grad,
                                          const at::Tensor& norm, at::TensorList pc_s,
                                          at::TensorList pr_s, at::TensorList pc_t,
                                          at::TensorList pr_t, const std::string& mode) {
  const HarmonyLevels lv = harmony_loss_check(op, pc_s, pr_s, pc_t, pr_t, mode);
  const auto acc = acc_dtype(pc_s[0].scalar_type());
  TORCH_CHECK_VALUE(grad.dim() == 0, op, ": grad must be a 0-d tensor, got shape ", grad.sizes());
  check_dtype(op, "grad", grad, acc);
  check_same_device(op, "grad", grad, "pc_s[0]", pc_s[0]);
  TORCH_CHECK_VALUE(norm.dim() == 2 && norm.size(0) == lv.L && norm.size(1) == lv.N, op,
                    ": norm must be [L, N] = [", lv.L, ", ", lv.N, "], got ", norm.sizes());
  check_dtype(op, "norm", norm, acc);
  check_same_device(op, "norm", norm, "pc_s[0]", pc_s[0]);
  return lv;
}

namespace {

// Autocast: the kernels read 16-bit inputs directly and compute in fp32;
// mixed input dtypes are promoted to a common one.
std::tuple<at::Tensor, at::Tensor> harmony_loss_autocast(at::TensorList pc_s, at::TensorList pr_s,
                                                         at::TensorList pc_t, at::TensorList pr_t,
                                                         c10::string_view mode, double eps) {
  const AutocastOff off;
  static auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
      at::TensorList, at::TensorList, at::TensorList, at::TensorList, c10::string_view, double)>(
      TBD_OPS_LIB_NAME "::harmony_distillation_loss");
  const auto t = promote_dtype(pc_s, pr_s, pc_t, pr_t);
  if (!t) return op.call(pc_s, pr_s, pc_t, pr_t, mode, eps);
  return op.call(cast_to(pc_s, *t), cast_to(pr_s, *t), cast_to(pc_t, *t), cast_to(pr_t, *t), mode, eps);
}

// ---- autograd: the gradients of the student's maps; the teacher's are constants of the
// loss (no gradient, even if they require one). norm is not differentiable (detached).
struct HarmonyLossFunction : torch::autograd::Function<HarmonyLossFunction> {
  static autograd::variable_list forward(autograd::AutogradContext* ctx, at::TensorList pc_s,
                                         at::TensorList pr_s, at::TensorList pc_t, at::TensorList pr_t,
                                         c10::string_view mode, double eps) {
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
        at::TensorList, at::TensorList, at::TensorList, at::TensorList, c10::string_view, double)>(
        TBD_OPS_LIB_NAME "::harmony_distillation_loss");
    at::Tensor loss, norm;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(loss, norm) = op.call(pc_s, pr_s, pc_t, pr_t, mode, eps);
    }
    ctx->set_materialize_grads(false);  // no zero gradient made for norm
    autograd::variable_list saved{norm};
    for (at::TensorList maps : {pc_s, pr_s, pc_t, pr_t}) saved.insert(saved.end(), maps.begin(), maps.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["levels"] = static_cast<int64_t>(pc_s.size());
    ctx->saved_data["mode"] = std::string(mode);
    return {loss, norm};
  }

  static autograd::variable_list backward(autograd::AutogradContext* ctx, autograd::variable_list grad) {
    static auto op = typed_op<std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
        const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
        at::TensorList, c10::string_view, std::array<bool, 2>)>(
        TBD_OPS_LIB_NAME "::_harmony_distillation_loss_backward");
    const auto L = static_cast<size_t>(ctx->saved_data["levels"].toInt());
    const std::array<bool, 2> mask{autograd::any_needs(ctx, 0, L), autograd::any_needs(ctx, L, L)};
    autograd::Grads out(ctx, grad);
    if (!grad[0].defined() || !(mask[0] || mask[1])) return out.none(4 * L + 2).take();
    const auto saved = ctx->get_saved_variables();
    const auto maps = [&](size_t k) { return autograd::slice(saved, 1 + k * L, L); };
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    auto [gc, gr] = op.call(grad[0], saved[0], maps(0), maps(1), maps(2), maps(3), mode, mask);
    return out.list(0, L, gc).list(L, L, gr).none(2 * L + 2).take();
  }
};

std::tuple<at::Tensor, at::Tensor> harmony_loss_autograd(at::TensorList pc_s, at::TensorList pr_s,
                                                         at::TensorList pc_t, at::TensorList pr_t,
                                                         c10::string_view mode, double eps) {
  auto out = HarmonyLossFunction::apply(pc_s, pr_s, pc_t, pr_t, mode, eps);
  return {out[0], out[1].detach()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def(
      "harmony_distillation_loss(Tensor[] pc_s, Tensor[] pr_s, Tensor[] pc_t, Tensor[] pr_t,"
      " str mode=\"iou_guided\", float eps=1e-06) -> (Tensor loss, Tensor norm)");
  m.def(
      "_harmony_distillation_loss_backward(Tensor grad, Tensor norm, Tensor[] pc_s,"
      " Tensor[] pr_s, Tensor[] pc_t, Tensor[] pr_t, str mode, bool[2] output_mask)"
      " -> (Tensor[] grad_pc_s, Tensor[] grad_pr_s)");
}

TBD_OPS_AUTOCAST_IMPL("harmony_distillation_loss", TORCH_FN(harmony_loss_autocast))
TBD_OPS_IMPL(Autograd, "harmony_distillation_loss", TORCH_FN(harmony_loss_autograd))

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/harmony_loss.cu, the shared pieces csrc/cuda_glue.h.
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

// The level table of the launchers (grads filled by the backward).
std::vector<cuda::HarmonyLevel> levels_of(const at::TensorList lists[4], int64_t L) {
  std::vector<cuda::HarmonyLevel> out(L);
  for (int64_t l = 0; l < L; ++l) {
    cuda::HarmonyLevel& lv = out[l];
    lv = cuda::HarmonyLevel{};
    for (int k = 0; k < 4; ++k) {
      const at::Tensor& t = lists[k][l];
      lv.maps[k] = t.const_data_ptr();
      for (int d = 0; d < 3; ++d) lv.st[k][d] = t.stride(d);
    }
    lv.H = lists[0][l].size(1);
    lv.W = lists[0][l].size(2);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> harmony_distillation_loss_cuda(
    const HarmonyLevels& hl, const HarmonyMaps& lists, double eps) {
  const DeviceGuard guard(lists[0][0].device());
  const auto acc_opts = lists[0][0].options().dtype(acc_dtype(lists[0][0].scalar_type()));
  auto loss = cuda_glue::empty({}, acc_opts);
  auto norm = cuda_glue::empty({hl.L, hl.N}, acc_opts);
  const std::vector<cuda::HarmonyLevel> levels = levels_of(lists, hl.L);
  cuda::HarmonyArgs a{levels.data(), hl.L, hl.N, hl.mode, eps, 0};
  auto workspace = cuda_glue::empty({cuda::harmony_loss_workspace(a)}, acc_opts);
  launch([&] {
    cuda::harmony_loss_forward(dtype_of(lists[0][0]), a, loss.mutable_data_ptr(),
                               norm.mutable_data_ptr(), workspace.mutable_data_ptr(),
                               current_stream());
  });
  return {loss, norm};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> harmony_distillation_loss_backward_cuda(
    const HarmonyLevels& hl, const at::Tensor& grad, const at::Tensor& norm,
    const HarmonyMaps& lists, std::array<bool, 2> output_mask) {
  const DeviceGuard guard(lists[0][0].device());
  std::vector<at::Tensor> gc, gr;
  for (int64_t l = 0; l < hl.L; ++l) {
    if (output_mask[0]) gc.push_back(cuda_glue::empty_like(lists[0][l]));
    if (output_mask[1]) gr.push_back(cuda_glue::empty_like(lists[1][l]));
  }
  if (!output_mask[0] && !output_mask[1]) return {gc, gr};
  std::vector<cuda::HarmonyLevel> levels = levels_of(lists, hl.L);
  for (int64_t l = 0; l < hl.L; ++l) {
    const at::Tensor* outs[2] = {output_mask[0] ? &gc[l] : nullptr, output_mask[1] ? &gr[l] : nullptr};
    for (int k = 0; k < 2; ++k) {
      if (outs[k] == nullptr) continue;
      levels[l].grads[k] = outs[k]->mutable_data_ptr();
      for (int d = 0; d < 3; ++d) levels[l].gst[k][d] = outs[k]->stride(d);
    }
  }
  cuda::HarmonyArgs a{levels.data(), hl.L, hl.N, hl.mode, 0.0, 0};
  launch([&] {
    cuda::harmony_loss_backward(dtype_of(lists[0][0]), a, grad.const_data_ptr(), norm.const_data_ptr(),
                                norm.stride(0), norm.stride(1), current_stream());
  });
  return {gc, gr};
}

}  // namespace

TBD_OPS_IMPL(TBD_OPS_CUDA_KEY, TBD_OPS_HARMONY_LOSS_KERNELS(cuda))

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
