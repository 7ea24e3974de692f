// Host entry points of the masked reductions (masked_sq_dist, masked_l1;
// SPEC 1.5). Plain C++ (no PyTorch, no CUDA headers): the registration glue
// (csrc/masked_reduce.cpp) validates and allocates, these launch on the
// given stream and never synchronize.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "tbd_ops/masked_reduce.h"

namespace tbd_ops {
namespace cuda {

// Blocks per image of the forward's partial-sum grid; the caller allocates
// `partials` of N * K * blocks accumulator values (float, or double for
// kDouble) and `s` of N * H * W accumulator values.
int64_t masked_reduce_blocks_per_image(int64_t hw);

// a, b: [N, C, H, W], masks: [N, K, H, W] (dtype dt, element strides as, bs,
// ms). Writes out: contiguous [N, K] in the accumulator dtype (0 where
// H * W = 0).
void masked_reduce_forward(MaskedMode mode, DType dt, const void* a, const int64_t as[4],
                           const void* b, const int64_t bs[4], const void* masks,
                           const int64_t ms[4], int64_t N, int64_t C, int64_t K, int64_t H,
                           int64_t W, void* out, void* s, void* partials, void* stream);

// grad: [N, K] in the accumulator dtype with strides gs[2]. Outputs may be
// null when not wanted: grad_a and grad_b (both or neither; dtype dt, strides
// gas, gbs), grad_masks (dtype dt, strides gms). Every element of a wanted
// output is written.
void masked_reduce_backward(MaskedMode mode, DType dt, const void* grad, const int64_t gs[2],
                            const void* a, const int64_t as[4], const void* b,
                            const int64_t bs[4], const void* masks, const int64_t ms[4],
                            int64_t N, int64_t C, int64_t K, int64_t H, int64_t W, void* grad_a,
                            const int64_t gas[4], void* grad_b, const int64_t gbs[4],
                            void* grad_masks, const int64_t gms[4], void* stream);

}  // namespace cuda
}  // namespace tbd_ops
