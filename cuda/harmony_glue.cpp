// CUDA registration of the harmony family (harmony_score,
// harmony_distillation_loss): validation, allocation, device guard and current
// stream (see cuda/glue.h).
#include <array>
#include <string>
#include <vector>

#include "../csrc/harmony.h"
#include "glue.h"
#include "harmony.h"

namespace tbd_ops {
namespace {

using cuda_glue::current_stream;
using cuda_glue::DeviceGuard;
using cuda_glue::dtype_of;
using cuda_glue::launch;

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

}  // namespace tbd_ops
