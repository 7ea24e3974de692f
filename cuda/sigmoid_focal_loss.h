// Host entry points of the sigmoid_focal_loss CUDA kernels (SPEC 2.4). Plain
// C++ (no PyTorch, no CUDA headers): the registration glue
// (csrc/sigmoid_focal_loss.cpp) validates and allocates, these launch on
// the given stream and never synchronize.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dtype.h"
#include "tbd_ops/focal.h"

namespace tbd_ops {
namespace cuda {

struct FocalArgs {
  const void* logits;      // dtype dt, [R, C] with element strides (xs0, xs1)
  int64_t xs0, xs1;
  const int64_t* targets;  // [R] with stride ts0; a value outside [0, C] makes its row NaN
  int64_t ts0;
  const void* weight;      // contiguous [R] in the accumulation dtype, or nullptr
  int64_t R, C;
  double gamma, alpha;
  FocalReduction reduction;
};

// Accumulator values of scratch memory the forward needs (partials of the sum;
// 0 for reduction "none"); the caller allocates them in the accumulation dtype.
int64_t focal_partials(const FocalArgs& a);

// "none": writes out, contiguous [R, C] in dtype dt. "sum"/"mean": writes the
// 0-d out in the accumulation dtype (float, or double for kDouble).
void sigmoid_focal_loss_forward(DType dt, const FocalArgs& a, void* out, void* partials,
                                void* stream);

// grad: [R, C] in dtype dt with strides (gs0, gs1) for "none", else one
// accumulator value (device memory). grad_logits (contiguous [R, C], dtype dt)
// and grad_weight (contiguous [R], accumulation dtype; needs a.weight) may be
// null when not wanted.
void sigmoid_focal_loss_backward(DType dt, const FocalArgs& a, const void* grad, int64_t gs0,
                                 int64_t gs1, void* grad_logits, void* grad_weight, void* stream);

}  // namespace cuda
}  // namespace tbd_ops
