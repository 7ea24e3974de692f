// harmony_score (SPEC 1.3): schemas, argument checks, autocast, the CUDA
// registration and autograd.
// Kernels: csrc/cpu/harmony_score.cpp, cuda/harmony_score.cu; fake kernels:
// python/tbd_ops/ops/harmony.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "autograd.h"
#include "harmony_score.h"

#if TBD_OPS_CUDA_GLUE
#include <ATen/TensorIterator.h>

#include "../cuda/harmony_score.h"
#include "cuda_glue.h"
#endif

namespace tbd_ops {

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

namespace {

// Autocast: the kernels read 16-bit inputs directly and compute in fp32;
// mixed input dtypes are promoted to a common one.
at::Tensor harmony_score_autocast(const at::Tensor& p_c, const at::Tensor& p_r) {
  const AutocastOff off;
  static auto op =
      typed_op<at::Tensor(const at::Tensor&, const at::Tensor&)>(TBD_OPS_LIB_NAME "::harmony_score");
  const auto t = promote_dtype(p_c, p_r);
  return t ? op.call(p_c.to(*t), p_r.to(*t)) : op.call(p_c, p_r);
}

// ---- autograd
struct HarmonyScoreFunction : torch::autograd::Function<HarmonyScoreFunction> {
  static at::Tensor forward(autograd::AutogradContext* ctx, const at::Tensor& p_c, const at::Tensor& p_r) {
    static auto op =
        typed_op<at::Tensor(const at::Tensor&, const at::Tensor&)>(TBD_OPS_LIB_NAME "::harmony_score");
    ctx->save_for_backward({p_c, p_r});
    const at::AutoDispatchBelowADInplaceOrView below;
    return op.call(p_c, p_r);
  }

  static autograd::variable_list backward(autograd::AutogradContext* ctx, autograd::variable_list grad) {
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, std::array<bool, 2>)>(
        TBD_OPS_LIB_NAME "::_harmony_score_backward");
    const std::array<bool, 2> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    autograd::Grads out(ctx, grad);
    if (!grad[0].defined() || !(mask[0] || mask[1])) return out.none(2).take();
    const auto saved = ctx->get_saved_variables();
    auto [gc, gr] = op.call(grad[0], saved[0], saved[1], mask);
    return out.tensor(0, mask[0] ? gc : at::Tensor()).tensor(1, mask[1] ? gr : at::Tensor()).take();
  }
};

at::Tensor harmony_score_autograd(const at::Tensor& p_c, const at::Tensor& p_r) {
  return HarmonyScoreFunction::apply(p_c, p_r);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def("harmony_score(Tensor p_c, Tensor p_r) -> Tensor");
  m.def(
      "_harmony_score_backward(Tensor grad, Tensor p_c, Tensor p_r, bool[2] output_mask)"
      " -> (Tensor grad_p_c, Tensor grad_p_r)");
}

TBD_OPS_AUTOCAST_IMPL("harmony_score", TORCH_FN(harmony_score_autocast))
TBD_OPS_IMPL(Autograd, "harmony_score", TORCH_FN(harmony_score_autograd))

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/harmony_score.cu, the shared pieces csrc/cuda_glue.h.
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

// The elementwise problem over `outs` and `ins` (one shape, one dtype): a
// TensorIterator drops dimensions of size 1 and merges those contiguous in
// every tensor; the launchers take its shape and element strides, the
// innermost dimension last. Returns false if more than kHarmonyMaxRank
// dimensions remain.
bool nd_layout(const std::vector<at::Tensor>& outs, const std::vector<at::Tensor>& ins,
               cuda::NdShape& shape, std::vector<cuda::NdStrides>& strides) {
  at::TensorIteratorConfig cfg;
  cfg.check_all_same_dtype(true).resize_outputs(false);
  for (const at::Tensor& t : outs) cfg.add_output(t);
  for (const at::Tensor& t : ins) cfg.add_const_input(t);
  const at::TensorIterator iter = cfg.build();
  const int rank = iter.ndim();
  if (rank > cuda::kHarmonyMaxRank) return false;
  shape = cuda::NdShape{};
  shape.rank = rank;
  strides.assign(iter.ntensors(), cuda::NdStrides{});
  for (int d = 0; d < rank; ++d) {  // the iterator's dimension 0 is the innermost
    shape.sizes[rank - 1 - d] = iter.shape()[d];
    for (int k = 0; k < iter.ntensors(); ++k) {
      strides[k].s[rank - 1 - d] = iter.strides(k)[d] / iter.element_size(k);
    }
  }
  return true;
}

void score_forward(const at::Tensor& p_c, const at::Tensor& p_r, const at::Tensor& out) {
  cuda::NdShape shape;
  std::vector<cuda::NdStrides> st;
  if (!nd_layout({out}, {p_c, p_r}, shape, st)) {
    // Beyond kHarmonyMaxRank dimensions that do not merge: contiguous copies.
    auto tmp = cuda_glue::empty(p_c.sizes(), p_c.options());
    score_forward(p_c.contiguous(), p_r.contiguous(), tmp);
    out.copy_(tmp);
    return;
  }
  launch([&] {
    cuda::harmony_score_forward(dtype_of(p_c), shape, p_c.const_data_ptr(), st[1],
                                p_r.const_data_ptr(), st[2], out.mutable_data_ptr(), st[0],
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
  cuda::NdShape shape;
  std::vector<cuda::NdStrides> st;
  // Operands: the wanted outputs (grad_p_c, grad_p_r), then grad, p_c, p_r.
  std::vector<at::Tensor> outs;
  if (gc.defined()) outs.push_back(gc);
  if (gr.defined()) outs.push_back(gr);
  if (!nd_layout(outs, {grad, p_c, p_r}, shape, st)) {
    at::Tensor tc, tr;
    if (gc.defined()) tc = cuda_glue::empty(p_c.sizes(), p_c.options());
    if (gr.defined()) tr = cuda_glue::empty(p_r.sizes(), p_r.options());
    score_backward(grad.contiguous(), p_c.contiguous(), p_r.contiguous(), tc, tr);
    if (gc.defined()) gc.copy_(tc);
    if (gr.defined()) gr.copy_(tr);
    return;
  }
  const size_t k = outs.size();
  const cuda::NdStrides none{};
  const cuda::NdStrides& gcs = gc.defined() ? st[0] : none;
  const cuda::NdStrides& grs = gr.defined() ? st[k - 1] : none;
  launch([&] {
    cuda::harmony_score_backward(dtype_of(p_c), shape, grad.const_data_ptr(), st[k],
                                 p_c.const_data_ptr(), st[k + 1], p_r.const_data_ptr(),
                                 st[k + 2], gc.defined() ? gc.mutable_data_ptr() : nullptr, gcs,
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

}  // namespace

TBD_OPS_IMPL(TBD_OPS_CUDA_KEY,
    "harmony_score", TORCH_FN(harmony_score_cuda),
    "_harmony_score_backward", TORCH_FN(harmony_score_backward_cuda))

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
