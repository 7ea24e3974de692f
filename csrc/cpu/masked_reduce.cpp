// CPU kernels of the masked reductions masked_sq_dist and masked_l1 (SPEC 1.5).
// The per-element math is in tbd_ops/masked_reduce.h, shared with the CUDA
// kernels.
//
// Forward: work items are (image, chunk of kChunk locations). Each item reads
// a and b once: s[i] = sum_c term(a - b) per location (channels in order),
// then one partial per mask, sum_i masks[k, i] * s[i], in kLanes interleaved
// lanes combined in a fixed order. The partials of an image are summed in
// chunk order, so results do not depend on the number of threads.
// Backward: the same items recompute a - b (nothing of size [N, C, H, W] is
// saved): w[i] = sum_k grad[k] * masks[k, i], grad_a = term'(a - b) * w,
// grad_b = -grad_a, grad_masks[k, i] = grad[k] * s[i]. Every gradient element
// is computed in the same order as on the GPU: equal bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "../masked_reduce.h"
#include "tbd_ops/masked_reduce.h"

namespace tbd_ops {
namespace {

constexpr int64_t kChunk = 512;  // locations per work item
constexpr int64_t kGroup = 8;    // locations interleaved on the strided paths
constexpr int kLanes = 8;        // interleaved partial sums of the mask products

struct Strides4 {
  int64_t s0, s1, s2, s3;
  explicit Strides4(const at::Tensor& t) : s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  // The H*W plane of every (n, c) is contiguous: rows of locations vectorize.
  bool plane_contiguous(int64_t W) const { return s3 == 1 && s2 == W; }
  int64_t at(int64_t n, int64_t c, int64_t i, int64_t W) const {
    return n * s0 + c * s1 + (i / W) * s2 + (i % W) * s3;
  }
};

// s[i] = sum_c term(a[c, i] - b[c, i]) over `len` contiguous locations (planes
// contiguous). Compiled for AVX2 and the baseline ISA, picked at load time.
template <MaskedMode M, typename T, typename A>
__attribute__((target_clones("avx2", "default"))) void term_rows(
    const T* pa, int64_t as1, const T* pb, int64_t bs1, int64_t C, int64_t len, A* s) {
  for (int64_t i = 0; i < len; ++i) s[i] = A(0);
  for (int64_t c = 0; c < C; ++c) {
    const T* ra = pa + c * as1;
    const T* rb = pb + c * bs1;
    for (int64_t i = 0; i < len; ++i) {
      s[i] += masked_term<M>(static_cast<A>(ra[i]) - static_cast<A>(rb[i]));
    }
  }
}

// The same for any strides (channels_last, views): kGroup locations at a time,
// each summing its channels in order (independent chains, so the adds overlap).
template <MaskedMode M, typename T, typename A>
void term_strided(const T* a, const Strides4& as, const T* b, const Strides4& bs, int64_t n,
                  int64_t i0, int64_t C, int64_t W, int64_t len, A* s) {
  for (int64_t g0 = 0; g0 < len; g0 += kGroup) {
    const int64_t g = std::min(kGroup, len - g0);
    const T* la[kGroup] = {};
    const T* lb[kGroup] = {};
    A acc[kGroup];
    for (int64_t j = 0; j < g; ++j) {
      la[j] = a + as.at(n, 0, i0 + g0 + j, W);
      lb[j] = b + bs.at(n, 0, i0 + g0 + j, W);
      acc[j] = A(0);
    }
    if (g == kGroup) {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t j = 0; j < kGroup; ++j) {
          acc[j] += masked_term<M>(static_cast<A>(la[j][c * as.s1]) - static_cast<A>(lb[j][c * bs.s1]));
        }
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t j = 0; j < g; ++j) {
          acc[j] += masked_term<M>(static_cast<A>(la[j][c * as.s1]) - static_cast<A>(lb[j][c * bs.s1]));
        }
      }
    }
    for (int64_t j = 0; j < g; ++j) s[g0 + j] = acc[j];
  }
}

// sum_i m[i] * s[i] in kLanes interleaved lanes, combined in lane order.
template <typename A>
__attribute__((target_clones("avx2", "default"))) A dot_lanes(const A* m, const A* s, int64_t len) {
  A lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += m[i + j] * s[i + j];
  }
  for (int j = 0; i + j < len; ++j) lane[j] += m[i + j] * s[i + j];
  A total = A(0);
  for (int j = 0; j < kLanes; ++j) total += lane[j];
  return total;
}

