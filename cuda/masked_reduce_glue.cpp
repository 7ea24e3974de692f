// CUDA registration of the masked reductions (masked_sq_dist, masked_l1):
// validation, allocation, device guard and current stream (see cuda/glue.h).
// One level and a list of levels take the same launchers (every level of a
// list in the same launches).
#include <array>
#include <vector>

#include "../csrc/masked_reduce.h"
#include "glue.h"
#include "masked_reduce.h"

namespace tbd_ops {
namespace {

using cuda_glue::current_stream;
using cuda_glue::DeviceGuard;
using cuda_glue::dtype_of;
using cuda_glue::launch;

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
      v.term = const_cast<void*>(term[l].const_data_ptr());
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

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, TBD_OPS_CUDA_KEY, m) {
  m.impl("masked_sq_dist", TORCH_FN(masked_forward_cuda<MaskedMode::kSqDist>));
  m.impl("masked_l1", TORCH_FN(masked_forward_cuda<MaskedMode::kL1>));
  m.impl("_masked_sq_dist_backward", TORCH_FN(masked_backward_cuda<MaskedMode::kSqDist>));
  m.impl("_masked_l1_backward", TORCH_FN(masked_backward_cuda<MaskedMode::kL1>));
  m.impl("_masked_sq_dist_levels", TORCH_FN(masked_forward_levels_cuda<MaskedMode::kSqDist>));
  m.impl("_masked_l1_levels", TORCH_FN(masked_forward_levels_cuda<MaskedMode::kL1>));
  m.impl("_masked_sq_dist_levels_backward", TORCH_FN(masked_backward_levels_cuda<MaskedMode::kSqDist>));
  m.impl("_masked_l1_levels_backward", TORCH_FN(masked_backward_levels_cuda<MaskedMode::kL1>));
}

}  // namespace tbd_ops
