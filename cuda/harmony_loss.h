// Host entry points of harmony_distillation_loss (SPEC 1.4). Plain C++ (no
// PyTorch, no CUDA headers): the registration glue (csrc/harmony_loss.cpp)
// validates and allocates, these launch on the given stream and never
// synchronize.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "tbd_ops/harmony.h"

namespace tbd_ops {
namespace cuda {

// ---- harmony_distillation_loss: every level in one launch ---------------------
// Levels per launch (a kernel parameter table); more levels take one more
// launch per kHarmonyMaxLevels, with the same results.
constexpr int kHarmonyMaxLevels = 8;
// Locations per block of the partial-sum and gradient grids (default).
constexpr int64_t kHarmonyChunk = 2048;

struct HarmonyLevel {
  const void* maps[4];  // pc_s, pr_s, pc_t, pr_t: [N, H, W], dtype dt
  int64_t st[4][3];     // their element strides
  void* grads[2];       // backward: grad_pc_s, grad_pr_s ([N, H, W], dtype dt) or null
  int64_t gst[2][3];
  int64_t H, W;
};

struct HarmonyArgs {
  const HarmonyLevel* levels;  // HOST array of L levels
  int64_t L, N;
  HarmonyMode mode;
  double eps;
  int64_t chunk;  // locations per block; 0: kHarmonyChunk
};

// Accumulator values (float, or double for kDouble) of scratch memory the
// forward needs: two partial sums per (level, image, chunk) and one term per
// (level, image).
int64_t harmony_loss_workspace(const HarmonyArgs& a);

// Writes loss (0-d) and norm (contiguous [L, N]: the factor of each image's
// sum_hw w |HS^t - HS^s| in the loss), both in the accumulator dtype.
void harmony_loss_forward(DType dt, const HarmonyArgs& a, void* loss, void* norm, void* workspace,
                          void* stream);

// grad: 0-d, norm: [L, N] with strides (ns0, ns1), both in the accumulator
// dtype. Writes the levels' grads[0] / grads[1] where not null.
void harmony_loss_backward(DType dt, const HarmonyArgs& a, const void* grad, const void* norm,
                           int64_t ns0, int64_t ns1, void* stream);
}  // namespace cuda
}  // namespace tbd_ops
