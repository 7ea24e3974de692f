// CUDA registration of prediction_guided_assign: validation, allocation,
// device guard and current stream (see cuda/glue.h).
#include "../csrc/prediction_guided_assign.h"
#include "glue.h"
#include "prediction_guided_assign.h"

namespace tbd_ops {
namespace {

using cuda_glue::current_stream;
using cuda_glue::DeviceGuard;
using cuda_glue::dtype_of;
using cuda_glue::launch;

std::tuple<at::Tensor, at::Tensor> prediction_guided_assign_cuda(
    const at::Tensor& boxes, const at::Tensor& scores, const at::Tensor& pseudo_boxes,
    const at::Tensor& pseudo_labels, at::IntArrayRef proposal_counts,
    at::IntArrayRef pseudo_counts, const c10::optional<at::Tensor>& valid, double iou_thr,
    int64_t topk, double alpha) {
  const AssignProblem pb = assign_prepare("prediction_guided_assign", boxes, scores, pseudo_boxes,
                                          pseudo_labels, proposal_counts, pseudo_counts, valid,
                                          iou_thr, topk, alpha);
  const DeviceGuard guard(boxes.device());
  auto gt_inds = cuda_glue::empty({pb.P}, boxes.options().dtype(at::kLong));
  auto q = cuda_glue::empty({pb.P}, boxes.options());
  cuda::AssignArgs a{};
  a.boxes = boxes.const_data_ptr();
  a.bs0 = boxes.stride(0);
  a.bs1 = boxes.stride(1);
  a.scores = scores.const_data_ptr();
  a.ss0 = scores.stride(0);
  a.ss1 = scores.stride(1);
  a.C = pb.C;
  a.pseudo_boxes = pb.pseudo_boxes.const_data_ptr();
  a.pseudo_labels = pb.pseudo_labels.const_data_ptr<int64_t>();
  a.valid = pb.valid.defined() ? pb.valid.const_data_ptr<bool>() : nullptr;
  a.p_offsets = pb.p_offsets.data();
  a.m_offsets = pb.m_offsets.data();
  a.N = pb.N;
  a.iou_thr = pb.iou_thr;
  a.alpha = pb.alpha;
  a.eps = kIouEps;
  a.topk = pb.topk;
  const auto dt = dtype_of(boxes);
  const size_t ws_bytes = cuda::prediction_guided_assign_workspace(dt, a);
  at::Tensor workspace = cuda_glue::empty({static_cast<int64_t>(ws_bytes)},
                                          boxes.options().dtype(at::kByte));
  launch([&] {
    cuda::prediction_guided_assign(dt, a, gt_inds.mutable_data_ptr<int64_t>(),
                                   q.mutable_data_ptr(),
                                   ws_bytes ? workspace.mutable_data_ptr() : nullptr,
                                   current_stream());
  });
  return {gt_inds, q};
}

}  // namespace

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, TBD_OPS_CUDA_KEY, m) {
  m.impl("prediction_guided_assign", TORCH_FN(prediction_guided_assign_cuda));
}

}  // namespace tbd_ops
