// Host entry points of channel_max_spatial_softmax (p_c, SPEC 1.1). Plain C++
// (no PyTorch, no CUDA headers): the registration glue
// (csrc/channel_max_spatial_softmax.cpp) validates and allocates, these
// launch on the given stream and never synchronize. Every level of a list is
// done by the same launches (two for the forward, two for the backward, up to
// kMaxLevels = 8 levels; one more pair per further 8).
#pragma once

#include <cstdint>

#include "dtype.h"

namespace tbd_ops {
namespace cuda {

// One level of the forward: logits x [N, K, H, W] (element strides xs) ->
// out (dtype of x), log_p (accumulator dtype) and argmax (int64), each a
// contiguous [N, H, W]; argmax may be null (no backward to come: not stored), for
// every level of a call or for none (an empty level's is null either way).
struct CmssLevel {
  const void* x;
  int64_t xs[4];
  int64_t N, K, H, W;
  void* out;
  void* log_p;
  int64_t* argmax;
};

// One level of the backward: grad [N, H, W] (strides gs), the forward's
// log_p and argmax (contiguous) -> dx [N, K, H, W] with element strides ds
// (every element written: the argmax channel gets the gradient, the others 0).
struct CmssGradLevel {
  const void* grad;
  int64_t gs[3];
  const void* log_p;
  const int64_t* argmax;
  int64_t N, K, H, W;
  void* dx;
  int64_t ds[4];
};

// Accumulator values (float, or double for kDouble) of scratch memory.
int64_t cmss_forward_workspace(const CmssLevel* levels, int64_t L);
int64_t cmss_backward_workspace(const CmssGradLevel* levels, int64_t L);

void cmss_forward(DType dt, const CmssLevel* levels, int64_t L, double temperature,
                  bool scale_by_hw, void* workspace, void* stream);
void cmss_backward(DType dt, const CmssGradLevel* levels, int64_t L, double temperature,
                   bool scale_by_hw, void* workspace, void* stream);

// How the kernels of p_c and of the masked reductions spread the channels of
// a location over threads: 0 = by the rule on the launch's location count
// (cuda/level_table.cuh), 1 = always one thread per location, 2 = always
// split (channels_last inputs split over lanes in every case). For tests;
// returns the previous policy.
int set_channel_split_policy(int policy);
int channel_split_policy();

}  // namespace cuda
}  // namespace tbd_ops
