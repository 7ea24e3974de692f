// Sigmoid focal loss; the per-element math is tbd_ops/focal.h, shared with the
// CPU kernels (per-element results agree bit for bit under emulation; on a GPU,
// where powf / exp / log1p come from libdevice, to rounding for a gamma other
// than 0, 1 or 2 and in float64).
//
// Forward:
//   "none": focal_forward_kernel, one thread per element (grid-stride), writes
//     w[r] * loss[r, c].
//   "sum"/"mean": the same kernel sums its elements per thread, reduces the
//     block (fixed order) into one partial per block; focal_combine_kernel
//     (one block) adds the partials in a fixed order and divides by R * C for
//     "mean". The grid depends on R * C only: deterministic, no atomics.
// Backward, recomputing from the logits (nothing of size [R, C] is saved):
//   focal_grad_kernel, one thread per element: (g * w[r]) * dloss/dx;
// The grid-stride loops step (row, column) along with the flat index
// (RowColWalk): no 64-bit division per element.
//   focal_grad_weight_kernel, one thread per row: sum_c g * loss (columns in
//   order). The incoming gradient of "sum"/"mean" is read on the device.
// A target outside [0, C] (not checked on the host: that would synchronize)
// gives NaN for every element of its row; nothing is read out of bounds.
#include "common.cuh"
#include "sigmoid_focal_loss.h"
#include "tbd_ops/layout.h"

