// CPU kernel of channel_max_spatial_softmax (p_c). The per-element math is in
// tbd_ops/softmax.h, shared with the CUDA kernel.
//
// Forward, two passes over contiguous per-image buffers:
//   1. per tile of kTile locations (fixed boundaries from the start of each
//      image): channel max and argmax, y = z / T into log_p, the argmax, and the
//      tile's softmax statistics (max m_t, sum of exp(y - m_t)); the no-grad
//      variant keeps no argmax (float32: a max-only channel sweep);
//   2. per image, the tiles' statistics combined in tile order (M, S), then per
//      tile: log_p = (y - M) - log S and out = exp(y - M) * (scale / S)
//      (float32 output: pass 1 leaves exp(y - m_t) in out, scaled here by
//      exp(m_t - M) * scale / S, so one exp per location).
// Tile boundaries and the summation order inside a tile are fixed, so results
// do not depend on the number of threads. float32-accumulated inputs (float32,
// float16, bfloat16) use explicit SIMD (GCC vector extensions, an AVX2 clone
// and the baseline ISA picked at load time; the tile's exp also in AVX-512
// where present, with the same results) with the deterministic exp of
// csrc/cpu/simd.h; float64 stays scalar. The channel argmax is exact
// (torch.max semantics; csrc/cpu/channel_argmax.h).
//
// Backward: dot = sum p * g per image (fixed-order chunk partials), then the
// gradient dz of each location, which goes to its argmax channel only. NCHW:
// dx is written once, by chunks of locations, channel row by channel row (dz
// where the argmax is the channel, else 0; float32 of kStreamBytes and more
// with streaming stores); channels_last: zeros, then one value per location.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../channel_max_spatial_softmax.h"
#include "channel_argmax.h"
#include "simd.h"
#include "tbd_ops/softmax.h"

namespace tbd_ops {
namespace {

using namespace cpu;  // SIMD types, exp_nonpositive, channel_argmax_tile

constexpr int64_t kChunk = 256;  // locations per partial sum of the backward's dot product
// Locations per work item of the backward's NCHW gradient (no sums: any split
// gives the same values); its channel rows are written kPlaneChunk at a time.
constexpr int64_t kPlaneChunk = 2048;
// Bytes of float32 gradient from which the backward streams it past the caches
// (cpu::stream_store): far more than a core's L2, half of a typical L3. At
// batch 2: RetinaNet's (K = 720) P3 and P4, not FCOS's (K = 80) levels.
constexpr int64_t kStreamBytes = int64_t(16) << 20;
// Locations per work item of the forward (fixed: thread-independent results):
// every channel row is read in contiguous runs of kTile values (long enough
// for the hardware prefetcher) while the running max and argmax of the tile
// stay in L1.
constexpr int64_t kTile = 2048;
// Tiles whose channel argmax is found in one sweep where a work item holds a
// whole image (the argmax of a location does not depend on the tiles).
constexpr int64_t kSpanTiles = 4;

// ---- softmax pieces on float32 buffers ----

#if TBD_OPS_HAVE_AVX512
// GCC 12's AVX-512 headers warn about their own _mm512_undefined_* (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// exp_nonpositive of 16 lanes at a time with AVX-512 (the same operations,
// hence the same values), e = exp(y - m) for i < n (rounded down to 16), each
// 16-lane result added to the 8-lane sum as its two halves in index order (the
// order of the 8-lane loop). Returns how many locations it did.
TBD_AVX512 int64_t exp_store_sum_avx512(const float* y, int64_t n, float m, float* e, float* acc8) {
  const __m512 mm = _mm512_set1_ps(m);
  __m256 sv = _mm256_loadu_ps(acc8);
  const int64_t n16 = n / 16 * 16;
  for (int64_t i = 0; i < n16; i += 16) {
    const __m512 ev = exp_nonpositive_avx512(_mm512_sub_ps(_mm512_loadu_ps(y + i), mm));
    _mm512_storeu_ps(e + i, ev);
    sv = _mm256_add_ps(sv, _mm512_castps512_ps256(ev));
    sv = _mm256_add_ps(sv, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(ev), 1)));
  }
  _mm256_storeu_ps(acc8, sv);
  return n16;
}
#pragma GCC diagnostic pop
#endif

