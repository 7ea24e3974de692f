// masked_reduce (SPEC 1.5): schemas, argument checks, autocast and the CUDA
// registration of the op family masked_sq_dist / masked_l1.
// Kernels: csrc/cpu/masked_reduce.cpp, cuda/masked_reduce.cu; fake kernels and
// autograd: python/tbd_ops/ops/masked_reduce.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <vector>

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
