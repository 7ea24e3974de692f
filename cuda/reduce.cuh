// Deterministic warp and block reductions on warp shuffles and shared memory.
// One source for nvcc and the emulator: the emulator runs the very code the
// GPU runs. The combination order is fixed (a shuffle tree within each warp,
// then the warps in order), so results do not depend on timing.
#pragma once

#include <cstring>
#include <type_traits>

#include "backend.cuh"

namespace tbd_ops {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// shfl(word) applied to each 32-bit word of any trivially copyable value.
template <typename T, typename Shfl> __device__ __forceinline__ T shfl_words(T v, Shfl shfl) {
  static_assert(std::is_trivially_copyable<T>::value, "shuffled values must be trivially copyable");
  constexpr int kWords = (sizeof(T) + 3) / 4;
  unsigned w[kWords] = {};
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = shfl(w[i]);
  T out;
  memcpy(&out, w, sizeof(T));
  return out;
}

// __shfl_down_sync / __shfl_xor_sync for any trivially copyable value.
template <typename T> __device__ __forceinline__ T shfl_down_any(T v, int delta) {
  return shfl_words(v, [delta](unsigned w) { return __shfl_down_sync(kFullMask, w, delta); });
}
template <typename T> __device__ __forceinline__ T shfl_xor_any(T v, int lane_mask) {
  return shfl_words(v, [lane_mask](unsigned w) { return __shfl_xor_sync(kFullMask, w, lane_mask); });
}

// Reduction over the 32 lanes of a full warp; lane 0 holds the result.
template <typename T, typename Op> __device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = op(v, shfl_down_any(v, off));
  return v;
}

// Reduction over a 1-D block of exactly kThreads threads (a multiple of 32);
// every thread gets the result. Contains __syncthreads: every thread of the
// block must call it.
template <int kThreads, typename T, typename Op> __device__ T block_reduce(T v, Op op) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32");
  constexpr int kWarps = kThreads / 32;
  __shared__ SharedArray<T, kWarps> warp_part;
  __shared__ SharedArray<T, 1> result;
  TBD_DEVICE_CHECK(blockDim.x == kThreads && blockDim.y == 1 && blockDim.z == 1,
                   "block_reduce needs a 1-D block of kThreads threads");
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    T acc = warp_part[0];
    for (int w = 1; w < kWarps; ++w) acc = op(acc, warp_part[w]);
    result[0] = acc;
  }
  __syncthreads();
  return result[0];
}

struct SumOp {
  template <typename T> __device__ __forceinline__ T operator()(const T& a, const T& b) const {
    return a + b;
  }
};

template <int kThreads, typename T> __device__ __forceinline__ T block_sum(T v) {
  return block_reduce<kThreads>(v, SumOp());
}

}  // namespace cuda
}  // namespace tbd_ops
