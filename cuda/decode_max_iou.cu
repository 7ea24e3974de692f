// p_r: decode every prediction once and take its max IoU over the image's
// ground truths, which are staged in shared memory tile by tile. Memory is
// O(P + G): the P x G IoU matrix never exists.
//
// Ground-truth offsets travel as kernel parameters (chunks of up to
// kChunk images), so nothing is copied or synchronized with the host and the
// launches can be captured in a CUDA graph.
#include <cub/block/block_reduce.cuh>

#include <algorithm>

#include "common.cuh"
#include "tbd_ops/argmax.h"
#include "tbd_ops/box.h"
#include "tbd_ops/layout.h"

namespace tbd_ops {
namespace cuda {
namespace {

constexpr int kChunk = 64;     // images per launch
constexpr int kTile = 1024;    // ground-truth boxes per shared-memory tile

struct ImageChunk {
  int64_t n0;                 // first image of the chunk
  int count;                  // images in the chunk
  int64_t off[kChunk + 1];    // ground-truth offsets (absolute rows of gts)
};

template <typename T, typename A>
__device__ __forceinline__ Box<A> load_gt(const T* gts, int64_t row) {
  const T* g = gts + row * 4;
  return {to_acc(g[0]), to_acc(g[1]), to_acc(g[2]), to_acc(g[3])};
}

template <typename T, typename A>
__device__ __forceinline__ Box<A> decode_at(const T* pred, const PredLayout& pl, const T* priors,
                                            int64_t ps0, int64_t ps1, int pdim, int64_t n,
                                            int64_t p, const CoderParams<A>& cp, A d[4], A r[4]) {
  load_pred(pred, pl, n, p, d, ToAcc());
  load_prior(priors, ps0, ps1, pdim, p, r, ToAcc());
  return decode_box(d, r, cp);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
decode_max_iou_fwd_kernel(const T* __restrict__ pred, PredLayout pl, const T* __restrict__ priors,
                          int64_t ps0, int64_t ps1, int pdim, const T* __restrict__ gts,
                          ImageChunk chunk, int64_t P, CoderParams<A> cp, A eps,
                          T* __restrict__ iou, int64_t* __restrict__ arg) {
  __shared__ Box<A> tile[kTile];
  const int64_t n = chunk.n0 + blockIdx.y;
  const int64_t p = blockIdx.x * int64_t(kBlock) + threadIdx.x;
  const bool active = p < P;
  const int64_t g0 = chunk.off[blockIdx.y];
  const int64_t G = chunk.off[blockIdx.y + 1] - g0;
  Box<A> b{};
  if (active) {
    A d[4], r[4];
    b = decode_at(pred, pl, priors, ps0, ps1, pdim, n, p, cp, d, r);
  }
  ArgMax<A> best = argmax_empty<A>();
  for (int64_t t0 = 0; t0 < G; t0 += kTile) {
    const int tn = static_cast<int>(G - t0 < kTile ? G - t0 : kTile);
    __syncthreads();
    for (int j = threadIdx.x; j < tn; j += kBlock) tile[j] = load_gt<T, A>(gts, g0 + t0 + j);
    __syncthreads();
    if (active) {
      for (int j = 0; j < tn; ++j) argmax_update(best, box_iou(b, tile[j], eps), t0 + j);
    }
  }
  if (active) {
    iou[n * P + p] = from_acc<T>(best.index < 0 ? A(0) : best.value);
    arg[n * P + p] = best.index;
  }
}

// One thread per prior: loops over the chunk's images, writes the gradient of
// every prediction and accumulates the prior's gradient in a fixed order.
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
decode_max_iou_bwd_kernel(const T* __restrict__ pred, PredLayout pl, const T* __restrict__ priors,
                          int64_t ps0, int64_t ps1, int pdim, const T* __restrict__ gts,
                          ImageChunk chunk, int64_t P, CoderParams<A> cp, A eps,
                          const T* __restrict__ grad, int64_t gs0, int64_t gs1,
                          const int64_t* __restrict__ arg, T* __restrict__ grad_pred,
                          PredLayout gpl, T* __restrict__ grad_priors) {
  const int64_t p = blockIdx.x * int64_t(kBlock) + threadIdx.x;
  if (p >= P) return;
  A acc[4] = {A(0), A(0), A(0), A(0)};
  for (int i = 0; i < chunk.count; ++i) {
    const int64_t n = chunk.n0 + i;
    const int64_t a = arg[n * P + p];
    A dp[4] = {A(0), A(0), A(0), A(0)};
    if (a >= 0 && a < chunk.off[i + 1] - chunk.off[i]) {
      A d[4], r[4], dr[4] = {A(0), A(0), A(0), A(0)};
      const Box<A> b = decode_at(pred, pl, priors, ps0, ps1, pdim, n, p, cp, d, r);
      Box<A> gb, gg;
      box_iou_backward(b, load_gt<T, A>(gts, chunk.off[i] + a), eps,
                       to_acc(grad[n * gs0 + p * gs1]), gb, gg);
      decode_box_backward(d, r, cp, gb, dp, grad_priors ? dr : nullptr);
      for (int k = 0; k < 4; ++k) acc[k] += dr[k];
    }
    if (grad_pred) {
      const int64_t o = pred_offset(gpl, n, p, 0);
      for (int k = 0; k < 4; ++k) grad_pred[o + k * gpl.sC] = from_acc<T>(dp[k]);
    }
  }
  if (grad_priors) {
    for (int k = 0; k < pdim; ++k) {
      // Chunks run in order on one stream: the first writes, later ones add.
      const A prev = chunk.n0 == 0 ? A(0) : to_acc(grad_priors[p * pdim + k]);
      grad_priors[p * pdim + k] = from_acc<T>(prev + acc[k]);
    }
  }
}

template <typename A> struct Box4Sum {
  __device__ __forceinline__ Box<A> operator()(const Box<A>& a, const Box<A>& b) const {
    return {a.x1 + b.x1, a.y1 + b.y1, a.x2 + b.x2, a.y2 + b.y2};
  }
};

// One block per ground truth: sums the gradient of the predictions whose max
// IoU it is (block reduction, fixed order).
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
decode_max_iou_bwd_gt_kernel(const T* __restrict__ pred, PredLayout pl,
                             const T* __restrict__ priors, int64_t ps0, int64_t ps1, int pdim,
                             const T* __restrict__ gts, ImageChunk chunk, int64_t P,
                             CoderParams<A> cp, A eps, const T* __restrict__ grad, int64_t gs0,
                             int64_t gs1, const int64_t* __restrict__ arg,
                             T* __restrict__ grad_gts) {
  const int64_t n = chunk.n0 + blockIdx.y;
  const int64_t j = blockIdx.x;
  const int64_t g0 = chunk.off[blockIdx.y];
  if (j >= chunk.off[blockIdx.y + 1] - g0) return;  // uniform over the block
  const Box<A> gt = load_gt<T, A>(gts, g0 + j);
  Box<A> s{A(0), A(0), A(0), A(0)};
  for (int64_t p = threadIdx.x; p < P; p += kBlock) {
    if (arg[n * P + p] != j) continue;
    A d[4], r[4];
    const Box<A> b = decode_at(pred, pl, priors, ps0, ps1, pdim, n, p, cp, d, r);
    Box<A> gb, gg;
    box_iou_backward(b, gt, eps, to_acc(grad[n * gs0 + p * gs1]), gb, gg);
    s = Box4Sum<A>()(s, gg);
  }
  using Reduce = cub::BlockReduce<Box<A>, kBlock>;
  __shared__ typename Reduce::TempStorage tmp;
  s = Reduce(tmp).Reduce(s, Box4Sum<A>());
  if (threadIdx.x == 0) {
    T* o = grad_gts + (g0 + j) * 4;
    o[0] = from_acc<T>(s.x1);
    o[1] = from_acc<T>(s.y1);
    o[2] = from_acc<T>(s.x2);
    o[3] = from_acc<T>(s.y2);
  }
}

template <typename F> void for_each_chunk(const DecodeIouArgs& a, F&& f) {
  for (int64_t n0 = 0; n0 < a.N; n0 += kChunk) {
    ImageChunk c;
    c.n0 = n0;
    c.count = static_cast<int>(std::min<int64_t>(kChunk, a.N - n0));
    int64_t max_g = 0;
    for (int i = 0; i <= c.count; ++i) {
      c.off[i] = a.gt_offsets[n0 + i];
      if (i > 0) max_g = std::max(max_g, c.off[i] - c.off[i - 1]);
    }
    f(c, max_g);
  }
}

}  // namespace

void decode_max_iou_forward(DType dt, const DecodeIouArgs& a, void* iou, int64_t* arg,
                            void* stream) {
  if (a.N == 0 || a.P == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const CoderParams<A> cp = cast_params<A>(a.params);
    for_each_chunk(a, [&](const ImageChunk& c, int64_t) {
      const dim3 grid(static_cast<unsigned>(ceil_div(a.P, kBlock)), static_cast<unsigned>(c.count));
      decode_max_iou_fwd_kernel<T, A><<<grid, kBlock, 0, s>>>(
          static_cast<const T*>(a.pred), a.pl, static_cast<const T*>(a.priors), a.prior_s0,
          a.prior_s1, a.prior_dim, static_cast<const T*>(a.gts), c, a.P, cp,
          static_cast<A>(a.eps), static_cast<T*>(iou), arg);
      check_launch("decode_max_iou_fwd_kernel");
    });
  });
}

void decode_max_iou_backward(DType dt, const DecodeIouArgs& a, const void* grad_iou, int64_t gs0,
                             int64_t gs1, const int64_t* arg, void* grad_pred,
                             const PredLayout& gpl, void* grad_priors, void* grad_gts,
                             void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const CoderParams<A> cp = cast_params<A>(a.params);
    if (a.P > 0 && a.N == 0 && grad_priors) {
      cudaMemsetAsync(grad_priors, 0, sizeof(T) * a.P * a.prior_dim, s);
    }
    if (a.P == 0) return;
    for_each_chunk(a, [&](const ImageChunk& c, int64_t max_g) {
      if (grad_pred || grad_priors) {
        decode_max_iou_bwd_kernel<T, A><<<static_cast<unsigned>(ceil_div(a.P, kBlock)), kBlock, 0, s>>>(
            static_cast<const T*>(a.pred), a.pl, static_cast<const T*>(a.priors), a.prior_s0,
            a.prior_s1, a.prior_dim, static_cast<const T*>(a.gts), c, a.P, cp,
            static_cast<A>(a.eps), static_cast<const T*>(grad_iou), gs0, gs1, arg,
            static_cast<T*>(grad_pred), gpl, static_cast<T*>(grad_priors));
        check_launch("decode_max_iou_bwd_kernel");
      }
      if (grad_gts && max_g > 0) {
        const dim3 grid(static_cast<unsigned>(max_g), static_cast<unsigned>(c.count));
        decode_max_iou_bwd_gt_kernel<T, A><<<grid, kBlock, 0, s>>>(
            static_cast<const T*>(a.pred), a.pl, static_cast<const T*>(a.priors), a.prior_s0,
            a.prior_s1, a.prior_dim, static_cast<const T*>(a.gts), c, a.P, cp,
            static_cast<A>(a.eps), static_cast<const T*>(grad_iou), gs0, gs1, arg,
            static_cast<T*>(grad_gts));
        check_launch("decode_max_iou_bwd_gt_kernel");
      }
    });
  });
}

}  // namespace cuda
}  // namespace tbd_ops
