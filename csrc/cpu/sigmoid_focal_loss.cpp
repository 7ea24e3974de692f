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
//
// Vectorized loops: each row is done in segments of up to kSeg columns, first
// every element as a background element (a loop of the header's branch-free
// math with the target bit fixed and gamma = 0, 1 or 2 fixed at compile time,
// so that the compiler vectorizes it; AVX-512, AVX2 and baseline clones,
// picked at load time, all with the same results), then the target column again as the positive
// element. Logits that are not contiguous float32 / float64 (strided, float16,
// bfloat16) go through a buffer of the accumulation type first. The sums of
// "sum"/"mean" add the elements of a chunk into kLanes fixed lanes (combined
// in a fixed tree), the same order for every ISA and thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../sigmoid_focal_loss.h"

namespace tbd_ops {
namespace {

constexpr int64_t kChunkElems = 4096;  // elements per work item of the sum
constexpr int64_t kSeg = 1024;         // columns per segment of a row
constexpr int kLanes = 8;              // lanes of the sums

void check_targets_cpu(const char* op, const at::Tensor& targets, int64_t C) {
  const at::Tensor t = targets.contiguous();
  const int64_t* pt = t.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < t.numel(); ++r) {
    TORCH_CHECK_VALUE(focal_target_ok(pt[r], C), op, ": targets must lie in [0, C] = [0, ", C,
                      "] (C = background), got ", pt[r], " at row ", r);
  }
}

#define TBD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// out[i] = loss(x[i], background) * w.
template <int G, typename A>
TBD_CLONES void background_loss(const A* __restrict__ x, int64_t n, A gamma, A alpha, A w,
                                A* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = focal_loss<A, G>(x[i], false, gamma, alpha) * w;
}

// The gradients of background elements: gx[i] = (ge[i] * w) * dloss/dx (ge[i]
// = ge0 when not PerElem) and, for WantLoss, loss[i] = the loss.
template <int G, bool PerElem, bool WantGx, bool WantLoss, typename A>
TBD_CLONES void background_grad(const A* __restrict__ x, const A* __restrict__ ge, A ge0,
                                int64_t n, A gamma, A alpha, A w, A* __restrict__ gx,
                                A* __restrict__ loss) {
  for (int64_t i = 0; i < n; ++i) {
    const FocalParts<A> f = focal_parts(x[i]);  // the exp and log1p once for both
    const A g = PerElem ? ge[i] : ge0;
    if (WantGx) gx[i] = g * w * focal_grad_of<A, G>(f, false, gamma, alpha);
    if (WantLoss) loss[i] = focal_loss_of<A, G>(f, false, gamma, alpha);
  }
}

// acc[l] += v[i] for i = l (mod kLanes).
template <typename A> TBD_CLONES void add_lanes(const A* __restrict__ v, int64_t n, A* __restrict__ acc) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += v[i + l];
  for (int l = 0; i + l < n; ++l) acc[l] += v[i + l];
}