// masks[n, k, i0 .. i0 + len) in the accumulator type.
template <typename T, typename A>
void load_mask_row(const T* m, const Strides4& ms, int64_t n, int64_t k, int64_t i0, int64_t W,
                   int64_t len, A* out) {
  if (ms.plane_contiguous(W)) {
    const T* row = m + n * ms.s0 + k * ms.s1 + i0;
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<A>(row[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<A>(m[ms.at(n, k, i0 + i, W)]);
  }
}

template <MaskedMode M>
at::Tensor masked_forward_cpu(const char* op, const at::Tensor& a, const at::Tensor& b,
                              const at::Tensor& masks) {
  masked_reduce_check(op, a, b, masks);
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), HW = H * W;
  const int64_t K = masks.size(1);
  auto out = at::empty({N, K}, a.options().dtype(acc_dtype(a.scalar_type())));
  if (N == 0 || K == 0) return out;
  if (HW == 0) return out.zero_();
  const int64_t chunks = (HW + kChunk - 1) / kChunk;
  const Strides4 as(a), bs(b), ms(masks);
  const bool rows = as.plane_contiguous(W) && bs.plane_contiguous(W);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "masked_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const scalar_t* pm = masks.const_data_ptr<scalar_t>();
    std::vector<A> partial(N * chunks * K);  // [N, chunks, K]
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
      A s[kChunk];
      A mrow[kChunk];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / chunks, i0 = (item % chunks) * kChunk;
        const int64_t len = std::min(kChunk, HW - i0);
        if (rows) {
          term_rows<M>(pa + n * as.s0 + i0, as.s1, pb + n * bs.s0 + i0, bs.s1, C, len, s);
        } else {
          term_strided<M>(pa, as, pb, bs, n, i0, C, W, len, s);
        }
        for (int64_t k = 0; k < K; ++k) {
          load_mask_row(pm, ms, n, k, i0, W, len, mrow);
          partial[item * K + k] = dot_lanes(mrow, s, len);
        }
      }
    });
    A* po = out.mutable_data_ptr<A>();
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        A total = A(0);
        for (int64_t c = 0; c < chunks; ++c) total += partial[(n * chunks + c) * K + k];
        po[n * K + k] = total;
      }
    }
  });
  return out;
}

// Gradients of a and b over `len` contiguous locations (every plane
// contiguous), and s when kS.
template <MaskedMode M, bool kS, typename T, typename A>
__attribute__((target_clones("avx2", "default"))) void grad_rows(
    const T* pa, int64_t as1, const T* pb, int64_t bs1, T* da, int64_t das1, T* db,
    int64_t dbs1, int64_t C, int64_t len, const A* w, A* s) {
  if (kS) {
    for (int64_t i = 0; i < len; ++i) s[i] = A(0);
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* ra = pa + c * as1;
    const T* rb = pb + c * bs1;
    T* rda = da + c * das1;
    T* rdb = db + c * dbs1;
    for (int64_t i = 0; i < len; ++i) {
      const A d = static_cast<A>(ra[i]) - static_cast<A>(rb[i]);
      const A g = masked_grad_a<M>(d, w[i]);
      rda[i] = static_cast<T>(g);
      rdb[i] = static_cast<T>(-g);
      if (kS) s[i] += masked_term<M>(d);
    }
  }
}

// The same for any strides, one location at a time.
template <MaskedMode M, typename T, typename A>
void grad_strided(const T* a, const Strides4& as, const T* b, const Strides4& bs, T* da,
                  const Strides4& das, T* db, const Strides4& dbs, int64_t n, int64_t i0,
                  int64_t C, int64_t W, int64_t len, const A* w, A* s) {
  for (int64_t i = 0; i < len; ++i) {
    const T* la = a + as.at(n, 0, i0 + i, W);
    const T* lb = b + bs.at(n, 0, i0 + i, W);
    T* lda = da + das.at(n, 0, i0 + i, W);
    T* ldb = db + dbs.at(n, 0, i0 + i, W);
    A acc = A(0);
    for (int64_t c = 0; c < C; ++c) {
      const A d = static_cast<A>(la[c * as.s1]) - static_cast<A>(lb[c * bs.s1]);
      const A g = masked_grad_a<M>(d, w[i]);
      lda[c * das.s1] = static_cast<T>(g);
      ldb[c * dbs.s1] = static_cast<T>(-g);
      acc += masked_term<M>(d);
    }
    if (s != nullptr) s[i] = acc;
  }
}

