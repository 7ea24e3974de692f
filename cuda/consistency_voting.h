// Host entry point of the consistency_voting CUDA kernels (SPEC 2.2). Plain
// C++ (no PyTorch, no CUDA headers). The launcher enqueues everything on the
// given stream and never synchronizes with the host.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dtype.h"
#include "tbd_ops/voting.h"

namespace tbd_ops {
namespace cuda {

struct VotingArgs {
  const void* pred_boxes;     // dtype dt, [R, 4] with strides (bs0, bs1)
  int64_t bs0, bs1;
  const int64_t* gt_inds;     // [R] with stride gs0; a value outside [0, M_n] reads as background
  int64_t gs0;
  const void* pseudo_boxes;   // dtype dt, contiguous [M, 4]
  const int64_t* r_offsets;   // HOST array of N + 1 offsets into the RoIs
  const int64_t* m_offsets;   // HOST array of N + 1 offsets into the pseudo boxes
  int64_t N;
  double eps;                 // of the IoU
  VotingMode mode;
};

// Writes sigma ([M]), w ([R]) and reg_scale (one value), all contiguous in the
// accumulation dtype (float, or double for kDouble); `sigma_r` is scratch of R
// accumulator values.
void consistency_voting(DType dt, const VotingArgs& a, void* sigma, void* w, void* reg_scale,
                        void* sigma_r, void* stream);

}  // namespace cuda
}  // namespace tbd_ops
