// CPU kernels of the harmony family (SPEC 1.3, 1.4): harmony_score and
// harmony_distillation_loss. The per-element math is in tbd_ops/harmony.h,
// shared with the CUDA kernels (scores and gradients agree bit for bit with
// the emulated CUDA build).
//
// harmony_score: elementwise over any shape and strides (TensorIterator).
// harmony_distillation_loss, forward: work items are (level, image, chunk of
// kChunk locations) over all levels at once; each item sums w * |HS^t - HS^s|
// and w (the weight psi, or 1) in kLanes interleaved lanes combined in lane
// order. The partials of an image are then summed in chunk order, the
// normalized per-image terms in (level, image) order: the result does not
// depend on the number of threads. Backward: the same items, elementwise,
// with the normalizers saved by the forward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include "../harmony.h"
#include "tbd_ops/harmony.h"

namespace tbd_ops {
namespace {

constexpr int64_t kChunk = 2048;  // locations per work item
constexpr int kLanes = 8;         // interleaved partial sums within an item

// ---- harmony_score ------------------------------------------------------------

// A TensorIterator 2-D loop from a 1-D one: f(data, strides, n) per outer step.
template <typename F> auto loop_2d(int ntensors, F f) {
  return [=](char** base, const int64_t* strides, int64_t size0, int64_t size1) {
    char* data[8];
    for (int64_t j = 0; j < size1; ++j) {
      for (int k = 0; k < ntensors; ++k) data[k] = base[k] + j * strides[ntensors + k];
      f(data, strides, size0);
    }
  };
}

at::Tensor harmony_score_cpu(const at::Tensor& p_c, const at::Tensor& p_r) {
  harmony_score_check("harmony_score", p_c, p_r);
  auto out = at::empty_like(p_c);
  if (out.numel() == 0) return out;
  auto iter = at::TensorIteratorConfig()
                  .add_output(out)
                  .add_const_input(p_c)
                  .add_const_input(p_r)
                  .resize_outputs(false)
                  .build();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p_c.scalar_type(), "harmony_score_cpu", [&] {
    using A = acc_t<scalar_t>;
    iter.for_each(loop_2d(iter.ntensors(), [](char** data, const int64_t* strides, int64_t n) {
      char* po = data[0];
      const char* pc = data[1];
      const char* pr = data[2];
      for (int64_t i = 0; i < n; ++i) {
        const A c = static_cast<A>(*reinterpret_cast<const scalar_t*>(pc + i * strides[1]));
        const A r = static_cast<A>(*reinterpret_cast<const scalar_t*>(pr + i * strides[2]));
        *reinterpret_cast<scalar_t*>(po + i * strides[0]) = static_cast<scalar_t>(harmony_score(c, r));
      }
    }));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> harmony_score_backward_cpu(const at::Tensor& grad,
                                                               const at::Tensor& p_c,
                                                               const at::Tensor& p_r,
                                                               std::array<bool, 2> output_mask) {
  harmony_score_backward_check("_harmony_score_backward", grad, p_c, p_r);
  const bool want_c = output_mask[0], want_r = output_mask[1];
  auto gc = want_c ? at::empty_like(p_c) : at::empty({0}, p_c.options());
  auto gr = want_r ? at::empty_like(p_r) : at::empty({0}, p_r.options());
  if (p_c.numel() == 0 || (!want_c && !want_r)) return {gc, gr};
  at::TensorIteratorConfig cfg;
  if (want_c) cfg.add_output(gc);
  if (want_r) cfg.add_output(gr);
  cfg.add_const_input(grad).add_const_input(p_c).add_const_input(p_r).resize_outputs(false);
  auto iter = cfg.build();
  const int outs = int(want_c) + int(want_r);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p_c.scalar_type(), "harmony_score_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    iter.for_each(loop_2d(iter.ntensors(), [=](char** data, const int64_t* strides, int64_t n) {
      const char* pg = data[outs];
      const char* pc = data[outs + 1];
      const char* pr = data[outs + 2];
      for (int64_t i = 0; i < n; ++i) {
        const A g = static_cast<A>(*reinterpret_cast<const scalar_t*>(pg + i * strides[outs]));
        const A c = static_cast<A>(*reinterpret_cast<const scalar_t*>(pc + i * strides[outs + 1]));
        const A r = static_cast<A>(*reinterpret_cast<const scalar_t*>(pr + i * strides[outs + 2]));
        const A d = harmony_grad_pr(g, c, r);
        int k = 0;
        if (want_c) {
          *reinterpret_cast<scalar_t*>(data[k] + i * strides[k]) = static_cast<scalar_t>(-d);
          ++k;
        }
        if (want_r) *reinterpret_cast<scalar_t*>(data[k] + i * strides[k]) = static_cast<scalar_t>(d);
      }
    }));
  });
  return {gc, gr};
}

