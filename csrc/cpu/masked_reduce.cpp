// CPU kernels of the masked reductions masked_sq_dist and masked_l1 (SPEC 1.5).
// The per-element math is in tbd_ops/masked_reduce.h, shared with the CUDA
// kernels.
//
// Forward: work items are (image, chunk of kChunk locations). Each item reads
// a and b once: s[i] = sum_c term(a - b) per location (in the 8 channel groups
// of tbd_ops/masked_reduce.h, as the CUDA kernels), kept as the term output,
// then one partial per mask, sum_i masks[k, i] * s[i], in kLanes interleaved
// lanes combined in a fixed order. The partials of an image are summed in
// chunk order, so results do not depend on the number of threads.
// Backward, the gradients asked for only, in two passes. First, items (image,
// chunk): w[i] = sum_k grad[k] * masks[k, i] for every location, and
// grad_masks[k, i] = grad[k] * s[i] from the forward's term. Then a - b is
// recomputed (nothing of size [N, C, H, W] is saved): grad_a = term'(a - b) * w,
// grad_b = -grad_a, by whole channel planes, so that each thread streams its
// share of a, b and the gradients front to back (float32 gradients of
// kStreamBytes and more with streaming stores). Every gradient element is
// computed in the same order as on the GPU: equal bit for bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "../masked_reduce.h"
#include "simd.h"
#include "tbd_ops/masked_reduce.h"

