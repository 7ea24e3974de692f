// masked_reduce (SPEC 1.5): schemas, argument checks, autocast, the CUDA
// registration and autograd of the op family masked_sq_dist / masked_l1.
// Kernels: csrc/cpu/masked_reduce.cpp, cuda/masked_reduce.cu; fake kernels:
// python/tbd_ops/ops/masked_reduce.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include "autograd.h"
#include "masked_reduce.h"

#if TBD_OPS_CUDA_GLUE
#include "../cuda/masked_reduce.h"
#include "cuda_glue.h"
#endif

namespace tbd_ops {

void masked_reduce_check(const char* op, const at::Tensor& a, const at::Tensor& b,
                         const at::Tensor& masks) {
  TORCH_CHECK_VALUE(a.dim() == 4, op, ": a must be a 4-D tensor [N, C, H, W], got a ", a.dim(),
                    "-D tensor of shape ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 4, op, ": b must be a 4-D tensor [N, C, H, W], got a ", b.dim(),
                    "-D tensor of shape ", b.sizes());
  TORCH_CHECK_VALUE(masks.dim() == 4, op, ": masks must be a 4-D tensor [N, K, H, W], got a ",
                    masks.dim(), "-D tensor of shape ", masks.sizes());
  check_float(op, "a", a);
  check_float(op, "b", b);
  check_float(op, "masks", masks);
  TORCH_CHECK_VALUE(b.sizes() == a.sizes(), op, ": b must have the shape of a ", a.sizes(),
                    ", got ", b.sizes());
  TORCH_CHECK_VALUE(masks.size(0) == a.size(0) && masks.size(2) == a.size(2) &&
                        masks.size(3) == a.size(3),
                    op, ": masks must be [N, K, H, W] = [", a.size(0), ", K, ", a.size(2), ", ",
                    a.size(3), "] (N, H, W of a), got ", masks.sizes());
  check_same_dtype(op, "b", b, "a", a);
  check_same_dtype(op, "masks", masks, "a", a);
  check_same_device(op, "b", b, "a", a);
  check_same_device(op, "masks", masks, "a", a);
}

void masked_reduce_backward_check(const char* op, const at::Tensor& grad, const at::Tensor& a,
                                  const at::Tensor& b, const at::Tensor& masks) {
  masked_reduce_check(op, a, b, masks);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == a.size(0) && grad.size(1) == masks.size(1),
                    op, ": grad must be [N, K] = [", a.size(0), ", ", masks.size(1), "], got ",
                    grad.sizes());
  check_dtype(op, "grad", grad, acc_dtype(a.scalar_type()));
  check_same_device(op, "grad", grad, "a", a);
}

void masked_reduce_levels_check(const char* op, at::TensorList a, at::TensorList b,
                                at::TensorList masks) {
  TORCH_CHECK_VALUE(a.size() == b.size() && a.size() == masks.size(), op,
                    ": a, b and masks must have one entry per level, got ", a.size(), ", ",
                    b.size(), " and ", masks.size(), " levels");
  for (size_t l = 0; l < a.size(); ++l) {
    masked_reduce_check(op, a[l], b[l], masks[l]);
    const std::string name = "a[" + std::to_string(l) + "]";
    check_same_dtype(op, name, a[l], "a[0]", a[0]);
    check_same_device(op, name, a[l], "a[0]", a[0]);
  }
}

void masked_reduce_levels_backward_check(const char* op, at::TensorList grad, at::TensorList a,
                                         at::TensorList b, at::TensorList masks,
                                         at::TensorList term, bool want_masks) {
  masked_reduce_levels_check(op, a, b, masks);
  TORCH_CHECK_VALUE(grad.size() == a.size(), op, ": grad must have one entry per level (",
                    a.size(), "), got ", grad.size());
  TORCH_CHECK_VALUE(!want_masks || term.size() == a.size(), op,
                    ": term must have one entry per level (", a.size(),
                    ") when the gradient of masks is asked for, got ", term.size());
  for (size_t l = 0; l < a.size(); ++l) {
    masked_reduce_backward_check(op, grad[l], a[l], b[l], masks[l]);
    if (!want_masks) continue;
    const at::Tensor& t = term[l];
    TORCH_CHECK_VALUE(t.dim() == 3 && t.size(0) == a[l].size(0) && t.size(1) == a[l].size(2) &&
                          t.size(2) == a[l].size(3),
                      op, ": term[", l, "] must be [N, H, W] = [", a[l].size(0), ", ", a[l].size(2),
                      ", ", a[l].size(3), "], got ", t.sizes());
    const std::string name = "term[" + std::to_string(l) + "]";
    check_dtype(op, name, t, acc_dtype(a[l].scalar_type()));
    check_same_device(op, name, t, "a[" + std::to_string(l) + "]", a[l]);
  }
}

