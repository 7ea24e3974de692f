// SIMD on the CPU (GCC vector extensions): 8-lane float vectors, loads,
// stores and splats, and the deterministic exp of a non-positive argument in
// 8 lanes and, where the CPU has AVX-512, in 16 lanes (the same operations on
// the same coefficients, hence the same values). For the CPU kernels' float32
// loops compiled for AVX2 and the baseline ISA (TBD_CLONES, picked at load time).
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#define TBD_OPS_HAVE_AVX512 1
#include <immintrin.h>
#else
#define TBD_OPS_HAVE_AVX512 0
#endif

namespace tbd_ops {
namespace cpu {
// Internal linkage: target_clones resolvers are not shared between translation units.
namespace {

#define TBD_CLONES __attribute__((target_clones("avx2", "default")))

// 8 float lanes (one AVX2 register). 16-lane vectors in an AVX-512 clone were
// 7x slower with GCC's lowering of the vector selects. (Vector arguments of the
// always-inline helpers never cross an ABI boundary.)
#pragma GCC diagnostic ignored "-Wpsabi"
constexpr int kLanes = 8;
typedef float f32v __attribute__((vector_size(4 * kLanes)));
typedef int32_t i32v __attribute__((vector_size(4 * kLanes)));
typedef uint32_t u32v __attribute__((vector_size(4 * kLanes)));

// Unaligned loads and stores and splats (inlined into every clone).
template <typename V, typename P> __attribute__((always_inline)) inline V loadv(const P* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename P> __attribute__((always_inline)) inline void storev(P* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
// (A broadcast, not f32v{} + a: 0.0f + -0.0f is +0.0f.)
static_assert(kLanes == 8, "splat lists 8 lanes");
__attribute__((always_inline)) inline f32v splat(float a) { return f32v{a, a, a, a, a, a, a, a}; }

// Non-temporal (streaming) stores of 8 floats at a 16-byte aligned address:
// they bypass the caches, so a store to a line not in cache does not read the
// line first. For outputs far larger than the caches, which nothing reads back
// soon; stream_fence() after the last one, before another thread reads them.
// SSE2 (the x86-64 baseline), so any clone can use them; plain stores elsewhere,
// and under AddressSanitizer, which does not check the streaming stores' bounds.
constexpr uintptr_t kStreamAlign = 16;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__SANITIZE_ADDRESS__)
#define TBD_OPS_STREAM_STORES 1
#else
#define TBD_OPS_STREAM_STORES 0
#endif
__attribute__((always_inline)) inline void stream_store(float* p, const f32v& v) {
#if TBD_OPS_STREAM_STORES
  __m128 lo, hi;
  __builtin_memcpy(&lo, &v, sizeof(lo));
  __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  _mm_stream_ps(p, lo);
  _mm_stream_ps(p + 4, hi);
#else
  storev(p, v);
#endif
}
__attribute__((always_inline)) inline void stream_fence() {
#if TBD_OPS_STREAM_STORES
  _mm_sfence();
#endif
}
__attribute__((always_inline)) inline i32v splat(int32_t a) { return i32v{a, a, a, a, a, a, a, a}; }

// ---- exp(x) for x in [-inf, 0] or NaN (all that a softmax needs: y - max y) ----
// Lane by lane, deterministic (plain IEEE operations, no FMA contraction), a
// few ulps from the correctly rounded value, subnormal results included.
// Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-7
// polynomial, the 2^n scaling in two exact halves so that it may underflow.
constexpr float kExpUnder = -103.98f;  // below: exp(x) < 2^-150 rounds to 0
constexpr float kExpLog2e = 1.44269504088896341f;
constexpr float kExpRound = 12582912.0f;  // 1.5 * 2^23: x + kExpRound - kExpRound rounds to an integer
constexpr float kExpLn2Hi = 0.693359375f, kExpLn2Lo = -2.12194440e-4f;
constexpr int kExpPolyDegree = 6;
constexpr float kExpPoly[kExpPolyDegree] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                                            4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

__attribute__((always_inline)) inline f32v exp_nonpositive(f32v x) {
  const i32v under = x < splat(kExpUnder);  // exp(x) < 2^-150 rounds to 0 (also -inf)
  x = under ? splat(kExpUnder) : x;          // NaN stays
  f32v n = x * splat(kExpLog2e);
  n = (n + splat(kExpRound)) - splat(kExpRound);  // round to nearest, |n| <= 151
  n = n == n ? n : splat(0.0f);
  f32v r = x - n * splat(kExpLn2Hi);  // ln 2 in two parts; n * kExpLn2Hi is exact
  r = r - n * splat(kExpLn2Lo);
  f32v p = splat(kExpPoly[0]);
  for (int j = 1; j < kExpPolyDegree; ++j) p = p * r + splat(kExpPoly[j]);
  p = p * (r * r) + r + splat(1.0f);
  const i32v ni = __builtin_convertvector(n, i32v);  // in [-151, 0]
  const i32v n1 = ni >> 1, n2 = ni - n1;           // each >= -76: normal powers of two
  f32v s1, s2;
  const i32v e1 = (n1 + 127) << 23, e2 = (n2 + 127) << 23;
  __builtin_memcpy(&s1, &e1, sizeof(s1));
  __builtin_memcpy(&s2, &e2, sizeof(s2));
  const f32v y = (p * s1) * s2;  // p * s1 exact, one rounding at the end
  return under ? splat(0.0f) : y;
}

#if TBD_OPS_HAVE_AVX512
#define TBD_AVX512 __attribute__((target("avx512f")))
// GCC 12's AVX-512 headers warn about their own _mm512_undefined_* (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
const bool kHasAvx512 = __builtin_cpu_supports("avx512f");

// exp_nonpositive of 16 lanes (AVX-512): the same operations, hence the same values.
TBD_AVX512 __attribute__((always_inline)) inline __m512 exp_nonpositive_avx512(__m512 x) {
  const __m512 lo = _mm512_set1_ps(kExpUnder);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_mask_mov_ps(x, under, lo);
  __m512 nf = _mm512_mul_ps(x, _mm512_set1_ps(kExpLog2e));
  nf = _mm512_sub_ps(_mm512_add_ps(nf, _mm512_set1_ps(kExpRound)), _mm512_set1_ps(kExpRound));
  nf = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(nf, nf, _CMP_ORD_Q), nf);
  __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(nf, _mm512_set1_ps(kExpLn2Hi)));
  r = _mm512_sub_ps(r, _mm512_mul_ps(nf, _mm512_set1_ps(kExpLn2Lo)));
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int j = 1; j < kExpPolyDegree; ++j) p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(kExpPoly[j]));
  p = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(p, _mm512_mul_ps(r, r)), r), _mm512_set1_ps(1.0f));
  const __m512i ni = _mm512_cvttps_epi32(nf);
  const __m512i n1 = _mm512_srai_epi32(ni, 1), n2 = _mm512_sub_epi32(ni, n1);
  const __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n1, _mm512_set1_epi32(127)), 23));
  const __m512 s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(n2, _mm512_set1_epi32(127)), 23));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_mul_ps(_mm512_mul_ps(p, s1), s2));
}
#pragma GCC diagnostic pop
#else
const bool kHasAvx512 = false;
#endif

}  // namespace
}  // namespace cpu
}  // namespace tbd_ops