// y = bv * inv_t into y, the argmax into am, and the tile's softmax
// statistics {m, s} = {max y, sum exp(y - m)} (summed in a fixed order: per
// lane, then the lanes in a fixed tree). When e is not null and m is finite or
// -inf, e = exp(y - m) (0 for m = -inf).
TBD_CLONES SoftmaxState<float> tile_softmax(const float* bv, const int32_t* bi, int64_t len,
                                            float inv_t, float* y, int64_t* am, float* e) {
  const int64_t vlen = len / kLanes * kLanes;
  f32v mv = splat(-INFINITY);
  i32v nanv = {};
  for (int64_t i = 0; i < vlen; i += kLanes) {
    const f32v v = loadv<f32v>(bv + i) * splat(inv_t);
    storev(y + i, v);
    nanv |= v != v;
    mv = v > mv ? v : mv;
  }
  float m = -INFINITY;
  bool nan = false;
  for (int64_t i = vlen; i < len; ++i) {
    const float v = bv[i] * inv_t;
    y[i] = v;
    nan |= v != v;
    m = v > m ? v : m;
  }
  if (am)
    for (int64_t i = 0; i < len; ++i) am[i] = bi[i];
  for (int l = 0; l < kLanes; ++l) {
    nan |= nanv[l] != 0;
    m = mv[l] > m ? mv[l] : m;
  }
  if (nan) return {NAN, NAN};
  if (m == -INFINITY) {  // every y is -inf: nothing to add
    if (e) for (int64_t i = 0; i < len; ++i) e[i] = 0.0f;
    return {m, 0.0f};
  }
  if (m == INFINITY) return {m, NAN};  // exp(inf - inf), as in the two-pass softmax
  f32v sv = {};
  const f32v mm = splat(m);
  int64_t i0 = 0;
#if TBD_OPS_HAVE_AVX512
  if (kHasAvx512 && e) {
    alignas(32) float acc[kLanes] = {};
    i0 = exp_store_sum_avx512(y, vlen, m, e, acc);
    __builtin_memcpy(&sv, acc, sizeof(sv));
  }
#endif
  for (int64_t i = i0; i < vlen; i += kLanes) {
    const f32v ev = exp_nonpositive(loadv<f32v>(y + i) - mm);
    if (e) storev(e + i, ev);
    sv += ev;
  }
  if (vlen < len) {  // the tail in one padded vector: the same exp as the full ones
    f32v v = splat(-INFINITY);
    for (int64_t i = vlen; i < len; ++i) v[i - vlen] = y[i];
    const f32v ev = exp_nonpositive(v - mm);
    if (e)
      for (int64_t i = vlen; i < len; ++i) e[i] = ev[i - vlen];
    sv += ev;
  }
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) sv[l] += sv[l + w];
  return {m, sv[0]};
}

// log_p = (y - M) - log S in place, out = exp(y - M) * (scale / S).
TBD_CLONES void normalize_f32(float* y, int64_t len, float M, float log_s, float f, float* out) {
  const int64_t vlen = len / kLanes * kLanes;
  for (int64_t i = 0; i < vlen; i += kLanes) {
    const f32v v = loadv<f32v>(y + i) - splat(M);
    storev(y + i, f32v(v - splat(log_s)));
    storev(out + i, f32v(exp_nonpositive(v) * splat(f)));
  }
  if (vlen < len) {
    f32v v = splat(0.0f);
    for (int64_t i = vlen; i < len; ++i) v[i - vlen] = y[i];
    v = v - splat(M);
    const f32v lp = v - splat(log_s), e = exp_nonpositive(v) * splat(f);
    for (int64_t i = vlen; i < len; ++i) {
      y[i] = lp[i - vlen];
      out[i] = e[i - vlen];
    }
  }
}

