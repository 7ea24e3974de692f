// consistency_voting (SPEC 2.2): the whole batch in a fixed number of
// launches, no host synchronization. The images travel concatenated; their
// offsets are host metadata, passed as kernel parameters (ImageChunk,
// kChunkImages images per launch).
//
//   1. voting_sigma_kernel, one block per pseudo box j of image n: the threads
//      scan the image's RoIs (strided), add IoU(pred_boxes[r], pseudo_boxes[j])
//      and count the RoIs with gt_inds[r] = j + 1; two block reductions (fixed
//      order) give sigma_j = sum / count (0 without positives). No tiles: any
//      number of RoIs per image.
//   2. voting_weight_kernel, one thread per RoI: w = sigma^2 ("pseco") or
//      sigma ("paper") of its pseudo box for positives, 0 otherwise; sigma(r)
//      (0 for background) into a scratch row.
//   3. voting_scale_kernel, one block: sum sigma(r) and sigma(r)^2 over the
//      batch in a fixed order; reg_scale = sum / max(sum of squares, 1e-6)
//      ("pseco") or 1 ("paper").
// A gt_inds value outside [0, M_n] (not checked on the host: that would
// synchronize) counts as background: it is never used as an index.
#include "common.cuh"
#include "consistency_voting.h"
#include "tbd_ops/box.h"

namespace tbd_ops {
namespace cuda {
namespace {

// The RoI (table kR) and pseudo-box (table kM) offsets of a chunk of images.
using VotingChunk = ImageChunk<2>;
constexpr int kR = 0, kM = 1;

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
voting_sigma_kernel(const T* __restrict__ boxes, int64_t bs0, int64_t bs1,
                    const int64_t* __restrict__ gt_inds, int64_t gs0, const T* __restrict__ gts,
                    VotingChunk chunk, A eps, A* __restrict__ sigma) {
  const int64_t g = chunk.off[kM][0] + blockIdx.x;
  const int n = image_of(chunk.off[kM], chunk.count, g);
  const int64_t j = g - chunk.off[kM][n];
  const Box<A> gt = load_box<A>(gts, g, ToAcc());
  A sum = A(0);
  int64_t count = 0;
  for (int64_t r = chunk.off[kR][n] + threadIdx.x; r < chunk.off[kR][n + 1]; r += kBlock) {
    if (gt_inds[r * gs0] != j + 1) continue;
    sum += box_iou(load_box<A>(boxes, r, bs0, bs1, ToAcc()), gt, eps);
    ++count;
  }
  sum = block_sum<kBlock>(sum);
  count = block_sum<kBlock>(count);
  if (threadIdx.x == 0) sigma[g] = voting_mean(sum, count);
}

template <typename A>
__global__ void __launch_bounds__(kBlock)
voting_weight_kernel(const int64_t* __restrict__ gt_inds, int64_t gs0, VotingChunk chunk,
                     VotingMode mode, const A* __restrict__ sigma, A* __restrict__ w,
                     A* __restrict__ sigma_r) {
  const int64_t r = chunk.off[kR][0] + blockIdx.x * int64_t(kBlock) + threadIdx.x;
  if (r >= chunk.off[kR][chunk.count]) return;
  const int n = image_of(chunk.off[kR], chunk.count, r);
  const int64_t m0 = chunk.off[kM][n], M = chunk.off[kM][n + 1] - m0;
  const int64_t gt = gt_inds[r * gs0];
  if (voting_positive(gt, M)) {
    const A s = sigma[m0 + gt - 1];
    w[r] = voting_weight(s, mode);
    sigma_r[r] = s;
  } else {
    w[r] = A(0);
    sigma_r[r] = A(0);
  }
}

template <typename A>
__global__ void __launch_bounds__(kBlock)
voting_scale_kernel(const A* __restrict__ sigma_r, int64_t R, VotingMode mode,
                    A* __restrict__ out) {
  A num = A(0), den = A(0);
  for (int64_t r = threadIdx.x; r < R; r += kBlock) {
    const A s = sigma_r[r];
    num += s;
    den += s * s;
  }
  num = block_sum<kBlock>(num);
  den = block_sum<kBlock>(den);
  if (threadIdx.x == 0) out[0] = voting_scale(num, den, mode);
}

}  // namespace

void consistency_voting(DType dt, const VotingArgs& a, void* sigma, void* w, void* reg_scale,
                        void* sigma_r, void* stream) {
  const int64_t R = a.r_offsets[a.N];
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    A* ps = static_cast<A*>(sigma);
    A* pw = static_cast<A*>(w);
    A* psr = static_cast<A*>(sigma_r);
    const int64_t* const tables[2] = {a.r_offsets, a.m_offsets};
    for_each_offset_chunk<2>(a.N, tables, [&](const VotingChunk& c) {
      const int64_t chunk_m = c.off[kM][c.count] - c.off[kM][0];
      const int64_t chunk_r = c.off[kR][c.count] - c.off[kR][0];
      if (chunk_m > 0) {
        launch_kernel((voting_sigma_kernel<T, A>), dim3(static_cast<unsigned>(chunk_m)), kBlock, 0,
                      s, static_cast<const T*>(a.pred_boxes), a.bs0, a.bs1, a.gt_inds, a.gs0,
                      static_cast<const T*>(a.pseudo_boxes), c, static_cast<A>(a.eps), ps);
      }
      if (chunk_r > 0) {
        launch_kernel((voting_weight_kernel<A>),
                      dim3(static_cast<unsigned>(ceil_div(chunk_r, kBlock))), kBlock, 0, s,
                      a.gt_inds, a.gs0, c, a.mode, static_cast<const A*>(ps), pw, psr);
      }
    });
    launch_kernel((voting_scale_kernel<A>), dim3(1), kBlock, 0, s, static_cast<const A*>(psr), R,
                  a.mode, static_cast<A*>(reg_scale));
  });
}

}  // namespace cuda
}  // namespace tbd_ops
