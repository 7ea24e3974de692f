// CPU kernels of sigmoid_focal_loss (SPEC 2.4). The per-element math is in
// tbd_ops/focal.h, shared with the CUDA kernels: per-element results (the
// "none" output and every gradient element) agree with them bit for bit.
//
// Forward: "none" writes w[r] * loss[r, c] per element. "sum"/"mean": work
// items are fixed chunks of rows; each sums its elements in row-major order,
// the chunk partials are added in chunk order (independent of the thread
// count). Backward recomputes everything from the logits (nothing of size
// [R, C] is saved): grad_logits[r, c] = (g[r, c] * w[r]) * dloss/dx and
// grad_weight[r] = sum_c g[r, c] * loss[r, c] (columns in order).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../sigmoid_focal_loss.h"

namespace tbd_ops {
namespace {

constexpr int64_t kChunkElems = 4096;  // elements per work item of the sum

void check_targets_cpu(const char* op, const at::Tensor& targets, int64_t C) {
  const at::Tensor t = targets.contiguous();
  const int64_t* pt = t.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < t.numel(); ++r) {
    TORCH_CHECK_VALUE(focal_target_ok(pt[r], C), op, ": targets must lie in [0, C] = [0, ", C,
                      "] (C = background), got ", pt[r], " at row ", r);
  }
}

at::Tensor sigmoid_focal_loss_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                  const c10::optional<at::Tensor>& weight, double gamma,
                                  double alpha, c10::string_view reduction) {
  constexpr const char* op = "sigmoid_focal_loss";
  const FocalReduction red = focal_check(op, logits, targets, weight, gamma, alpha, reduction);
  const int64_t R = logits.size(0), C = logits.size(1);
  check_targets_cpu(op, targets, C);
  const at::Tensor w = focal_weight_acc(logits, weight);
  at::Tensor out = red == FocalReduction::kNone
                       ? at::empty({R, C}, logits.options())
                       : at::empty({}, logits.options().dtype(acc_dtype(logits.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "sigmoid_focal_loss_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* px = logits.const_data_ptr<scalar_t>();
    const int64_t xs0 = logits.stride(0), xs1 = logits.stride(1);
    const int64_t* pt = targets.const_data_ptr<int64_t>();
    const int64_t ts0 = targets.stride(0);
    const A* pw = w.defined() ? w.const_data_ptr<A>() : nullptr;
    const A g = static_cast<A>(gamma), a = static_cast<A>(alpha);
    if (red == FocalReduction::kNone) {
      scalar_t* po = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, R, std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1)),
                       [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t t = pt[r * ts0];
          const A wr = pw ? pw[r] : A(1);
          for (int64_t c = 0; c < C; ++c) {
            const A l = focal_loss(static_cast<A>(px[r * xs0 + c * xs1]), t == c, g, a);
            po[r * C + c] = static_cast<scalar_t>(l * wr);
          }
        }
      });
      return;
    }
    const int64_t rows = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1));
    const int64_t chunks = (R + rows - 1) / rows;
    std::vector<A> partial(chunks, A(0));
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        A acc = A(0);
        for (int64_t r = k * rows; r < std::min(R, (k + 1) * rows); ++r) {
          const int64_t t = pt[r * ts0];
          const A wr = pw ? pw[r] : A(1);
          for (int64_t c = 0; c < C; ++c) {
            acc += focal_loss(static_cast<A>(px[r * xs0 + c * xs1]), t == c, g, a) * wr;
          }
        }
        partial[k] = acc;
      }
    });
    A total = A(0);
    for (int64_t k = 0; k < chunks; ++k) total += partial[k];
    if (red == FocalReduction::kMean) total = total / static_cast<A>(R * C);
    *out.mutable_data_ptr<A>() = total;
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sigmoid_focal_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& targets,
    const c10::optional<at::Tensor>& weight, double gamma, double alpha,
    c10::string_view reduction, std::array<bool, 2> output_mask) {
  constexpr const char* op = "_sigmoid_focal_loss_backward";
  const FocalReduction red =
      focal_backward_check(op, grad, logits, targets, weight, gamma, alpha, reduction);
  const int64_t R = logits.size(0), C = logits.size(1);
  check_targets_cpu(op, targets, C);
  const bool has_w = weight.has_value() && weight->defined();
  const bool want_x = output_mask[0];
  const bool want_w = output_mask[1] && has_w;
  const at::Tensor w = focal_weight_acc(logits, weight);
  const auto acc_opts = logits.options().dtype(acc_dtype(logits.scalar_type()));
  at::Tensor gx = want_x ? at::empty({R, C}, logits.options()) : at::empty({0}, logits.options());
  at::Tensor gw = want_w ? at::empty({R}, acc_opts) : at::empty({0}, acc_opts);
  if (R == 0 || (!want_x && !want_w)) {
    return {gx, want_w ? gw.to(weight->scalar_type()) : gw};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "sigmoid_focal_loss_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* px = logits.const_data_ptr<scalar_t>();
    const int64_t xs0 = logits.stride(0), xs1 = logits.stride(1);
    const int64_t* pt = targets.const_data_ptr<int64_t>();
    const int64_t ts0 = targets.stride(0);
    const A* pw = w.defined() ? w.const_data_ptr<A>() : nullptr;
    const A g = static_cast<A>(gamma), a = static_cast<A>(alpha);
    // The incoming gradient: per element ("none") or one scalar (1/(R*C) of it for "mean").
    const bool per_elem = red == FocalReduction::kNone;
    const scalar_t* pg = per_elem ? grad.const_data_ptr<scalar_t>() : nullptr;
    const int64_t gs0 = per_elem ? grad.stride(0) : 0, gs1 = per_elem ? grad.stride(1) : 0;
    A g0 = A(0);
    if (!per_elem) {
      g0 = *grad.const_data_ptr<A>();
      if (red == FocalReduction::kMean) g0 = g0 / static_cast<A>(R * C);
    }
    scalar_t* pgx = want_x ? gx.mutable_data_ptr<scalar_t>() : nullptr;
    A* pgw = want_w ? gw.mutable_data_ptr<A>() : nullptr;
    at::parallel_for(0, R, std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t t = pt[r * ts0];
        const A wr = pw ? pw[r] : A(1);
        A acc = A(0);
        for (int64_t c = 0; c < C; ++c) {
          const A x = static_cast<A>(px[r * xs0 + c * xs1]);
          const A ge = per_elem ? static_cast<A>(pg[r * gs0 + c * gs1]) : g0;
          const FocalParts<A> f = focal_parts(x);  // the exp and log1p once for both
          if (pgx) pgx[r * C + c] = static_cast<scalar_t>(ge * wr * focal_grad_of(f, t == c, g, a));
          if (pgw) acc += ge * focal_loss_of(f, t == c, g, a);
        }
        if (pgw) pgw[r] = acc;
      }
    });
  });
  return {gx, want_w ? gw.to(weight->scalar_type()) : gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(tbd_ops, CPU, m) {
  m.impl("sigmoid_focal_loss", TORCH_FN(sigmoid_focal_loss_cpu));
  m.impl("_sigmoid_focal_loss_backward", TORCH_FN(sigmoid_focal_loss_backward_cpu));
}

}  // namespace tbd_ops