// log_p = (y - M) - log S in place, out = e * c (e = exp(y - m) from
// tile_softmax, c = exp(m - M) * scale / S).
TBD_CLONES void normalize_from_exp_f32(float* y, const float* e, int64_t len, float M, float log_s,
                                       float c, float* out) {
  for (int64_t i = 0; i < len; ++i) {
    y[i] = (y[i] - M) - log_s;
    out[i] = e[i] * c;
  }
}

// The same steps in float64, scalar.
SoftmaxState<double> tile_softmax(const double* bv, const int32_t* bi, int64_t len, double inv_t,
                                  double* y, int64_t* am, double*) {
  double m = -INFINITY;
  bool nan = false;
  for (int64_t i = 0; i < len; ++i) {
    const double v = bv[i] * inv_t;
    y[i] = v;
    if (am) am[i] = bi[i];
    nan |= v != v;
    m = v > m ? v : m;
  }
  if (nan) return {NAN, NAN};
  if (m == -INFINITY) return {m, 0.0};
  if (m == INFINITY) return {m, NAN};
  double s = 0.0;
  for (int64_t i = 0; i < len; ++i) s += math_exp(y[i] - m);
  return {m, s};
}

template <typename T>
void normalize_tile(float* y, int64_t len, float M, float log_s, float f, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    normalize_f32(y, len, M, log_s, f, out);
  } else {  // float16 / bfloat16: through a float buffer
    float buf[256];
    for (int64_t i0 = 0; i0 < len; i0 += 256) {
      const int64_t n = std::min<int64_t>(256, len - i0);
      normalize_f32(y + i0, n, M, log_s, f, buf);
      for (int64_t i = 0; i < n; ++i) out[i0 + i] = static_cast<T>(buf[i]);
    }
  }
}

void normalize_tile(double* y, int64_t len, double M, double log_s, double f, double* out) {
  for (int64_t i = 0; i < len; ++i) {
    const double v = y[i] - M;
    y[i] = v - log_s;
    out[i] = math_exp(v) * f;
  }
}

template <typename A, typename T>
void normalize_item(A* y, int64_t len, A M, A log_s, A f, A m_tile, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    if (std::isfinite(M) && std::isfinite(f)) {  // out holds e = exp(y - m_tile)
      normalize_from_exp_f32(y, out, len, M, log_s, math_exp(m_tile - M) * f, out);
      return;
    }
  }
  normalize_tile(y, len, M, log_s, f, out);
}

// One level's input and outputs as raw pointers and sizes.
template <typename scalar_t> struct CmssLevel {
  using A = acc_t<scalar_t>;
  const scalar_t* px;
  int64_t K, W, HW, tiles, s0, s1, s2, s3;
  A* lp;
  int64_t* am;
  scalar_t* po;
  A inv_t, scale;
};

template <typename scalar_t>
CmssLevel<scalar_t> cmss_level(const at::Tensor& x, double temperature, bool scale_by_hw,
                               at::Tensor& out, at::Tensor& log_p, at::Tensor& argmax) {
  using A = acc_t<scalar_t>;
  const int64_t HW = x.size(2) * x.size(3);
  return {x.const_data_ptr<scalar_t>(), x.size(1), x.size(3), HW, (HW + kTile - 1) / kTile,
          x.stride(0), x.stride(1), x.stride(2), x.stride(3), log_p.mutable_data_ptr<A>(),
          argmax.defined() ? argmax.mutable_data_ptr<int64_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
          A(1) / static_cast<A>(temperature), scale_by_hw ? static_cast<A>(HW) : A(1)};
}

