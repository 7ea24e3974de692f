// decode_max_iou / box_max_iou (p_r): schemas, argument checks, autocast, the
// CUDA registration and autograd.
// Kernels: csrc/cpu/decode_max_iou.cpp, cuda/decode_max_iou.cu; fake kernels:
// python/tbd_ops/ops/decode_max_iou.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "autograd.h"
#include "decode_max_iou.h"

#if TBD_OPS_CUDA_GLUE
#include "../cuda/decode_max_iou.h"
#include "cuda_glue.h"
#endif

namespace tbd_ops {

namespace {
constexpr Option<Coder> kCoders[] = {
    {"delta_xywh", Coder::kDeltaXYWH}, {"distance", Coder::kDistance}, {"none", Coder::kNone}};
}  // namespace

PredLayout pred_layout_of(const at::Tensor& t) {
  PredLayout l{};
  if (t.dim() == 4) {
    l.A = t.size(1) / 4;
    l.H = t.size(2);
    l.W = t.size(3);
    l.sN = t.stride(0);
    l.sC = t.stride(1);
    l.sH = t.stride(2);
    l.sW = t.stride(3);
  } else {  // [N, P, 4]
    l.A = 1;
    l.H = 1;
    l.W = t.size(1);
    l.sN = t.stride(0);
    l.sC = t.stride(2);
    l.sH = 0;
    l.sW = t.stride(1);
  }
  if (l.W == 0) l.W = 1;  // P == 0: no index is ever formed
  if (l.A == 0) l.A = 1;
  return l;
}

DecodeProblem decode_prepare(const char* op, const at::Tensor& bbox_pred,
                             const c10::optional<at::Tensor>& priors, const at::Tensor& gt_bboxes,
                             at::IntArrayRef gt_counts, c10::string_view coder,
                             at::ArrayRef<double> means, at::ArrayRef<double> stds, double scale,
                             c10::optional<at::ArrayRef<double>> max_shape, double wh_ratio_clip,
                             const c10::optional<at::Tensor>& max_shapes) {
  DecodeProblem pb;
  // bbox_pred
  TORCH_CHECK_VALUE(bbox_pred.dim() == 4 || bbox_pred.dim() == 3, op,
                    ": bbox_pred must be [N, A*4, H, W] or [N, P, 4], got shape ",
                    bbox_pred.sizes());
  check_float(op, "bbox_pred", bbox_pred);
  if (bbox_pred.dim() == 4) {
    TORCH_CHECK_VALUE(bbox_pred.size(1) % 4 == 0 && bbox_pred.size(1) > 0, op,
                      ": bbox_pred channels must be a positive multiple of 4 (A*4), got ",
                      bbox_pred.size(1));
    pb.P = bbox_pred.size(1) / 4 * bbox_pred.size(2) * bbox_pred.size(3);
  } else {
    TORCH_CHECK_VALUE(bbox_pred.size(2) == 4, op,
                      ": bbox_pred of rank 3 must be [N, P, 4], got shape ", bbox_pred.sizes());
    pb.P = bbox_pred.size(1);
  }
  pb.N = bbox_pred.size(0);
  pb.pl = pred_layout_of(bbox_pred);

  // coder and its parameters
  pb.params.coder = parse_option(op, "coder", coder, kCoders);
  TORCH_CHECK_VALUE(means.size() == 4, op, ": means must have 4 values, got ", means.size());
  TORCH_CHECK_VALUE(stds.size() == 4, op, ": stds must have 4 values, got ", stds.size());
  for (int k = 0; k < 4; ++k) {
    TORCH_CHECK_VALUE(std::isfinite(means[k]) && std::isfinite(stds[k]), op,
                      ": means and stds must be finite, got means=", means, ", stds=", stds);
    pb.params.mean[k] = means[k];
    pb.params.std[k] = stds[k];
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  pb.params.scale = scale;
  TORCH_CHECK_VALUE(std::isfinite(wh_ratio_clip) && wh_ratio_clip > 0, op,
                    ": wh_ratio_clip must be a finite number > 0, got ", wh_ratio_clip);
  pb.params.max_ratio = std::abs(std::log(wh_ratio_clip));
  pb.params.clip = max_shape.has_value();
  if (max_shape.has_value()) {
    const auto ms = *max_shape;
    TORCH_CHECK_VALUE(ms.size() >= 2, op, ": max_shape must be (h, w), got ", ms);
    TORCH_CHECK_VALUE(std::isfinite(ms[0]) && std::isfinite(ms[1]) && ms[0] >= 0 && ms[1] >= 0,
                      op, ": max_shape must hold finite sizes >= 0, got ", ms);
    pb.params.max_h = ms[0];
    pb.params.max_w = ms[1];
  }
  if (max_shapes.has_value() && max_shapes->defined()) {
    // One (h, w) per image, read by the kernels from memory on the device of
    // bbox_pred: no value reaches the host, so nothing synchronizes.
    const at::Tensor& ms = *max_shapes;
    TORCH_CHECK_VALUE(!max_shape.has_value(), op,
                      ": max_shape must be one (h, w) or one per image, got both");
    TORCH_CHECK_TYPE(ms.is_floating_point() ||
                         (at::isIntegralType(ms.scalar_type(), /*includeBool=*/false)),
                     op, ": max_shape per image must be a float or integer tensor, got ",
                     ms.scalar_type());
    TORCH_CHECK_VALUE(ms.dim() == 2 && ms.size(0) == pb.N && ms.size(1) == 2, op,
                      ": max_shape per image must be [N, 2] = [", pb.N,
                      ", 2] (h, w of every image), got shape ", ms.sizes());
    check_same_device(op, "max_shape per image", ms, "bbox_pred", bbox_pred);
    if (ms.device().is_cpu() && ms.numel() > 0) {
      // Host memory: the values are checked here (on a GPU that would need a
      // synchronization; there NaN propagates and a negative size clips to it).
      const at::Tensor d = ms.to(at::kDouble);
      TORCH_CHECK_VALUE(d.isfinite().all().item<bool>() && (d >= 0).all().item<bool>(), op,
                        ": max_shape must hold finite sizes >= 0, got ", ms.min().item<double>(),
                        " .. ", ms.max().item<double>(), " in the per-image shapes");
    }
    pb.params.clip = true;
    pb.params.max_h = 0;
    pb.params.max_w = 0;
    pb.max_shapes = ms.to(acc_dtype(bbox_pred.scalar_type())).contiguous();
  }

  // priors
  if (pb.params.coder == Coder::kNone) {
    pb.prior_dim = 0;
  } else {
    TORCH_CHECK_VALUE(priors.has_value() && priors->defined(), op, ": coder '",
                      std::string(coder), "' needs priors, got None");
  }
  if (priors.has_value() && priors->defined()) {
    const at::Tensor& pr = *priors;
    TORCH_CHECK_VALUE(pr.dim() == 2, op, ": priors must be [P, 4] or [P, 2], got shape ",
                      pr.sizes());
    TORCH_CHECK_VALUE(pr.size(0) == pb.P, op, ": priors must have P = H*W*A = ", pb.P,
                      " rows to match bbox_pred of shape ", bbox_pred.sizes(), ", got ",
                      pr.size(0));
    check_same_dtype(op, "priors", pr, "bbox_pred", bbox_pred);
    check_same_device(op, "priors", pr, "bbox_pred", bbox_pred);
    if (pb.params.coder == Coder::kDeltaXYWH) {
      TORCH_CHECK_VALUE(pr.size(1) == 4, op,
                        ": coder 'delta_xywh' needs anchors [P, 4], got priors of shape ",
                        pr.sizes());
      pb.prior_dim = 4;
    } else if (pb.params.coder == Coder::kDistance) {
      TORCH_CHECK_VALUE(pr.size(1) == 2 || pr.size(1) == 4, op,
                        ": coder 'distance' needs points [P, 2] (or [P, 4] with strides), got "
                        "priors of shape ",
                        pr.sizes());
      pb.prior_dim = 2;
    }
  }

  // ground truths
  TORCH_CHECK_VALUE(gt_bboxes.dim() == 2 && gt_bboxes.size(1) == 4, op,
                    ": gt_bboxes must be [sum G_n, 4], got shape ", gt_bboxes.sizes());
  check_same_dtype(op, "gt_bboxes", gt_bboxes, "bbox_pred", bbox_pred);
  check_same_device(op, "gt_bboxes", gt_bboxes, "bbox_pred", bbox_pred);
  TORCH_CHECK_VALUE(static_cast<int64_t>(gt_counts.size()) == pb.N, op,
                    ": gt_counts must have one count per image (N = ", pb.N, "), got ",
                    gt_counts.size());
  pb.gt_offsets = image_offsets(op, "gt_counts", gt_counts, gt_bboxes.size(0), "gt_bboxes");
  pb.gts = gt_bboxes.contiguous();
  return pb;
}

void decode_backward_check(const DecodeProblem& pb, const at::Tensor& bbox_pred,
                           const at::Tensor& grad_iou, const at::Tensor& arg) {
  constexpr const char* op = "_decode_max_iou_backward";
  TORCH_CHECK_VALUE(grad_iou.dim() == 2 && grad_iou.size(0) == pb.N && grad_iou.size(1) == pb.P,
                    op, ": grad_iou must be [N, P] = [", pb.N, ", ", pb.P, "], got ",
                    grad_iou.sizes());
  TORCH_CHECK_VALUE(arg.sizes() == grad_iou.sizes(), op, ": arg must be [N, P], got ",
                    arg.sizes());
  check_same_dtype(op, "grad_iou", grad_iou, "bbox_pred", bbox_pred);
  check_dtype(op, "arg", arg, at::kLong);
  check_same_device(op, "grad_iou", grad_iou, "bbox_pred", bbox_pred);
  check_same_device(op, "arg", arg, "bbox_pred", bbox_pred);
}

namespace {

using DecodeSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const c10::optional<at::Tensor>&, const at::Tensor&, c10::SymIntArrayRef,
    c10::string_view, at::ArrayRef<double>, at::ArrayRef<double>, double,
    c10::optional<at::ArrayRef<double>>, double, const c10::optional<at::Tensor>&);

c10::TypedOperatorHandle<DecodeSig>& decode_op() {
  static auto op = typed_op<DecodeSig>(TBD_OPS_LIB_NAME "::decode_max_iou");
  return op;
}

std::tuple<at::Tensor, at::Tensor> decode_autocast(
    const at::Tensor& bbox_pred, const c10::optional<at::Tensor>& priors,
    const at::Tensor& gt_bboxes, c10::SymIntArrayRef gt_counts, c10::string_view coder,
    at::ArrayRef<double> means, at::ArrayRef<double> stds, double scale,
    c10::optional<at::ArrayRef<double>> max_shape, double wh_ratio_clip,
    const c10::optional<at::Tensor>& max_shapes) {
  const AutocastOff off;
  // Mixed precision (e.g. fp16 predictions, fp32 anchors and boxes): run in
  // the widest floating dtype, return IoU in the dtype of bbox_pred.
  const auto t = promote_dtype(bbox_pred, priors, gt_bboxes);
  if (!t) {
    return decode_op().call(bbox_pred, priors, gt_bboxes, gt_counts, coder, means, stds, scale,
                            max_shape, wh_ratio_clip, max_shapes);
  }
  auto [iou, arg] = decode_op().call(bbox_pred.to(*t), cast_to(priors, *t), gt_bboxes.to(*t), gt_counts,
                                     coder, means, stds, scale, max_shape, wh_ratio_clip, max_shapes);
  return {iou.to(bbox_pred.scalar_type()), arg};
}

// ---- autograd: the gradients of bbox_pred, priors (when decoded from them) and gt_bboxes
// through the best pair's IoU; arg is not differentiable.
struct DecodeFunction : torch::autograd::Function<DecodeFunction> {
  static autograd::variable_list forward(
      autograd::AutogradContext* ctx, const at::Tensor& bbox_pred, const c10::optional<at::Tensor>& priors,
      const at::Tensor& gt_bboxes, c10::SymIntArrayRef gt_counts, c10::string_view coder,
      at::ArrayRef<double> means, at::ArrayRef<double> stds, double scale,
      c10::optional<at::ArrayRef<double>> max_shape, double wh_ratio_clip,
      const c10::optional<at::Tensor>& max_shapes) {
    at::Tensor iou, arg;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(iou, arg) = decode_op().call(bbox_pred, priors, gt_bboxes, gt_counts, coder, means, stds, scale,
                                            max_shape, wh_ratio_clip, max_shapes);
    }
    ctx->set_materialize_grads(false);  // no zero gradient made for arg (not differentiable: int64)
    ctx->save_for_backward({bbox_pred, autograd::or_undefined(priors), gt_bboxes, arg,
                            autograd::or_undefined(max_shapes)});
    auto& d = ctx->saved_data;
    d["gt_counts"] = gt_counts.vec();
    d["coder"] = std::string(coder);
    d["means"] = means.vec();
    d["stds"] = stds.vec();
    d["scale"] = scale;
    d["max_shape"] = max_shape.has_value() ? c10::IValue(max_shape->vec()) : c10::IValue();
    d["wh_ratio_clip"] = wh_ratio_clip;
    return {iou, arg};
  }

  static autograd::variable_list backward(autograd::AutogradContext* ctx, autograd::variable_list grad) {
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
        const at::Tensor&, c10::SymIntArrayRef, c10::string_view, at::ArrayRef<double>, at::ArrayRef<double>,
        double, c10::optional<at::ArrayRef<double>>, double, std::array<bool, 3>,
        const c10::optional<at::Tensor>&)>(TBD_OPS_LIB_NAME "::_decode_max_iou_backward");
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &bbox_pred = saved[0], &priors = saved[1], &gt_bboxes = saved[2];
    auto& d = ctx->saved_data;
    const std::string coder = d["coder"].toStringRef();
    // Positions among the tensors: bbox_pred 0, priors 1 (when given), gt_bboxes after them.
    const size_t gts_edge = priors.defined() ? 2 : 1;
    const std::array<bool, 3> mask{ctx->needs_input_grad(0),
                                   priors.defined() && coder != "none" && ctx->needs_input_grad(1),
                                   ctx->needs_input_grad(gts_edge)};
    autograd::Grads out(ctx, grad);
    if (!grad[0].defined() || !(mask[0] || mask[1] || mask[2])) return out.none(11).take();
    const auto gt_counts = d["gt_counts"].toSymIntVector();
    const auto means = d["means"].toDoubleVector(), stds = d["stds"].toDoubleVector();
    std::vector<double> max_shape_v;
    c10::optional<at::ArrayRef<double>> max_shape;
    if (!d["max_shape"].isNone()) {
      max_shape_v = d["max_shape"].toDoubleVector();
      max_shape = at::ArrayRef<double>(max_shape_v);
    }
    auto [g_pred, g_priors, g_gts] =
        op.call(grad[0], saved[3], bbox_pred, autograd::to_optional(priors), gt_bboxes, gt_counts, coder, means,
                stds, d["scale"].toDouble(), max_shape, d["wh_ratio_clip"].toDouble(), mask,
                autograd::to_optional(saved[4]));
    out.tensor(0, mask[0] ? g_pred : at::Tensor());
    if (priors.defined()) {
      out.tensor(1, mask[1] ? g_priors : at::Tensor());
    } else {
      out.none();
    }
    return out.tensor(gts_edge, mask[2] ? g_gts : at::Tensor()).none(8).take();
  }
};

