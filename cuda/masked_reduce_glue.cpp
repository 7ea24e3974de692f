// CUDA registration of the masked reductions (masked_sq_dist, masked_l1):
// validation, allocation, device guard and current stream (see cuda/glue.h).
#include <array>

#include "../csrc/masked_reduce.h"
#include "glue.h"
#include "masked_reduce.h"

namespace tbd_ops {
namespace {

using cuda_glue::current_stream;
using cuda_glue::DeviceGuard;
using cuda_glue::dtype_of;
using cuda_glue::launch;

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

}  // namespace tbd_ops