// The channel max and argmax of locations i0 .. i0 + len of image n into bv, bi.
template <typename scalar_t, typename A = acc_t<scalar_t>>
void cmss_argmax(const CmssLevel<scalar_t>& v, int64_t n, int64_t i0, int64_t len, A* bv,
                 int32_t* bi) {
  // When the H*W plane is contiguous the channel rows of a tile are contiguous.
  if (v.s3 == 1 && v.s2 == v.W) {
    channel_argmax_tile(v.px + n * v.s0 + i0, v.K, v.s1, len, bv, bi, v.am != nullptr);
  } else {
    for (int64_t i = 0; i < len; ++i) {  // e.g. channels_last: K values of a location
      const scalar_t* loc = v.px + n * v.s0 + ((i0 + i) / v.W) * v.s2 + ((i0 + i) % v.W) * v.s3;
      ArgMax<A> best = argmax_empty<A>();
      for (int64_t k = 0; k < v.K; ++k) argmax_update(best, static_cast<A>(loc[k * v.s1]), k);
      bv[i] = best.value;
      bi[i] = static_cast<int32_t>(best.index);
    }
  }
}

// Pass 1 of tile t of image n from its channel max and argmax bv, bi: y = z / T
// into log_p, the argmax, the tile's softmax statistics.
template <typename scalar_t, typename A = acc_t<scalar_t>>
SoftmaxState<A> cmss_tile_stats(const CmssLevel<scalar_t>& v, int64_t n, int64_t t, const A* bv,
                                const int32_t* bi) {
  const int64_t t0 = t * kTile, len = std::min(kTile, v.HW - t0);
  // float32 keeps e = exp(y - m_t) in the output (scaled in pass 2).
  scalar_t* e = std::is_same_v<scalar_t, float> ? v.po + n * v.HW + t0 : nullptr;
  return tile_softmax(bv, bi, len, v.inv_t, v.lp + n * v.HW + t0, v.am ? v.am + n * v.HW + t0 : nullptr,
                      reinterpret_cast<A*>(e));
}

// The image's statistics: its tiles' combined in tile order.
template <typename A> struct CmssImage {
  A M, log_s, f;
};
template <typename A>
CmssImage<A> cmss_combine(const SoftmaxState<A>* partial, int64_t tiles, A scale) {
  SoftmaxState<A> st = softmax_empty<A>();
  for (int64_t t = 0; t < tiles; ++t) st = softmax_combine(st, partial[t]);
  return {st.m, math_log(st.s), scale / st.s};
}

// Pass 2 of tile t of image n. float32 with a finite max and sum scales the
// kept exponentials; otherwise (NaN, inf) out = exp(y - M) * scale / S again.
template <typename scalar_t, typename A = acc_t<scalar_t>>
void cmss_pass2(const CmssLevel<scalar_t>& v, int64_t n, int64_t t, const CmssImage<A>& img,
                A m_tile) {
  const int64_t i0 = n * v.HW + t * kTile, len = std::min(kTile, (n + 1) * v.HW - i0);
  normalize_item(v.lp + i0, len, img.M, img.log_s, img.f, m_tile, v.po + i0);
}

// A work item per image (both passes; the image's data stays in cache between
// them, and no barrier between the passes): used when the images split evenly
// over the threads. Results do not depend on the split (fixed tiles).
bool cmss_per_image(int64_t N) {
  return N > 0 && N % at::get_num_threads() == 0;
}

// Every image n of the levels (image-major items, so that a thread's items
// are whole images) in one parallel region.
template <typename scalar_t>
void cmss_images(const std::vector<CmssLevel<scalar_t>>& levels, int64_t N) {
  using A = acc_t<scalar_t>;
  const int64_t L = static_cast<int64_t>(levels.size());
  int64_t max_tiles = 0;
  for (const auto& v : levels) max_tiles = std::max(max_tiles, v.tiles);
  at::parallel_for(0, N * L, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> bv(kSpanTiles * kTile);
    std::vector<int32_t> bi(kSpanTiles * kTile);
    std::vector<SoftmaxState<A>> partial(max_tiles);
    for (int64_t item = begin; item < end; ++item) {
      const auto& v = levels[item % L];
      const int64_t n = item / L;
      if (v.HW == 0) continue;
      // The argmax of kSpanTiles tiles at a time (longer contiguous runs of
      // every channel row), then the tiles' statistics.
      for (int64_t t0 = 0; t0 < v.tiles; t0 += kSpanTiles) {
        const int64_t t1 = std::min(v.tiles, t0 + kSpanTiles);
        cmss_argmax(v, n, t0 * kTile, std::min(t1 * kTile, v.HW) - t0 * kTile, bv.data(), bi.data());
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t off = (t - t0) * kTile;
          partial[t] = cmss_tile_stats(v, n, t, bv.data() + off, bi.data() + off);
        }
      }
      const CmssImage<A> img = cmss_combine(partial.data(), v.tiles, v.scale);
      for (int64_t t = 0; t < v.tiles; ++t) cmss_pass2(v, n, t, img, partial[t].m);
    }
  });
}

