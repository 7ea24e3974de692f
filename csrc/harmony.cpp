// harmony (SPEC 1.3, 1.4): schemas, argument checks, autocast and the CUDA
// registration of the op family harmony_score / harmony_distillation_loss.
// Kernels: csrc/cpu/harmony.cpp, cuda/harmony.cu; fake kernels and autograd:
// python/tbd_ops/ops/harmony.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <string>
#include <vector>

#include "harmony.h"

#if TBD_OPS_CUDA_GLUE
#include "../cuda/harmony.h"
#include "cuda_glue.h"
#endif

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

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/harmony.cu, the shared pieces csrc/cuda_glue.h.
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

// Shape and strides of an elementwise problem, dimensions of size 1 dropped
// and neighbours that are contiguous in every tensor merged. Returns false if
// more than kHarmonyMaxRank dimensions remain.
bool nd_layout(const std::vector<const at::Tensor*>& ts, cuda::NdShape& shape,
               std::vector<cuda::NdStrides>& strides) {
  const at::Tensor& ref = *ts[0];
  std::vector<int64_t> sizes;
  std::vector<std::vector<int64_t>> st(ts.size());
  for (int64_t d = 0; d < ref.dim(); ++d) {
    const int64_t size = ref.size(d);
    if (size == 1) continue;
    bool merge = !sizes.empty();
    for (size_t k = 0; merge && k < ts.size(); ++k) {
      merge = st[k].back() == ts[k]->stride(d) * size;
    }
    if (merge) {
      sizes.back() *= size;
      for (size_t k = 0; k < ts.size(); ++k) st[k].back() = ts[k]->stride(d);
    } else {
      sizes.push_back(size);
      for (size_t k = 0; k < ts.size(); ++k) st[k].push_back(ts[k]->stride(d));
    }
  }
  if (sizes.size() > static_cast<size_t>(cuda::kHarmonyMaxRank)) return false;
  shape = cuda::NdShape{};
  shape.rank = static_cast<int>(sizes.size());
  strides.assign(ts.size(), cuda::NdStrides{});
  for (size_t d = 0; d < sizes.size(); ++d) {
    shape.sizes[d] = sizes[d];
    for (size_t k = 0; k < ts.size(); ++k) strides[k].s[d] = st[k][d];
  }
  return true;
}

void score_forward(const at::Tensor& p_c, const at::Tensor& p_r, const at::Tensor& out) {
  cuda::NdShape shape;
  std::vector<cuda::NdStrides> st;
  if (!nd_layout({&p_c, &p_r, &out}, shape, st)) {
    // Beyond kHarmonyMaxRank dimensions that do not merge: contiguous copies.
    auto tmp = cuda_glue::empty(p_c.sizes(), p_c.options());
    score_forward(p_c.contiguous(), p_r.contiguous(), tmp);
    out.copy_(tmp);
    return;
  }
  launch([&] {
    cuda::harmony_score_forward(dtype_of(p_c), shape, p_c.const_data_ptr(), st[0],
                                p_r.const_data_ptr(), st[1], out.mutable_data_ptr(), st[2],
                                current_stream());
  });
}

at::Tensor harmony_score_cuda(const at::Tensor& p_c, const at::Tensor& p_r) {
  harmony_score_check("harmony_score", p_c, p_r);
  const DeviceGuard guard(p_c.device());
  auto out = cuda_glue::empty_like(p_c);
  if (out.numel() > 0) score_forward(p_c, p_r, out);
  return out;
}

void score_backward(const at::Tensor& grad, const at::Tensor& p_c, const at::Tensor& p_r,
                    const at::Tensor& gc, const at::Tensor& gr) {
  std::vector<const at::Tensor*> ts = {&grad, &p_c, &p_r};
  if (gc.defined()) ts.push_back(&gc);
  if (gr.defined()) ts.push_back(&gr);
  cuda::NdShape shape;
  std::vector<cuda::NdStrides> st;
  if (!nd_layout(ts, shape, st)) {
    at::Tensor tc, tr;
    if (gc.defined()) tc = cuda_glue::empty(p_c.sizes(), p_c.options());
    if (gr.defined()) tr = cuda_glue::empty(p_r.sizes(), p_r.options());
    score_backward(grad.contiguous(), p_c.contiguous(), p_r.contiguous(), tc, tr);
    if (gc.defined()) gc.copy_(tc);
    if (gr.defined()) gr.copy_(tr);
    return;
  }
  const cuda::NdStrides none{};
  const size_t k = 3;
  const cuda::NdStrides& gcs = gc.defined() ? st[k] : none;
  const cuda::NdStrides& grs = gr.defined() ? st[gc.defined() ? k + 1 : k] : none;
  launch([&] {
    cuda::harmony_score_backward(dtype_of(p_c), shape, grad.const_data_ptr(), st[0],
                                 p_c.const_data_ptr(), st[1], p_r.const_data_ptr(), st[2],
                                 gc.defined() ? gc.mutable_data_ptr() : nullptr, gcs,
                                 gr.defined() ? gr.mutable_data_ptr() : nullptr, grs,
                                 current_stream());
  });
}

