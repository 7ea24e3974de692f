// CPU kernel of channel_max_spatial_softmax (p_c). The per-element math is in
// tbd_ops/softmax.h, shared with the CUDA kernel. The channel scan runs over
// tiles of locations; each tile's locations form fixed chunks whose
// online-softmax partials are combined in chunk order, so results do not
// depend on the number of threads (nor on the tile size).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "../channel_max_spatial_softmax.h"
#include "tbd_ops/softmax.h"

namespace tbd_ops {
namespace {

constexpr int64_t kChunk = 256;  // locations per softmax partial (fixed: thread-independent results)
// Locations per work item of the channel scan (a multiple of kChunk): every
// channel row is read in contiguous runs of kTile values (long enough for the
// hardware prefetcher) while the running max and argmax of the tile stay in L1.
constexpr int64_t kTile = 2048;
static_assert(kTile % kChunk == 0, "a tile holds whole softmax chunks");

// Running channel argmax of `len` contiguous locations whose channel k starts
// at base + k * s1 (the NCHW case), exact for any input (NaN included).
// Branch-free so that it vectorizes; compiled for AVX2 and for the baseline
// ISA, picked at load time.
template <typename T, typename A>
__attribute__((target_clones("avx2", "default"))) void channel_argmax_rows(
    const T* base, int64_t K, int64_t s1, int64_t len, A* bv, int32_t* bi) {
  for (int64_t i = 0; i < len; ++i) {
    bv[i] = static_cast<A>(base[i]);
    bi[i] = 0;
  }
  for (int64_t k = 1; k < K; ++k) {
    const T* row = base + k * s1;
    for (int64_t i = 0; i < len; ++i) {
      const A v = static_cast<A>(row[i]);
      const bool take = argmax_takes(bv[i], v);
      bv[i] = take ? v : bv[i];
      bi[i] = take ? static_cast<int32_t>(k) : bi[i];
    }
  }
}

// float32 fast path, same results: channels 1.. in blocks of kRows. A pass
// over the tile takes the plain max of kRows rows (no index), and a location
// moves to a block only when the block's max is strictly greater than its
// running max; the lowest channel of the winning block holding that max is
// then found by re-reading that block at this location alone. NaN breaks the
// plain max: a tile holding one returns false and is redone exactly.
constexpr int64_t kRows = 4;
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

// Unaligned 8-lane load and store (inlined into either clone).
template <typename V, typename P> __attribute__((always_inline)) inline V load8(const P* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename P> __attribute__((always_inline)) inline void store8(P* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

__attribute__((target_clones("avx2", "default"))) bool channel_argmax_rows_f32(
    const float* __restrict__ base, int64_t K, int64_t s1, int64_t len, float* __restrict__ bv,
    int32_t* __restrict__ bi) {
  const int64_t vlen = len / 8 * 8;
  const int64_t kfull = 1 + (K - 1) / kRows * kRows;  // rows [1, kfull) form whole blocks
  i32x8 nan8 = {};
  int32_t nan1 = 0;
  for (int64_t i = 0; i < len; ++i) {
    bv[i] = base[i];
    bi[i] = 0;
    nan1 |= base[i] != base[i];
  }
  for (int64_t k = 1; k < K;) {
    const int64_t rows = k < kfull ? kRows : 1;
    const float* r = base + k * s1;
    i32x8 kv;
    for (int l = 0; l < 8; ++l) kv[l] = static_cast<int32_t>(k);
    for (int64_t i = 0; i < vlen; i += 8) {
      f32x8 m = load8<f32x8>(r + i);
      i32x8 nan = m != m;
      for (int64_t j = 1; j < rows; ++j) {
        const f32x8 v = load8<f32x8>(r + j * s1 + i);
        nan |= v != v;
        m = v > m ? v : m;
      }
      nan8 |= nan;
      const f32x8 b = load8<f32x8>(bv + i);
      const i32x8 t = m > b;
      store8(bv + i, f32x8(t ? m : b));
      store8(bi + i, i32x8(t ? kv : load8<i32x8>(bi + i)));
    }
    for (int64_t i = vlen; i < len; ++i) {
      float m = r[i];
      for (int64_t j = 0; j < rows; ++j) {
        const float v = r[j * s1 + i];
        nan1 |= v != v;
        m = v > m ? v : m;
      }
      if (m > bv[i]) {
        bv[i] = m;
        bi[i] = static_cast<int32_t>(k);
      }
    }
    k += rows;
  }
  for (int l = 0; l < 8; ++l) nan1 |= nan8[l];
  if (nan1) return false;
  // The lowest channel of the winning block whose value equals the max.
  for (int64_t i = 0; i < len; ++i) {
    const int64_t k0 = bi[i];
    const int64_t k1 = k0 == 0 ? 1 : (k0 < kfull ? k0 + kRows : k0 + 1);
    for (int64_t k = k0; k < k1; ++k) {
      const float v = base[k * s1 + i];
      if (v == bv[i]) {
        bv[i] = v;  // the first equal value (-0.0 and 0.0 compare equal)
        bi[i] = static_cast<int32_t>(k);
        break;
      }
    }
  }
  return true;
}

template <typename T, typename A>
void channel_argmax_tile(const T* base, int64_t K, int64_t s1, int64_t len, A* bv, int32_t* bi) {
  if constexpr (std::is_same_v<T, float>) {
    if (channel_argmax_rows_f32(base, K, s1, len, bv, bi)) return;
  }
  channel_argmax_rows(base, K, s1, len, bv, bi);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cmss_cpu(const at::Tensor& x, double temperature,
                                                        bool scale_by_hw) {
  cmss_check(x, temperature);
  const int64_t N = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  auto out = at::empty({N, H, W}, x.options());
  auto log_p = at::empty({N, H, W}, x.options().dtype(acc_dtype(x.scalar_type())));
  auto argmax = at::empty({N, H, W}, x.options().dtype(at::kLong));
  if (N == 0 || HW == 0) return {out, log_p, argmax};
  const int64_t chunks = (HW + kChunk - 1) / kChunk;
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cmss_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    A* lp = log_p.mutable_data_ptr<A>();
    int64_t* am = argmax.mutable_data_ptr<int64_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const A inv_t = A(1) / static_cast<A>(temperature);
    const A scale = scale_by_hw ? static_cast<A>(HW) : A(1);
    std::vector<SoftmaxState<A>> partial(N * chunks);

    // Pass 1: channel max, y = z / T into log_p, one softmax partial per chunk
    // of kChunk locations; work items are tiles of kTile locations.
    const int64_t tiles = (HW + kTile - 1) / kTile;
    at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
      // Tile-local running max; when the H*W plane is contiguous the k loop
      // reads rows contiguously and vectorizes.
      std::vector<A> bv(kTile);
      std::vector<int32_t> bi(kTile);
      const bool plane_contiguous = s3 == 1 && s2 == W;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / tiles, t0 = (item % tiles) * kTile;
        const int64_t len = std::min(kTile, HW - t0);
        if (plane_contiguous) {
          channel_argmax_tile(px + n * s0 + t0, K, s1, len, bv.data(), bi.data());
        } else {
          for (int64_t i = 0; i < len; ++i) {  // e.g. channels_last: K values of a location
            const scalar_t* loc = px + n * s0 + ((t0 + i) / W) * s2 + ((t0 + i) % W) * s3;
            ArgMax<A> best = argmax_empty<A>();
            for (int64_t k = 0; k < K; ++k) argmax_update(best, static_cast<A>(loc[k * s1]), k);
            bv[i] = best.value;
            bi[i] = static_cast<int32_t>(best.index);
          }
        }
        A* lpt = lp + n * HW + t0;
        int64_t* amt = am + n * HW + t0;
        for (int64_t c0 = 0; c0 < len; c0 += kChunk) {
          const int64_t c1 = std::min(len, c0 + kChunk);
          SoftmaxState<A> st = softmax_empty<A>();
          for (int64_t i = c0; i < c1; ++i) {
            const A y = bv[i] * inv_t;
            lpt[i] = y;
            amt[i] = bi[i];
            softmax_add(st, y);
          }
          partial[n * chunks + (t0 + c0) / kChunk] = st;
        }
      }
    });
    // Pass 2: per image, combine the partials in chunk order and normalize.
    std::vector<A> lse(N);
    for (int64_t n = 0; n < N; ++n) {
      SoftmaxState<A> st = softmax_empty<A>();
      for (int64_t c = 0; c < chunks; ++c) st = softmax_combine(st, partial[n * chunks + c]);
      lse[n] = softmax_lse(st);
    }
    at::parallel_for(0, N * HW, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const A v = lp[j] - lse[j / HW];
        lp[j] = v;
        po[j] = static_cast<scalar_t>(math_exp(v) * scale);
      }
    });
  });
  return {out, log_p, argmax};
}

at::Tensor cmss_backward_cpu(const at::Tensor& grad, const at::Tensor& log_p,
                             const at::Tensor& argmax, int64_t channels, double temperature,
                             bool scale_by_hw, bool channels_last) {
  cmss_backward_check(grad, log_p, argmax, channels, temperature);
  const int64_t N = grad.size(0), H = grad.size(1), W = grad.size(2), HW = H * W;
  auto dx = at::empty({N, channels, H, W}, grad.options(),
                      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)
                .zero_();
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
    at::parallel_for(0, N * HW, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t n = j / HW, i = j % HW;
        const A dz = spatial_softmax_grad(static_cast<A>(math_exp(lp[j])), g_at(n, i), dot[n],
                                          scale, inv_t);
        if (am[j] < 0 || am[j] >= channels) continue;  // not produced by the forward
        pd[n * d0 + am[j] * d1 + (i / W) * d2 + (i % W) * d3] = static_cast<scalar_t>(dz);
      }
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(tbd_ops, CPU, m) {
  m.impl("channel_max_spatial_softmax", TORCH_FN(cmss_cpu));
  m.impl("_channel_max_spatial_softmax_backward", TORCH_FN(cmss_backward_cpu));
}

}  // namespace tbd_ops
