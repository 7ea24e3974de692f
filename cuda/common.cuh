// Helpers shared by the CUDA kernels (no PyTorch): dtype conversion and dispatch.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "backend.cuh"
#include "launchers.h"
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
