// What the CUDA kernels and launchers share (no PyTorch): dtype conversion and
// dispatch, the launch geometry (grid sizes, batches in chunks of images, the
// per-image offsets passed as a kernel parameter), the layout of a launcher's
// scratch memory, and device-side searches over batch offsets.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "backend.cuh"
#include "dtype.h"
#include "reduce.cuh"
#include "tbd_ops/math.h"

namespace tbd_ops {
namespace cuda {

constexpr int kBlock = 256;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Explicit conversions (PyTorch builds with __CUDA_NO_HALF_CONVERSIONS__).
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T> struct FromAcc {
  template <typename A> __device__ __forceinline__ static T cvt(A v) { return static_cast<T>(v); }
};
template <> struct FromAcc<__half> {
  template <typename A> __device__ __forceinline__ static __half cvt(A v) {
    return __float2half_rn(static_cast<float>(v));
  }
};
template <> struct FromAcc<__nv_bfloat16> {
  template <typename A> __device__ __forceinline__ static __nv_bfloat16 cvt(A v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};
template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) {
  return FromAcc<T>::cvt(v);
}

struct ToAcc {
  template <typename T> __device__ __forceinline__ auto operator()(T v) const { return to_acc(v); }
};

template <typename T> struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) with the CUDA scalar type matching dt.
template <typename F> void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat: f(TypeTag<float>{}); break;
    case DType::kDouble: f(TypeTag<double>{}); break;
    case DType::kHalf: f(TypeTag<__half>{}); break;
    case DType::kBFloat16: f(TypeTag<__nv_bfloat16>{}); break;
    default: throw std::invalid_argument("tbd_ops: unsupported dtype");
  }
}

// ---- launch geometry ------------------------------------------------------------------
// Blocks of the grid-stride elementwise kernels, at the most.
constexpr int64_t kMaxBlocksElementwise = int64_t(1) << 16;

// Blocks of kBlock threads for `units` work items (one per thread): at least 1
// and at most max_blocks (grid-stride loops do the rest).
inline int64_t grid_blocks(int64_t units, int64_t max_blocks) {
  const int64_t b = ceil_div(units, kBlock);
  return b < 1 ? 1 : (b > max_blocks ? max_blocks : b);
}

// Calls f(n0, count) for consecutive runs [n0, n0 + count) of at most
// per_launch of the N images of a batch.
template <typename F> void for_each_image_chunk(int64_t N, int64_t per_launch, F&& f) {
  for (int64_t n0 = 0; n0 < N; n0 += per_launch) f(n0, N - n0 < per_launch ? N - n0 : per_launch);
}

// The launches of a grid (blocks, images): f(n0, grid) with grid.y images
// starting at image n0, at most max_grid_yz() images per launch.
template <typename F> void for_each_grid_chunk(int64_t N, int64_t blocks, F&& f) {
  for_each_image_chunk(N, max_grid_yz(), [&](int64_t n0, int64_t count) {
    f(n0, dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(count)));
  });
}

// ---- per-image offsets as a kernel parameter ----------------------------------------------
// Images per launch of the kernels that take the per-image offsets of a batch
// by value (no copy to the device, nothing to synchronize: the launches can be
// captured in a CUDA graph); larger batches take one launch per chunk.
constexpr int kChunkImages = 64;

// kTables tables of per-image row offsets (e.g. proposals and pseudo boxes) of
// the images n0 .. n0 + count - 1: off[t][i] .. off[t][i + 1] are the rows of
// image n0 + i in table t (absolute rows of the batch).
template <int kTables> struct ImageChunk {
  int64_t n0;
  int count;
  int64_t off[kTables][kChunkImages + 1];
};

// Calls f(chunk) for each chunk of kChunkImages images; `tables` are HOST
// arrays of N + 1 offsets each.
template <int kTables, typename F>
void for_each_offset_chunk(int64_t N, const int64_t* const (&tables)[kTables], F&& f) {
  for_each_image_chunk(N, kChunkImages, [&](int64_t n0, int64_t count) {
    ImageChunk<kTables> c;
    c.n0 = n0;
    c.count = static_cast<int>(count);
    for (int t = 0; t < kTables; ++t) {
      for (int i = 0; i <= c.count; ++i) c.off[t][i] = tables[t][n0 + i];
    }
    f(c);
  });
}

// ---- workspaces -----------------------------------------------------------------------
// Bits of a radix-sort key holding values 0 .. v (at least 1, at most 31).
inline int bits_for(int64_t v) {
  int b = 1;
  while (b < 31 && (int64_t(1) << b) <= v) ++b;
  return b;
}

inline size_t align_up(size_t v) { return (v + 255) / 256 * 256; }

// The buffers of a launcher's scratch memory, each at a 256-byte aligned
// offset: take() them in order, allocate total() bytes, then at<T>(base, offset).
class WorkspaceLayout {
 public:
  size_t take(size_t bytes) {
    const size_t at = total_;
    total_ += align_up(bytes);
    return at;
  }
  template <typename T> size_t take_array(int64_t n) { return take(sizeof(T) * static_cast<size_t>(n)); }
  size_t total() const { return total_; }

 private:
  size_t total_ = 0;
};

template <typename T> T* workspace_at(void* base, size_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(base) + offset);
}

// ---- device-side searches ------------------------------------------------------------
// The image i of a batch chunk with off[i] <= v < off[i + 1], for
// off[0] <= v < off[count] (binary search; empty images are skipped).
__device__ __forceinline__ int image_of(const int64_t* off, int count, int64_t v) {
  int lo = 0, hi = count;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (off[mid] <= v) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// First position of `key` in the sorted keys[0, n) (n if every key is smaller).
__device__ __forceinline__ int64_t lower_bound_key(const int32_t* keys, int64_t n, int32_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < key) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace cuda
}  // namespace tbd_ops