// ---- harmony_distillation_loss ------------------------------------------------

// The four maps of one level (pc_s, pr_s, pc_t, pr_t) and the work items it owns.
template <typename T> struct Level {
  const T* p[4];
  int64_t st[4][3];
  int64_t H, W, HW, chunks, item0;
};

template <typename T>
std::vector<Level<T>> levels_of(const at::TensorList lists[4], int64_t L, int64_t N,
                                int64_t* items) {
  std::vector<Level<T>> out(L);
  int64_t item = 0;
  for (int64_t l = 0; l < L; ++l) {
    Level<T>& lv = out[l];
    for (int k = 0; k < 4; ++k) {
      const at::Tensor& t = lists[k][l];
      lv.p[k] = t.const_data_ptr<T>();
      for (int d = 0; d < 3; ++d) lv.st[k][d] = t.stride(d);
    }
    lv.H = lists[0][l].size(1);
    lv.W = lists[0][l].size(2);
    lv.HW = lv.H * lv.W;
    lv.chunks = (lv.HW + kChunk - 1) / kChunk;
    lv.item0 = item;
    item += N * lv.chunks;
  }
  *items = item;
  return out;
}

// The level holding work item `item` (levels in item order).
template <typename T> int64_t level_of(const std::vector<Level<T>>& lv, int64_t item) {
  int64_t l = 0;
  while (l + 1 < static_cast<int64_t>(lv.size()) && lv[l + 1].item0 <= item) ++l;
  return l;
}

// Visits the locations [i0, i0 + len) (flattened h * W + w) of image n at
// one level in order: f(j, h, w, pc_s, pr_s, pc_t, pr_t) in the accumulator type.
template <typename A, typename T, typename F>
void for_each_location(const Level<T>& lv, int64_t n, int64_t i0, int64_t len, F&& f) {
  int64_t h = i0 / lv.W, w = i0 - h * lv.W;
  for (int64_t j = 0; j < len; ++j) {
    A v[4];
    for (int k = 0; k < 4; ++k) {
      v[k] = static_cast<A>(lv.p[k][n * lv.st[k][0] + h * lv.st[k][1] + w * lv.st[k][2]]);
    }
    f(j, h, w, v[0], v[1], v[2], v[3]);
    if (++w == lv.W) {
      w = 0;
      ++h;
    }
  }
}

template <HarmonyMode M, typename T>
std::tuple<at::Tensor, at::Tensor> loss_forward(const at::TensorList lists[4], const HarmonyLevels& hl,
                                                double eps, const at::TensorOptions& acc_opts) {
  using A = acc_t<T>;
  const int64_t L = hl.L, N = hl.N;
  auto loss = at::empty({}, acc_opts);
  auto norm = at::empty({L, N}, acc_opts);
  int64_t items = 0;
  const std::vector<Level<T>> lv = levels_of<T>(lists, L, N, &items);
  std::vector<A> partial(2 * items);  // per item: sum w |HS^t - HS^s|, sum w
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const Level<T>& v = lv[level_of(lv, item)];
      const int64_t local = item - v.item0;
      const int64_t n = local / v.chunks, i0 = (local % v.chunks) * kChunk;
      const int64_t len = std::min(kChunk, v.HW - i0);
      A s[kLanes] = {}, p[kLanes] = {};
      for_each_location<A>(v, n, i0, len, [&](int64_t j, int64_t, int64_t, A pc_s, A pr_s, A pc_t, A pr_t) {
        const A w = hd_weight<M>(pc_s, pc_t, pr_t);
        s[j % kLanes] += hd_term(w, harmony_score(pc_s, pr_s), harmony_score(pc_t, pr_t));
        if (M == HarmonyMode::kIouGuided) p[j % kLanes] += w;
      });
      A ts = A(0), tp = A(0);
      for (int j = 0; j < kLanes; ++j) {
        ts += s[j];
        tp += p[j];
      }
      partial[2 * item] = ts;
      partial[2 * item + 1] = tp;
    }
  });
  A* pn = norm.mutable_data_ptr<A>();
  A total = A(0);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t n = 0; n < N; ++n) {
      A s = A(0), p = A(0);
      for (int64_t c = 0; c < lv[l].chunks; ++c) {
        const int64_t item = lv[l].item0 + n * lv[l].chunks + c;
        s += partial[2 * item];
        p += partial[2 * item + 1];
      }
      const A nm = hd_norm<M>(p, lv[l].HW, N, static_cast<A>(eps));
      pn[l * N + n] = nm;
      total += s * nm;
    }
  }
  loss.fill_(total);
  return {loss, norm};
}