namespace tbd_ops {
namespace {

constexpr int64_t kChunk = 512;  // locations per work item of the forward
// Locations per work item of the backward's first pass (the weights w and the
// gradient of masks) and of its strided gradients of a and b. No partial sums
// there: any split gives the same values.
constexpr int64_t kGradChunk = 4096;
// Items of the first pass per thread at least: it reads K mask rows per item,
// little next to the gradients of a and b, so small levels run it inline.
constexpr int64_t kWeightGrain = 4;
constexpr int kLanes = 8;        // interleaved partial sums of the mask products
// Bytes of gradients of a and b written by one call, both counted, from which
// the float32 backward streams them past the caches (cpu::stream_store): far
// more than a core's L2, and half of a typical L3. At batch 2 and C = 256:
// RetinaNet's P3 (32.8 MiB per gradient) and, with both gradients, P4.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

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
// contiguous), in the 8 channel groups of tbd_ops/masked_reduce.h: channel c
// adds to row c % 8 of `groups` ([8][kChunk] scratch), the rows are combined by
// masked_group_tree. Compiled for AVX2 and the baseline ISA, picked at load time.
template <MaskedMode M, typename T, typename A>
__attribute__((target_clones("avx2", "default"))) void term_rows(
    const T* pa, int64_t as1, const T* pb, int64_t bs1, int64_t C, int64_t len, A* groups, A* s) {
  for (int g = 0; g < kMaskedGroups; ++g) {
    A* row = groups + g * kChunk;
    for (int64_t i = 0; i < len; ++i) row[i] = A(0);
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* ra = pa + c * as1;
    const T* rb = pb + c * bs1;
    A* row = groups + (c % kMaskedGroups) * kChunk;
    for (int64_t i = 0; i < len; ++i) {
      row[i] += masked_term<M>(static_cast<A>(ra[i]) - static_cast<A>(rb[i]));
    }
  }
  for (int64_t i = 0; i < len; ++i) {
    A g[kMaskedGroups];
    for (int j = 0; j < kMaskedGroups; ++j) g[j] = groups[j * kChunk + i];
    s[i] = masked_group_tree(g);
  }
}

// The same for float32 (planes contiguous) with explicit 8-lane vectors: the
// group sums of all `len` locations (8 x kChunk floats, 16 KiB) stay in L1
// while each channel's rows of a and b are read front to back, two streams at
// a time. (Walking 8 locations at a time through all C channels, with the
// group sums in registers, keeps 2 C rows in flight, more than the hardware
// prefetchers follow: the forward at C = 256, batch 2, was up to 20% slower
// that way, and nowhere faster.) The same operations in the same order per location,
// so the same values as term_rows.
template <MaskedMode M>
__attribute__((always_inline)) inline cpu::f32v term_v(const cpu::f32v& d) {
  // masked_term's math; it cannot take a vector (its |d| branch compares with a scalar 0).
  if (M == MaskedMode::kSqDist) return d * d;
  // |d| by clearing the sign bit. abs_val keeps the sign of -0 and NaN: the
  // sums are the same (each starts at +0, and +0 + -0 = +0), up to a NaN's sign.
  return reinterpret_cast<cpu::f32v>(reinterpret_cast<const cpu::u32v&>(d) & 0x7fffffffu);
}

template <MaskedMode M>
TBD_CLONES void term_rows_f32(const float* pa, int64_t as1, const float* pb, int64_t bs1, int64_t C,
                              int64_t len, float* s) {
  using cpu::f32v;
  using cpu::loadv;
  constexpr int64_t kVecs = kChunk / cpu::kLanes;
  const int64_t nv = std::min(len, kChunk) / cpu::kLanes;  // whole vectors of locations
  f32v g[kMaskedGroups][kVecs];
  for (int j = 0; j < kMaskedGroups; ++j) {
    for (int64_t v = 0; v < nv; ++v) g[j][v] = f32v{};
  }
  for (int64_t c = 0; c < C; ++c) {
    const float* ra = pa + c * as1;
    const float* rb = pb + c * bs1;
    f32v* row = g[c % kMaskedGroups];
    for (int64_t v = 0; v < nv; ++v) {
      row[v] += term_v<M>(loadv<f32v>(ra + v * cpu::kLanes) - loadv<f32v>(rb + v * cpu::kLanes));
    }
  }
  for (int64_t v = 0; v < nv; ++v) {
    f32v t[kMaskedGroups];
    for (int j = 0; j < kMaskedGroups; ++j) t[j] = g[j][v];
    cpu::storev(s + v * cpu::kLanes, masked_group_tree(t));
  }
  for (int64_t i = nv * cpu::kLanes; i < len; ++i) {
    float t[kMaskedGroups] = {};
    for (int64_t c = 0; c < C; ++c) t[c % kMaskedGroups] += masked_term<M>(pa[c * as1 + i] - pb[c * bs1 + i]);
    s[i] = masked_group_tree(t);
  }
}

// The same for any strides (channels_last, views), one location at a time with
// its 8 group sums side by side.
template <MaskedMode M, typename T, typename A>
void term_strided(const T* a, const Strides4& as, const T* b, const Strides4& bs, int64_t n,
                  int64_t i0, int64_t C, int64_t W, int64_t len, A* s) {
  for (int64_t i = 0; i < len; ++i) {
    const T* la = a + as.at(n, 0, i0 + i, W);
    const T* lb = b + bs.at(n, 0, i0 + i, W);
    A g[kMaskedGroups] = {};
    int64_t c0 = 0;
    for (; c0 + kMaskedGroups <= C; c0 += kMaskedGroups) {
      for (int j = 0; j < kMaskedGroups; ++j) {
        g[j] += masked_term<M>(static_cast<A>(la[(c0 + j) * as.s1]) - static_cast<A>(lb[(c0 + j) * bs.s1]));
      }
    }
    for (int j = 0; c0 + j < C; ++j) {
      g[j] += masked_term<M>(static_cast<A>(la[(c0 + j) * as.s1]) - static_cast<A>(lb[(c0 + j) * bs.s1]));
    }
    s[i] = masked_group_tree(g);
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

// out [N, K] and term [N, H, W] (the per-location sums, which the backward
// reads for the gradient of masks) of one level.
template <MaskedMode M>
std::tuple<at::Tensor, at::Tensor> masked_forward_level(const at::Tensor& a, const at::Tensor& b,
                                                        const at::Tensor& masks) {
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), HW = H * W;
  const int64_t K = masks.size(1);
  const auto acc_opts = a.options().dtype(acc_dtype(a.scalar_type()));
  auto out = at::empty({N, K}, acc_opts);
  auto term = at::empty({N, H, W}, acc_opts);
  if (N == 0 || HW == 0) return {out.zero_(), term};
  const int64_t chunks = (HW + kChunk - 1) / kChunk;
  const Strides4 as(a), bs(b), ms(masks);
  const bool rows = as.plane_contiguous(W) && bs.plane_contiguous(W);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "masked_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const scalar_t* pm = masks.const_data_ptr<scalar_t>();
    A* pt = term.mutable_data_ptr<A>();
    std::vector<A> partial(N * chunks * K);  // [N, chunks, K]
    at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
      // term_rows' group rows (the float32 path keeps its group sums in registers).
      std::vector<A> groups(rows && !std::is_same<scalar_t, float>::value ? kMaskedGroups * kChunk : 0);
      A mrow[kChunk];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / chunks, i0 = (item % chunks) * kChunk;
        const int64_t len = std::min(kChunk, HW - i0);
        A* s = pt + n * HW + i0;
        if (rows && std::is_same<scalar_t, float>::value) {
          term_rows_f32<M>(reinterpret_cast<const float*>(pa) + n * as.s0 + i0, as.s1,
                           reinterpret_cast<const float*>(pb) + n * bs.s0 + i0, bs.s1, C, len,
                           reinterpret_cast<float*>(s));
        } else if (rows) {
          term_rows<M>(pa + n * as.s0 + i0, as.s1, pb + n * bs.s0 + i0, bs.s1, C, len, groups.data(), s);
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
  return {out, term};
}

// Gradients of a and/or b (kA, kB) over `len` contiguous locations (every
// plane contiguous): term'(a - b) * w and its negation.
template <MaskedMode M, bool kA, bool kB, typename T, typename A>
__attribute__((target_clones("avx2", "default"))) void grad_rows(
    const T* pa, int64_t as1, const T* pb, int64_t bs1, T* da, int64_t das1, T* db,
    int64_t dbs1, int64_t C, int64_t len, const A* w) {
  for (int64_t c = 0; c < C; ++c) {
    const T* ra = pa + c * as1;
    const T* rb = pb + c * bs1;
    T* rda = kA ? da + c * das1 : nullptr;
    T* rdb = kB ? db + c * dbs1 : nullptr;
    for (int64_t i = 0; i < len; ++i) {
      const A g = masked_grad_a<M>(static_cast<A>(ra[i]) - static_cast<A>(rb[i]), w[i]);
      if (kA) rda[i] = static_cast<T>(g);
      if (kB) rdb[i] = static_cast<T>(-g);
    }
  }
}

// term'(d) in 8 float lanes: masked_term_grad's math (2 d, or sign(d) with
// sign(0) = sign(NaN) = +0, as sign_val computes it on the host).
template <MaskedMode M>
__attribute__((always_inline)) inline cpu::f32v term_grad_v(const cpu::f32v& d) {
  if (M == MaskedMode::kSqDist) return cpu::splat(2.0f) * d;
  return __builtin_convertvector((d < cpu::splat(0.0f)) - (d > cpu::splat(0.0f)), cpu::f32v);
}

// grad_rows for float32 gradients far larger than the caches, with streaming
// stores: a store then does not first read its line from memory. TFD's backward
// (the gradient of b only) moves three streams instead of four, and with both
// gradients four instead of six. The same values as grad_rows.
template <MaskedMode M, bool kA, bool kB>
TBD_CLONES void grad_rows_stream(const float* pa, int64_t as1, const float* pb, int64_t bs1, float* da,
                                 int64_t das1, float* db, int64_t dbs1, int64_t C, int64_t len,
                                 const float* w) {
  using cpu::f32v;
  using cpu::loadv;
  for (int64_t c = 0; c < C; ++c) {
    const float* ra = pa + c * as1;
    const float* rb = pb + c * bs1;
    float* rda = kA ? da + c * das1 : nullptr;
    float* rdb = kB ? db + c * dbs1 : nullptr;
    const uintptr_t off = reinterpret_cast<uintptr_t>(kA ? rda : rdb) % cpu::kStreamAlign;
    // Streams where the rows of both gradients start at the same distance from an
    // aligned address (the rows of tensors with equal strides do), else plain stores.
    const bool aligned = !(kA && kB) || reinterpret_cast<uintptr_t>(rdb) % cpu::kStreamAlign == off;
    const int64_t head =
        aligned ? std::min<int64_t>(len, ((cpu::kStreamAlign - off) % cpu::kStreamAlign) / sizeof(float)) : len;
    int64_t i = 0;
    for (; i < head; ++i) {
      const float g = masked_grad_a<M>(ra[i] - rb[i], w[i]);
      if (kA) rda[i] = g;
      if (kB) rdb[i] = -g;
    }
    if (aligned) {
      for (; i + cpu::kLanes <= len; i += cpu::kLanes) {
        const f32v g = term_grad_v<M>(loadv<f32v>(ra + i) - loadv<f32v>(rb + i)) * loadv<f32v>(w + i);
        if (kA) cpu::stream_store(rda + i, g);
        if (kB) cpu::stream_store(rdb + i, -g);
      }
    }
    for (; i < len; ++i) {
      const float g = masked_grad_a<M>(ra[i] - rb[i], w[i]);
      if (kA) rda[i] = g;
      if (kB) rdb[i] = -g;
    }
  }
  cpu::stream_fence();
}

// The same for any strides, one location at a time.
template <MaskedMode M, typename T, typename A>
void grad_strided(const T* a, const Strides4& as, const T* b, const Strides4& bs, T* da,
                  const Strides4& das, T* db, const Strides4& dbs, int64_t n, int64_t i0,
                  int64_t C, int64_t W, int64_t len, const A* w) {
  for (int64_t i = 0; i < len; ++i) {
    const T* la = a + as.at(n, 0, i0 + i, W);
    const T* lb = b + bs.at(n, 0, i0 + i, W);
    T* lda = da ? da + das.at(n, 0, i0 + i, W) : nullptr;
    T* ldb = db ? db + dbs.at(n, 0, i0 + i, W) : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      const A g = masked_grad_a<M>(static_cast<A>(la[c * as.s1]) - static_cast<A>(lb[c * bs.s1]), w[i]);
      if (lda) lda[c * das.s1] = static_cast<T>(g);
      if (ldb) ldb[c * dbs.s1] = static_cast<T>(-g);
    }
  }
}

// The gradients asked for (output_mask) of one level; term: the forward's
// per-location sums (read for the gradient of masks only).
template <MaskedMode M>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward_level(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks,
    const at::Tensor& term, std::array<bool, 3> output_mask) {
  const bool want_a = output_mask[0], want_b = output_mask[1], want_m = output_mask[2];
  auto ga = want_a ? at::empty_like(a) : at::Tensor();
  auto gb = want_b ? at::empty_like(b) : at::Tensor();
  auto gm = want_m ? at::empty_like(masks) : at::Tensor();
  const int64_t N = a.size(0), C = a.size(1), H = a.size(2), W = a.size(3), HW = H * W;
  const int64_t K = masks.size(1);
  if (N == 0 || HW == 0 || (!want_a && !want_b && !want_m)) return {ga, gb, gm};
  const int64_t chunks = (HW + kGradChunk - 1) / kGradChunk;
  const Strides4 as(a), bs(b), ms(masks);
  const auto tc = want_m ? term.contiguous() : term;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "masked_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const scalar_t* pm = masks.const_data_ptr<scalar_t>();
    const A* pt = want_m ? tc.const_data_ptr<A>() : nullptr;
    const auto gacc = grad.accessor<A, 2>();
    scalar_t* pga = want_a ? ga.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* pgb = want_b ? gb.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* pgm = want_m ? gm.mutable_data_ptr<scalar_t>() : nullptr;
    const Strides4 gas = want_a ? Strides4(ga) : as, gbs = want_b ? Strides4(gb) : bs;
    const Strides4 gms = want_m ? Strides4(gm) : ms;
    const bool rows = as.plane_contiguous(W) && bs.plane_contiguous(W) &&
                      gas.plane_contiguous(W) && gbs.plane_contiguous(W);
    // Streaming stores for gradients that would only pass through the caches.
    const bool stream = (int64_t(want_a) + int64_t(want_b)) * a.numel() * a.element_size() >= kStreamBytes;
    // Pass 1, items (image, chunk): the weights w of every location ([N, HW],
    // for the gradients of a and b) and the gradient of masks.
    std::vector<A> wall(want_a || want_b ? N * HW : 0);
    at::parallel_for(0, N * chunks, kWeightGrain, [&](int64_t begin, int64_t end) {
      std::vector<A> mbuf(want_a || want_b ? kGradChunk : 0);
      A* mrow = mbuf.data();
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / chunks, i0 = (item % chunks) * kGradChunk;
        const int64_t len = std::min(kGradChunk, HW - i0);
        if (want_a || want_b) {
          A* w = wall.data() + n * HW + i0;
          for (int64_t i = 0; i < len; ++i) w[i] = A(0);
          for (int64_t k = 0; k < K; ++k) {
            const A g = gacc[n][k];
            load_mask_row(pm, ms, n, k, i0, W, len, mrow);
            for (int64_t i = 0; i < len; ++i) w[i] += g * mrow[i];
          }
        }
        if (want_m) {
          const A* s = pt + n * HW + i0;
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
    if (!want_a && !want_b) return;
    const A* w = wall.data();
    if (rows) {
      // Pass 2, planes contiguous: items are channel rows (n, c), each a
      // whole H*W plane. A thread's rows are consecutive, so it streams a, b
      // and the gradients in long runs (one run per image where channels are
      // adjacent, as in a contiguous tensor).
      at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end;) {
          const int64_t n = row / C, c0 = row % C, cnt = std::min(end - row, C - c0);
          const scalar_t* ra = pa + n * as.s0 + c0 * as.s1;
          const scalar_t* rb = pb + n * bs.s0 + c0 * bs.s1;
          scalar_t* da = want_a ? pga + n * gas.s0 + c0 * gas.s1 : nullptr;
          scalar_t* db = want_b ? pgb + n * gbs.s0 + c0 * gbs.s1 : nullptr;
          const A* wn = w + n * HW;
          // The kernel for the gradients asked for: f(kA, kB) as std::bool_constant.
          const auto wanted = [&](auto f) {
            if (want_a && want_b) {
              f(std::true_type{}, std::true_type{});
            } else if (want_a) {
              f(std::true_type{}, std::false_type{});
            } else {
              f(std::false_type{}, std::true_type{});
            }
          };
          bool done = false;
          if constexpr (std::is_same_v<scalar_t, float>) {
            if (stream) {
              wanted([&](auto ka, auto kb) {
                grad_rows_stream<M, decltype(ka)::value, decltype(kb)::value>(
                    ra, as.s1, rb, bs.s1, da, gas.s1, db, gbs.s1, cnt, HW, wn);
              });
              done = true;
            }
          }
          if (!done) {
            wanted([&](auto ka, auto kb) {
              grad_rows<M, decltype(ka)::value, decltype(kb)::value>(
                  ra, as.s1, rb, bs.s1, da, gas.s1, db, gbs.s1, cnt, HW, wn);
            });
          }
          row += cnt;
        }
      });
    } else {
      // Pass 2, any strides: items (image, chunk), one location at a time.
      at::parallel_for(0, N * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t n = item / chunks, i0 = (item % chunks) * kGradChunk;
          const int64_t len = std::min(kGradChunk, HW - i0);
          grad_strided<M>(pa, as, pb, bs, pga, gas, pgb, gbs, n, i0, C, W, len, w + n * HW + i0);
        }
      });
    }
  });
  return {ga, gb, gm};
}