namespace {

// ---- autocast: the kernels read 16-bit inputs directly and accumulate in
// fp32; mixed input dtypes are promoted to a common one (autocast's "promote"
// policy), everything else is left as it is.
template <const char* kName>
at::Tensor masked_autocast(const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks) {
  const AutocastOff off;
  static auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(kName);
  const auto t = promote_dtype(a, b, masks);
  return t ? op.call(a.to(*t), b.to(*t), masks.to(*t)) : op.call(a, b, masks);
}

template <const char* kName>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> masked_levels_autocast(
    at::TensorList a, at::TensorList b, at::TensorList masks) {
  const AutocastOff off;
  static auto op = typed_op<std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
      at::TensorList, at::TensorList, at::TensorList)>(kName);
  const auto t = promote_dtype(a, b, masks);
  return t ? op.call(cast_to(a, *t), cast_to(b, *t), cast_to(masks, *t)) : op.call(a, b, masks);
}

constexpr char kSqDistName[] = TBD_OPS_LIB_NAME "::masked_sq_dist";
constexpr char kL1Name[] = TBD_OPS_LIB_NAME "::masked_l1";
constexpr char kSqDistLevelsName[] = TBD_OPS_LIB_NAME "::_masked_sq_dist_levels";
constexpr char kL1LevelsName[] = TBD_OPS_LIB_NAME "::_masked_l1_levels";
constexpr char kSqDistBackwardName[] = TBD_OPS_LIB_NAME "::_masked_sq_dist_backward";
constexpr char kL1BackwardName[] = TBD_OPS_LIB_NAME "::_masked_l1_backward";
constexpr char kSqDistLevelsBackwardName[] = TBD_OPS_LIB_NAME "::_masked_sq_dist_levels_backward";
constexpr char kL1LevelsBackwardName[] = TBD_OPS_LIB_NAME "::_masked_l1_levels_backward";

// ---- autograd: nothing of size [N, C, H, W] is saved; the backward reads a and b again.
template <const char* kName, const char* kBackward>
struct MaskedFunction : torch::autograd::Function<MaskedFunction<kName, kBackward>> {
  static at::Tensor forward(autograd::AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b,
                            const at::Tensor& masks) {
    static auto op = typed_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>(kName);
    ctx->save_for_backward({a, b, masks});
    const at::AutoDispatchBelowADInplaceOrView below;
    return op.call(a, b, masks);
  }

  static autograd::variable_list backward(autograd::AutogradContext* ctx, autograd::variable_list grad) {
    static auto op = typed_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, std::array<bool, 3>)>(
        kBackward);
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)};
    autograd::Grads out(ctx, grad);
    if (!grad[0].defined() || !(mask[0] || mask[1] || mask[2])) return out.none(3).take();
    const auto saved = ctx->get_saved_variables();
    auto [ga, gb, gm] = op.call(grad[0], saved[0], saved[1], saved[2], mask);
    return out.tensor(0, mask[0] ? ga : at::Tensor())
        .tensor(1, mask[1] ? gb : at::Tensor())
        .tensor(2, mask[2] ? gm : at::Tensor())
        .take();
  }
};

template <const char* kName, const char* kBackward>
at::Tensor masked_autograd(const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks) {
  return MaskedFunction<kName, kBackward>::apply(a, b, masks);
}