namespace tbd_ops {
namespace cuda {
namespace {

constexpr int64_t kMaxBlocks = 1024;  // partials of the sum


template <typename A> __device__ __forceinline__ A focal_nan() { return static_cast<A>(NAN); }

template <typename T, typename A>
__device__ __forceinline__ A element_loss(const T* __restrict__ x, int64_t xs0, int64_t xs1,
                                          const int64_t* __restrict__ targets, int64_t ts0,
                                          int64_t r, int64_t c, int64_t C, A gamma, A alpha) {
  const int64_t t = targets[r * ts0];
  if (!focal_target_ok(t, C)) return focal_nan<A>();
  return focal_loss(to_acc(x[r * xs0 + c * xs1]), t == c, gamma, alpha);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
focal_forward_kernel(const T* __restrict__ x, int64_t xs0, int64_t xs1,
                     const int64_t* __restrict__ targets, int64_t ts0, const A* __restrict__ w,
                     int64_t R, int64_t C, A gamma, A alpha, T* __restrict__ out,
                     A* __restrict__ partial) {
  const int64_t n = R * C, stride = int64_t(gridDim.x) * kBlock;
  int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x;
  A acc = A(0);
  // (r, c) of i stepped with i: no 64-bit division per element (n > 0, so C > 0).
  for (RowColWalk rc(i < n ? i : 0, stride, i < n ? C : 1); i < n; i += stride, rc.step()) {
    const int64_t r = rc.r, c = rc.c;
    const A wr = w != nullptr ? w[r] : A(1);
    const A l = element_loss(x, xs0, xs1, targets, ts0, r, c, C, gamma, alpha);
    if (out != nullptr) {
      out[i] = from_acc<T>(l * wr);
    } else {
      acc += l * wr;
    }
  }
  if (partial != nullptr) {  // the same for every thread of the block
    acc = block_sum<kBlock>(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  }
}

template <typename A>
__global__ void __launch_bounds__(kBlock)
focal_combine_kernel(const A* __restrict__ partial, int64_t count, int64_t n, bool mean,
                     A* __restrict__ out) {
  A acc = A(0);
  for (int64_t b = threadIdx.x; b < count; b += kBlock) acc += partial[b];
  acc = block_sum<kBlock>(acc);
  if (threadIdx.x == 0) out[0] = mean ? acc / static_cast<A>(n) : acc;
}

// The incoming gradient of element (r, c).
template <typename T, typename A> struct FocalGrad {
  const T* g;     // [R, C] ("none"), else nullptr
  int64_t gs0, gs1;
  const A* g0;    // the scalar of "sum"/"mean", else nullptr
  bool mean;
  int64_t n;      // R * C
  __device__ __forceinline__ A scalar() const {
    A v = g0[0];
    if (mean) v = v / static_cast<A>(n);
    return v;
  }
  __device__ __forceinline__ A at(int64_t r, int64_t c, A s) const {
    return g != nullptr ? to_acc(g[r * gs0 + c * gs1]) : s;
  }
};

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
focal_grad_kernel(const T* __restrict__ x, int64_t xs0, int64_t xs1,
                  const int64_t* __restrict__ targets, int64_t ts0, const A* __restrict__ w,
                  int64_t R, int64_t C, A gamma, A alpha, FocalGrad<T, A> grad,
                  T* __restrict__ gx) {
  const int64_t n = R * C, stride = int64_t(gridDim.x) * kBlock;
  const A s = grad.g == nullptr ? grad.scalar() : A(0);
  int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x;
  for (RowColWalk rc(i < n ? i : 0, stride, i < n ? C : 1); i < n; i += stride, rc.step()) {
    const int64_t r = rc.r, c = rc.c;
    const int64_t t = targets[r * ts0];
    const A wr = w != nullptr ? w[r] : A(1);
    const A ge = grad.at(r, c, s);
    const A d = focal_target_ok(t, C)
                    ? focal_grad(to_acc(x[r * xs0 + c * xs1]), t == c, gamma, alpha)
                    : focal_nan<A>();
    gx[i] = from_acc<T>(ge * wr * d);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
focal_grad_weight_kernel(const T* __restrict__ x, int64_t xs0, int64_t xs1,
                         const int64_t* __restrict__ targets, int64_t ts0, int64_t R, int64_t C,
                         A gamma, A alpha, FocalGrad<T, A> grad, A* __restrict__ gw) {
  const A s = grad.g == nullptr ? grad.scalar() : A(0);
  for (int64_t r = blockIdx.x * int64_t(kBlock) + threadIdx.x; r < R;
       r += int64_t(gridDim.x) * kBlock) {
    const int64_t t = targets[r * ts0];
    const bool ok = focal_target_ok(t, C);
    const T* xr = x + r * xs0;
    A acc = A(0);
#pragma unroll 1
    for (int64_t c = 0; c < C; ++c) {
      const A l = ok ? focal_loss(to_acc(xr[c * xs1]), t == c, gamma, alpha) : focal_nan<A>();
      acc += grad.at(r, c, s) * l;
    }
    gw[r] = acc;
  }
}

}  // namespace

int64_t focal_partials(const FocalArgs& a) {
  return a.reduction == FocalReduction::kNone ? 0 : grid_blocks(a.R * a.C, kMaxBlocks);
}

void sigmoid_focal_loss_forward(DType dt, const FocalArgs& a, void* out, void* partials,
                                void* stream) {
  const int64_t n = a.R * a.C;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(a.logits);
    const A* w = static_cast<const A*>(a.weight);
    const A gamma = static_cast<A>(a.gamma), alpha = static_cast<A>(a.alpha);
    if (a.reduction == FocalReduction::kNone) {
      if (n == 0) return;
      const dim3 grid(static_cast<unsigned>(grid_blocks(n, kMaxBlocksElementwise)));
      launch_kernel((focal_forward_kernel<T, A>), grid, kBlock, 0, s, x, a.xs0, a.xs1, a.targets,
                    a.ts0, w, a.R, a.C, gamma, alpha, static_cast<T*>(out), static_cast<A*>(nullptr));
      return;
    }
    const int64_t blocks = grid_blocks(n, kMaxBlocks);
    A* part = static_cast<A*>(partials);
    if (n > 0) {
      launch_kernel((focal_forward_kernel<T, A>), dim3(static_cast<unsigned>(blocks)), kBlock, 0,
                    s, x, a.xs0, a.xs1, a.targets, a.ts0, w, a.R, a.C, gamma, alpha,
                    static_cast<T*>(nullptr), part);
    }
    launch_kernel((focal_combine_kernel<A>), dim3(1), kBlock, 0, s,
                  static_cast<const A*>(part), n > 0 ? blocks : int64_t(0), n,
                  a.reduction == FocalReduction::kMean, static_cast<A*>(out));
  });
}

void sigmoid_focal_loss_backward(DType dt, const FocalArgs& a, const void* grad, int64_t gs0,
                                 int64_t gs1, void* grad_logits, void* grad_weight, void* stream) {
  const int64_t n = a.R * a.C;
  if (a.R == 0) return;
  if (grad_weight != nullptr && a.weight == nullptr) {
    throw std::invalid_argument("tbd_ops: sigmoid_focal_loss_backward: grad_weight needs a weight");
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const T* x = static_cast<const T*>(a.logits);
    const A gamma = static_cast<A>(a.gamma), alpha = static_cast<A>(a.alpha);
    FocalGrad<T, A> g{};
    if (a.reduction == FocalReduction::kNone) {
      g.g = static_cast<const T*>(grad);
      g.gs0 = gs0;
      g.gs1 = gs1;
    } else {
      g.g0 = static_cast<const A*>(grad);
      g.mean = a.reduction == FocalReduction::kMean;
    }
    g.n = n;
    if (grad_logits != nullptr && n > 0) {
      const dim3 grid(static_cast<unsigned>(grid_blocks(n, kMaxBlocksElementwise)));
      launch_kernel((focal_grad_kernel<T, A>), grid, kBlock, 0, s, x, a.xs0, a.xs1, a.targets, a.ts0,
                    static_cast<const A*>(a.weight), a.R, a.C, gamma, alpha, g,
                    static_cast<T*>(grad_logits));
    }
    if (grad_weight != nullptr) {
      const dim3 grid(static_cast<unsigned>(grid_blocks(a.R, kMaxBlocksElementwise)));
      launch_kernel((focal_grad_weight_kernel<T, A>), grid, kBlock, 0, s, x, a.xs0, a.xs1, a.targets,
                    a.ts0, a.R, a.C, gamma, alpha, g, static_cast<A*>(grad_weight));
    }
  });
}

}  // namespace cuda
}  // namespace tbd_ops
