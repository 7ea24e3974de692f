// p_r: decode every prediction once and take its max IoU over the image's
// ground truths, which are staged in shared memory tile by tile. Memory is
// O(P + G): the P x G IoU matrix never exists.
//
// Ground-truth offsets travel as kernel parameters (ImageChunk, up to
// kChunkImages images per launch), so nothing is copied or synchronized with the host and the
// launches can be captured in a CUDA graph. Per-image clip shapes ([N, 2]) are
// read by the kernels from device memory, for the same reason.
//
// Backward:
//   - predictions and priors: one thread per prior loops over the chunk's
//     images; the prior gradient is accumulated in the accumulation type
//     across chunks (scratch) and rounded to the input dtype once, at the end;
//   - ground truths, O(N*P + G): every prediction gets the key of the
//     ground-truth row it matched (none when its term of that row's gradient
//     is zero: the predictions that overlap no ground truth do not pile up in
//     the segment of the image's first row), a stable radix sort groups the
//     predictions by row (in increasing prediction order), and one block per
//     row sums its segment in a fixed order.
#include "common.cuh"
#include "decode_max_iou.h"
#include "tbd_ops/argmax.h"
#include "tbd_ops/box.h"
#include "tbd_ops/layout.h"

namespace tbd_ops {
namespace cuda {
namespace {

constexpr int kTile = 1024;    // ground-truth boxes per shared-memory tile (dynamic)

// The ground-truth offsets (absolute rows of gts) of a chunk of images.
using GtChunk = ImageChunk<1>;

// Loads prediction (n, p) and its prior into d and r and decodes them; the
// callers that need only the box take .box (the rest is dead once inlined).
template <typename T, typename A>
__device__ __forceinline__ DecodedBox<A> decode_at(const T* pred, const PredLayout& pl,
                                                   const T* priors, int64_t ps0, int64_t ps1,
                                                   int pdim, int64_t n, int64_t p,
                                                   const CoderParams<A>& cp, A d[4], A r[4]) {
  load_pred(pred, pl, n, p, d, ToAcc());
  load_prior(priors, ps0, ps1, pdim, p, r, ToAcc());
  return decode_box_full(d, r, cp);
}

// Shared memory of the forward: a tile of kTile ground-truth boxes, then their
// areas (box_area, computed once when the tile is staged).
template <typename A> constexpr size_t fwd_tile_bytes() { return kTile * (sizeof(Box<A>) + sizeof(A)); }

struct AnyOp {
  __device__ __forceinline__ int operator()(int a, int b) const { return a | b; }
};

// The pair loop runs box_iou_with_areas (no NaN checks) unless the prediction
// or a ground truth of the tile has a NaN area; then box_iou, which propagates
// the NaN. Both give the same value bit for bit (tbd_ops/box.h).
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
decode_max_iou_fwd_kernel(const T* __restrict__ pred, PredLayout pl, const T* __restrict__ priors,
                          int64_t ps0, int64_t ps1, int pdim, const T* __restrict__ gts,
                          GtChunk chunk, int64_t P, CoderParams<A> cp,
                          const A* __restrict__ shapes, A eps, T* __restrict__ iou,
                          int64_t* __restrict__ arg) {
  Box<A>* tile = dynamic_smem<Box<A>>();            // kTile boxes
  A* tile_area = reinterpret_cast<A*>(tile + kTile);  // kTile areas
  const int64_t n = chunk.n0 + blockIdx.y;
  const int64_t p = blockIdx.x * int64_t(kBlock) + threadIdx.x;
  const bool active = p < P;
  const int64_t g0 = chunk.off[0][blockIdx.y];
  const int64_t G = chunk.off[0][blockIdx.y + 1] - g0;
  Box<A> b{};
  if (active) {
    A d[4], r[4];
    b = decode_at(pred, pl, priors, ps0, ps1, pdim, n, p, image_params(cp, shapes, n), d, r).box;
  }
  const A area = box_area(b);
  // Running argmax (tbd_ops/argmax.h); every IoU is NaN or >= -0.0. The pair
  // loop keeps the index within the tile (32 bits).
  A best = A(-1);
  int64_t best_index = -1;
  for (int64_t t0 = 0; t0 < G; t0 += kTile) {
    const int tn = static_cast<int>(G - t0 < kTile ? G - t0 : kTile);
    __syncthreads();  // the previous tile is no longer read
    int nan_area = 0;
    for (int j = threadIdx.x; j < tn; j += kBlock) {
      const Box<A> gb = load_box<A>(gts, g0 + t0 + j, ToAcc());
      tile[j] = gb;
      tile_area[j] = box_area(gb);
      nan_area |= static_cast<int>(is_nan(tile_area[j]));
    }
    // Also the barrier after the staging.
    const bool exact = block_reduce<kBlock>(nan_area, AnyOp()) != 0 || is_nan(area);
    if (active) {
      int best_j = -1;  // set when a candidate of this tile becomes the best
      if (!exact) {
        for (int j = 0; j < tn; ++j) {
          argmax_update_above(best, best_j, box_iou_with_areas(b, area, tile[j], tile_area[j], eps), j);
        }
      } else {
        for (int j = 0; j < tn; ++j) argmax_update_above(best, best_j, box_iou(b, tile[j], eps), j);
      }
      if (best_j >= 0) best_index = t0 + best_j;
    }
  }
  if (active) {
    iou[n * P + p] = from_acc<T>(best_index < 0 ? A(0) : best);
    arg[n * P + p] = best_index;
  }
}

// One thread per prior: loops over the chunk's images, writes the gradient of
// every prediction and adds the prior's gradient to prior_acc (accumulation
// type; the first chunk writes it). The last chunk writes grad_priors.
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
decode_max_iou_bwd_kernel(const T* __restrict__ pred, PredLayout pl, const T* __restrict__ priors,
                          int64_t ps0, int64_t ps1, int pdim, const T* __restrict__ gts,
                          GtChunk chunk, int64_t P, CoderParams<A> cp,
                          const A* __restrict__ shapes, A eps, const T* __restrict__ grad,
                          int64_t gs0, int64_t gs1, const int64_t* __restrict__ arg,
                          T* __restrict__ grad_pred,
                          PredLayout gpl, A* __restrict__ prior_acc, T* __restrict__ grad_priors,
                          bool last_chunk) {
  const int64_t p = blockIdx.x * int64_t(kBlock) + threadIdx.x;
  if (p >= P) return;
  A acc[4] = {A(0), A(0), A(0), A(0)};
  if (grad_priors && chunk.n0 > 0) {
    for (int k = 0; k < pdim; ++k) acc[k] = prior_acc[p * pdim + k];
  }
  for (int i = 0; i < chunk.count; ++i) {
    const int64_t n = chunk.n0 + i;
    const int64_t a = arg[n * P + p];
    A dp[4] = {A(0), A(0), A(0), A(0)};
    if (a >= 0 && a < chunk.off[0][i + 1] - chunk.off[0][i]) {
      A d[4], r[4], dr[4] = {A(0), A(0), A(0), A(0)};
      const CoderParams<A> cpn = image_params(cp, shapes, n);
      const DecodedBox<A> db = decode_at(pred, pl, priors, ps0, ps1, pdim, n, p, cpn, d, r);
      Box<A> gb, gg;
      box_iou_backward(db.box, load_box<A>(gts, chunk.off[0][i] + a, ToAcc()), eps,
                       to_acc(grad[n * gs0 + p * gs1]), gb, gg);
      decode_box_backward(d, r, cpn, db, gb, dp, grad_priors ? dr : nullptr);
      for (int k = 0; k < 4; ++k) acc[k] += dr[k];
    }
    if (grad_pred) {
      const int64_t o = pred_offset(gpl, n, p, 0);
      for (int k = 0; k < 4; ++k) grad_pred[o + k * gpl.sC] = from_acc<T>(dp[k]);
    }
  }
  if (grad_priors) {
    for (int k = 0; k < pdim; ++k) {
      if (last_chunk) {
        grad_priors[p * pdim + k] = from_acc<T>(acc[k]);  // rounded once
      } else {
        prior_acc[p * pdim + k] = acc[k];
      }
    }
  }
}

// key[n*P + p] = row of gts matched by prediction (n, p), or `none` (sorts
// last) when it matched nothing or its term of that row's gradient is +0.0 or
// -0.0 in every coordinate (no overlap, for instance; a touching box or a NaN
// gives a nonzero or NaN term and is kept); val = n*P + p. A sum that starts
// at +0.0 is never -0.0, so adding such a term changes nothing: the row's sum
// is that of its other terms, in the same order.
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
decode_max_iou_gt_keys_kernel(const T* __restrict__ pred, PredLayout pl,
                              const T* __restrict__ priors, int64_t ps0, int64_t ps1, int pdim,
                              const T* __restrict__ gts, GtChunk chunk, int64_t P,
                              CoderParams<A> cp, const A* __restrict__ shapes, A eps,
                              const T* __restrict__ grad, int64_t gs0, int64_t gs1,
                              const int64_t* __restrict__ arg, int32_t none,
                              int32_t* __restrict__ keys, int64_t* __restrict__ vals) {
  const int64_t p = blockIdx.x * int64_t(kBlock) + threadIdx.x;
  if (p >= P) return;
  const int64_t n = chunk.n0 + blockIdx.y;
  const int64_t g0 = chunk.off[0][blockIdx.y];
  const int64_t a = arg[n * P + p];
  bool keep = a >= 0 && a < chunk.off[0][blockIdx.y + 1] - g0;
  if (keep) {
    A d[4], r[4];
    const Box<A> b =
        decode_at(pred, pl, priors, ps0, ps1, pdim, n, p, image_params(cp, shapes, n), d, r).box;
    Box<A> gb, gg;
    box_iou_backward(b, load_box<A>(gts, g0 + a, ToAcc()), eps, to_acc(grad[n * gs0 + p * gs1]),
                     gb, gg);
    keep = !box_is_zero(gg);
  }
  keys[n * P + p] = keep ? static_cast<int32_t>(g0 + a) : none;
  vals[n * P + p] = n * P + p;
}

template <typename A> struct Box4Sum {
  __device__ __forceinline__ Box<A> operator()(const Box<A>& a, const Box<A>& b) const {
    return {a.x1 + b.x1, a.y1 + b.y1, a.x2 + b.x2, a.y2 + b.y2};
  }
};

// One block per ground-truth row: sums the gradient of the predictions whose
// max IoU it is, over its segment of the sorted keys (fixed order).
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
decode_max_iou_bwd_gt_kernel(const T* __restrict__ pred, PredLayout pl,
                             const T* __restrict__ priors, int64_t ps0, int64_t ps1, int pdim,
                             const T* __restrict__ gts, int64_t NP, int64_t P, CoderParams<A> cp,
                             const A* __restrict__ shapes, A eps, const T* __restrict__ grad,
                             int64_t gs0, int64_t gs1,
                             const int32_t* __restrict__ keys, const int64_t* __restrict__ vals,
                             T* __restrict__ grad_gts) {
  const int32_t row = static_cast<int32_t>(blockIdx.x);
  const int64_t lo = lower_bound_key(keys, NP, row);
  const int64_t hi = lower_bound_key(keys, NP, row + 1);
  const Box<A> gt = load_box<A>(gts, row, ToAcc());
  Box<A> s{A(0), A(0), A(0), A(0)};
  for (int64_t i = lo + threadIdx.x; i < hi; i += kBlock) {
    const int64_t v = vals[i];
    const int64_t n = v / P, p = v - n * P;
    A d[4], r[4];
    const Box<A> b =
        decode_at(pred, pl, priors, ps0, ps1, pdim, n, p, image_params(cp, shapes, n), d, r).box;
    Box<A> gb, gg;
    box_iou_backward(b, gt, eps, to_acc(grad[n * gs0 + p * gs1]), gb, gg);
    s = Box4Sum<A>()(s, gg);
  }
  s = block_reduce<kBlock>(s, Box4Sum<A>());
  if (threadIdx.x == 0) {
    T* o = grad_gts + int64_t(row) * 4;
    o[0] = from_acc<T>(s.x1);
    o[1] = from_acc<T>(s.y1);
    o[2] = from_acc<T>(s.x2);
    o[3] = from_acc<T>(s.y2);
  }
}

template <typename F> void for_each_chunk(const DecodeIouArgs& a, F&& f) {
  const int64_t* const tables[1] = {a.gt_offsets};
  for_each_offset_chunk<1>(a.N, tables, f);
}

// Workspace layout of the backward: prior accumulators (when the images take
// more than one chunk), then the sort's keys/values (in and out) and its
// temporary storage.
struct BackwardWorkspace {
  size_t prior_acc = 0, keys_in = 0, keys_out = 0, vals_in = 0, vals_out = 0, temp = 0;
  size_t temp_bytes = 0, total = 0;
  BackwardWorkspace(DType dt, int64_t N, int64_t P, int prior_dim, int64_t total_g,
                    bool want_priors, bool want_gts) {
    const size_t acc = dt == DType::kDouble ? sizeof(double) : sizeof(float);
    WorkspaceLayout w;
    if (want_priors && N > kChunkImages) prior_acc = w.take(acc * P * prior_dim);
    if (want_gts && total_g > 0 && N * P > 0) {
      const int64_t np = N * P;
      keys_in = w.take_array<int32_t>(np);
      keys_out = w.take_array<int32_t>(np);
      vals_in = w.take_array<int64_t>(np);
      vals_out = w.take_array<int64_t>(np);
      temp_bytes = sort_pairs_temp_bytes(np, bits_for(total_g));
      temp = w.take(temp_bytes);
    }
    total = w.total();
  }
};

}  // namespace

void decode_max_iou_forward(DType dt, const DecodeIouArgs& a, void* iou, int64_t* arg,
                            void* stream) {
  if (a.N == 0 || a.P == 0) return;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const CoderParams<A> cp = cast_params<A>(a.params);
    const A* shapes = static_cast<const A*>(a.max_shapes);
    for_each_chunk(a, [&](const GtChunk& c) {
      const dim3 grid(static_cast<unsigned>(ceil_div(a.P, kBlock)), static_cast<unsigned>(c.count));
      launch_kernel((decode_max_iou_fwd_kernel<T, A>), grid, kBlock, fwd_tile_bytes<A>(), s,
                    static_cast<const T*>(a.pred), a.pl, static_cast<const T*>(a.priors),
                    a.prior_s0, a.prior_s1, a.prior_dim, static_cast<const T*>(a.gts), c, a.P, cp,
                    shapes, static_cast<A>(a.eps), static_cast<T*>(iou), arg);
    });
  });
}