template <MaskedMode M>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward_cpu(
    const char* op, const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b,
    const at::Tensor& masks, std::array<bool, 3> output_mask) {
  masked_reduce_backward_check(op, grad, a, b, masks);
  const bool want_ab = output_mask[0] || output_mask[1];
  const bool want_m = output_mask[2];
  // grad_a and grad_b are computed together (grad_b = -grad_a).
  auto ga = want_ab ? at::empty_like(a) : at::empty({0}, a.options());
  auto gb = want_ab ? at::empty_like(b) : at::empty({0}, b.options());
  auto gm = want_m ? at::empty_like(masks) : at::empty({0}, masks.options());
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), HW = H * W;
  const int64_t K = masks.size(1);
  if (N == 0 || HW == 0 || (!want_ab && !want_m)) {
    return {output_mask[0] ? ga : at::empty({0}, a.options()),
            output_mask[1] ? gb : at::empty({0}, b.options()), gm};
  }
  const int64_t chunks = (HW + kChunk - 1) / kChunk;
  const Strides4 as(a), bs(b), ms(masks);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "masked_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const scalar_t* pm = masks.const_data_ptr<scalar_t>();
    const auto gacc = grad.accessor<A, 2>();
    scalar_t* pga = want_ab ? ga.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* pgb = want_ab ? gb.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* pgm = want_m ? gm.mutable_data_ptr<scalar_t>() : nullptr;
    const Strides4 gas = want_ab ? Strides4(ga) : as, gbs = want_ab ? Strides4(gb) : bs;
    const Strides4 gms = want_m ? Strides4(gm) : ms;
    const bool rows = as.plane_contiguous(W) && bs.plane_contiguous(W);
    const bool grad_rows_ok = rows && gas.plane_contiguous(W) && gbs.plane_contiguous(W);
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
      A s[kChunk];
      A w[kChunk];
      A mrow[kChunk];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / chunks, i0 = (item % chunks) * kChunk;
        const int64_t len = std::min(kChunk, HW - i0);
        if (want_ab) {
          for (int64_t i = 0; i < len; ++i) w[i] = A(0);
          for (int64_t k = 0; k < K; ++k) {
            const A g = gacc[n][k];
            load_mask_row(pm, ms, n, k, i0, W, len, mrow);
            for (int64_t i = 0; i < len; ++i) w[i] += g * mrow[i];
          }
          if (grad_rows_ok) {
            const int64_t oa = n * as.s0 + i0, ob = n * bs.s0 + i0;
            const int64_t oga = n * gas.s0 + i0, ogb = n * gbs.s0 + i0;
            if (want_m) {
              grad_rows<M, true>(pa + oa, as.s1, pb + ob, bs.s1, pga + oga, gas.s1, pgb + ogb,
                                 gbs.s1, C, len, w, s);
            } else {
              grad_rows<M, false>(pa + oa, as.s1, pb + ob, bs.s1, pga + oga, gas.s1, pgb + ogb,
                                  gbs.s1, C, len, w, s);
            }
          } else {
            grad_strided<M>(pa, as, pb, bs, pga, gas, pgb, gbs, n, i0, C, W, len, w,
                            want_m ? s : nullptr);
          }
        } else if (want_m) {
          if (rows) {
            term_rows<M>(pa + n * as.s0 + i0, as.s1, pb + n * bs.s0 + i0, bs.s1, C, len, s);
          } else {
            term_strided<M>(pa, as, pb, bs, n, i0, C, W, len, s);
          }
        }
        if (want_m) {
          for (int64_t k = 0; k < K; ++k) {
            const A g = gacc[n][k];
            if (gms.plane_contiguous(W)) {
              scalar_t* row = pgm + n * gms.s0 + k * gms.s1 + i0;
              for (int64_t i = 0; i < len; ++i) row[i] = static_cast<scalar_t>(g * s[i]);
            } else {
              for (int64_t i = 0; i < len; ++i) {
                pgm[gms.at(n, k, i0 + i, W)] = static_cast<scalar_t>(g * s[i]);
              }
            }
          }
        }
      }
    });
  });
  return {output_mask[0] ? ga : at::empty({0}, a.options()),
          output_mask[1] ? gb : at::empty({0}, b.options()), gm};
}

at::Tensor masked_sq_dist_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks) {
  return masked_forward_cpu<MaskedMode::kSqDist>("masked_sq_dist", a, b, masks);
}
at::Tensor masked_l1_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks) {
  return masked_forward_cpu<MaskedMode::kL1>("masked_l1", a, b, masks);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_sq_dist_backward_cpu(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks,
    std::array<bool, 3> output_mask) {
  return masked_backward_cpu<MaskedMode::kSqDist>("_masked_sq_dist_backward", grad, a, b, masks,
                                                  output_mask);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_l1_backward_cpu(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks,
    std::array<bool, 3> output_mask) {
  return masked_backward_cpu<MaskedMode::kL1>("_masked_l1_backward", grad, a, b, masks,
                                              output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(tbd_ops, CPU, m) {
  m.impl("masked_sq_dist", TORCH_FN(masked_sq_dist_cpu));
  m.impl("masked_l1", TORCH_FN(masked_l1_cpu));
  m.impl("_masked_sq_dist_backward", TORCH_FN(masked_sq_dist_backward_cpu));
  m.impl("_masked_l1_backward", TORCH_FN(masked_l1_backward_cpu));
}

}  // namespace tbd_ops