template <HarmonyMode M, typename T>
void loss_backward(const at::Tensor& grad, const at::Tensor& norm, const at::TensorList lists[4],
                   const HarmonyLevels& hl, std::vector<at::Tensor>& gc, std::vector<at::Tensor>& gr) {
  using A = acc_t<T>;
  const int64_t L = hl.L, N = hl.N;
  int64_t items = 0;
  const std::vector<Level<T>> lv = levels_of<T>(lists, L, N, &items);
  const bool want_c = !gc.empty(), want_r = !gr.empty();
  // Output pointers and strides per level.
  std::vector<T*> oc(L, nullptr), orr(L, nullptr);
  std::vector<std::array<int64_t, 3>> sc(L), sr(L);
  for (int64_t l = 0; l < L; ++l) {
    if (want_c) {
      oc[l] = gc[l].mutable_data_ptr<T>();
      for (int d = 0; d < 3; ++d) sc[l][d] = gc[l].stride(d);
    }
    if (want_r) {
      orr[l] = gr[l].mutable_data_ptr<T>();
      for (int d = 0; d < 3; ++d) sr[l][d] = gr[l].stride(d);
    }
  }
  const A g = grad.item<A>();
  const auto nacc = norm.accessor<A, 2>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t l = level_of(lv, item);
      const Level<T>& v = lv[l];
      const int64_t local = item - v.item0;
      const int64_t n = local / v.chunks, i0 = (local % v.chunks) * kChunk;
      const int64_t len = std::min(kChunk, v.HW - i0);
      const A coef = g * nacc[l][n];
      for_each_location<A>(v, n, i0, len, [&](int64_t, int64_t h, int64_t w, A pc_s, A pr_s, A pc_t, A pr_t) {
        const A wt = hd_weight<M>(pc_s, pc_t, pr_t);
        const A d = hd_grad_pr(coef, wt, pc_s, pr_s, harmony_score(pc_t, pr_t));
        if (want_c) oc[l][n * sc[l][0] + h * sc[l][1] + w * sc[l][2]] = static_cast<T>(-d);
        if (want_r) orr[l][n * sr[l][0] + h * sr[l][1] + w * sr[l][2]] = static_cast<T>(d);
      });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> harmony_distillation_loss_cpu(
    at::TensorList pc_s, at::TensorList pr_s, at::TensorList pc_t, at::TensorList pr_t,
    c10::string_view mode, double eps) {
  const char* op = "harmony_distillation_loss";
  const HarmonyLevels hl = harmony_loss_check(op, pc_s, pr_s, pc_t, pr_t, std::string(mode));
  harmony_eps_check(op, eps);
  const at::TensorList lists[4] = {pc_s, pr_s, pc_t, pr_t};
  const auto acc_opts = pc_s[0].options().dtype(acc_dtype(pc_s[0].scalar_type()));
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pc_s[0].scalar_type(), "harmony_distillation_loss_cpu", [&] {
    dispatch_harmony_mode(hl.mode, [&](auto mtag) {
      out = loss_forward<decltype(mtag)::value, scalar_t>(lists, hl, eps, acc_opts);
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> harmony_distillation_loss_backward_cpu(
    const at::Tensor& grad, const at::Tensor& norm, at::TensorList pc_s, at::TensorList pr_s,
    at::TensorList pc_t, at::TensorList pr_t, c10::string_view mode,
    std::array<bool, 2> output_mask) {
  const HarmonyLevels hl = harmony_loss_backward_check("_harmony_distillation_loss_backward", grad,
                                                       norm, pc_s, pr_s, pc_t, pr_t,
                                                       std::string(mode));
  std::vector<at::Tensor> gc, gr;
  for (int64_t l = 0; l < hl.L; ++l) {
    if (output_mask[0]) gc.push_back(at::empty_like(pc_s[l]));
    if (output_mask[1]) gr.push_back(at::empty_like(pr_s[l]));
  }
  if (!output_mask[0] && !output_mask[1]) return {gc, gr};
  const at::TensorList lists[4] = {pc_s, pr_s, pc_t, pr_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pc_s[0].scalar_type(), "harmony_distillation_loss_backward_cpu", [&] {
    dispatch_harmony_mode(hl.mode, [&](auto mtag) {
      loss_backward<decltype(mtag)::value, scalar_t>(grad, norm, lists, hl, gc, gr);
    });
  });
  return {gc, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(tbd_ops, CPU, m) {
  m.impl("harmony_score", TORCH_FN(harmony_score_cpu));
  m.impl("_harmony_score_backward", TORCH_FN(harmony_score_backward_cpu));
  m.impl("harmony_distillation_loss", TORCH_FN(harmony_distillation_loss_cpu));
  m.impl("_harmony_distillation_loss_backward", TORCH_FN(harmony_distillation_loss_backward_cpu));
}

}  // namespace tbd_ops