std::tuple<at::Tensor, at::Tensor> decode_autograd(
    const at::Tensor& bbox_pred, const c10::optional<at::Tensor>& priors,
    const at::Tensor& gt_bboxes, c10::SymIntArrayRef gt_counts, c10::string_view coder,
    at::ArrayRef<double> means, at::ArrayRef<double> stds, double scale,
    c10::optional<at::ArrayRef<double>> max_shape, double wh_ratio_clip,
    const c10::optional<at::Tensor>& max_shapes) {
  // Image sizes are data: the kernels have no gradient for them. Raise rather than leave a
  // tensor that asks for one without it.
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && max_shapes.has_value() && max_shapes->requires_grad()),
                    "decode_max_iou: max_shape is not differentiable (image sizes), got a tensor that "
                    "requires grad; pass max_shape.detach()");
  auto r = DecodeFunction::apply(bbox_pred, priors, gt_bboxes, gt_counts, coder, means, stds, scale, max_shape,
                                 wh_ratio_clip, max_shapes);
  return {r[0], r[1]};
}

// box_max_iou: the same op on already-decoded boxes.
std::tuple<at::Tensor, at::Tensor> box_max_iou(const at::Tensor& boxes,
                                               const at::Tensor& gt_bboxes,
                                               c10::SymIntArrayRef gt_counts) {
  TORCH_CHECK_VALUE(boxes.dim() == 3 && boxes.size(2) == 4,
                    "box_max_iou: boxes must be [N, P, 4], got shape ", boxes.sizes());
  static const std::vector<double> zeros{0., 0., 0., 0.}, ones{1., 1., 1., 1.};
  return decode_op().call(boxes, c10::nullopt, gt_bboxes, gt_counts, "none", zeros, ones, 1.0,
                          c10::nullopt, 0.016, c10::nullopt);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def(
      "decode_max_iou(Tensor bbox_pred, Tensor? priors, Tensor gt_bboxes, SymInt[] gt_counts,"
      " str coder=\"delta_xywh\", float[] means=[0., 0., 0., 0.], float[] stds=[1., 1., 1., 1.],"
      " float scale=1.0, float[]? max_shape=None, float wh_ratio_clip=0.016,"
      " Tensor? max_shapes=None) -> (Tensor iou, Tensor arg)");
  m.def(
      "_decode_max_iou_backward(Tensor grad_iou, Tensor arg, Tensor bbox_pred, Tensor? priors,"
      " Tensor gt_bboxes, SymInt[] gt_counts, str coder, float[] means, float[] stds, float scale,"
      " float[]? max_shape, float wh_ratio_clip, bool[3] output_mask, Tensor? max_shapes=None)"
      " -> (Tensor grad_bbox_pred, Tensor grad_priors, Tensor grad_gt_bboxes)");
  m.def("box_max_iou(Tensor boxes, Tensor gt_bboxes, SymInt[] gt_counts) -> (Tensor iou, Tensor arg)",
        TORCH_FN(box_max_iou));
}

