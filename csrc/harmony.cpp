// harmony (SPEC 1.3, 1.4): schemas, argument checks and autocast of the op
// family harmony_score / harmony_distillation_loss.
// Kernels: csrc/cpu/harmony.cpp, cuda/harmony.cu; fake kernels and autograd:
// python/tbd_ops/ops/harmony.py.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "harmony.h"

namespace tbd_ops {

void harmony_score_check(const char* op, const at::Tensor& p_c, const at::Tensor& p_r) {
  check_float(op, "p_c", p_c);
  check_float(op, "p_r", p_r);
  TORCH_CHECK_VALUE(p_r.sizes() == p_c.sizes(), op, ": p_r must have the shape of p_c ",
                    p_c.sizes(), ", got ", p_r.sizes());
  TORCH_CHECK_TYPE(p_r.scalar_type() == p_c.scalar_type(), op, ": p_r must have the dtype of p_c (",
                   p_c.scalar_type(), "), got ", p_r.scalar_type());
  TORCH_CHECK_VALUE(p_r.device() == p_c.device(), op, ": p_r must be on the device of p_c (",
                    p_c.device(), "), got ", p_r.device());
}

void harmony_score_backward_check(const char* op, const at::Tensor& grad, const at::Tensor& p_c,
                                  const at::Tensor& p_r) {
  harmony_score_check(op, p_c, p_r);
  TORCH_CHECK_VALUE(grad.sizes() == p_c.sizes(), op, ": grad must have the shape of p_c ",
                    p_c.sizes(), ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == p_c.scalar_type(), op, ": grad must have the dtype of p_c (",
                   p_c.scalar_type(), "), got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == p_c.device(), op, ": grad must be on the device of p_c (",
                    p_c.device(), "), got ", grad.device());
}

HarmonyLevels harmony_loss_check(const char* op, at::TensorList pc_s, at::TensorList pr_s,
                                 at::TensorList pc_t, at::TensorList pr_t,
                                 const std::string& mode) {
  HarmonyLevels lv;
  if (mode == "iou_guided") {
    lv.mode = HarmonyMode::kIouGuided;
  } else if (mode == "plain") {
    lv.mode = HarmonyMode::kPlain;
  } else {
    TORCH_CHECK_VALUE(false, op, ": mode must be \"iou_guided\" or \"plain\", got \"", mode, "\"");
  }
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
      check_float(op, name.c_str(), t);
      if (k > 0) {
        TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name, " must have the shape of pc_s[",
                          l, "] ", ref.sizes(), ", got ", t.sizes());
      }
      TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), op, ": ", name,
                       " must have the dtype of pc_s[0] (", first.scalar_type(), "), got ",
                       t.scalar_type());
      TORCH_CHECK_VALUE(t.device() == first.device(), op, ": ", name,
                        " must be on the device of pc_s[0] (", first.device(), "), got ",
                        t.device());
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
  TORCH_CHECK_TYPE(grad.scalar_type() == acc, op, ": grad must be ", acc, ", got ",
                   grad.scalar_type());
  TORCH_CHECK_VALUE(grad.device() == pc_s[0].device(), op, ": grad must be on the device of pc_s[0] (",
                    pc_s[0].device(), "), got ", grad.device());
  TORCH_CHECK_VALUE(norm.dim() == 2 && norm.size(0) == lv.L && norm.size(1) == lv.N, op,
                    ": norm must be [L, N] = [", lv.L, ", ", lv.N, "], got ", norm.sizes());
  TORCH_CHECK_TYPE(norm.scalar_type() == acc, op, ": norm must be ", acc, ", got ",
                   norm.scalar_type());
  TORCH_CHECK_VALUE(norm.device() == pc_s[0].device(), op, ": norm must be on the device of pc_s[0] (",
                    pc_s[0].device(), "), got ", norm.device());
  return lv;
}

namespace {

// ---- autocast: the kernels read 16-bit inputs directly and compute in fp32;
// mixed input dtypes are promoted to a common one (autocast's "promote"
// policy), everything else is left as it is.
at::Tensor harmony_score_autocast(const at::Tensor& p_c, const at::Tensor& p_r) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(TBD_OPS_LIB_NAME "::harmony_score", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  if (!at::isFloatingType(p_c.scalar_type()) || !at::isFloatingType(p_r.scalar_type()) ||
      p_c.scalar_type() == p_r.scalar_type()) {
    return op.call(p_c, p_r);
  }
  const auto t = at::promoteTypes(p_c.scalar_type(), p_r.scalar_type());
  return op.call(p_c.to(t), p_r.to(t));
}

std::tuple<at::Tensor, at::Tensor> harmony_loss_autocast(at::TensorList pc_s, at::TensorList pr_s,
                                                         at::TensorList pc_t, at::TensorList pr_t,
                                                         c10::string_view mode, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow(TBD_OPS_LIB_NAME "::harmony_distillation_loss", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                           c10::string_view, double)>();
  const at::TensorList lists[4] = {pc_s, pr_s, pc_t, pr_t};
  bool all_float = true, mixed = false;
  at::ScalarType common = at::ScalarType::Undefined;
  for (const auto& list : lists) {
    for (const auto& t : list) {
      if (!at::isFloatingType(t.scalar_type())) {
        all_float = false;
      } else if (common == at::ScalarType::Undefined) {
        common = t.scalar_type();
      } else if (t.scalar_type() != common) {
        mixed = true;
        common = at::promoteTypes(common, t.scalar_type());
      }
    }
  }
  if (!all_float || !mixed) return op.call(pc_s, pr_s, pc_t, pr_t, mode, eps);
  std::vector<at::Tensor> cast[4];
  for (int k = 0; k < 4; ++k) {
    for (const auto& t : lists[k]) cast[k].push_back(t.to(common));
  }
  return op.call(cast[0], cast[1], cast[2], cast[3], mode, eps);
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
