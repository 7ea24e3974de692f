// Host entry points of harmony_score (SPEC 1.3). Plain C++ (no PyTorch, no
// CUDA headers): the registration glue (csrc/harmony_score.cpp) validates and
// allocates, these launch on the given stream and never synchronize.
#pragma once

#include <cstdint>

#include "dtype.h"
#include "tbd_ops/harmony.h"

namespace tbd_ops {
namespace cuda {

// ---- harmony_score: elementwise over up to kHarmonyMaxRank dimensions ---------
constexpr int kHarmonyMaxRank = 8;

struct NdShape {
  int rank;  // 0 .. kHarmonyMaxRank
  int64_t sizes[kHarmonyMaxRank];
};
struct NdStrides {
  int64_t s[kHarmonyMaxRank];  // element strides
};

// out = 1 - tanh(|p_r - p_c|); p_c, p_r, out of dtype dt, any strides.
void harmony_score_forward(DType dt, const NdShape& shape, const void* p_c, const NdStrides& cs,
                           const void* p_r, const NdStrides& rs, void* out, const NdStrides& os,
                           void* stream);

// grad (dtype dt) -> grad_p_c, grad_p_r (dtype dt); either may be null when not
// wanted. Every element of a wanted output is written.
void harmony_score_backward(DType dt, const NdShape& shape, const void* grad, const NdStrides& gs,
                            const void* p_c, const NdStrides& cs, const void* p_r,
                            const NdStrides& rs, void* grad_p_c, const NdStrides& gcs,
                            void* grad_p_r, const NdStrides& grs, void* stream);
}  // namespace cuda
}  // namespace tbd_ops