// Every level in one call. term (the per-location sums) is an output that is not
// differentiable (detached), kept for the backward only where the gradient of masks may be asked for.
template <const char* kName, const char* kBackward>
struct MaskedLevelsFunction : torch::autograd::Function<MaskedLevelsFunction<kName, kBackward>> {
  static autograd::variable_list forward(autograd::AutogradContext* ctx, at::TensorList a,
                                         at::TensorList b, at::TensorList masks) {
    static auto op = typed_op<std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>(
        at::TensorList, at::TensorList, at::TensorList)>(kName);
    std::vector<at::Tensor> out, term;
    {
      const at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, term) = op.call(a, b, masks);
    }
    ctx->set_materialize_grads(false);  // no zero gradients made for term
    // (forward runs with grad mode off: whether masks will need a gradient is their requires_grad)
    const bool keep_term =
        std::any_of(masks.begin(), masks.end(), [](const at::Tensor& m) { return m.requires_grad(); });
    autograd::variable_list saved(a.begin(), a.end());
    saved.insert(saved.end(), b.begin(), b.end());
    saved.insert(saved.end(), masks.begin(), masks.end());
    if (keep_term) saved.insert(saved.end(), term.begin(), term.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["levels"] = static_cast<int64_t>(a.size());
    ctx->saved_data["keep_term"] = keep_term;
    return autograd::concat({&out, &term});
  }

  static autograd::variable_list backward(autograd::AutogradContext* ctx, autograd::variable_list grad) {
    static auto op = typed_op<std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>(
        at::TensorList, at::TensorList, at::TensorList, at::TensorList, at::TensorList, std::array<bool, 3>)>(
        kBackward);
    const auto L = static_cast<size_t>(ctx->saved_data["levels"].toInt());
    const std::array<bool, 3> mask{autograd::any_needs(ctx, 0, L), autograd::any_needs(ctx, L, L),
                                   autograd::any_needs(ctx, 2 * L, L) && ctx->saved_data["keep_term"].toBool()};
    autograd::Grads out(ctx, grad);
    const bool any_grad =
        std::any_of(grad.begin(), grad.begin() + L, [](const at::Tensor& g) { return g.defined(); });
    if (!any_grad || !(mask[0] || mask[1] || mask[2])) return out.none(3 * L).take();
    const auto saved = ctx->get_saved_variables();
    const auto a = autograd::slice(saved, 0, L), b = autograd::slice(saved, L, L);
    const auto masks = autograd::slice(saved, 2 * L, L);
    const auto term = mask[2] ? autograd::slice(saved, 3 * L, L) : std::vector<at::Tensor>();
    // A level whose output got no gradient (unused) contributes zeros.
    std::vector<at::Tensor> g(grad.begin(), grad.begin() + L);
    for (size_t l = 0; l < L; ++l) {
      if (g[l].defined()) continue;
      g[l] = at::zeros_symint({a[l].sym_size(0), masks[l].sym_size(1)},
                              a[l].options().dtype(acc_dtype(a[l].scalar_type())));
    }
    auto [ga, gb, gm] = op.call(g, a, b, masks, term, mask);
    return out.list(0, L, ga).list(L, L, gb).list(2 * L, L, gm).take();
  }
};

