// CPU kernel of channel_max_spatial_softmax (p_c). The per-element math is in
// tbd_ops/softmax.h, shared with the CUDA kernel. Locations are processed in
// fixed chunks whose online-softmax partials are combined in chunk order, so
// results do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../channel_max_spatial_softmax.h"
#include "tbd_ops/softmax.h"

namespace tbd_ops {
namespace {

constexpr int64_t kChunk = 256;  // locations per work item

// Running channel max of `len` contiguous locations whose channel k starts at
// base + k * s1 (the NCHW case). Branch-free so that it vectorizes; compiled
// for AVX2 and for the baseline ISA, picked at load time.
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

    // Pass 1: channel max, y = z / T into log_p, one softmax partial per chunk.
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
      // Chunk-local running max; when the H*W plane is contiguous the k loop
      // reads rows contiguously and vectorizes.
      A bv[kChunk];
      int32_t bi[kChunk];
      const bool plane_contiguous = s3 == 1 && s2 == W;
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / chunks, i0 = (item % chunks) * kChunk;
        const int64_t len = std::min(kChunk, HW - i0);
        if (plane_contiguous) {
          channel_argmax_rows(px + n * s0 + i0, K, s1, len, bv, bi);
        } else {
          for (int64_t i = 0; i < len; ++i) {  // e.g. channels_last: K values of a location
            const scalar_t* loc = px + n * s0 + ((i0 + i) / W) * s2 + ((i0 + i) % W) * s3;
            ArgMax<A> best = argmax_empty<A>();
            for (int64_t k = 0; k < K; ++k) argmax_update(best, static_cast<A>(loc[k * s1]), k);
            bv[i] = best.value;
            bi[i] = static_cast<int32_t>(best.index);
          }
        }
        SoftmaxState<A> st = softmax_empty<A>();
        for (int64_t i = 0; i < len; ++i) {
          const A y = bv[i] * inv_t;
          lp[n * HW + i0 + i] = y;
          am[n * HW + i0 + i] = bi[i];
          softmax_add(st, y);
        }
        partial[item] = st;
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
