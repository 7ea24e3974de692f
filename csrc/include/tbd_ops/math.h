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

// Whether v is NaN: a bool, or for a GCC vector type (CPU) a mask per lane.
template <typename T> TBD_HD auto is_nan(T v) -> decltype(v != v) { return v != v; }

// The constant c, which is 0, 0.5 or 1 (exact in every floating type), as a T:
// also a GCC vector type (CPU; c in every lane), for the functions below and
// those of box.h that the CPU kernels run on vectors as well as on scalars.
template <typename T> TBD_HD T lit(float c) { return T{} + c; }

// ---- libm in the precision of the argument ----------------------------------
// math_<name>(float) calls <f>, math_<name>(double) <d>.
#define TBD_OPS_LIBM(name, f, d)                   \
  TBD_HD float math_##name(float v) { return f(v); } \
  TBD_HD double math_##name(double v) { return d(v); }
TBD_OPS_LIBM(exp, expf, exp)
TBD_OPS_LIBM(log, logf, log)
TBD_OPS_LIBM(log1p, log1pf, log1p)
TBD_OPS_LIBM(tanh, tanhf, tanh)
TBD_OPS_LIBM(sqrt, sqrtf, sqrt)
TBD_OPS_LIBM(floor, floorf, floor)
#undef TBD_OPS_LIBM
#if defined(__GNUC__) && !defined(__CUDACC__)
// math_exp of a GCC vector type (CPU), lane by lane: the scalar values bit for bit.
template <typename V, typename = decltype(V{}[0])> inline V math_exp(const V& v) {
  V e = v;
  for (int i = 0; i < static_cast<int>(sizeof(V) / sizeof(v[0])); ++i) e[i] = math_exp(v[i]);
  return e;
}
#endif
TBD_HD float math_pow(float b, float e) { return powf(b, e); }
TBD_HD double math_pow(double b, double e) { return pow(b, e); }

// ---- deterministic float32 exp and log1p ---------------------------------------
// Plain IEEE float operations and integer arithmetic on bit patterns: no libm
// call, no branch, no comparison or select (GCC may turn those into branches),
// so that a loop over them vectorizes on the host and every compiler and
// device computes the same bits (the kernels are built without FMA
// contraction: -ffp-contract=off, nvcc -fmad=false). Cephes' expf / logf
// coefficients; the CPU softmax of channel_max_spatial_softmax uses the same
// exp (the same operations in explicit SIMD).

// TBD_HD, also forcing inlining on the host compiler: for the functions that
// vectorized CPU loops call (GCC would otherwise call them, one element at a
// time).
#if defined(__GNUC__) && !defined(__CUDACC__) && !defined(__HIPCC__)
#define TBD_HD_INLINE inline __attribute__((always_inline))
#else
#define TBD_HD_INLINE TBD_HD
#endif

// The float with the bit pattern `bits`.
TBD_HD_INLINE float float_from_bits(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// The bit pattern of `v`.
TBD_HD_INLINE uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_int(v));
#else
  uint32_t b;
  __builtin_memcpy(&b, &v, sizeof(b));
  return b;
#endif
}

// c0 x^n + c1 x^(n-1) + ... + cn by Horner's rule, the operations in this
// order: ((c0 x + c1) x + c2) x + ... + cn.
template <typename... C> TBD_HD_INLINE float horner(float x, float c0, C... cs) {
  float p = c0;
  ((p = p * x + cs), ...);
  return p;
}

namespace exp_coef {  // exp(x) = 2^n * exp(r), x = n ln 2 + r, |r| <= ln 2 / 2
constexpr float kUnder = -103.98f;           // exp(x) < 2^-150 rounds to 0 below this
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kRound = 12582912.0f;        // 1.5 * 2^23: (v + kRound) - kRound rounds to nearest
constexpr float kLn2Hi = 0.693359375f;       // ln 2 = kLn2Hi + kLn2Lo; n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f,
                kP3 = 4.1665795894e-2f, kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
}  // namespace exp_coef

// exp(-|x|) (so exp(x) for x <= 0), within 1 ulp of the correctly rounded
// value, subnormal results included; exactly 1 at 0, 0 at -inf and below
// kUnder; NaN gives NaN. x is clamped at kUnder (where the result rounds to 0)
// and NaN is put back at the end in the integer domain, so that there is no
// select for a compiler to turn into a branch (a vectorized loop needs none).
// The 2^n scaling in two exact halves so that it may underflow.
TBD_HD_INLINE float exp_nonpositive(float x) {
  using namespace exp_coef;
  const int32_t a = static_cast<int32_t>(float_bits(x) & 0x7fffffffu);  // |x|; NaN above inf's
  const int32_t d = a - static_cast<int32_t>(float_bits(-kUnder));
  const int32_t m = d & (d >> 31);  // min(d, 0) without a comparison
  x = float_from_bits((static_cast<int32_t>(float_bits(-kUnder)) + m) | INT32_MIN);  // -min(|x|, -kUnder)
  float n = x * kLog2e;
  n = (n + kRound) - kRound;  // in [-150, 0]
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  float p = horner(r, kP0, kP1, kP2, kP3, kP4, kP5);
  p = p * (r * r) + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1, n2 = ni - n1;  // each >= -75: normal powers of two
  const float y = (p * float_from_bits((n1 + 127) << 23)) * float_from_bits((n2 + 127) << 23);  // p * 2^n1 exact
  const int32_t nan = (0x7f800000 - a) >> 31 & 0x7fc00000;  // NaN in, NaN out
  return float_from_bits(static_cast<int32_t>(float_bits(y)) | nan);
}

