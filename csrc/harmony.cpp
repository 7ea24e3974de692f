// harmony (SPEC 1.3, 1.4): schemas, argument checks and autocast of the op
// family harmony_score / harmony_distillation_loss.
// Kernels: csrc/cpu/harmony.cpp, cuda/harmony.cu; fake kernels and autograd:
// python/tbd_ops/ops/harmony.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "harmony.h"

namespace tbd_ops {

namespace {
constexpr Option<HarmonyMode> kHarmonyModes[] = {{"iou_guided", HarmonyMode::kIouGuided},
                                                 {"plain", HarmonyMode::kPlain}};
}  // namespace

void harmony_score_check(const char* op, const at::Tensor& p_c, const at::Tensor& p_r) {
  check_float(op, "p_c", p_c);
  check_float(op, "p_r", p_r);
  TORCH_CHECK_VALUE(p_r.sizes() == p_c.sizes(), op, ": p_r must have the shape of p_c ",
                    p_c.sizes(), ", got ", p_r.sizes());
  check_same_dtype(op, "p_r", p_r, "p_c", p_c);
  check_same_device(op, "p_r", p_r, "p_c", p_c);
}

void harmony_score_backward_check(const char* op, const at::Tensor& grad, const at::Tensor& p_c,
                                  const at::Tensor& p_r) {
  harmony_score_check(op, p_c, p_r);
  TORCH_CHECK_VALUE(grad.sizes() == p_c.sizes(), op, ": grad must have the shape of p_c ",
                    p_c.sizes(), ", got ", grad.sizes());
  check_same_dtype(op, "grad", grad, "p_c", p_c);
  check_same_device(op, "grad", grad, "p_c", p_c);
}

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

// ---- autocast: the kernels read 16-bit inputs directly and compute in fp32;
// mixed input dtypes are promoted to a common one (autocast's "promote"
// policy), everything else is left as it is.
at::Tensor harmony_score_autocast(const at::Tensor& p_c, const at::Tensor& p_r) {
  const AutocastOff off;
  static auto op =
      typed_op<at::Tensor(const at::Tensor&, const at::Tensor&)>(TBD_OPS_LIB_NAME "::harmony_score");
  const auto t = promote_dtype(p_c, p_r);
  return t ? op.call(p_c.to(*t), p_r.to(*t)) : op.call(p_c, p_r);
}

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def("harmony_score(Tensor p_c, Tensor p_r) -> Tensor");
  m.def(
      "_harmony_score_backward(Tensor grad, Tensor p_c, Tensor p_r, bool[2] output_mask)"
      " -> (Tensor grad_p_c, Tensor grad_p_r)");
  m.def(
      "harmony_distillation_loss(Tensor[] pc_s, Tensor[] pr_s, Tensor[] pc_t, Tensor[] pr_t,"
      " str mode=\"iou_guided\", float eps=1e-06) -> (Tensor loss, Tensor norm)");
  m.def(
      "_harmony_distillation_loss_backward(Tensor grad, Tensor norm, Tensor[] pc_s,"
      " Tensor[] pr_s, Tensor[] pc_t, Tensor[] pr_t, str mode, bool[2] output_mask)"
      " -> (Tensor[] grad_pc_s, Tensor[] grad_pr_s)");
}

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, AutocastCPU, m) {
  m.impl("harmony_score", TORCH_FN(harmony_score_autocast));
  m.impl("harmony_distillation_loss", TORCH_FN(harmony_loss_autocast));
}

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, AutocastCUDA, m) {
  m.impl("harmony_score", TORCH_FN(harmony_score_autocast));
  m.impl("harmony_distillation_loss", TORCH_FN(harmony_loss_autocast));
}

}  // namespace tbd_ops