// Work items per tile, the two passes in two parallel regions.
template <typename scalar_t>
void cmss_tiles(const CmssLevel<scalar_t>& v, int64_t N) {
  using A = acc_t<scalar_t>;
  const int64_t tiles = v.tiles;
  std::vector<SoftmaxState<A>> partial(N * tiles);
  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> bv(kTile);
    std::vector<int32_t> bi(kTile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / tiles, t = item % tiles, t0 = t * kTile;
      cmss_argmax(v, n, t0, std::min(kTile, v.HW - t0), bv.data(), bi.data());
      partial[item] = cmss_tile_stats(v, n, t, bv.data(), bi.data());
    }
  });
  std::vector<CmssImage<A>> img(N);
  for (int64_t n = 0; n < N; ++n) img[n] = cmss_combine(partial.data() + n * tiles, tiles, v.scale);
  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      cmss_pass2(v, item / tiles, item % tiles, img[item / tiles], partial[item].m);
    }
  });
}

// out, log_p (also the scratch of pass 1) and, with_argmax, argmax.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cmss_alloc(const at::Tensor& x, bool with_argmax = true) {
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  return {at::empty({N, H, W}, x.options()),
          at::empty({N, H, W}, x.options().dtype(acc_dtype(x.scalar_type()))),
          with_argmax ? at::empty({N, H, W}, x.options().dtype(at::kLong)) : at::Tensor()};
}