size_t decode_max_iou_backward_workspace(DType dt, const DecodeIouArgs& a, bool want_priors,
                                         bool want_gts) {
  return BackwardWorkspace(dt, a.N, a.P, a.prior_dim, a.gt_offsets[a.N], want_priors, want_gts)
      .total;
}

void decode_max_iou_backward(DType dt, const DecodeIouArgs& a, const void* grad_iou, int64_t gs0,
                             int64_t gs1, const int64_t* arg, void* grad_pred,
                             const PredLayout& gpl, void* grad_priors, void* grad_gts,
                             void* workspace, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t total_g = a.gt_offsets[a.N];
  const BackwardWorkspace ws(dt, a.N, a.P, a.prior_dim, total_g, grad_priors != nullptr,
                             grad_gts != nullptr);
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    const CoderParams<A> cp = cast_params<A>(a.params);
    const A* shapes = static_cast<const A*>(a.max_shapes);
    if (a.P > 0 && a.N == 0 && grad_priors) {
      memset_async(grad_priors, 0, sizeof(T) * a.P * a.prior_dim, s);
    }
    if (grad_gts && total_g > 0 && a.N * a.P == 0) {
      memset_async(grad_gts, 0, sizeof(T) * total_g * 4, s);
    }
    if (a.P == 0 || a.N == 0) return;
    const unsigned pblocks = static_cast<unsigned>(ceil_div(a.P, kBlock));
    if (grad_pred || grad_priors) {
      A* prior_acc = workspace_at<A>(workspace, ws.prior_acc);
      for_each_chunk(a, [&](const GtChunk& c) {
        launch_kernel((decode_max_iou_bwd_kernel<T, A>), dim3(pblocks), kBlock, 0, s,
                      static_cast<const T*>(a.pred), a.pl, static_cast<const T*>(a.priors),
                      a.prior_s0, a.prior_s1, a.prior_dim, static_cast<const T*>(a.gts), c, a.P,
                      cp, shapes, static_cast<A>(a.eps), static_cast<const T*>(grad_iou), gs0, gs1,
                      arg,
                      static_cast<T*>(grad_pred), gpl, prior_acc, static_cast<T*>(grad_priors),
                      c.n0 + c.count == a.N);
      });
    }
    if (grad_gts && total_g > 0) {
      const int64_t np = a.N * a.P;
      int32_t* keys_in = workspace_at<int32_t>(workspace, ws.keys_in);
      int32_t* keys_out = workspace_at<int32_t>(workspace, ws.keys_out);
      int64_t* vals_in = workspace_at<int64_t>(workspace, ws.vals_in);
      int64_t* vals_out = workspace_at<int64_t>(workspace, ws.vals_out);
      for_each_chunk(a, [&](const GtChunk& c) {
        launch_kernel((decode_max_iou_gt_keys_kernel<T, A>),
                      dim3(pblocks, static_cast<unsigned>(c.count)), kBlock, 0, s,
                      static_cast<const T*>(a.pred), a.pl, static_cast<const T*>(a.priors),
                      a.prior_s0, a.prior_s1, a.prior_dim, static_cast<const T*>(a.gts), c, a.P,
                      cp, shapes, static_cast<A>(a.eps), static_cast<const T*>(grad_iou), gs0, gs1,
                      arg, static_cast<int32_t>(total_g), keys_in, vals_in);
      });
      sort_pairs(keys_in, keys_out, vals_in, vals_out, np, bits_for(total_g), workspace_at<char>(workspace, ws.temp),
                 ws.temp_bytes, s);
      launch_kernel((decode_max_iou_bwd_gt_kernel<T, A>), dim3(static_cast<unsigned>(total_g)),
                    kBlock, 0, s, static_cast<const T*>(a.pred), a.pl,
                    static_cast<const T*>(a.priors), a.prior_s0, a.prior_s1, a.prior_dim,
                    static_cast<const T*>(a.gts), np, a.P, cp, shapes, static_cast<A>(a.eps),
                    static_cast<const T*>(grad_iou), gs0, gs1, keys_out, vals_out,
                    static_cast<T*>(grad_gts));
    }
  });
}

}  // namespace cuda
}  // namespace tbd_ops
