// Host entry points of the masked reductions (masked_sq_dist, masked_l1;
// SPEC 1.5). Plain C++ (no PyTorch, no CUDA headers): the registration glue
// (csrc/masked_reduce.cpp) validates and allocates, these launch on the
// given stream and never synchronize. Every level of a list is done by the
// same launches (two for the forward, one for the backward, up to kMaxLevels =
// 8 levels; as many more per further 8).
#pragma once

#include <cstdint>

#include "dtype.h"
#include "tbd_ops/masked_reduce.h"

namespace tbd_ops {
namespace cuda {

// One level: a, b [N, C, H, W], masks [N, K, H, W] (dtype dt, element strides
// as, bs, ms).
struct MaskedLevel {
  const void* a;
  int64_t as[4];
  const void* b;
  int64_t bs[4];
  const void* masks;
  int64_t ms[4];
  int64_t N, C, K, H, W;
  // Forward: writes out (contiguous [N, K], accumulator dtype; 0 where
  // H * W = 0) and term (contiguous [N, H, W], accumulator dtype: the
  // per-location s[n, hw] = sum_c term(a - b)).
  // Backward: reads term (the forward's; needed for grad_masks only, else may
  // be null).
  void* out;
  void* term;
  // Backward: grad [N, K] in the accumulator dtype with strides gs; each of
  // grad_a, grad_b, grad_masks (dtype dt, strides gas, gbs, gms) may be null
  // when not wanted. Every element of a wanted output is written.
  const void* grad;
  int64_t gs[2];
  void* grad_a;
  int64_t gas[4];
  void* grad_b;
  int64_t gbs[4];
  void* grad_masks;
  int64_t gms[4];
};

// Accumulator values (float, or double for kDouble) of scratch memory the
// forward needs.
int64_t masked_reduce_forward_workspace(const MaskedLevel* levels, int64_t L);

void masked_reduce_forward(MaskedMode mode, DType dt, const MaskedLevel* levels, int64_t L,
                           void* workspace, void* stream);
void masked_reduce_backward(MaskedMode mode, DType dt, const MaskedLevel* levels, int64_t L,
                            void* stream);

}  // namespace cuda
}  // namespace tbd_ops