TBD_OPS_AUTOCAST_IMPL("decode_max_iou", TORCH_FN(decode_autocast))
TBD_OPS_IMPL(Autograd, "decode_max_iou", TORCH_FN(decode_autograd))

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/decode_max_iou.cu, the shared pieces csrc/cuda_glue.h.
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

cuda::DecodeIouArgs make_args(const DecodeProblem& pb, const at::Tensor& bbox_pred,
                              const c10::optional<at::Tensor>& priors) {
  cuda::DecodeIouArgs a{};
  a.pred = bbox_pred.const_data_ptr();
  a.pl = pb.pl;
  const bool use_priors = pb.prior_dim > 0;
  a.priors = use_priors ? priors->const_data_ptr() : nullptr;
  a.prior_s0 = use_priors ? priors->stride(0) : 0;
  a.prior_s1 = use_priors ? priors->stride(1) : 0;
  a.prior_dim = pb.prior_dim;
  a.gts = pb.gts.const_data_ptr();
  a.gt_offsets = pb.gt_offsets.data();
  a.N = pb.N;
  a.P = pb.P;
  a.params = pb.params;
  a.max_shapes = pb.max_shapes.defined() ? pb.max_shapes.const_data_ptr() : nullptr;
  a.eps = kIouEps;
  return a;
}

