// masked_reduce (SPEC 1.5): schemas, argument checks and autocast of the op
// family masked_sq_dist / masked_l1.
// Kernels: csrc/cpu/masked_reduce.cpp, cuda/masked_reduce.cu; fake kernels and
// autograd: python/tbd_ops/ops/masked_reduce.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "masked_reduce.h"

namespace tbd_ops {

void masked_reduce_check(const char* op, const at::Tensor& a, const at::Tensor& b,
                         const at::Tensor& masks) {
  TORCH_CHECK_VALUE(a.dim() == 4, op, ": a must be a 4-D tensor [N, C, H, W], got a ", a.dim(),
                    "-D tensor of shape ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 4, op, ": b must be a 4-D tensor [N, C, H, W], got a ", b.dim(),
                    "-D tensor of shape ", b.sizes());
  TORCH_CHECK_VALUE(masks.dim() == 4, op, ": masks must be a 4-D tensor [N, K, H, W], got a ",
                    masks.dim(), "-D tensor of shape ", masks.sizes());
  check_float(op, "a", a);
  check_float(op, "b", b);
  check_float(op, "masks", masks);
  TORCH_CHECK_VALUE(b.sizes() == a.sizes(), op, ": b must have the shape of a ", a.sizes(),
                    ", got ", b.sizes());
  TORCH_CHECK_VALUE(masks.size(0) == a.size(0) && masks.size(2) == a.size(2) &&
                        masks.size(3) == a.size(3),
                    op, ": masks must be [N, K, H, W] = [", a.size(0), ", K, ", a.size(2), ", ",
                    a.size(3), "] (N, H, W of a), got ", masks.sizes());
  check_same_dtype(op, "b", b, "a", a);
  check_same_dtype(op, "masks", masks, "a", a);
  check_same_device(op, "b", b, "a", a);
  check_same_device(op, "masks", masks, "a", a);
}

void masked_reduce_backward_check(const char* op, const at::Tensor& grad, const at::Tensor& a,
                                  const at::Tensor& b, const at::Tensor& masks) {
  masked_reduce_check(op, a, b, masks);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == a.size(0) && grad.size(1) == masks.size(1),
                    op, ": grad must be [N, K] = [", a.size(0), ", ", masks.size(1), "], got ",
                    grad.sizes());
  check_dtype(op, "grad", grad, acc_dtype(a.scalar_type()));
  check_same_device(op, "grad", grad, "a", a);
}

namespace {

// ---- autocast: the kernels read 16-bit inputs directly and accumulate in
// fp32; mixed input dtypes are promoted to a common one (autocast's "promote"
// policy), everything else is left as it is.
template <const char* kName>
at::Tensor masked_autocast(const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks) {
  const AutocastOff off;
  static auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(kName);
  const auto t = promote_dtype(a, b, masks);
  return t ? op.call(a.to(*t), b.to(*t), masks.to(*t)) : op.call(a, b, masks);
}

constexpr char kSqDistName[] = TBD_OPS_LIB_NAME "::masked_sq_dist";
constexpr char kL1Name[] = TBD_OPS_LIB_NAME "::masked_l1";

}  // namespace

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def("masked_sq_dist(Tensor a, Tensor b, Tensor masks) -> Tensor");
  m.def("masked_l1(Tensor a, Tensor b, Tensor masks) -> Tensor");
  m.def(
      "_masked_sq_dist_backward(Tensor grad, Tensor a, Tensor b, Tensor masks, bool[3] output_mask)"
      " -> (Tensor grad_a, Tensor grad_b, Tensor grad_masks)");
  m.def(
      "_masked_l1_backward(Tensor grad, Tensor a, Tensor b, Tensor masks, bool[3] output_mask)"
      " -> (Tensor grad_a, Tensor grad_b, Tensor grad_masks)");
}

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, AutocastCPU, m) {
  m.impl("masked_sq_dist", TORCH_FN(masked_autocast<kSqDistName>));
  m.impl("masked_l1", TORCH_FN(masked_autocast<kL1Name>));
}

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, AutocastCUDA, m) {
  m.impl("masked_sq_dist", TORCH_FN(masked_autocast<kSqDistName>));
  m.impl("masked_l1", TORCH_FN(masked_autocast<kL1Name>));
}

}  // namespace tbd_ops
