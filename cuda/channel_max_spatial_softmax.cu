// p_c = softmax over H*W of (max_k x[n, k, h, w]) / T.
//
// Forward, two launches:
//   1. cmss_max_kernel: one thread per location reads the K logits once
//      (any strides), keeps the argmax, stores y = z / T in log_p and folds y
//      into an online-softmax state; a block reduction writes one (m, s)
//      partial per block.
//   2. cmss_normalize_kernel: each block combines the image's partials in a
//      fixed order (deterministic), then writes log_p = y - lse and
//      out = scale * math_exp(log_p).
// Backward, two launches: dot = sum(p * g) per image (fixed-order partials),
// then dx = 0 everywhere except dx[argmax] = (1/T) * scale * p * (g - dot).
//
// Grid: (blocks per image, images of the chunk); grid.y is at most 65535, so
// larger batches run as several launches of at most max_grid_yz() images.
#include "channel_max_spatial_softmax.h"
#include "common.cuh"
#include "tbd_ops/softmax.h"

namespace tbd_ops {
namespace cuda {
namespace {

constexpr int64_t kMaxBlocksPerImage = 256;

template <typename A> struct SoftmaxCombineOp {
  __device__ __forceinline__ SoftmaxState<A> operator()(const SoftmaxState<A>& a,
                                                        const SoftmaxState<A>& b) const {
    return softmax_combine(a, b);
  }
};

// Combines the per-block partials of image n in a fixed order; every thread of
// the block gets the result.
template <typename A>
__device__ SoftmaxState<A> combine_partials(const A* pm, const A* ps, int64_t bpi) {
  SoftmaxState<A> st = softmax_empty<A>();
  for (int64_t b = threadIdx.x; b < bpi; b += blockDim.x) {
    st = softmax_combine(st, SoftmaxState<A>{pm[b], ps[b]});
  }
  return block_reduce<kBlock>(st, SoftmaxCombineOp<A>());
}

template <typename A> __device__ A sum_partials(const A* p, int64_t bpi) {
  A s = A(0);
  for (int64_t b = threadIdx.x; b < bpi; b += blockDim.x) s += p[b];
  return block_sum<kBlock>(s);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
cmss_max_kernel(int64_t n0, const T* __restrict__ x, int64_t s0, int64_t s1, int64_t s2, int64_t s3,
                int64_t K, int64_t W, int64_t HW, A inv_t, A* __restrict__ log_p,
                int64_t* __restrict__ argmax, A* __restrict__ part_m, A* __restrict__ part_s) {
  const int64_t n = n0 + blockIdx.y;
  const int64_t bpi = gridDim.x;
  SoftmaxState<A> st = softmax_empty<A>();
  for (int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x; i < HW; i += bpi * kBlock) {
    const int64_t h = i / W, w = i - h * W;
    const T* px = x + n * s0 + h * s2 + w * s3;
    ArgMax<A> am = argmax_empty<A>();
#pragma unroll 8
    for (int64_t k = 0; k < K; ++k) argmax_update(am, to_acc(px[k * s1]), k);  // loads in flight
    const A y = am.value * inv_t;
    log_p[n * HW + i] = y;
    argmax[n * HW + i] = am.index;
    softmax_add(st, y);
  }
  st = block_reduce<kBlock>(st, SoftmaxCombineOp<A>());
  if (threadIdx.x == 0) {
    part_m[n * bpi + blockIdx.x] = st.m;
    part_s[n * bpi + blockIdx.x] = st.s;
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
cmss_normalize_kernel(int64_t n0, int64_t HW, A scale, const A* __restrict__ part_m,
                      const A* __restrict__ part_s, A* __restrict__ log_p, T* __restrict__ out) {
  const int64_t n = n0 + blockIdx.y;
  const int64_t bpi = gridDim.x;
  const A lse = softmax_lse(combine_partials(part_m + n * bpi, part_s + n * bpi, bpi));
  for (int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x; i < HW; i += bpi * kBlock) {
    const A lp = log_p[n * HW + i] - lse;
    log_p[n * HW + i] = lp;
    out[n * HW + i] = from_acc<T>(math_exp(lp) * scale);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
cmss_dot_kernel(int64_t n0, const T* __restrict__ grad, int64_t g0, int64_t g1, int64_t g2, int64_t W,
                int64_t HW, const A* __restrict__ log_p, A* __restrict__ part) {
  const int64_t n = n0 + blockIdx.y;
  const int64_t bpi = gridDim.x;
  A s = A(0);
  for (int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x; i < HW; i += bpi * kBlock) {
    const int64_t h = i / W, w = i - h * W;
    s += math_exp(log_p[n * HW + i]) * to_acc(grad[n * g0 + h * g1 + w * g2]);
  }
  s = block_sum<kBlock>(s);
  if (threadIdx.x == 0) part[n * bpi + blockIdx.x] = s;
}

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
cmss_scatter_kernel(int64_t n0, const T* __restrict__ grad, int64_t g0, int64_t g1, int64_t g2,
                    const A* __restrict__ log_p, const int64_t* __restrict__ argmax, int64_t K,
                    int64_t W, int64_t HW, A inv_t, A scale, const A* __restrict__ part,
                    T* __restrict__ dx, int64_t d0, int64_t d1, int64_t d2, int64_t d3) {
  const int64_t n = n0 + blockIdx.y;
  const int64_t bpi = gridDim.x;
  const A dot = sum_partials(part + n * bpi, bpi);
  const T zero = from_acc<T>(A(0));
  for (int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x; i < HW; i += bpi * kBlock) {
    const int64_t h = i / W, w = i - h * W;
    const A g = to_acc(grad[n * g0 + h * g1 + w * g2]);
    const A dz = spatial_softmax_grad(math_exp(log_p[n * HW + i]), g, dot, scale, inv_t);
    const T dzt = from_acc<T>(dz);
    const int64_t am = argmax[n * HW + i];
    T* pd = dx + n * d0 + h * d2 + w * d3;
    for (int64_t k = 0; k < K; ++k) pd[k * d1] = (k == am) ? dzt : zero;
  }
}

}  // namespace

int64_t cmss_blocks_per_image(int64_t hw) { return grid_blocks(hw, kMaxBlocksPerImage); }

void cmss_forward(DType dt, const void* x, const int64_t xs[4], int64_t N, int64_t K, int64_t H,
                  int64_t W, double temperature, bool scale_by_hw, void* out, void* log_p,
                  int64_t* argmax, void* partials, void* stream) {
  const int64_t HW = H * W;
  if (N == 0 || HW == 0) return;
  const int64_t bpi = cmss_blocks_per_image(HW);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    A* pm = static_cast<A*>(partials);
    A* ps = pm + N * bpi;
    const A inv_t = A(1) / static_cast<A>(temperature);
    const A scale = scale_by_hw ? static_cast<A>(HW) : A(1);
    for_each_grid_chunk(N, bpi, [&](int64_t n0, dim3 grid) {
      launch_kernel((cmss_max_kernel<T, A>), grid, kBlock, 0, s, n0, static_cast<const T*>(x),
                    xs[0], xs[1], xs[2], xs[3], K, W, HW, inv_t, static_cast<A*>(log_p), argmax,
                    pm, ps);
      launch_kernel((cmss_normalize_kernel<T, A>), grid, kBlock, 0, s, n0, HW, scale, pm, ps,
                    static_cast<A*>(log_p), static_cast<T*>(out));
    });
  });
}

void cmss_backward(DType dt, const void* grad, const int64_t gs[3], const void* log_p,
                   const int64_t* argmax, int64_t N, int64_t K, int64_t H, int64_t W,
                   double temperature, bool scale_by_hw, void* dx, const int64_t ds[4],
                   void* partials, void* stream) {
  const int64_t HW = H * W;
  if (N == 0 || HW == 0 || K == 0) return;
  const int64_t bpi = cmss_blocks_per_image(HW);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    A* part = static_cast<A*>(partials);
    const A* lp = static_cast<const A*>(log_p);
    const A inv_t = A(1) / static_cast<A>(temperature);
    const A scale = scale_by_hw ? static_cast<A>(HW) : A(1);
    for_each_grid_chunk(N, bpi, [&](int64_t n0, dim3 grid) {
      launch_kernel((cmss_dot_kernel<T, A>), grid, kBlock, 0, s, n0, static_cast<const T*>(grad),
                    gs[0], gs[1], gs[2], W, HW, lp, part);
      launch_kernel((cmss_scatter_kernel<T, A>), grid, kBlock, 0, s, n0,
                    static_cast<const T*>(grad), gs[0], gs[1], gs[2], lp, argmax, K, W, HW, inv_t,
                    scale, part, static_cast<T*>(dx), ds[0], ds[1], ds[2], ds[3]);
    });
  });
}

}  // namespace cuda
}  // namespace tbd_ops
