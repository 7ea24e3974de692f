// CPU kernel of prediction_guided_assign (SPEC 2.1).
//   pass 1, over all proposals of the batch: u = max IoU against the image's
//     pseudo boxes (lowest index on ties), j* its argmax, and the quality q;
//   pass 2, over images: the members of each bag (proposals with j* = j and
//     u >= iou_thr) in increasing proposal order; k from the exact sum of the
//     min(|bag|, topk) largest u (tbd_ops/assign.h BagSum); the k
//     members of largest q (same ranking) become positives if valid.
// Both passes are independent of the thread count. The math is in
// tbd_ops/assign.h and tbd_ops/box.h, shared with the CUDA kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../prediction_guided_assign.h"
#include "box_rows.h"
#include "tbd_ops/assign.h"

namespace tbd_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> prediction_guided_assign_cpu(const AssignProblem& pb,
                                                                const at::Tensor& boxes,
                                                                const at::Tensor& scores) {
  constexpr const char* op = "prediction_guided_assign";
  const int64_t* labels = pb.pseudo_labels.const_data_ptr<int64_t>();
  for (int64_t m = 0; m < pb.M; ++m) {
    TORCH_CHECK_VALUE(labels[m] >= 0 && labels[m] < pb.C, op,
                      ": pseudo_labels must lie in [0, C) = [0, ", pb.C, "), got ", labels[m],
                      " at row ", m);
  }
  auto gt_inds = at::zeros({pb.P}, boxes.options().dtype(at::kLong));
  auto q = at::empty({pb.P}, boxes.options());
  if (pb.P == 0) return {gt_inds, q};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, boxes.scalar_type(),
                                  "prediction_guided_assign_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* pbx = boxes.const_data_ptr<scalar_t>();
    const int64_t bs0 = boxes.stride(0), bs1 = boxes.stride(1);
    const scalar_t* psc = scores.const_data_ptr<scalar_t>();
    const int64_t ss0 = scores.stride(0), ss1 = scores.stride(1);
    const bool* pvalid = pb.valid.defined() ? pb.valid.const_data_ptr<bool>() : nullptr;
    const A eps = static_cast<A>(kIouEps);
    const A thr = static_cast<A>(pb.iou_thr);
    const double beta = 1.0 - pb.alpha;
    const std::vector<Box<A>> gts =
        cpu::load_boxes<A>(pb.pseudo_boxes.const_data_ptr<scalar_t>(), pb.M);
    std::vector<A> u(pb.P), qa(pb.P);
    std::vector<int64_t> jstar(pb.P);
    scalar_t* qout = q.mutable_data_ptr<scalar_t>();
    int64_t* gout = gt_inds.mutable_data_ptr<int64_t>();

    // Pass 1: one proposal at a time.
    at::parallel_for(0, pb.P, 64, [&](int64_t begin, int64_t end) {
      int64_t n = std::upper_bound(pb.p_offsets.begin(), pb.p_offsets.end(), begin) -
                  pb.p_offsets.begin() - 1;
      std::vector<A> row;
      for (int64_t p = begin; p < end; ++p) {
        while (p >= pb.p_offsets[n + 1]) ++n;
        const int64_t g0 = pb.m_offsets[n], M = pb.m_offsets[n + 1] - g0;
        const Box<A> box = load_box<A>(pbx, p, bs0, bs1, CastTo<A>());
        const ArgMax<A> best = cpu::max_iou(box, gts.data() + g0, M, eps, row);
        if (best.index < 0) {
          u[p] = A(0);
          jstar[p] = -1;
          qa[p] = A(0);
        } else {
          u[p] = best.value;
          jstar[p] = best.index;
          const A s = static_cast<A>(psc[p * ss0 + labels[g0 + best.index] * ss1]);
          qa[p] = assign_quality(s, best.value, pb.alpha, beta);
        }
        qout[p] = static_cast<scalar_t>(qa[p]);
      }
    });

    // Pass 2: one image at a time.
    at::parallel_for(0, pb.N, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> start, members, order;
      for (int64_t n = begin; n < end; ++n) {
        const int64_t p0 = pb.p_offsets[n], P = pb.p_offsets[n + 1] - p0;
        const int64_t M = pb.m_offsets[n + 1] - pb.m_offsets[n];
        if (M == 0 || P == 0) continue;
        // Bags by a stable counting sort on j*: each bag in increasing p.
        start.assign(M + 1, 0);
        for (int64_t p = p0; p < p0 + P; ++p) {
          if (u[p] >= thr) ++start[jstar[p] + 1];
        }
        for (int64_t j = 0; j < M; ++j) start[j + 1] += start[j];
        members.resize(start[M]);
        {
          std::vector<int64_t> fill(start.begin(), start.end() - 1);
          for (int64_t p = p0; p < p0 + P; ++p) {
            if (u[p] >= thr) members[fill[jstar[p]]++] = p;
          }
        }
        for (int64_t j = 0; j < M; ++j) {
          const int64_t size = start[j + 1] - start[j];
          if (size == 0) continue;
          const int64_t* mem = members.data() + start[j];
          order.assign(mem, mem + size);
          const int64_t kk = std::min<int64_t>(size, pb.topk);
          std::partial_sort(order.begin(), order.begin() + kk, order.end(),
                            [&](int64_t a, int64_t b) { return ranks_before(u[a], a, u[b], b); });
          BagSum sum = bag_sum_empty();
          for (int64_t r = 0; r < kk; ++r) bag_sum_add(sum, static_cast<double>(u[order[r]]));
          const int64_t k = std::min<int64_t>(dynamic_k(sum), size);
          order.assign(mem, mem + size);
          if (k < size) {
            std::nth_element(order.begin(), order.begin() + k, order.end(),
                             [&](int64_t a, int64_t b) {
                               return ranks_before(qa[a], a, qa[b], b);
                             });
          }
          for (int64_t r = 0; r < k; ++r) {
            const int64_t p = order[r];
            if (pvalid == nullptr || pvalid[p]) gout[p] = j + 1;
          }
        }
      }
    });
  });
  return {gt_inds, q};
}

}  // namespace

TBD_OPS_IMPL(CPU, "prediction_guided_assign",
    TORCH_FN(prediction_guided_assign_kernel<prediction_guided_assign_cpu>))

}  // namespace tbd_ops
