// Several FPN levels in one launch: the blocks of a 1-D grid are dealt out to
// the levels in order (level l owns blocks [block0[l], block0[l + 1])), and
// within a level to (image, unit) pairs, unit-major per image. The table
// travels by value as a kernel parameter: no copy to the device, no
// synchronization, capturable in a CUDA graph. More levels than kMaxLevels
// take one launch per group of kMaxLevels.
//
// Channel split: a problem whose locations (all levels and images together)
// would leave most of the GPU idle with one thread per location spreads the
// channels of each location over several threads (see ChannelSplit below).
#pragma once

#include <cstdint>
#include <stdexcept>

#include "common.cuh"
#include "tbd_ops/dispatch.h"

namespace tbd_ops {
namespace cuda {

constexpr int kMaxLevels = 8;

// Where a block of a multi-level launch works.
struct BlockPos {
  int l;         // level (within the launch)
  int64_t n;     // image
  int64_t unit;  // unit of work of that image (a tile of locations)
};

// block0[0 .. count]: first block of each level in this launch; units[l]:
// units per image of level l.
struct LevelBlocks {
  int count;
  int64_t block0[kMaxLevels + 1];
  int64_t units[kMaxLevels];

  __device__ __forceinline__ BlockPos pos(int64_t b) const {
    BlockPos p;
    p.l = 0;
#pragma unroll
    for (int l = 1; l < kMaxLevels; ++l) p.l += (l < count && block0[l] <= b) ? 1 : 0;
    const int64_t local = b - block0[p.l];
    p.n = local / units[p.l];
    p.unit = local - p.n * units[p.l];
    return p;
  }
};

// How the channels of one location are spread over threads. Every variant
// sums (or maximizes) the channels in the same 8 groups, channel c in group
// c % 8 in increasing order, and combines the groups in the fixed tree
// ((g0 + g4) + (g2 + g6)) + ((g1 + g5) + (g3 + g7)) (csrc/include/tbd_ops/masked_reduce.h),
// so a location's result does not depend on the variant:
//   kSerial     one thread per location, the 8 groups in registers; lanes run
//               along locations (coalesced where the H*W planes are contiguous);
//   kWarpSplit  a block of 8 warps takes 32 locations; warp w sums group w,
//               lanes along locations (coalesced in NCHW); the groups meet in
//               shared memory;
//   kLaneSplit  8 lanes per location, lane j sums group j, so the 8 lanes read
//               8 consecutive channels (coalesced in channels_last); the groups
//               meet by warp shuffles; a block takes 32 locations.
enum class ChannelSplit : int { kSerial = 0, kWarpSplit = 1, kLaneSplit = 2 };

// f(std::integral_constant<ChannelSplit, split>{}) for the code of each variant.
template <typename F> void dispatch_split(ChannelSplit split, F&& f) {
  dispatch_mode<ChannelSplit::kSerial, ChannelSplit::kWarpSplit, ChannelSplit::kLaneSplit>(split, f);
}

constexpr int kGroups = 8;            // channel groups of a location
constexpr int kSplitLocations = 32;   // locations per block of the split variants
// Below this many locations in a launch (all levels and images), one thread per
// location would not fill the GPU (an H100 holds 132 SMs x 2048 = 270,336
// resident threads): the channels are split over 8 threads.
constexpr int64_t kSplitBelowLocations = int64_t(1) << 18;

// The variant for a problem: channels_last inputs (channel stride 1) always
// split over lanes; otherwise split over warps when the launch has fewer than
// kSplitBelowLocations locations. policy: 0 = this rule, 1 = always kSerial
// (kLaneSplit stays for channels_last), 2 = always split (tests force both
// sides of the rule with it).
inline ChannelSplit choose_split(bool channel_fast, int64_t locations, int policy) {
  if (channel_fast) return ChannelSplit::kLaneSplit;
  if (policy == 1) return ChannelSplit::kSerial;
  if (policy == 2) return ChannelSplit::kWarpSplit;
  return locations < kSplitBelowLocations ? ChannelSplit::kWarpSplit : ChannelSplit::kSerial;
}

// Locations one block handles per step.
inline int64_t locations_per_step(ChannelSplit s) {
  return s == ChannelSplit::kSerial ? kBlock : kSplitLocations;
}

// Tiles per image of hw locations with at most max_tiles tiles, and the tile
// length (a multiple of step).
struct Tiling {
  int64_t tiles, len;
};
inline Tiling tiling(int64_t hw, int64_t step, int64_t max_tiles) {
  if (hw <= 0) return {0, step};
  int64_t tiles = ceil_div(hw, step);
  if (tiles > max_tiles) tiles = max_tiles;
  const int64_t len = ceil_div(ceil_div(hw, tiles), step) * step;
  return {ceil_div(hw, len), len};
}

// Calls f(first_level, count) for each group of up to kMaxLevels levels.
template <typename F> void for_each_level_group(int64_t L, F&& f) {
  for (int64_t g0 = 0; g0 < L; g0 += kMaxLevels) {
    f(g0, static_cast<int>(L - g0 < kMaxLevels ? L - g0 : kMaxLevels));
  }
}

inline void check_blocks(int64_t blocks, const char* op) {
  if (blocks > 0x7fffffff) throw std::invalid_argument(std::string("tbd_ops: ") + op + ": too many blocks");
}

// The elementwise pass of a block over the locations [i0, i1) of its tile:
// f(i, c0, step) handles the channels c0, c0 + step, ... of location i (all
// channels of a location by one thread for kSerial; kGroups threads per
// location, one per channel group, for the split variants).
template <ChannelSplit S, typename I, typename F>
__device__ __forceinline__ void for_each_tile_location(I i0, I i1, F&& f) {
  if constexpr (S == ChannelSplit::kSerial) {
    for (I i = i0 + threadIdx.x; i < i1; i += kBlock) f(i, 0, 1);
  } else if constexpr (S == ChannelSplit::kWarpSplit) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (I i = i0 + lane; i < i1; i += kSplitLocations) f(i, warp, kGroups);
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (I b = i0; b < i1; b += kSplitLocations) {
      const I i = b + warp * (32 / kGroups) + (lane >> 3);
      if (i < i1) f(i, lane & (kGroups - 1), kGroups);
    }
  }
}

// ---- the fixed tree of the 8 channel groups ----------------------------------

// v of lane group j (the low 3 bits of the lane for kLaneSplit) -> every lane
// of the 8 holds the tree of the 8 values. Needs all 32 lanes.
template <typename A, typename Op> __device__ __forceinline__ A lane_group_tree(A v, Op op) {
#pragma unroll
  for (int d = 4; d >= 1; d >>= 1) v = op(v, shfl_xor_any(v, d));
  return v;
}

}  // namespace cuda
}  // namespace tbd_ops