template <const char* kName, const char* kBackward>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> masked_levels_autograd(
    at::TensorList a, at::TensorList b, at::TensorList masks) {
  auto flat = MaskedLevelsFunction<kName, kBackward>::apply(a, b, masks);
  const size_t L = a.size();
  return {autograd::slice(flat, 0, L), autograd::detached(autograd::slice(flat, L, L))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def("masked_sq_dist(Tensor a, Tensor b, Tensor masks) -> Tensor");
  m.def("masked_l1(Tensor a, Tensor b, Tensor masks) -> Tensor");
  m.def(
      "_masked_sq_dist_backward(Tensor grad, Tensor a, Tensor b, Tensor masks, bool[3] output_mask)"
      " -> (Tensor grad_a, Tensor grad_b, Tensor grad_masks)");
  m.def(
      "_masked_l1_backward(Tensor grad, Tensor a, Tensor b, Tensor masks, bool[3] output_mask)"
      " -> (Tensor grad_a, Tensor grad_b, Tensor grad_masks)");
  // Every level of a list in one call (one launch sequence on CUDA). term: the per-location
  // s[n, h, w] = sum_c term(a - b), which the backward reads for the gradient of masks.
#define TBD_MASKED_LEVELS(name)                                                                 \
  m.def("_" name "_levels(Tensor[] a, Tensor[] b, Tensor[] masks) -> (Tensor[] out, Tensor[] term)"); \
  m.def("_" name                                                                                \
        "_levels_backward(Tensor[] grad, Tensor[] a, Tensor[] b, Tensor[] masks, Tensor[] term,"   \
        " bool[3] output_mask) -> (Tensor[] grad_a, Tensor[] grad_b, Tensor[] grad_masks)")
  TBD_MASKED_LEVELS("masked_sq_dist");
  TBD_MASKED_LEVELS("masked_l1");
#undef TBD_MASKED_LEVELS
}

TBD_OPS_AUTOCAST_IMPL(
    "masked_sq_dist", TORCH_FN(masked_autocast<kSqDistName>),
    "masked_l1", TORCH_FN(masked_autocast<kL1Name>),
    "_masked_sq_dist_levels", TORCH_FN(masked_levels_autocast<kSqDistLevelsName>),
    "_masked_l1_levels", TORCH_FN(masked_levels_autocast<kL1LevelsName>))
TBD_OPS_IMPL(Autograd,
    "masked_sq_dist", TORCH_FN((masked_autograd<kSqDistName, kSqDistBackwardName>)),
    "masked_l1", TORCH_FN((masked_autograd<kL1Name, kL1BackwardName>)),
    "_masked_sq_dist_levels", TORCH_FN((masked_levels_autograd<kSqDistLevelsName, kSqDistLevelsBackwardName>)),
    "_masked_l1_levels", TORCH_FN((masked_levels_autograd<kL1LevelsName, kL1LevelsBackwardName>)))

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/masked_reduce.cu, the shared pieces csrc/cuda_glue.h.
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

using Lists = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;
using Grads = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>;

void strides4(const at::Tensor& t, int64_t out[4]) {
  for (int d = 0; d < 4; ++d) out[d] = t.stride(d);
}

cuda::MaskedLevel level_of(const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks) {
  cuda::MaskedLevel v{};
  v.a = a.const_data_ptr();
  v.b = b.const_data_ptr();
  v.masks = masks.const_data_ptr();
  strides4(a, v.as);
  strides4(b, v.bs);
  strides4(masks, v.ms);
  v.N = a.size(0);
  v.C = a.size(1);
  v.K = masks.size(1);
  v.H = a.size(2);
  v.W = a.size(3);
  return v;
}

template <MaskedMode M> Lists forward_levels(at::TensorList a, at::TensorList b, at::TensorList masks) {
  std::vector<at::Tensor> out, term;
  if (a.empty()) return {out, term};
  const DeviceGuard guard(a[0].device());
  const auto acc_opts = a[0].options().dtype(acc_dtype(a[0].scalar_type()));
  std::vector<cuda::MaskedLevel> lv;
  for (size_t l = 0; l < a.size(); ++l) {
    cuda::MaskedLevel v = level_of(a[l], b[l], masks[l]);
    out.push_back(cuda_glue::empty({v.N, v.K}, acc_opts));
    term.push_back(cuda_glue::empty({v.N, v.H, v.W}, acc_opts));
    v.out = out.back().mutable_data_ptr();
    v.term = term.back().mutable_data_ptr();
    lv.push_back(v);
  }
  const int64_t L = static_cast<int64_t>(lv.size());
  auto workspace = cuda_glue::empty({cuda::masked_reduce_forward_workspace(lv.data(), L)}, acc_opts);
  launch([&] {
    cuda::masked_reduce_forward(M, dtype_of(a[0]), lv.data(), L, workspace.mutable_data_ptr(),
                                current_stream());
  });
  return {out, term};
}

// Only the gradients asked for are allocated and written.
template <MaskedMode M>
Grads backward_levels(at::TensorList grad, at::TensorList a, at::TensorList b, at::TensorList masks,
                      at::TensorList term, std::array<bool, 3> output_mask) {
  std::vector<at::Tensor> ga, gb, gm;
  if (a.empty() || (!output_mask[0] && !output_mask[1] && !output_mask[2])) return {ga, gb, gm};
  const DeviceGuard guard(a[0].device());
  std::vector<cuda::MaskedLevel> lv;
  for (size_t l = 0; l < a.size(); ++l) {
    cuda::MaskedLevel v = level_of(a[l], b[l], masks[l]);
    v.grad = grad[l].const_data_ptr();
    v.gs[0] = grad[l].stride(0);
    v.gs[1] = grad[l].stride(1);
    if (output_mask[0]) {
      ga.push_back(cuda_glue::empty_like(a[l]));
      v.grad_a = ga.back().mutable_data_ptr();
      strides4(ga.back(), v.gas);
    }
    if (output_mask[1]) {
      gb.push_back(cuda_glue::empty_like(b[l]));
      v.grad_b = gb.back().mutable_data_ptr();
      strides4(gb.back(), v.gbs);
    }
    if (output_mask[2]) {
      gm.push_back(cuda_glue::empty_like(masks[l]));
      v.grad_masks = gm.back().mutable_data_ptr();
      strides4(gm.back(), v.gms);
    }
    lv.push_back(v);
  }
  std::vector<at::Tensor> keep;  // contiguous terms, alive until launched
  if (output_mask[2]) {
    for (size_t l = 0; l < a.size(); ++l) {
      keep.push_back(term[l].contiguous());
      lv[l].term = const_cast<void*>(keep.back().const_data_ptr());
    }
  }
  launch([&] {
    cuda::masked_reduce_backward(M, dtype_of(a[0]), lv.data(), static_cast<int64_t>(lv.size()),
                                 current_stream());
  });
  return {ga, gb, gm};
}

constexpr const char* kName[2] = {"masked_sq_dist", "masked_l1"};
constexpr const char* kBackwardName[2] = {"_masked_sq_dist_backward", "_masked_l1_backward"};

template <MaskedMode M>
at::Tensor masked_forward_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks) {
  masked_reduce_check(kName[static_cast<int>(M)], a, b, masks);
  return std::get<0>(forward_levels<M>({a}, {b}, {masks}))[0];
}

