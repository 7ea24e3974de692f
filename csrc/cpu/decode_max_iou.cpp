// CPU kernel of decode_max_iou (p_r): every prediction is decoded once and
// compared with the image's ground truths; no P x G matrix is formed. The
// coder and IoU math is in tbd_ops/box.h, shared with the CUDA kernel. In
// float, blocks of 16 predictions are compared with the ground truths in
// vectors, a lane per prediction, by the same box_iou_with_areas and
// argmax_update_above as the CUDA kernel's. The float backward takes 8
// predictions at a time in vectors, a lane per prediction, through the same
// decode_box_full, box_iou_backward and decode_box_backward as the CUDA kernels.
// These header functions are instantiated with 8-lane vectors below and
// inlined (flatten) into the target_clones functions that call them,
// max_iou_columns and lanes_backward, so that they are compiled for the clone's
// ISA and their vector arguments never cross an ABI boundary.
#pragma GCC diagnostic ignored "-Wpsabi"
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <type_traits>

#include "../decode_max_iou.h"
#include "box_rows.h"
#include "simd.h"
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
  // decode_box_full of prediction p of image n, whose values are at offset
  // off = pred_offset(pl, n, p, 0) (a PredWalk's); its pred and prior in d, r.
  DecodedBox<A> decode_full_at(int64_t n, int64_t p, int64_t off, A d[4], A r[4]) const {
    load_pred_at(pred, pl, off, d, CastTo<A>());
    load_prior(priors, ps0, ps1, pdim, p, r, CastTo<A>());
    return decode_box_full(d, r, params(n));
  }
  DecodedBox<A> decode_full(int64_t n, int64_t p, A d[4], A r[4]) const {
    return decode_full_at(n, p, pred_offset(pl, n, p, 0), d, r);
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

// max_iou of a block of up to kIouBlock float boxes at once, for the float
// kernels: the boxes in columns with their areas (box_area), none of which is
// NaN, against boxes[0, n) with areas, none NaN, n >= 1. Lane by lane
// box_iou_with_areas(lane's box, boxes[j]) and argmax_update_above, started
// below every IoU, in 8-lane vectors: the values and indices of max_iou bit
// for bit. Unused lanes hold zero boxes; their results are ignored.
using cpu::f32v;
using cpu::i32v;
using cpu::kLanes;
using cpu::loadv;
using cpu::splat;
using cpu::storev;
constexpr int kIouBlock = 16;
struct BoxColumns {
  float x1[kIouBlock], y1[kIouBlock], x2[kIouBlock], y2[kIouBlock], area[kIouBlock];
};

TBD_CLONES __attribute__((flatten)) void max_iou_columns(const BoxColumns& c, const Box<float>* boxes,
                                                         const float* areas, int32_t n, float eps, float* value,
                                                         int32_t* index) {
  constexpr int V = kIouBlock / kLanes;
  Box<f32v> box[V];
  f32v area[V], best[V];
  i32v arg[V];
  for (int v = 0; v < V; ++v) {
    const int o = v * kLanes;
    box[v] = {loadv<f32v>(c.x1 + o), loadv<f32v>(c.y1 + o), loadv<f32v>(c.x2 + o), loadv<f32v>(c.y2 + o)};
    area[v] = loadv<f32v>(c.area + o);
    best[v] = splat(-1.0f);  // below every IoU (NaN or >= -0.0)
    arg[v] = splat(int32_t(-1));
  }
  const f32v e = splat(eps);
  i32v jv = splat(int32_t(0));
  for (int32_t j = 0; j < n; ++j, jv += 1) {
    const Box<f32v> gt = {splat(boxes[j].x1), splat(boxes[j].y1), splat(boxes[j].x2), splat(boxes[j].y2)};
    const f32v gt_area = splat(areas[j]);
    for (int v = 0; v < V; ++v) {
      argmax_update_above(best[v], arg[v], box_iou_with_areas(box[v], area[v], gt, gt_area, e), jv);
    }
  }
  for (int v = 0; v < V; ++v) {
    storev(value + v * kLanes, best[v]);
    storev(index + v * kLanes, arg[v]);
  }
}

// The max IoU and its argmax of boxes[0, len), len <= kIouBlock, against
// the G >= 1 ground truths, none of the areas NaN, in vectors (float).
void block_max_iou(const Box<float>* boxes, const float* box_areas, int len, const Box<float>* gts,
                   const float* gt_areas, int32_t G, float eps, float* best, int32_t* arg) {
  BoxColumns cols;
  for (int i = 0; i < kIouBlock; ++i) {
    const bool in = i < len;
    cols.x1[i] = in ? boxes[i].x1 : 0.0f;
    cols.y1[i] = in ? boxes[i].y1 : 0.0f;
    cols.x2[i] = in ? boxes[i].x2 : 0.0f;
    cols.y2[i] = in ? boxes[i].y2 : 0.0f;
    cols.area[i] = in ? box_areas[i] : 0.0f;
  }
  max_iou_columns(cols, gts, gt_areas, G, eps, best, arg);
}
// Other accumulation types take the scalar path; never called.
template <typename A>
void block_max_iou(const Box<A>*, const A*, int, const Box<A>*, const A*, int32_t, A, A*, int32_t*) {}

// The gradients of kLanes predictions of one image at once (float), a lane
// per prediction: decode_box_full, box_iou_backward and decode_box_backward,
// the scalar loop's functions on 8-lane vectors, so lane by lane the same
// operations and values. In and out in columns; a lane that matched nothing
// holds zeros and is ignored.
struct LaneColumns {
  alignas(32) float d[4][kLanes];   // prediction
  alignas(32) float r[4][kLanes];   // prior
  alignas(32) float gt[4][kLanes];  // matched ground truth
  alignas(32) float g[kLanes];      // incoming gradient of the IoU
  alignas(32) float dp[4][kLanes];  // out: gradient of the prediction (kPredGt, kAll)
  alignas(32) float dr[4][kLanes];  // out: gradient of the prior (kAll)
  alignas(32) float gg[4][kLanes];  // out: gradient of the ground truth (always)
};

// The gradients lanes_backward writes: the ground truth's always; kPredGt
// adds the prediction's, kAll the prediction's and the prior's.
enum class LaneGrads { kGtOnly, kPredGt, kAll };

TBD_CLONES __attribute__((flatten)) void lanes_backward(LaneColumns& c, const CoderParams<float>& params, float eps,
                                                        LaneGrads want) {
  const CoderParams<f32v> cp = convert_params<f32v>(params, [](float v) { return splat(v); });  // every lane
  f32v d[4], r[4];
  for (int k = 0; k < 4; ++k) {
    d[k] = loadv<f32v>(c.d[k]);
    r[k] = loadv<f32v>(c.r[k]);
  }
  const DecodedBox<f32v> db = decode_box_full(d, r, cp);
  const Box<f32v> gt = {loadv<f32v>(c.gt[0]), loadv<f32v>(c.gt[1]), loadv<f32v>(c.gt[2]),
                        loadv<f32v>(c.gt[3])};
  Box<f32v> gb, gg;
  box_iou_backward(db.box, gt, splat(eps), loadv<f32v>(c.g), gb, gg);
  const f32v ggs[4] = {gg.x1, gg.y1, gg.x2, gg.y2};
  for (int k = 0; k < 4; ++k) storev(c.gg[k], ggs[k]);
  if (want == LaneGrads::kGtOnly) return;
  f32v dp[4], dr[4] = {};  // the columns decode_box_backward does not write (points: 2, 3) stay 0
  decode_box_backward(d, r, cp, db, gb, dp, want == LaneGrads::kAll ? dr : nullptr);
  for (int k = 0; k < 4; ++k) {
    storev(c.dp[k], dp[k]);
    if (want == LaneGrads::kAll) storev(c.dr[k], dr[k]);
  }
}
// Other accumulation types take the scalar path; never called.
template <typename A> void lanes_backward(LaneColumns&, const CoderParams<A>&, A, LaneGrads) {}

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
    // Blocks of up to kIouBlock predictions of one image: decoded one by one,
    // then (float, no NaN area, 1 <= G < 2^31) compared with the ground truths
    // in vectors, a lane per prediction; otherwise one by one.
    constexpr int B = kIouBlock;
    at::parallel_for(0, pb.N * pb.P, 256, [&](int64_t begin, int64_t end) {
      std::vector<A> row;
      Box<A> boxes[B];
      A pred_area[B];
      A best[B];
      int32_t best_arg[B];
      for (int64_t j = begin; j < end;) {
        const int64_t n = j / pb.P, p0 = j % pb.P;
        const int len = static_cast<int>(std::min<int64_t>({end - j, pb.P - p0, int64_t(B)}));
        const int64_t g0 = pb.gt_offsets[n], G = pb.gt_offsets[n + 1] - g0;
        bool vec = std::is_same_v<A, float> && G > 0 && G <= INT32_MAX && !nan_area[n];
        PredWalk walk(dec.pl, n, p0);
        for (int i = 0; i < len; ++i, walk.next()) {
          A d[4], r[4];
          boxes[i] = dec.decode_full_at(n, p0 + i, walk.offset(), d, r).box;
          pred_area[i] = box_area(boxes[i]);
          vec = vec && !is_nan(pred_area[i]);
        }
        if (vec) {
          block_max_iou(boxes, pred_area, len, gts.data() + g0, areas.data() + g0, static_cast<int32_t>(G),
                        eps, best, best_arg);
          for (int i = 0; i < len; ++i) {
            pi[j + i] = static_cast<scalar_t>(best[i]);
            pa[j + i] = best_arg[i];
          }
          j += len;
          continue;
        }
        for (int i = 0; i < len; ++i) {
          const ArgMax<A> b =
              cpu::max_iou(boxes[i], gts.data() + g0, areas.data() + g0, nan_area[n] != 0, G, eps, row);
          pi[j + i] = static_cast<scalar_t>(b.index < 0 ? A(0) : b.value);
          pa[j + i] = b.index;
        }
        j += len;
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
    // In float, kLanes predictions of an image at once in vectors
    // (lanes_backward); gather fills the columns of predictions p0 .. p0 + len
    // - 1 of image n, zeros in the lanes that matched no ground truth, and
    // says which did and whether any did.
    const auto gather = [&](int64_t n, int64_t p0, int len, LaneColumns& c, bool valid[kLanes]) {
      const int64_t g0 = pb.gt_offsets[n], G = pb.gt_offsets[n + 1] - g0;
      bool any = false;
      PredWalk walk(dec.pl, n, p0);
      for (int i = 0; i < kLanes; ++i, walk.next()) {
        const int64_t p = p0 + i;
        const int64_t a = i < len ? pa[n * pb.P + p] : -1;
        valid[i] = a >= 0 && a < G;
        any = any || valid[i];
        A d[4] = {A(0), A(0), A(0), A(0)}, r[4] = {A(0), A(0), A(0), A(0)};
        Box<A> q = {A(0), A(0), A(0), A(0)};
        if (valid[i]) {
          load_pred_at(dec.pred, dec.pl, walk.offset(), d, CastTo<A>());
          load_prior(dec.priors, dec.ps0, dec.ps1, dec.pdim, p, r, CastTo<A>());
          q = dec.gt(g0 + a);
        }
        for (int k = 0; k < 4; ++k) {
          c.d[k][i] = static_cast<float>(d[k]);
          c.r[k][i] = static_cast<float>(r[k]);
        }
        c.gt[0][i] = static_cast<float>(q.x1);
        c.gt[1][i] = static_cast<float>(q.y1);
        c.gt[2][i] = static_cast<float>(q.x2);
        c.gt[3][i] = static_cast<float>(q.y2);
        c.g[i] = valid[i] ? static_cast<float>(pg[n * gs0 + p * gs1]) : 0.0f;
      }
      return any;
    };
    // Predictions and priors: one work item per prior, images in order.
    if constexpr (std::is_same_v<A, float>) {
      if (gp || gr) {
        at::parallel_for(0, pb.P, 64, [&](int64_t begin, int64_t end) {
          LaneColumns c;
          for (int64_t p0 = begin; p0 < end; p0 += kLanes) {
            const int len = static_cast<int>(std::min<int64_t>(kLanes, end - p0));
            A acc[4][kLanes] = {};
            for (int64_t n = 0; n < pb.N; ++n) {
              bool valid[kLanes];
              if (!gather(n, p0, len, c, valid)) continue;
              lanes_backward(c, dec.params(n), eps, gr ? LaneGrads::kAll : LaneGrads::kPredGt);
              PredWalk out(gpl, n, p0);
              for (int i = 0; i < len; ++i, out.next()) {
                if (!valid[i]) continue;
                if (gp) {
                  const int64_t o = out.offset();
                  for (int k = 0; k < 4; ++k) gp[o + k * gpl.sC] = static_cast<scalar_t>(c.dp[k][i]);
                }
                if (gr) {
                  for (int k = 0; k < 4; ++k) acc[k][i] += c.dr[k][i];
                }
              }
            }
            if (gr) {
              for (int i = 0; i < len; ++i) {
                for (int k = 0; k < pb.prior_dim; ++k) {
                  gr[(p0 + i) * gr_cols + k] = static_cast<scalar_t>(acc[k][i]);
                }
              }
            }
          }
        });
      }
    } else if (gp || gr) {
      at::parallel_for(0, pb.P, 64, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          A acc[4] = {A(0), A(0), A(0), A(0)};
          for (int64_t n = 0; n < pb.N; ++n) {
            const int64_t a = pa[n * pb.P + p];
            if (a < 0 || a >= pb.gt_offsets[n + 1] - pb.gt_offsets[n]) continue;
            A d[4], r[4], dp[4], dr[4] = {A(0), A(0), A(0), A(0)};
            const DecodedBox<A> db = dec.decode_full(n, p, d, r);
            Box<A> gb, gg;
            box_iou_backward(db.box, dec.gt(pb.gt_offsets[n] + a), eps,
                             static_cast<A>(pg[n * gs0 + p * gs1]), gb, gg);
            decode_box_backward(d, r, dec.params(n), db, gb, dp, gr ? dr : nullptr);
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
          if constexpr (std::is_same_v<A, float>) {
            LaneColumns c;
            for (int64_t p0 = 0; p0 < pb.P; p0 += kLanes) {
              const int len = static_cast<int>(std::min<int64_t>(kLanes, pb.P - p0));
              bool valid[kLanes];
              if (!gather(n, p0, len, c, valid)) continue;
              lanes_backward(c, dec.params(n), eps, LaneGrads::kGtOnly);
              for (int i = 0; i < len; ++i) {
                if (!valid[i]) continue;
                const int64_t a = pa[n * pb.P + p0 + i];
                for (int k = 0; k < 4; ++k) acc[a * 4 + k] += c.gg[k][i];
              }
            }
          } else {
            PredWalk walk(dec.pl, n, 0);
            for (int64_t p = 0; p < pb.P; ++p, walk.next()) {
              const int64_t a = pa[n * pb.P + p];
              if (a < 0 || a >= G) continue;
              A d[4], r[4];
              const Box<A> b = dec.decode_full_at(n, p, walk.offset(), d, r).box;
              Box<A> gb, gg;
              box_iou_backward(b, dec.gt(g0 + a), eps, static_cast<A>(pg[n * gs0 + p * gs1]), gb, gg);
              acc[a * 4 + 0] += gg.x1;
              acc[a * 4 + 1] += gg.y1;
              acc[a * 4 + 2] += gg.x2;
              acc[a * 4 + 3] += gg.y2;
            }
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
