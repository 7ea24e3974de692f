// Host entry points of the channel_max_spatial_softmax (p_c) CUDA kernels.
// Plain C++ (no PyTorch, no CUDA headers): the registration glue
// (csrc/channel_max_spatial_softmax.cpp) validates and allocates, these launch
// on the given stream and never synchronize.
#pragma once

#include <cstdint>

#include "dtype.h"

namespace tbd_ops {
namespace cuda {

// Blocks per image of the forward/backward grid; the caller allocates
// `partials` of 2 * N * blocks (forward) / N * blocks (backward) accumulator
// values (float, or double for kDouble).
int64_t cmss_blocks_per_image(int64_t hw);

// x: logits [N, K, H, W] with element strides xs[4]. Writes out (dtype of x,
// contiguous [N, H, W]), log_p (accumulator dtype, [N, H, W]) and argmax
// (int64, [N, H, W]).
void cmss_forward(DType dt, const void* x, const int64_t xs[4], int64_t N, int64_t K,
                  int64_t H, int64_t W, double temperature, bool scale_by_hw, void* out,
                  void* log_p, int64_t* argmax, void* partials, void* stream);

// grad: [N, H, W] (dtype dt) with strides gs[3]; writes dx [N, K, H, W] with
// element strides ds[4] (every element: the argmax channel gets the gradient,
// the others 0).
void cmss_backward(DType dt, const void* grad, const int64_t gs[3], const void* log_p,
                   const int64_t* argmax, int64_t N, int64_t K, int64_t H, int64_t W,
                   double temperature, bool scale_by_hw, void* dx, const int64_t ds[4],
                   void* partials, void* stream);

}  // namespace cuda
}  // namespace tbd_ops