template <MaskedMode M>
Lists masked_forward_levels_cuda(at::TensorList a, at::TensorList b, at::TensorList masks) {
  masked_reduce_levels_check(kName[static_cast<int>(M)], a, b, masks);
  return forward_levels<M>(a, b, masks);
}

// The single-level backward has no saved term: the gradient of masks runs the
// forward for it.
template <MaskedMode M>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward_cuda(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks,
    std::array<bool, 3> output_mask) {
  masked_reduce_backward_check(kBackwardName[static_cast<int>(M)], grad, a, b, masks);
  std::vector<at::Tensor> term;
  if (output_mask[2]) term = std::get<1>(forward_levels<M>({a}, {b}, {masks}));
  auto r = backward_levels<M>({grad}, {a}, {b}, {masks}, term, output_mask);
  auto first = [](const std::vector<at::Tensor>& v, const at::Tensor& like) {
    return v.empty() ? at::empty({0}, like.options()) : v[0];
  };
  return {first(std::get<0>(r), a), first(std::get<1>(r), b), first(std::get<2>(r), masks)};
}

template <MaskedMode M>
Grads masked_backward_levels_cuda(at::TensorList grad, at::TensorList a, at::TensorList b,
                                  at::TensorList masks, at::TensorList term,
                                  std::array<bool, 3> output_mask) {
  masked_reduce_levels_backward_check(kBackwardName[static_cast<int>(M)], grad, a, b, masks, term,
                                      output_mask[2]);
  return backward_levels<M>(grad, a, b, masks, term, output_mask);
}

}  // namespace

// One level and a list of levels take the same launchers (every level of a
// list in the same launches).
TBD_OPS_IMPL(TBD_OPS_CUDA_KEY, TBD_OPS_MASKED_KERNELS(cuda))

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