// The forward of checked levels (one level or a list): every level of an image
// in one work item where the images split evenly over the threads, else level
// by level. with_argmax false (no backward to come): no argmax tensors (float32
// then sweeps the channels for the max only); out and log_p are the same.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
cmss_run(at::TensorList x, double temperature, bool scale_by_hw, bool with_argmax) {
  std::vector<at::Tensor> out, log_p, argmax;
  bool same_n = true;
  for (const at::Tensor& t : x) {
    auto r = cmss_alloc(t, with_argmax);
    out.push_back(std::get<0>(r));
    log_p.push_back(std::get<1>(r));
    argmax.push_back(std::get<2>(r));
    same_n = same_n && t.size(0) == x[0].size(0);
  }
  if (x.empty()) return {out, log_p, argmax};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x[0].scalar_type(), "cmss_levels_cpu", [&] {
    std::vector<CmssLevel<scalar_t>> v;
    for (size_t l = 0; l < x.size(); ++l)
      v.push_back(cmss_level<scalar_t>(x[l], temperature, scale_by_hw, out[l], log_p[l], argmax[l]));
    if (same_n && cmss_per_image(x[0].size(0))) {
      cmss_images(v, x[0].size(0));  // every level of an image in one item
      return;
    }
    for (size_t l = 0; l < x.size(); ++l) {
      const int64_t N = x[l].size(0);
      if (N == 0 || v[l].HW == 0) continue;
      if (cmss_per_image(N)) {
        cmss_images<scalar_t>({v[l]}, N);
      } else {
        cmss_tiles(v[l], N);
      }
    }
  });
  return {out, log_p, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cmss_cpu(const at::Tensor& x, double temperature,
                                                        bool scale_by_hw) {
  cmss_check(x, temperature);
  auto r = cmss_run({x}, temperature, scale_by_hw, true);
  return {std::get<0>(r)[0], std::get<1>(r)[0], std::get<2>(r)[0]};
}

// One channel row of dx (NCHW) over `len` locations: the location's gradient dz
// where its argmax is channel c, else 0.
template <typename T>
TBD_CLONES void plane_row(T* row, const T* dz, const int32_t* cls, int32_t c, int64_t len) {
  for (int64_t i = 0; i < len; ++i) row[i] = cls[i] == c ? dz[i] : T(0);
}

// The same for float32 rows of a dx far larger than the caches, with streaming
// stores (8 lanes, from a 16-byte aligned address): dx is then written once
// and never read from memory first. The same values as plane_row.
TBD_CLONES void plane_row_stream(float* row, const float* dz, const int32_t* cls, int32_t c, int64_t len) {
  const uintptr_t off = reinterpret_cast<uintptr_t>(row) % kStreamAlign;
  const int64_t head = std::min<int64_t>(len, ((kStreamAlign - off) % kStreamAlign) / sizeof(float));
  int64_t i = 0;
  for (; i < head; ++i) row[i] = cls[i] == c ? dz[i] : 0.0f;
  const i32v cv = splat(c);
  for (; i + kLanes <= len; i += kLanes) {
    const i32v keep = loadv<i32v>(cls + i) == cv;  // all ones where the argmax is c
    stream_store(row + i, reinterpret_cast<f32v>(loadv<i32v>(dz + i) & keep));
  }
  for (; i < len; ++i) row[i] = cls[i] == c ? dz[i] : 0.0f;
  stream_fence();
}

at::Tensor cmss_backward_cpu(const at::Tensor& grad, const at::Tensor& log_p,
                             const at::Tensor& argmax, int64_t channels, double temperature,
                             bool scale_by_hw, bool channels_last) {
  cmss_backward_check(grad, log_p, argmax, channels, temperature);
  const int64_t N = grad.size(0), H = grad.size(1), W = grad.size(2), HW = H * W;
  // NCHW: every element of dx is written below, once. channels_last (or more
  // channels than an int32 holds): zeros, then one value per location.
  const bool scatter = channels_last || channels > std::numeric_limits<int32_t>::max();
  auto dx = at::empty({N, channels, H, W}, grad.options(),
                      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (scatter || N == 0 || HW == 0) dx.zero_();
  if (N == 0 || HW == 0) return dx;
  const auto lpc = log_p.contiguous();
  const auto amc = argmax.contiguous();
  const int64_t chunks = (HW + kChunk - 1) / kChunk;
  const int64_t g0 = grad.stride(0), g1 = grad.stride(1), g2 = grad.stride(2);
  const int64_t d0 = dx.stride(0), d1 = dx.stride(1), d2 = dx.stride(2), d3 = dx.stride(3);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "cmss_bwd_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* pg = grad.const_data_ptr<scalar_t>();
    const A* lp = lpc.const_data_ptr<A>();
    const int64_t* am = amc.const_data_ptr<int64_t>();
    scalar_t* pd = dx.mutable_data_ptr<scalar_t>();
    const A inv_t = A(1) / static_cast<A>(temperature);
    const A scale = scale_by_hw ? static_cast<A>(HW) : A(1);
    auto g_at = [&](int64_t n, int64_t i) {
      return static_cast<A>(pg[n * g0 + (i / W) * g1 + (i % W) * g2]);
    };
    // dot[n] = sum p * g, fixed-order chunk partials.
    std::vector<A> partial(N * chunks);
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / chunks, i0 = (item % chunks) * kChunk;
        const int64_t len = std::min(kChunk, HW - i0);
        A s = A(0);
        for (int64_t i = i0; i < i0 + len; ++i) s += math_exp(lp[n * HW + i]) * g_at(n, i);
        partial[item] = s;
      }
    });
    std::vector<A> dot(N, A(0));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < chunks; ++c) dot[n] += partial[n * chunks + c];
    auto dz_at = [&](int64_t j) {
      return static_cast<scalar_t>(spatial_softmax_grad(static_cast<A>(math_exp(lp[j])), g_at(j / HW, j % HW),
                                                        dot[j / HW], scale, inv_t));
    };
    if (scatter) {
      at::parallel_for(0, N * HW, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) {
          if (am[j] < 0 || am[j] >= channels) continue;  // not produced by the forward
          const int64_t i = j % HW;
          pd[(j / HW) * d0 + am[j] * d1 + (i / W) * d2 + (i % W) * d3] = dz_at(j);
        }
      });
      return;
    }
    // NCHW, items (image, chunk of kPlaneChunk locations): the chunk's gradients
    // and argmax channels (-1: none, not produced by the forward), then its row
    // in every channel plane, front to back.
    const int64_t pchunks = (HW + kPlaneChunk - 1) / kPlaneChunk;
    const bool stream = std::is_same<scalar_t, float>::value && dx.numel() * int64_t(sizeof(float)) >= kStreamBytes;
    at::parallel_for(0, N * pchunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> dz(kPlaneChunk);
      std::vector<int32_t> cls(kPlaneChunk);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / pchunks, i0 = (item % pchunks) * kPlaneChunk;
        const int64_t len = std::min(kPlaneChunk, HW - i0);
        for (int64_t i = 0; i < len; ++i) {
          const int64_t j = n * HW + i0 + i;
          dz[i] = dz_at(j);
          cls[i] = am[j] < 0 || am[j] >= channels ? -1 : static_cast<int32_t>(am[j]);
        }
        for (int64_t c = 0; c < channels; ++c) {
          scalar_t* row = pd + n * d0 + c * d1 + i0;
          if (stream) {  // float32 only
            plane_row_stream(reinterpret_cast<float*>(row), reinterpret_cast<const float*>(dz.data()), cls.data(),
                             static_cast<int32_t>(c), len);
          } else {
            plane_row(row, dz.data(), cls.data(), static_cast<int32_t>(c), len);
          }
        }
      }
    });
  });
  return dx;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