constexpr const char* kName[2] = {"masked_sq_dist", "masked_l1"};
constexpr const char* kBackwardName[2] = {"_masked_sq_dist_backward", "_masked_l1_backward"};

template <MaskedMode M>
at::Tensor masked_forward_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks) {
  masked_reduce_check(kName[static_cast<int>(M)], a, b, masks);
  return std::get<0>(masked_forward_level<M>(a, b, masks));
}

// The single-level backward has no saved term: the gradient of masks runs the forward for it.
template <MaskedMode M>
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_backward_cpu(
    const at::Tensor& grad, const at::Tensor& a, const at::Tensor& b, const at::Tensor& masks,
    std::array<bool, 3> output_mask) {
  masked_reduce_backward_check(kBackwardName[static_cast<int>(M)], grad, a, b, masks);
  const at::Tensor term = output_mask[2] ? std::get<1>(masked_forward_level<M>(a, b, masks)) : at::Tensor();
  auto r = masked_backward_level<M>(grad, a, b, masks, term, output_mask);
  auto or_empty = [](const at::Tensor& t, const at::Tensor& like) {
    return t.defined() ? t : at::empty({0}, like.options());
  };
  return {or_empty(std::get<0>(r), a), or_empty(std::get<1>(r), b), or_empty(std::get<2>(r), masks)};
}