template <typename A> A sum_lanes(A* acc) {
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// Columns c0 .. c0 + n - 1 of row r as A: in place when the logits are A and
// contiguous along the row, else converted into buf.
template <typename T, typename A>
const A* row_segment(const T* px, int64_t xs0, int64_t xs1, int64_t r, int64_t c0, int64_t n,
                     A* buf) {
  const T* p = px + r * xs0 + c0 * xs1;
  if constexpr (std::is_same_v<T, A>) {
    if (xs1 == 1) return p;
  }
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(p[i * xs1]);
  return buf;
}

// Calls f with gamma's compile-time class (0, 1, 2 or any).
template <typename A, typename F> void dispatch_gamma(A gamma, F&& f) {
  if (gamma == A(0)) {
    f(std::integral_constant<int, 0>());
  } else if (gamma == A(1)) {
    f(std::integral_constant<int, 1>());
  } else if (gamma == A(2)) {
    f(std::integral_constant<int, 2>());
  } else {
    f(std::integral_constant<int, kFocalGammaAny>());
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
    dispatch_gamma(g, [&](auto gk) {
      constexpr int G = decltype(gk)::value;
      // dst[i] = w[r] * loss[r, c0 + i] for i < n (n <= kSeg).
      auto segment = [&](int64_t r, int64_t c0, int64_t n, A* dst, A* buf) {
        const A* x = row_segment(px, xs0, xs1, r, c0, n, buf);
        const int64_t t = pt[r * ts0];
        const A wr = pw ? pw[r] : A(1);
        background_loss<G>(x, n, g, a, wr, dst);
        if (t >= c0 && t < c0 + n) dst[t - c0] = focal_loss<A, G>(x[t - c0], true, g, a) * wr;
      };
      if (red == FocalReduction::kNone) {
        scalar_t* po = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, R, std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1)),
                         [&](int64_t begin, int64_t end) {
          std::vector<A> buf(2 * std::min(C, kSeg));
          for (int64_t r = begin; r < end; ++r) {
            for (int64_t c0 = 0; c0 < C; c0 += kSeg) {
              const int64_t n = std::min(kSeg, C - c0);
              scalar_t* o = po + r * C + c0;
              if constexpr (std::is_same_v<scalar_t, A>) {
                segment(r, c0, n, o, buf.data());
              } else {
                A* l = buf.data() + n;
                segment(r, c0, n, l, buf.data());
                for (int64_t i = 0; i < n; ++i) o[i] = static_cast<scalar_t>(l[i]);
              }
            }
          }
        });
        return;
      }
      const int64_t rows = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1));
      const int64_t chunks = (R + rows - 1) / rows;
      std::vector<A> partial(chunks, A(0));
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<A> buf(2 * std::min(C, kSeg));
        for (int64_t k = begin; k < end; ++k) {
          A acc[kLanes] = {};
          for (int64_t r = k * rows; r < std::min(R, (k + 1) * rows); ++r) {
            for (int64_t c0 = 0; c0 < C; c0 += kSeg) {
              const int64_t n = std::min(kSeg, C - c0);
              A* l = buf.data() + n;
              segment(r, c0, n, l, buf.data());
              add_lanes(l, n, acc);
            }
          }
          partial[k] = sum_lanes(acc);
        }
      });
      A total = A(0);
      for (int64_t k = 0; k < chunks; ++k) total += partial[k];
      if (red == FocalReduction::kMean) total = total / static_cast<A>(R * C);
      *out.mutable_data_ptr<A>() = total;
    });
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
    auto rows = [&](auto gk, auto per_elem_k, auto want_x_k, auto want_w_k) {
      constexpr int G = decltype(gk)::value;
      constexpr bool PerElem = decltype(per_elem_k)::value;
      constexpr bool WantGx = decltype(want_x_k)::value, WantLoss = decltype(want_w_k)::value;
      at::parallel_for(0, R, std::max<int64_t>(1, kChunkElems / std::max<int64_t>(C, 1)),
                       [&](int64_t begin, int64_t end) {
        const int64_t seg = std::min(C, kSeg);
        std::vector<A> buf(4 * seg);
        A* bx = buf.data();
        A* bg = bx + seg;
        A* bgx = bg + seg;
        A* bl = bgx + seg;
        for (int64_t r = begin; r < end; ++r) {
          const int64_t t = pt[r * ts0];
          const A wr = pw ? pw[r] : A(1);
          A acc = A(0);
          for (int64_t c0 = 0; c0 < C; c0 += kSeg) {
            const int64_t n = std::min(kSeg, C - c0);
            const A* x = row_segment(px, xs0, xs1, r, c0, n, bx);
            const A* ge = PerElem ? row_segment(pg, gs0, gs1, r, c0, n, bg) : nullptr;
            A* gxo = bgx;
            if constexpr (std::is_same_v<scalar_t, A>) {
              if (WantGx) gxo = pgx + r * C + c0;
            }
            background_grad<G, PerElem, WantGx, WantLoss>(x, ge, g0, n, g, a, wr, gxo, bl);
            if (t >= c0 && t < c0 + n) {  // the target column
              const int64_t i = t - c0;
              const FocalParts<A> f = focal_parts(x[i]);
              const A gi = PerElem ? ge[i] : g0;
              if (WantGx) gxo[i] = gi * wr * focal_grad_of<A, G>(f, true, g, a);
              if (WantLoss) bl[i] = focal_loss_of<A, G>(f, true, g, a);
            }
            if constexpr (!std::is_same_v<scalar_t, A>) {
              if (WantGx) {
                for (int64_t i = 0; i < n; ++i) pgx[r * C + c0 + i] = static_cast<scalar_t>(gxo[i]);
              }
            }
            if (WantLoss) {
              for (int64_t i = 0; i < n; ++i) acc += (PerElem ? ge[i] : g0) * bl[i];
            }
          }
          if (WantLoss) pgw[r] = acc;
        }
      });
    };
    using True = std::true_type;
    using False = std::false_type;
    dispatch_gamma(g, [&](auto gk) {
      auto wants = [&](auto per_elem_k) {
        if (want_x && want_w) {
          rows(gk, per_elem_k, True(), True());
        } else if (want_x) {
          rows(gk, per_elem_k, True(), False());
        } else {
          rows(gk, per_elem_k, False(), True());
        }
      };
      if (per_elem) {
        wants(True());
      } else {
        wants(False());
      }
    });
  });
  return {gx, want_w ? gw.to(weight->scalar_type()) : gw};
}

}  // namespace

TBD_OPS_IMPL(CPU,
    "sigmoid_focal_loss", TORCH_FN(sigmoid_focal_loss_cpu),
    "_sigmoid_focal_loss_backward", TORCH_FN(sigmoid_focal_loss_backward_cpu))

}  // namespace tbd_ops
