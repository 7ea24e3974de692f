// CPU kernel of consistency_voting (SPEC 2.2), the whole batch in one call.
//   pass 1, one image at a time (in parallel): for every positive RoI r
//     (gt_inds[r] = j + 1) in increasing r, add IoU(pred_boxes[r],
//     pseudo_boxes[j]) to the sum of pseudo box j and count it; sigma_j =
//     sum / count (0 without positives); w[r] = sigma^2 ("pseco") or sigma
//     ("paper") for positives, 0 otherwise;
//   pass 2, over all RoIs of the batch in order: sum sigma(r) and sigma(r)^2
//     of the positives (kLanes interleaved partial sums, by RoI index); reg_scale = sum / max(sum of squares, 1e-6) ("pseco")
//     or 1 ("paper").
// Independent of the thread count. The math is in tbd_ops/voting.h and
// tbd_ops/box.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../consistency_voting.h"
#include "tbd_ops/box.h"

namespace tbd_ops {
namespace {

constexpr int kLanes = 8;  // partial sums of the batch factor

std::tuple<at::Tensor, at::Tensor, at::Tensor> consistency_voting_cpu(
    const at::Tensor& pred_boxes, const at::Tensor& gt_inds, const at::Tensor& pseudo_boxes,
    at::IntArrayRef roi_counts, at::IntArrayRef pseudo_counts, c10::string_view mode) {
  constexpr const char* op = "consistency_voting";
  const VotingProblem pb =
      voting_prepare(op, pred_boxes, gt_inds, pseudo_boxes, roi_counts, pseudo_counts, mode);
  const int64_t* pg = gt_inds.const_data_ptr<int64_t>();
  const int64_t gs0 = gt_inds.stride(0);
  for (int64_t n = 0; n < pb.N; ++n) {
    const int64_t M = pb.m_offsets[n + 1] - pb.m_offsets[n];
    for (int64_t r = pb.r_offsets[n]; r < pb.r_offsets[n + 1]; ++r) {
      const int64_t g = pg[r * gs0];
      TORCH_CHECK_VALUE(g == 0 || voting_positive(g, M), op, ": gt_inds must lie in [0, M] = [0, ",
                        M, "] (M pseudo boxes of image ", n, "), got ", g, " at row ",
                        r - pb.r_offsets[n], " of image ", n);
    }
  }
  const auto acc_opts = pred_boxes.options().dtype(acc_dtype(pred_boxes.scalar_type()));
  auto sigma = at::zeros({pb.M}, acc_opts);
  auto w = at::zeros({pb.R}, acc_opts);
  auto reg_scale = at::empty({}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred_boxes.scalar_type(),
                                  "consistency_voting_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* pbx = pred_boxes.const_data_ptr<scalar_t>();
    const int64_t bs0 = pred_boxes.stride(0), bs1 = pred_boxes.stride(1);
    const scalar_t* pgt = pb.pseudo_boxes.const_data_ptr<scalar_t>();
    A* ps = sigma.mutable_data_ptr<A>();
    A* pw = w.mutable_data_ptr<A>();
    const A eps = static_cast<A>(kIouEps);
    at::parallel_for(0, pb.N, 1, [&](int64_t begin, int64_t end) {
      std::vector<A> sum;
      std::vector<int64_t> count;
      for (int64_t n = begin; n < end; ++n) {
        const int64_t m0 = pb.m_offsets[n], M = pb.m_offsets[n + 1] - m0;
        const int64_t r0 = pb.r_offsets[n], r1 = pb.r_offsets[n + 1];
        if (M == 0) continue;
        sum.assign(M, A(0));
        count.assign(M, 0);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t g = pg[r * gs0];
          if (!voting_positive(g, M)) continue;
          const Box<A> box = load_box<A>(pbx, r, bs0, bs1, CastTo<A>());
          const Box<A> gt = load_box<A>(pgt, m0 + g - 1, CastTo<A>());
          sum[g - 1] += box_iou(box, gt, eps);
          ++count[g - 1];
        }
        for (int64_t j = 0; j < M; ++j) ps[m0 + j] = voting_mean(sum[j], count[j]);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t g = pg[r * gs0];
          if (voting_positive(g, M)) pw[r] = voting_weight(ps[m0 + g - 1], pb.mode);
        }
      }
    });
    // kLanes interleaved partial sums over the batch's RoIs, combined in lane order.
    A num_l[kLanes] = {}, den_l[kLanes] = {};
    for (int64_t n = 0; n < pb.N; ++n) {
      const int64_t m0 = pb.m_offsets[n], M = pb.m_offsets[n + 1] - m0;
      for (int64_t r = pb.r_offsets[n]; r < pb.r_offsets[n + 1]; ++r) {
        const int64_t g = pg[r * gs0];
        if (!voting_positive(g, M)) continue;
        const A s = ps[m0 + g - 1];
        num_l[r % kLanes] += s;
        den_l[r % kLanes] += s * s;
      }
    }
    A num = A(0), den = A(0);
    for (int k = 0; k < kLanes; ++k) {
      num += num_l[k];
      den += den_l[k];
    }
    *reg_scale.mutable_data_ptr<A>() = voting_scale(num, den, pb.mode);
  });
  return {sigma, w, reg_scale};
}

}  // namespace

TBD_OPS_IMPL(CPU, "consistency_voting", TORCH_FN(consistency_voting_cpu))

}  // namespace tbd_ops
