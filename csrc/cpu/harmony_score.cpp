// CPU kernels of harmony_score (SPEC 1.3): elementwise over any shape and
// strides (TensorIterator). The per-element math is in tbd_ops/harmony.h,
// shared with the CUDA kernels (scores and gradients agree bit for bit with the
// emulated CUDA build).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include <array>

#include "../harmony_score.h"
#include "tbd_ops/harmony.h"

namespace tbd_ops {
namespace {

// The element of operand k at (i, j) of a TensorIterator 2-D loop.
template <typename T>
T& element(char** data, const int64_t* strides, int ntensors, int k, int64_t i, int64_t j) {
  return *reinterpret_cast<T*>(data[k] + i * strides[k] + j * strides[ntensors + k]);
}

at::Tensor harmony_score_cpu(const at::Tensor& p_c, const at::Tensor& p_r) {
  harmony_score_check("harmony_score", p_c, p_r);
  auto out = at::empty_like(p_c);
  if (out.numel() == 0) return out;
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(p_c)
                  .add_const_input(p_r)
                  .check_all_same_dtype(true)
                  .resize_outputs(false)
                  .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p_c.scalar_type(), "harmony_score_cpu", [&] {
    using A = acc_t<scalar_t>;
    iter.for_each([](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
      for (int64_t j = 0; j < size1; ++j) {
        for (int64_t i = 0; i < size0; ++i) {
          const A c = static_cast<A>(element<scalar_t>(data, strides, 3, 1, i, j));
          const A r = static_cast<A>(element<scalar_t>(data, strides, 3, 2, i, j));
          element<scalar_t>(data, strides, 3, 0, i, j) = static_cast<scalar_t>(harmony_score(c, r));
        }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> harmony_score_backward_cpu(const at::Tensor& grad,
                                                               const at::Tensor& p_c,
                                                               const at::Tensor& p_r,
                                                               std::array<bool, 2> output_mask) {
  harmony_score_backward_check("_harmony_score_backward", grad, p_c, p_r);
  const bool want_c = output_mask[0], want_r = output_mask[1];
  auto gc = want_c ? at::empty_like(p_c) : at::empty({0}, p_c.options());
  auto gr = want_r ? at::empty_like(p_r) : at::empty({0}, p_r.options());
  if (p_c.numel() == 0 || (!want_c && !want_r)) return {gc, gr};
  // Operands: the wanted outputs (grad_p_c, grad_p_r), then grad, p_c, p_r.
  at::TensorIteratorConfig cfg;
  if (want_c) cfg.add_output(gc);
  if (want_r) cfg.add_output(gr);
  cfg.add_const_input(grad).add_const_input(p_c).add_const_input(p_r);
  auto iter = cfg.check_all_same_dtype(true).resize_outputs(false).build();
  const int outs = int(want_c) + int(want_r), nt = outs + 3;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p_c.scalar_type(), "harmony_score_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    iter.for_each([=](char** data, const int64_t* strides, int64_t size0, int64_t size1) {
      for (int64_t j = 0; j < size1; ++j) {
        for (int64_t i = 0; i < size0; ++i) {
          const A g = static_cast<A>(element<scalar_t>(data, strides, nt, outs, i, j));
          const A c = static_cast<A>(element<scalar_t>(data, strides, nt, outs + 1, i, j));
          const A r = static_cast<A>(element<scalar_t>(data, strides, nt, outs + 2, i, j));
          const A d = harmony_grad_pr(g, c, r);
          if (want_c) element<scalar_t>(data, strides, nt, 0, i, j) = static_cast<scalar_t>(-d);
          if (want_r) element<scalar_t>(data, strides, nt, outs - 1, i, j) = static_cast<scalar_t>(d);
        }
      }
    });
  });
  return {gc, gr};
}

}  // namespace

TBD_OPS_IMPL(CPU,
    "harmony_score", TORCH_FN(harmony_score_cpu),
    "_harmony_score_backward", TORCH_FN(harmony_score_backward_cpu))

}  // namespace tbd_ops