// Lists of levels: level by level (each level's work items run in parallel).
template <MaskedMode M>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> masked_forward_levels_cpu(
    at::TensorList a, at::TensorList b, at::TensorList masks) {
  masked_reduce_levels_check(kName[static_cast<int>(M)], a, b, masks);
  std::vector<at::Tensor> out, term;
  for (size_t l = 0; l < a.size(); ++l) {
    auto r = masked_forward_level<M>(a[l], b[l], masks[l]);
    out.push_back(std::get<0>(r));
    term.push_back(std::get<1>(r));
  }
  return {out, term};
}

template <MaskedMode M>
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
masked_backward_levels_cpu(at::TensorList grad, at::TensorList a, at::TensorList b,
                           at::TensorList masks, at::TensorList term, std::array<bool, 3> output_mask) {
  masked_reduce_levels_backward_check(kBackwardName[static_cast<int>(M)], grad, a, b, masks, term,
                                      output_mask[2]);
  std::vector<at::Tensor> ga, gb, gm;
  for (size_t l = 0; l < a.size(); ++l) {
    auto r = masked_backward_level<M>(grad[l], a[l], b[l], masks[l],
                                      output_mask[2] ? term[l] : at::Tensor(), output_mask);
    if (output_mask[0]) ga.push_back(std::get<0>(r));
    if (output_mask[1]) gb.push_back(std::get<1>(r));
    if (output_mask[2]) gm.push_back(std::get<2>(r));
  }
  return {ga, gb, gm};
}

}  // namespace

TBD_OPS_IMPL(CPU, TBD_OPS_MASKED_KERNELS(cpu))

}  // namespace tbd_ops
