// CUDA registration of consistency_voting: validation, allocation, device
// guard and current stream (see cuda/glue.h). gt_inds values are not
// range-checked here (that would synchronize with the host): the kernels
// count a value outside [0, M_n] as background.
#include "../csrc/consistency_voting.h"
#include "consistency_voting.h"
#include "glue.h"

namespace tbd_ops {
namespace {

using cuda_glue::current_stream;
using cuda_glue::DeviceGuard;
using cuda_glue::dtype_of;
using cuda_glue::launch;

std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_voting_cuda(
    const at::Tensor& pred_boxes, const at::Tensor& gt_inds, const at::Tensor& pseudo_boxes,
    at::IntArrayRef roi_counts, at::IntArrayRef pseudo_counts, c10::string_view mode) {
  const VotingProblem pb = voting_prepare("consistency_voting", pred_boxes, gt_inds, pseudo_boxes,
                                          roi_counts, pseudo_counts, mode);
  const DeviceGuard guard(pred_boxes.device());
  const auto acc_opts = pred_boxes.options().dtype(acc_dtype(pred_boxes.scalar_type()));
  auto sigma = cuda_glue::empty({pb.M}, acc_opts);
  auto w = cuda_glue::empty({pb.R}, acc_opts);
  auto reg_scale = cuda_glue::empty({}, acc_opts);
  auto sigma_r = cuda_glue::empty({pb.R}, acc_opts);
  cuda::VotingArgs a{};
  a.pred_boxes = pred_boxes.const_data_ptr();
  a.bs0 = pred_boxes.stride(0);
  a.bs1 = pred_boxes.stride(1);
  a.gt_inds = gt_inds.const_data_ptr<int64_t>();
  a.gs0 = gt_inds.stride(0);
  a.pseudo_boxes = pb.pseudo_boxes.const_data_ptr();
  a.r_offsets = pb.r_offsets.data();
  a.m_offsets = pb.m_offsets.data();
  a.N = pb.N;
  a.eps = kIouEps;
  a.mode = pb.mode;
  launch([&] {
    cuda::consistency_voting(dtype_of(pred_boxes), a, sigma.mutable_data_ptr(),
                             w.mutable_data_ptr(), reg_scale.mutable_data_ptr(),
                             pb.R ? sigma_r.mutable_data_ptr() : nullptr, current_stream());
  });
  return {sigma, w, reg_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, TBD_OPS_CUDA_KEY, m) {
  m.impl("consistency_voting", TORCH_FN(consistency_voting_cuda));
}

}  // namespace tbd_ops
