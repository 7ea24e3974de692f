// Host entry point of the prediction_guided_assign CUDA kernels (plain C++: no
// PyTorch, no CUDA headers). The launcher enqueues everything on the given
// stream and never synchronizes with the host.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace tbd_ops {
namespace cuda {

struct AssignArgs {
  const void* boxes;           // dtype dt, [P, 4] with strides (bs0, bs1)
  int64_t bs0, bs1;
  const void* scores;          // dtype dt, [P, C] with strides (ss0, ss1)
  int64_t ss0, ss1, C;
  const void* pseudo_boxes;    // dtype dt, contiguous [M, 4]
  const int64_t* pseudo_labels;  // contiguous [M]; a label outside [0, C) reads as score 0
  const bool* valid;           // contiguous [P], or nullptr (all valid)
  const int64_t* p_offsets;    // HOST array of N + 1 offsets into the proposals
  const int64_t* m_offsets;    // HOST array of N + 1 offsets into the pseudo boxes
  int64_t N;
  double iou_thr, alpha, eps;
  int64_t topk;
};

// Bag members staged in shared memory per tile when `tile` is 0, and the
// most a tile may hold (48 KiB of float64 members: above 32 KiB the launcher
// opts the kernel in to more than 48 KiB of shared memory per block).
constexpr int kAssignDefaultTile = 1024;
constexpr int kAssignMaxTile = 2048;

// Bytes of device scratch memory the launcher needs (any alignment of at
// least 256 bytes).
size_t prediction_guided_assign_workspace(DType dt, const AssignArgs& a);

// Writes gt_inds ([P] int64) and q ([P], dtype dt), both contiguous. `tile`
// bounds the bag members held in shared memory at once (0: the default);
// larger bags are processed tile by tile. Throws std::invalid_argument for a
// tile above kAssignMaxTile.
void prediction_guided_assign(DType dt, const AssignArgs& a, int64_t* gt_inds, void* q,
                              void* workspace, void* stream, int tile = 0);

}  // namespace cuda
}  // namespace tbd_ops