std::tuple<at::Tensor, at::Tensor> decode_max_iou_cuda(const DecodeProblem& pb,
                                                       const at::Tensor& bbox_pred,
                                                       const c10::optional<at::Tensor>& priors) {
  const DeviceGuard guard(bbox_pred.device());
  auto iou = cuda_glue::empty({pb.N, pb.P}, bbox_pred.options());
  auto arg = cuda_glue::empty({pb.N, pb.P}, bbox_pred.options().dtype(at::kLong));
  const auto a = make_args(pb, bbox_pred, priors);
  launch([&] {
    cuda::decode_max_iou_forward(dtype_of(bbox_pred), a, iou.mutable_data_ptr(),
                                 arg.mutable_data_ptr<int64_t>(), current_stream());
  });
  return {iou, arg};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_max_iou_backward_cuda(
    const DecodeProblem& pb, const at::Tensor& grad_iou, const at::Tensor& arg,
    const at::Tensor& bbox_pred, const c10::optional<at::Tensor>& priors,
    std::array<bool, 3> output_mask) {
  const DeviceGuard guard(bbox_pred.device());
  const bool want_priors = output_mask[1] && pb.prior_dim > 0;
  at::Tensor grad_pred = output_mask[0] ? cuda_glue::empty_like(bbox_pred)
                                        : at::empty({0}, bbox_pred.options());
  // The kernels write [P, prior_dim]; points given as [P, 4] get zero stride columns.
  at::Tensor grad_priors_k = want_priors
                                 ? cuda_glue::empty({pb.P, pb.prior_dim}, bbox_pred.options())
                                 : at::empty({0}, bbox_pred.options());
  at::Tensor grad_gts = output_mask[2] ? cuda_glue::empty({pb.gts.size(0), 4}, bbox_pred.options())
                                       : at::empty({0}, bbox_pred.options());
  TORCH_CHECK_VALUE(pb.gts.size(0) < std::numeric_limits<int32_t>::max(),
                    "_decode_max_iou_backward: at most 2^31 - 2 ground-truth boxes per call, got ",
                    pb.gts.size(0));
  const auto argc = arg.contiguous();
  const auto a = make_args(pb, bbox_pred, priors);
  const auto dt = dtype_of(bbox_pred);
  const size_t ws_bytes =
      cuda::decode_max_iou_backward_workspace(dt, a, want_priors, output_mask[2]);
  at::Tensor workspace = cuda_glue::empty({static_cast<int64_t>(ws_bytes)},
                                          bbox_pred.options().dtype(at::kByte));
  launch([&] {
    cuda::decode_max_iou_backward(
        dt, a, grad_iou.const_data_ptr(), grad_iou.stride(0), grad_iou.stride(1),
        argc.const_data_ptr<int64_t>(), output_mask[0] ? grad_pred.mutable_data_ptr() : nullptr,
        output_mask[0] ? pred_layout_of(grad_pred) : pb.pl,
        want_priors ? grad_priors_k.mutable_data_ptr() : nullptr,
        output_mask[2] ? grad_gts.mutable_data_ptr() : nullptr,
        ws_bytes ? workspace.mutable_data_ptr() : nullptr, current_stream());
  });
  at::Tensor grad_priors = grad_priors_k;
  if (want_priors && priors->size(1) != pb.prior_dim) {
    grad_priors = at::zeros({pb.P, priors->size(1)}, bbox_pred.options());
    grad_priors.narrow(1, 0, pb.prior_dim).copy_(grad_priors_k);
  }
  return {grad_pred, grad_priors, grad_gts};
}

}  // namespace

TBD_OPS_IMPL(TBD_OPS_CUDA_KEY, TBD_OPS_DECODE_KERNELS(cuda))

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