cmss_levels_cpu(at::TensorList x, double temperature, bool scale_by_hw) {
  cmss_levels_check(x, temperature);
  return cmss_run(x, temperature, scale_by_hw, true);
}

at::Tensor cmss_no_grad_cpu(const at::Tensor& x, double temperature, bool scale_by_hw) {
  cmss_check(x, temperature);
  return std::get<0>(cmss_run({x}, temperature, scale_by_hw, false))[0];
}

std::vector<at::Tensor> cmss_levels_no_grad_cpu(at::TensorList x, double temperature, bool scale_by_hw) {
  cmss_levels_check(x, temperature);
  return std::get<0>(cmss_run(x, temperature, scale_by_hw, false));
}

std::vector<at::Tensor> cmss_levels_backward_cpu(at::TensorList grad, at::TensorList log_p,
                                                 at::TensorList argmax, at::IntArrayRef channels,
                                                 double temperature, bool scale_by_hw,
                                                 const c10::List<bool>& channels_last) {
  cmss_levels_backward_check(grad, log_p, argmax, channels, temperature, channels_last);
  std::vector<at::Tensor> dx;
  for (size_t l = 0; l < grad.size(); ++l) {
    dx.push_back(cmss_backward_cpu(grad[l], log_p[l], argmax[l], channels[l], temperature,
                                   scale_by_hw, channels_last.get(l)));
  }
  return dx;
}

}  // namespace

TBD_OPS_IMPL(CPU,
    "channel_max_spatial_softmax", TORCH_FN(cmss_cpu),
    "_channel_max_spatial_softmax_backward", TORCH_FN(cmss_backward_cpu),
    "_channel_max_spatial_softmax_levels", TORCH_FN(cmss_levels_cpu),
    "_channel_max_spatial_softmax_no_grad", TORCH_FN(cmss_no_grad_cpu),
    "_channel_max_spatial_softmax_levels_no_grad", TORCH_FN(cmss_levels_no_grad_cpu),
    "_channel_max_spatial_softmax_levels_backward", TORCH_FN(cmss_levels_backward_cpu))

}  // namespace tbd_ops