std::tuple<at::Tensor, at::Tensor> harmony_score_backward_cuda(const at::Tensor& grad,
                                                                const at::Tensor& p_c,
                                                                const at::Tensor& p_r,
                                                                std::array<bool, 2> output_mask) {
  harmony_score_backward_check("_harmony_score_backward", grad, p_c, p_r);
  const DeviceGuard guard(p_c.device());
  at::Tensor gc = output_mask[0] ? cuda_glue::empty_like(p_c) : at::Tensor();
  at::Tensor gr = output_mask[1] ? cuda_glue::empty_like(p_r) : at::Tensor();
  if (p_c.numel() > 0 && (gc.defined() || gr.defined())) score_backward(grad, p_c, p_r, gc, gr);
  return {gc.defined() ? gc : at::empty({0}, p_c.options()),
          gr.defined() ? gr : at::empty({0}, p_r.options())};
}

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
    at::TensorList pc_s, at::TensorList pr_s, at::TensorList pc_t, at::TensorList pr_t,
    c10::string_view mode, double eps) {
  const char* op = "harmony_distillation_loss";
  const HarmonyLevels hl = harmony_loss_check(op, pc_s, pr_s, pc_t, pr_t, std::string(mode));
  harmony_eps_check(op, eps);
  const DeviceGuard guard(pc_s[0].device());
  const auto acc_opts = pc_s[0].options().dtype(acc_dtype(pc_s[0].scalar_type()));
  auto loss = cuda_glue::empty({}, acc_opts);
  auto norm = cuda_glue::empty({hl.L, hl.N}, acc_opts);
  const at::TensorList lists[4] = {pc_s, pr_s, pc_t, pr_t};
  const std::vector<cuda::HarmonyLevel> levels = levels_of(lists, hl.L);
  cuda::HarmonyArgs a{levels.data(), hl.L, hl.N, hl.mode, eps, 0};
  auto workspace = cuda_glue::empty({cuda::harmony_loss_workspace(a)}, acc_opts);
  launch([&] {
    cuda::harmony_loss_forward(dtype_of(pc_s[0]), a, loss.mutable_data_ptr(),
                               norm.mutable_data_ptr(), workspace.mutable_data_ptr(),
                               current_stream());
  });
  return {loss, norm};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> harmony_distillation_loss_backward_cuda(
    const at::Tensor& grad, const at::Tensor& norm, at::TensorList pc_s, at::TensorList pr_s,
    at::TensorList pc_t, at::TensorList pr_t, c10::string_view mode,
    std::array<bool, 2> output_mask) {
  const HarmonyLevels hl = harmony_loss_backward_check("_harmony_distillation_loss_backward", grad,
                                                       norm, pc_s, pr_s, pc_t, pr_t,
                                                       std::string(mode));
  const DeviceGuard guard(pc_s[0].device());
  std::vector<at::Tensor> gc, gr;
  for (int64_t l = 0; l < hl.L; ++l) {
    if (output_mask[0]) gc.push_back(cuda_glue::empty_like(pc_s[l]));
    if (output_mask[1]) gr.push_back(cuda_glue::empty_like(pr_s[l]));
  }
  if (!output_mask[0] && !output_mask[1]) return {gc, gr};
  const at::TensorList lists[4] = {pc_s, pr_s, pc_t, pr_t};
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
    cuda::harmony_loss_backward(dtype_of(pc_s[0]), a, grad.const_data_ptr(), norm.const_data_ptr(),
                                norm.stride(0), norm.stride(1), current_stream());
  });
  return {gc, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, TBD_OPS_CUDA_KEY, m) {
  m.impl("harmony_score", TORCH_FN(harmony_score_cuda));
  m.impl("_harmony_score_backward", TORCH_FN(harmony_score_backward_cuda));
  m.impl("harmony_distillation_loss", TORCH_FN(harmony_distillation_loss_cuda));
  m.impl("_harmony_distillation_loss_backward", TORCH_FN(harmony_distillation_loss_backward_cuda));
}

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
