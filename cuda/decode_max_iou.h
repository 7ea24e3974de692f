// Host entry points of the decode_max_iou (p_r) CUDA kernels. Plain C++ (no
// PyTorch, no CUDA headers): the registration glue (csrc/decode_max_iou.cpp)
// validates and allocates, these launch on the given stream and never
// synchronize.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dtype.h"
#include "tbd_ops/box.h"
#include "tbd_ops/layout.h"

namespace tbd_ops {
namespace cuda {

struct DecodeIouArgs {
  const void* pred;        // dtype dt, layout pl
  PredLayout pl;
  const void* priors;      // dtype dt, [P, >= prior_dim] or nullptr (coder none)
  int64_t prior_s0, prior_s1;
  int prior_dim;
  const void* gts;         // dtype dt, contiguous [sum G_n, 4]
  const int64_t* gt_offsets;  // HOST array of N + 1 offsets into gts
  int64_t N, P;
  CoderParams<double> params;
  // Per-image clip shapes: DEVICE array [N, 2] of (h, w) in the accumulation
  // type (float, double for kDouble), contiguous; overrides params.max_h/max_w.
  // nullptr: params alone.
  const void* max_shapes;
  double eps;
};

// iou: [N, P] contiguous, dtype dt; arg: [N, P] int64.
void decode_max_iou_forward(DType dt, const DecodeIouArgs& a, void* iou, int64_t* arg,
                            void* stream);

// Bytes of scratch memory the backward needs (device memory, any alignment
// of at least 256 bytes).
size_t decode_max_iou_backward_workspace(DType dt, const DecodeIouArgs& a, bool want_priors,
                                         bool want_gts);

// grad_iou: [N, P] with strides (gs0, gs1). Outputs may be null when not
// requested: grad_pred (layout gpl), grad_priors ([P, prior_dim] contiguous),
// grad_gts ([sum G_n, 4] contiguous). Every requested output is fully written.
// The ground-truth rows must number less than 2^31 - 1.
void decode_max_iou_backward(DType dt, const DecodeIouArgs& a, const void* grad_iou,
                             int64_t gs0, int64_t gs1, const int64_t* arg, void* grad_pred,
                             const PredLayout& gpl, void* grad_priors, void* grad_gts,
                             void* workspace, void* stream);

}  // namespace cuda
}  // namespace tbd_ops
