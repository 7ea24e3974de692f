// CPU kernel of decode_max_iou (p_r): every prediction is decoded once and
// compared with the image's ground truths; no P x G matrix is formed. The
// coder and IoU math is in tbd_ops/box.h, shared with the CUDA kernel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../decode_max_iou.h"
#include "box_rows.h"
#include "tbd_ops/layout.h"

namespace tbd_ops {
namespace {

// Typed view of one decode problem.
template <typename T> struct Decoder {
  using A = acc_t<T>;
  const T* pred;
  PredLayout pl;
  const T* priors;
  int64_t ps0, ps1;
  int pdim;
  const T* gts;
  CoderParams<A> cp;
  const A* shapes;  // per-image (h, w) [N, 2], or nullptr

  // The coder parameters of image n (its own clip shape, if any).
  CoderParams<A> params(int64_t n) const { return image_params(cp, shapes, n); }
  Box<A> decode(int64_t n, int64_t p, A d[4], A r[4]) const {
    load_pred(pred, pl, n, p, d, CastTo<A>());
    load_prior(priors, ps0, ps1, pdim, p, r, CastTo<A>());
    return decode_box(d, r, params(n));
  }
  Box<A> gt(int64_t row) const { return load_box<A>(gts, row, CastTo<A>()); }
};

template <typename T>
Decoder<T> make_decoder(const DecodeProblem& pb, const at::Tensor& bbox_pred,
                        const c10::optional<at::Tensor>& priors) {
  Decoder<T> d;
  d.pred = bbox_pred.const_data_ptr<T>();
  d.pl = pb.pl;
  const bool use_priors = pb.prior_dim > 0;
  d.priors = use_priors ? priors->const_data_ptr<T>() : nullptr;
  d.ps0 = use_priors ? priors->stride(0) : 0;
  d.ps1 = use_priors ? priors->stride(1) : 0;
  d.pdim = pb.prior_dim;
  d.gts = pb.gts.const_data_ptr<T>();
  d.cp = cast_params<acc_t<T>>(pb.params);
  d.shapes = pb.max_shapes.defined() ? pb.max_shapes.const_data_ptr<acc_t<T>>() : nullptr;
  return d;
}

std::tuple<at::Tensor, at::Tensor> decode_max_iou_cpu(const DecodeProblem& pb,
                                                      const at::Tensor& bbox_pred,
                                                      const c10::optional<at::Tensor>& priors) {
  auto iou = at::empty({pb.N, pb.P}, bbox_pred.options());
  auto arg = at::empty({pb.N, pb.P}, bbox_pred.options().dtype(at::kLong));
  if (pb.N == 0 || pb.P == 0) return {iou, arg};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bbox_pred.scalar_type(),
                                  "decode_max_iou_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Decoder<scalar_t> dec = make_decoder<scalar_t>(pb, bbox_pred, priors);
    scalar_t* pi = iou.mutable_data_ptr<scalar_t>();
    int64_t* pa = arg.mutable_data_ptr<int64_t>();
    const A eps = static_cast<A>(kIouEps);
    // Ground truths converted once to A, their areas, and per image whether
    // one of them is NaN (then the IoUs take the NaN-propagating box_iou).
    const std::vector<Box<A>> gts = cpu::load_boxes<A>(dec.gts, pb.gts.size(0));
    const std::vector<A> areas = cpu::box_areas(gts);
    std::vector<char> nan_area(pb.N, 0);
    for (int64_t n = 0; n < pb.N; ++n) {
      for (int64_t g = pb.gt_offsets[n]; g < pb.gt_offsets[n + 1]; ++g) {
        if (is_nan(areas[g])) nan_area[n] = 1;
      }
    }
    at::parallel_for(0, pb.N * pb.P, 64, [&](int64_t begin, int64_t end) {
      std::vector<A> row;
      for (int64_t j = begin; j < end; ++j) {
        const int64_t n = j / pb.P, p = j % pb.P;
        const int64_t g0 = pb.gt_offsets[n], G = pb.gt_offsets[n + 1] - g0;
        A d[4], r[4];
        const Box<A> b = dec.decode(n, p, d, r);
        const ArgMax<A> best =
            cpu::max_iou(b, gts.data() + g0, areas.data() + g0, nan_area[n] != 0, G, eps, row);
        pi[j] = static_cast<scalar_t>(best.index < 0 ? A(0) : best.value);
        pa[j] = best.index;
      }
    });
  });
  return {iou, arg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_max_iou_backward_cpu(
    const DecodeProblem& pb, const at::Tensor& grad_iou, const at::Tensor& arg,
    const at::Tensor& bbox_pred, const c10::optional<at::Tensor>& priors,
    std::array<bool, 3> output_mask) {
  const bool want_priors = output_mask[1] && pb.prior_dim > 0;
  at::Tensor grad_pred = output_mask[0] ? at::zeros_like(bbox_pred) : at::empty({0}, bbox_pred.options());
  at::Tensor grad_priors = want_priors ? at::zeros_like(*priors, at::MemoryFormat::Contiguous)
                                       : at::empty({0}, bbox_pred.options());
  at::Tensor grad_gts = output_mask[2] ? at::zeros({pb.gts.size(0), 4}, bbox_pred.options())
                                       : at::empty({0}, bbox_pred.options());
  if (pb.N == 0 || pb.P == 0) return {grad_pred, grad_priors, grad_gts};
  const auto argc = arg.contiguous();
  const PredLayout gpl = output_mask[0] ? pred_layout_of(grad_pred) : pb.pl;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bbox_pred.scalar_type(),
                                  "decode_max_iou_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const Decoder<scalar_t> dec = make_decoder<scalar_t>(pb, bbox_pred, priors);
    const scalar_t* pg = grad_iou.const_data_ptr<scalar_t>();
    const int64_t gs0 = grad_iou.stride(0), gs1 = grad_iou.stride(1);
    const int64_t* pa = argc.const_data_ptr<int64_t>();
    const A eps = static_cast<A>(kIouEps);
    scalar_t* gp = output_mask[0] ? grad_pred.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gr = want_priors ? grad_priors.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t gr_cols = want_priors ? grad_priors.size(1) : 0;
    // Predictions and priors: one work item per prior, images in order.
    if (gp || gr) {
      at::parallel_for(0, pb.P, 64, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          A acc[4] = {A(0), A(0), A(0), A(0)};
          for (int64_t n = 0; n < pb.N; ++n) {
            const int64_t a = pa[n * pb.P + p];
            if (a < 0 || a >= pb.gt_offsets[n + 1] - pb.gt_offsets[n]) continue;
            A d[4], r[4], dp[4], dr[4] = {A(0), A(0), A(0), A(0)};
            const Box<A> b = dec.decode(n, p, d, r);
            Box<A> gb, gg;
            box_iou_backward(b, dec.gt(pb.gt_offsets[n] + a), eps,
                             static_cast<A>(pg[n * gs0 + p * gs1]), gb, gg);
            decode_box_backward(d, r, dec.params(n), gb, dp, gr ? dr : nullptr);
            if (gp) {
              const int64_t o = pred_offset(gpl, n, p, 0);
              for (int k = 0; k < 4; ++k) gp[o + k * gpl.sC] = static_cast<scalar_t>(dp[k]);
            }
            for (int k = 0; k < 4; ++k) acc[k] += dr[k];
          }
          if (gr) {
            for (int k = 0; k < pb.prior_dim; ++k) gr[p * gr_cols + k] = static_cast<scalar_t>(acc[k]);
          }
        }
      });
    }
    // Ground truths: one work item per image, predictions in order.
    if (output_mask[2]) {
      scalar_t* gg_out = grad_gts.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, pb.N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          const int64_t g0 = pb.gt_offsets[n], G = pb.gt_offsets[n + 1] - g0;
          if (G == 0) continue;
          std::vector<A> acc(G * 4, A(0));
          for (int64_t p = 0; p < pb.P; ++p) {
            const int64_t a = pa[n * pb.P + p];
            if (a < 0 || a >= G) continue;
            A d[4], r[4];
            const Box<A> b = dec.decode(n, p, d, r);
            Box<A> gb, gg;
            box_iou_backward(b, dec.gt(g0 + a), eps, static_cast<A>(pg[n * gs0 + p * gs1]), gb, gg);
            acc[a * 4 + 0] += gg.x1;
            acc[a * 4 + 1] += gg.y1;
            acc[a * 4 + 2] += gg.x2;
            acc[a * 4 + 3] += gg.y2;
          }
          for (int64_t i = 0; i < G * 4; ++i) gg_out[g0 * 4 + i] = static_cast<scalar_t>(acc[i]);
        }
      });
    }
  });
  return {grad_pred, grad_priors, grad_gts};
}

}  // namespace

TBD_OPS_IMPL(CPU, TBD_OPS_DECODE_KERNELS(cpu))

}  // namespace tbd_ops
