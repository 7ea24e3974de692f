// CPU kernels of harmony_distillation_loss (SPEC 1.4). The per-element math is
// in tbd_ops/harmony.h, shared with the CUDA kernels (gradients agree bit for
// bit with the emulated CUDA build).
//
// Forward: work items are (level, image, chunk of kChunk locations) over all
// levels at once; each item sums w * |HS^t - HS^s| and w (the weight psi, or
// 1) in kLanes interleaved lanes combined in lane order. The partials of an
// image are then summed in chunk order, the normalized per-image terms in
// (level, image) order: the result does not depend on the number of threads.
// Backward: the same items, elementwise, with the normalizers saved by the
// forward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include "../harmony_loss.h"
#include "tbd_ops/harmony.h"

namespace tbd_ops {
namespace {

constexpr int64_t kChunk = 2048;  // locations per work item
constexpr int kLanes = 8;         // interleaved partial sums within an item

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
    const HarmonyLevels& hl, const HarmonyMaps& lists, double eps) {
  const auto acc_opts = lists[0][0].options().dtype(acc_dtype(lists[0][0].scalar_type()));
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lists[0][0].scalar_type(), "harmony_distillation_loss_cpu", [&] {
    dispatch_harmony_mode(hl.mode, [&](auto mtag) {
      out = loss_forward<decltype(mtag)::value, scalar_t>(lists, hl, eps, acc_opts);
    });
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> harmony_distillation_loss_backward_cpu(
    const HarmonyLevels& hl, const at::Tensor& grad, const at::Tensor& norm,
    const HarmonyMaps& lists, std::array<bool, 2> output_mask) {
  std::vector<at::Tensor> gc, gr;
  for (int64_t l = 0; l < hl.L; ++l) {
    if (output_mask[0]) gc.push_back(at::empty_like(lists[0][l]));
    if (output_mask[1]) gr.push_back(at::empty_like(lists[1][l]));
  }
  if (!output_mask[0] && !output_mask[1]) return {gc, gr};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lists[0][0].scalar_type(), "harmony_distillation_loss_backward_cpu", [&] {
    dispatch_harmony_mode(hl.mode, [&](auto mtag) {
      loss_backward<decltype(mtag)::value, scalar_t>(grad, norm, lists, hl, gc, gr);
    });
  });
  return {gc, gr};
}

}  // namespace

TBD_OPS_IMPL(CPU, TBD_OPS_HARMONY_LOSS_KERNELS(cpu))

}  // namespace tbd_ops
