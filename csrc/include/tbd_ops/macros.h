// Shared host/device helpers. Nothing here depends on PyTorch: these headers
// compile with g++ alone (GoogleTest) and with nvcc (CUDA kernels).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define TBD_HD __host__ __device__ __forceinline__
#else
#define TBD_HD inline
#endif

namespace tbd_ops {

// Accumulation type: float for every floating type except double.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

template <typename T> TBD_HD bool is_nan(T v) { return v != v; }

// exp / log in the precision of the argument on host and device (a bare
// exp(float) on the host would promote to double).
TBD_HD float math_exp(float v) { return expf(v); }
TBD_HD double math_exp(double v) { return exp(v); }
TBD_HD float math_log(float v) { return logf(v); }
TBD_HD double math_log(double v) { return log(v); }

// max/min that propagate NaN like torch.maximum / torch.minimum.
template <typename T> TBD_HD T max_nan(T a, T b) {
  return (is_nan(a) || a > b) ? a : ((is_nan(b) || b > a) ? b : a);
}
template <typename T> TBD_HD T min_nan(T a, T b) {
  return (is_nan(a) || a < b) ? a : ((is_nan(b) || b < a) ? b : a);
}
// d max(a,b) / da as autograd computes it for torch.maximum (ties split 0.5).
template <typename T> TBD_HD T dmax_da(T a, T b) {
  return a > b ? T(1) : (a == b ? T(0.5) : T(0));
}
template <typename T> TBD_HD T dmin_da(T a, T b) {
  return a < b ? T(1) : (a == b ? T(0.5) : T(0));
}

// torch.clamp(v, lo, hi) and its gradient mask (closed interval, as autograd).
template <typename T> TBD_HD T clamp_val(T v, T lo, T hi) {
  return is_nan(v) ? v : (v < lo ? lo : (v > hi ? hi : v));
}
template <typename T> TBD_HD T clamp_grad(T v, T lo, T hi) {
  return (v >= lo && v <= hi) ? T(1) : T(0);
}
// torch.clamp(v, min=lo) and its gradient mask.
template <typename T> TBD_HD T clamp_min_val(T v, T lo) {
  return is_nan(v) ? v : (v < lo ? lo : v);
}
template <typename T> TBD_HD T clamp_min_grad(T v, T lo) {
  return v >= lo ? T(1) : T(0);
}

}  // namespace tbd_ops
