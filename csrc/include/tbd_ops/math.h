// Scalar math shared by every header of tbd_ops/: the accumulation type, the
// libm wrappers that keep the precision of their argument on host and device
// (a bare exp(float) on the host would promote to double), and the
// NaN-propagating max/min, clamp, |v| and sign with their autograd derivatives.
// Nothing here depends on PyTorch: these headers compile with g++ alone
// (GoogleTest) and with nvcc (CUDA kernels).
#pragma once

#include <cmath>
#include <cstdint>

#include "tbd_ops/macros.h"

namespace tbd_ops {

// Accumulation type: float for every floating type except double.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// Converts a stored value to A (c10::Half and c10::BFloat16 convert implicitly).
template <typename A> struct CastTo {
  template <typename T> TBD_HD A operator()(T v) const { return static_cast<A>(v); }
};

template <typename T> TBD_HD bool is_nan(T v) { return v != v; }

// ---- libm in the precision of the argument ----------------------------------
TBD_HD float math_exp(float v) { return expf(v); }
TBD_HD double math_exp(double v) { return exp(v); }
TBD_HD float math_log(float v) { return logf(v); }
TBD_HD double math_log(double v) { return log(v); }
TBD_HD float math_log1p(float v) { return log1pf(v); }
TBD_HD double math_log1p(double v) { return log1p(v); }
TBD_HD float math_tanh(float v) { return tanhf(v); }
TBD_HD double math_tanh(double v) { return tanh(v); }
TBD_HD float math_sqrt(float v) { return sqrtf(v); }
TBD_HD double math_sqrt(double v) { return sqrt(v); }
TBD_HD float math_floor(float v) { return floorf(v); }
TBD_HD double math_floor(double v) { return floor(v); }
TBD_HD float math_pow(float b, float e) { return powf(b, e); }
TBD_HD double math_pow(double b, double e) { return pow(b, e); }

// |v| without a libm call; |NaN| is NaN (the comparison is false).
template <typename A> TBD_HD A abs_val(A v) { return v < A(0) ? -v : v; }

// sign(v) as torch.sign (and the gradient of |v| in autograd): sign(0) = 0,
// sign(NaN) = 0.
template <typename A> TBD_HD A sign_val(A v) {
  return v > A(0) ? A(1) : (v < A(0) ? A(-1) : A(0));
}

// ---- NaN-aware max / min ------------------------------------------------------
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

// ---- clamp --------------------------------------------------------------------
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