namespace log_coef {  // log(1 + f), f in [sqrt(1/2) - 1, sqrt(2) - 1]
constexpr float kSqrt2 = 1.41421356237f;
constexpr float kQ0 = 7.0376836292e-2f, kQ1 = -1.1514610310e-1f, kQ2 = 1.1676998740e-1f,
                kQ3 = -1.2420140846e-1f, kQ4 = 1.4249322787e-1f, kQ5 = -1.6668057665e-1f,
                kQ6 = 2.0000714765e-1f, kQ7 = -2.4999993993e-1f, kQ8 = 3.3333331174e-1f;
}  // namespace log_coef

// log1p(e) for e in [0, 1] (or NaN, which propagates), within 1 ulp of the
// correctly rounded value, e itself for tiny and subnormal e. u = 1 + e is
// rounded; its rounding error c = e - (u - 1) is exact and enters to first
// order as c / u (Kahan), with 1 / u as the caller's sigmoid computes it (so
// that the compiler shares the division). log(u) = k ln 2 + log(1 + f) with
// u = 2^k (1 + f), 1 + f in [sqrt(1/2), sqrt(2)], f exact.
TBD_HD_INLINE float log1p_unit(float e) {
  using namespace log_coef;
  const float u = 1.0f + e;
  const float inv_u = 1.0f / u;
  const float c = e - (u - 1.0f);
  // k = (u > sqrt 2) as 0 or 1, by integer arithmetic on the bit patterns (a
  // comparison may become a branch, which keeps the loop from vectorizing).
  const float k = static_cast<float>(
      (static_cast<int32_t>(float_bits(kSqrt2)) - static_cast<int32_t>(float_bits(u))) >> 31 & 1);
  const float f = u * (1.0f - 0.5f * k) - 1.0f;
  const float z = f * f;
  float y = horner(f, kQ0, kQ1, kQ2, kQ3, kQ4, kQ5, kQ6, kQ7, kQ8);
  y = y * f * z;
  y = y + k * exp_coef::kLn2Lo;
  y = y - 0.5f * z;
  y = y + c * inv_u;
  return (f + y) + k * exp_coef::kLn2Hi;
}

// |v| without a libm call; |NaN| is NaN (the comparison is false).
template <typename A> TBD_HD A abs_val(A v) { return v < A(0) ? -v : v; }

// sign(v) as torch.sign (and the gradient of |v| in autograd): sign(0) = 0,
// sign(NaN) = 0.
// The same values both ways (+1, -1, or +0.0 for zeros and NaN): on the host
// branch-free (the comparisons converted to numbers), so that CPU loops around
// it vectorize; on the device as selects (the branch-free form made the float64
// L1 gradient kernel of masked_reduce spill registers).
template <typename A> TBD_HD A sign_val(A v) {
#if defined(__CUDA_ARCH__)
  return v > A(0) ? A(1) : (v < A(0) ? A(-1) : A(0));
#else
  return static_cast<A>(v > A(0)) - static_cast<A>(v < A(0));
#endif
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
  return a > b ? lit<T>(1) : (a == b ? lit<T>(0.5f) : lit<T>(0));
}
template <typename T> TBD_HD T dmin_da(T a, T b) {
  return a < b ? lit<T>(1) : (a == b ? lit<T>(0.5f) : lit<T>(0));
}

// ---- clamp --------------------------------------------------------------------
// torch.clamp(v, lo, hi) and its gradient mask (closed interval, as autograd).
template <typename T> TBD_HD T clamp_val(T v, T lo, T hi) {
  return is_nan(v) ? v : (v < lo ? lo : (v > hi ? hi : v));
}
template <typename T> TBD_HD T clamp_grad(T v, T lo, T hi) {
  return (v >= lo && v <= hi) ? lit<T>(1) : lit<T>(0);
}
// torch.clamp(v, min=lo) and its gradient mask.
template <typename T> TBD_HD T clamp_min_val(T v, T lo) {
  return is_nan(v) ? v : (v < lo ? lo : v);
}
template <typename T> TBD_HD T clamp_min_grad(T v, T lo) {
  return v >= lo ? lit<T>(1) : lit<T>(0);
}

// ---- selects without comparisons ------------------------------------------------
// For the float32 math of vectorized loops: GCC may turn a float comparison or
// a ?: into a branch (and then, as float operations may trap, not vectorize
// the loop); these work on the bit patterns with integer arithmetic only. The
// double overloads are the plain expressions.

// v < 0 ? a : b, with v < 0 decided by the sign bit (so also for -0 and for a
// NaN with the sign bit set): for callers where these give the same result.
TBD_HD_INLINE float select_sign(float v, float a, float b) {
  const int32_t m = static_cast<int32_t>(float_bits(v)) >> 31;  // all ones where negative
  return float_from_bits((static_cast<int32_t>(float_bits(a)) & m) |
                         (static_cast<int32_t>(float_bits(b)) & ~m));
}
TBD_HD_INLINE double select_sign(double v, double a, double b) { return v < 0.0 ? a : b; }

// clamp_min_val(v, lo) (NaN propagates) for a finite lo < 0.
TBD_HD_INLINE float clamp_min_negative(float v, float lo) {
  const int32_t b = static_cast<int32_t>(float_bits(v));
  const int32_t mag = b & 0x7fffffff;
  const int32_t below = (static_cast<int32_t>(float_bits(lo) & 0x7fffffffu) - mag) >> 31;  // |v| > |lo|
  const int32_t ordered = ~((0x7f800000 - mag) >> 31);                                    // not NaN
  const int32_t m = (b >> 31) & below & ordered;                                           // v < lo
  return float_from_bits((static_cast<int32_t>(float_bits(lo)) & m) | (b & ~m));
}
TBD_HD_INLINE double clamp_min_negative(double v, double lo) { return clamp_min_val(v, lo); }

}  // namespace tbd_ops
