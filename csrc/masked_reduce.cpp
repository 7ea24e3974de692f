// masked_reduce (SPEC 1.5): schemas, argument checks, autocast and the CUDA
// registration of the op family masked_sq_dist / masked_l1.
// Kernels: csrc/cpu/masked_reduce.cpp, cuda/masked_reduce.cu; fake kernels and
// autograd: python/tbd_ops/ops/masked_reduce.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>

#include "masked_reduce.h"

#if TBD_OPS_CUDA_GLUE
#include "../cuda/masked_reduce.h"
#include "cuda_glue.h"
#endif

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

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/masked_reduce.cu, the shared pieces csrc/cuda_glue.h.
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

void strides4(const at::Tensor& t, int64_t out[4]) {
  for (int d = 0; d < 4; ++d) out[d] = t.stride(d);
}

template <MaskedMode M>
at::Tensor masked_forward_cuda(const char* op, const at::Tensor& a, const at::Tensor& b,
                               const at::Tensor& masks) {
  masked_reduce_check(op, a, b, masks);
  const DeviceGuard guard(a.device());
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), K = masks.size(1);
  const auto acc_opts = a.options().dtype(acc_dtype(a.scalar_type()));
  auto out = cuda_glue::empty({N, K}, acc_opts);
  if (N == 0 || K == 0) return out;
  const int64_t HW = H * W;
  auto s = cuda_glue::empty({N * HW}, acc_opts);
  const int64_t bpi = HW == 0 ? 0 : cuda::masked_reduce_blocks_per_image(HW);
  auto partials = cuda_glue::empty({N * K * bpi}, acc_opts);
  int64_t as[4], bs[4], ms[4];
  strides4(a, as);
  strides4(b, bs);
  strides4(masks, ms);
  launch([&] {
    cuda::masked_reduce_forward(M, dtype_of(a), a.const_data_ptr(), as, b.const_data_ptr(), bs,
                                masks.const_data_ptr(), ms, N, C, K, H, W,
                                out.mutable_data_ptr(), s.mutable_data_ptr(),
                                partials.mutable_data_ptr(), current_stream());
  });
  return out;
}

template <MaskedMode M>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward_cuda(
    const char* op, const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& masks, std::array<bool, 3> output_mask) {
  masked_reduce_backward_check(op, grad, a, b, masks);
  const DeviceGuard guard(a.device());
  const bool want_ab = output_mask[0] || output_mask[1];
  const bool want_m = output_mask[2];
  // grad_a and grad_b are computed together (grad_b = -grad_a).
  auto ga = want_ab ? cuda_glue::empty_like(a) : at::empty({0}, a.options());
  auto gb = want_ab ? cuda_glue::empty_like(b) : at::empty({0}, b.options());
  auto gm = want_m ? cuda_glue::empty_like(masks) : at::empty({0}, masks.options());
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), K = masks.size(1);
  int64_t as[4], bs[4], ms[4], gas[4] = {}, gbs[4] = {}, gms[4] = {};
  strides4(a, as);
  strides4(b, bs);
  strides4(masks, ms);
  if (want_ab) {
    strides4(ga, gas);
    strides4(gb, gbs);
  }
  if (want_m) strides4(gm, gms);
  const int64_t gs[2] = {grad.stride(0), grad.stride(1)};
  launch([&] {
    cuda::masked_reduce_backward(M, dtype_of(a), grad.const_data_ptr(), gs, a.const_data_ptr(),
                                 as, b.const_data_ptr(), bs, masks.const_data_ptr(), ms, N, C, K,
                                 H, W, want_ab ? ga.mutable_data_ptr() : nullptr, gas,
                                 want_ab ? gb.mutable_data_ptr() : nullptr, gbs,
                                 want_m ? gm.mutable_data_ptr() : nullptr, gms, current_stream());
  });
  return {output_mask[0] ? ga : at::empty({0}, a.options()),
          output_mask[1] ? gb : at::empty({0}, b.options()), gm};
}

at::Tensor masked_sq_dist_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks) {
  return masked_forward_cuda<MaskedMode::kSqDist>("masked_sq_dist", a, b, masks);
}
at::Tensor masked_l1_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks) {
  return masked_forward_cuda<MaskedMode::kL1>("masked_l1", a, b, masks);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_sq_dist_backward_cuda(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks,
    std::array<bool, 3> output_mask) {
  return masked_backward_cuda<MaskedMode::kSqDist>("_masked_sq_dist_backward", grad, a, b, masks,
                                                   output_mask);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_l1_backward_cuda(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks,
    std::array<bool, 3> output_mask) {
  return masked_backward_cuda<MaskedMode::kL1>("_masked_l1_backward", grad, a, b, masks,
                                               output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, TBD_OPS_CUDA_KEY, m) {
  m.impl("masked_sq_dist", TORCH_FN(masked_sq_dist_cuda));
  m.impl("masked_l1", TORCH_FN(masked_l1_cuda));
  m.impl("_masked_sq_dist_backward", TORCH_FN(masked_sq_dist_backward_cuda));
  m.impl("_masked_l1_backward", TORCH_FN(masked_l1_backward_cuda));
}

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
