// Masked reductions (SPEC 1.5): out[n, k] = sum_hw masks[n, k, hw] * s[n, hw],
// s[n, hw] = sum_c term(a - b), term = d^2 (masked_sq_dist) or |d| (masked_l1).
//
// Forward, three launches:
//   1. masked_term_kernel: one thread per location (or per kVec consecutive
//      locations with vector loads where the H*W planes are contiguous and
//      aligned) reads a and b once, sums term(a - b) over the channels in
//      order and stores s into an [N, H*W] accumulator buffer. Threads run
//      along H*W: coalesced in NCHW.
//   2. masked_partial_kernel: per (block of locations, image), one partial
//      sum_hw masks[k] * s per mask k (block reduction, fixed order).
//   3. masked_combine_kernel: one thread per (n, k) sums the partials of its
//      image in block order (deterministic; no atomics).
// Backward, one launch (masked_grad_kernel): one thread per location
// recomputes a - b (nothing of size [N, C, H, W] is saved), with
// w = sum_k grad[n, k] * masks[n, k, hw]: grad_a = term'(a - b) * w,
// grad_b = -grad_a, grad_masks[n, k, hw] = grad[n, k] * s[n, hw].
//
// Grid: (blocks, images of the chunk); grid.y is at most max_grid_yz(), so
// larger batches run as several launches. Indices are 64-bit.
#include "common.cuh"
#include "masked_reduce.h"

namespace tbd_ops {
namespace cuda {
namespace {

constexpr int64_t kMaxBlocksPerImage = 256;   // partial sums per (image, mask)

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

inline Strides4 strides_of(const int64_t s[4]) { return {s[0], s[1], s[2], s[3]}; }

// kVec consecutive elements of one 16-byte vector load.
template <typename T> struct VecOf {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  struct alignas(16) type {
    T v[kVec];
  };
};

__device__ __forceinline__ int64_t loc_offset(const Strides4& s, int64_t i, int64_t W) {
  const int64_t h = i / W;
  return h * s.s2 + (i - h * W) * s.s3;
}

// s[n, i] = sum_c term(a - b), scalar loads, any strides.
template <MaskedMode M, typename T, typename A>
__global__ void __launch_bounds__(kBlock)
masked_term_kernel(int64_t n0, const T* __restrict__ a, Strides4 as, const T* __restrict__ b,
                   Strides4 bs, int64_t C, int64_t W, int64_t HW, A* __restrict__ s) {
  const int64_t n = n0 + blockIdx.y;
  for (int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x; i < HW;
       i += int64_t(gridDim.x) * kBlock) {
    const T* pa = a + n * as.s0 + loc_offset(as, i, W);
    const T* pb = b + n * bs.s0 + loc_offset(bs, i, W);
    A acc = A(0);
#pragma unroll 4
    for (int64_t c = 0; c < C; ++c) {
      acc += masked_term<M>(to_acc(pa[c * as.s1]) - to_acc(pb[c * bs.s1]));  // loads in flight
    }
    s[n * HW + i] = acc;
  }
}

// The same with 16-byte loads: the H*W planes of a and b are contiguous and
// every plane starts on a 16-byte boundary; thread t handles locations
// [t * kVec, t * kVec + kVec) (scalar loads for the last, partial group).
// Each location sums its channels in the same order as masked_term_kernel.
template <MaskedMode M, typename T, typename A>
__global__ void __launch_bounds__(kBlock)
masked_term_vec_kernel(int64_t n0, const T* __restrict__ a, int64_t as0, int64_t as1,
                       const T* __restrict__ b, int64_t bs0, int64_t bs1, int64_t C, int64_t HW,
                       A* __restrict__ s) {
  using V = typename VecOf<T>::type;
  constexpr int kVec = VecOf<T>::kVec;
  const int64_t n = n0 + blockIdx.y;
  const int64_t groups = (HW + kVec - 1) / kVec;
  for (int64_t g = blockIdx.x * int64_t(kBlock) + threadIdx.x; g < groups;
       g += int64_t(gridDim.x) * kBlock) {
    const int64_t i0 = g * kVec;
    const T* pa = a + n * as0 + i0;
    const T* pb = b + n * bs0 + i0;
    A acc[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] = A(0);
    if (i0 + kVec <= HW) {
      for (int64_t c = 0; c < C; ++c) {
        const V va = load_vec(reinterpret_cast<const V*>(pa + c * as1));
        const V vb = load_vec(reinterpret_cast<const V*>(pb + c * bs1));
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] += masked_term<M>(to_acc(va.v[j]) - to_acc(vb.v[j]));
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) s[n * HW + i0 + j] = acc[j];
    } else {
      const int64_t len = HW - i0;
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t j = 0; j < len; ++j) {
          acc[j] += masked_term<M>(to_acc(pa[c * as1 + j]) - to_acc(pb[c * bs1 + j]));
        }
      }
      for (int64_t j = 0; j < len; ++j) s[n * HW + i0 + j] = acc[j];
    }
  }
}

// partial[(n * K + k) * bpi + blockIdx.x] = sum over the block's locations of
// masks[n, k, i] * s[n, i].
template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
masked_partial_kernel(int64_t n0, const A* __restrict__ s, const T* __restrict__ masks,
                      Strides4 ms, int64_t K, int64_t W, int64_t HW, A* __restrict__ partial) {
  const int64_t n = n0 + blockIdx.y;
  const int64_t bpi = gridDim.x;
  for (int64_t k = 0; k < K; ++k) {
    const T* pm = masks + n * ms.s0 + k * ms.s1;
    A acc = A(0);
    for (int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x; i < HW; i += bpi * kBlock) {
      acc += to_acc(pm[loc_offset(ms, i, W)]) * s[n * HW + i];
    }
    acc = block_sum<kBlock>(acc);
    if (threadIdx.x == 0) partial[(n * K + k) * bpi + blockIdx.x] = acc;
  }
}

// out[j] = sum_b partial[j * bpi + b], j = n * K + k, in block order.
template <typename A>
__global__ void __launch_bounds__(kBlock)
masked_combine_kernel(const A* __restrict__ partial, int64_t bpi, int64_t NK, A* __restrict__ out) {
  for (int64_t j = blockIdx.x * int64_t(kBlock) + threadIdx.x; j < NK;
       j += int64_t(gridDim.x) * kBlock) {
    A total = A(0);
    for (int64_t b = 0; b < bpi; ++b) total += partial[j * bpi + b];
    out[j] = total;
  }
}

template <MaskedMode M, typename T, typename A>
__global__ void __launch_bounds__(kBlock)
masked_grad_kernel(int64_t n0, const A* __restrict__ grad, int64_t g0, int64_t g1,
                   const T* __restrict__ a, Strides4 as, const T* __restrict__ b, Strides4 bs,
                   const T* __restrict__ masks, Strides4 ms, int64_t C, int64_t K, int64_t W,
                   int64_t HW, T* __restrict__ ga, Strides4 gas, T* __restrict__ gb, Strides4 gbs,
                   T* __restrict__ gm, Strides4 gms) {
  const int64_t n = n0 + blockIdx.y;
  const bool want_ab = ga != nullptr;
  const bool want_m = gm != nullptr;
  const A* pg = grad + n * g0;
  for (int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x; i < HW;
       i += int64_t(gridDim.x) * kBlock) {
    A w = A(0);
    if (want_ab) {
      const T* pm = masks + n * ms.s0 + loc_offset(ms, i, W);
      for (int64_t k = 0; k < K; ++k) w += pg[k * g1] * to_acc(pm[k * ms.s1]);
    }
    const T* pa = a + n * as.s0 + loc_offset(as, i, W);
    const T* pb = b + n * bs.s0 + loc_offset(bs, i, W);
    A acc = A(0);
    if (want_ab) {
      T* pga = ga + n * gas.s0 + loc_offset(gas, i, W);
      T* pgb = gb + n * gbs.s0 + loc_offset(gbs, i, W);
      for (int64_t c = 0; c < C; ++c) {
        const A d = to_acc(pa[c * as.s1]) - to_acc(pb[c * bs.s1]);
        const A g = masked_grad_a<M>(d, w);
        pga[c * gas.s1] = from_acc<T>(g);
        pgb[c * gbs.s1] = from_acc<T>(-g);
        acc += masked_term<M>(d);
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        acc += masked_term<M>(to_acc(pa[c * as.s1]) - to_acc(pb[c * bs.s1]));
      }
    }
    if (want_m) {
      T* pgm = gm + n * gms.s0 + loc_offset(gms, i, W);
      for (int64_t k = 0; k < K; ++k) pgm[k * gms.s1] = from_acc<T>(pg[k * g1] * acc);
    }
  }
}

// Vector loads: contiguous H*W planes whose starts (every n, every c) lie on
// 16-byte boundaries.
bool vec_ok(const void* p, const int64_t st[4], int64_t N, int64_t C, int64_t W, int64_t vec,
            int64_t elem_bytes) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && st[3] == 1 && st[2] == W &&
         (N == 1 || st[0] % vec == 0) && (C == 1 || st[1] % vec == 0) && vec * elem_bytes == 16;
}

}  // namespace

int64_t masked_reduce_blocks_per_image(int64_t hw) { return grid_blocks(hw, kMaxBlocksPerImage); }

void masked_reduce_forward(MaskedMode mode, DType dt, const void* a, const int64_t as[4],
                           const void* b, const int64_t bs[4], const void* masks,
                           const int64_t ms[4], int64_t N, int64_t C, int64_t K, int64_t H,
                           int64_t W, void* out, void* s, void* partials, void* stream) {
  const int64_t HW = H * W;
  if (N == 0 || K == 0) return;
  const int64_t bpi = HW == 0 ? 0 : masked_reduce_blocks_per_image(HW);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dispatch_masked_mode(mode, [&](auto mtag) {
    constexpr MaskedMode M = decltype(mtag)::value;
    dispatch_dtype(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      A* ps = static_cast<A*>(s);
      A* part = static_cast<A*>(partials);
      const T* pa = static_cast<const T*>(a);
      const T* pb = static_cast<const T*>(b);
      constexpr int64_t kVec = VecOf<T>::kVec;
      const bool vec = vec_ok(a, as, N, C, W, kVec, sizeof(T)) &&
                       vec_ok(b, bs, N, C, W, kVec, sizeof(T));
      if (HW > 0) {
        const int64_t term_blocks = grid_blocks(vec ? ceil_div(HW, kVec) : HW, kMaxBlocksElementwise);
        for_each_grid_chunk(N, term_blocks, [&](int64_t n0, dim3 grid) {
          if (vec) {
            launch_kernel((masked_term_vec_kernel<M, T, A>), grid, kBlock, 0, st, n0, pa, as[0],
                          as[1], pb, bs[0], bs[1], C, HW, ps);
          } else {
            launch_kernel((masked_term_kernel<M, T, A>), grid, kBlock, 0, st, n0, pa,
                          strides_of(as), pb, strides_of(bs), C, W, HW, ps);
          }
        });
        for_each_grid_chunk(N, bpi, [&](int64_t n0, dim3 grid) {
          launch_kernel((masked_partial_kernel<T, A>), grid, kBlock, 0, st, n0,
                        static_cast<const A*>(ps), static_cast<const T*>(masks), strides_of(ms),
                        K, W, HW, part);
        });
      }
      const dim3 combine_grid(static_cast<unsigned>(grid_blocks(N * K, kMaxBlocksElementwise)));
      launch_kernel((masked_combine_kernel<A>), combine_grid, kBlock, 0, st, static_cast<const A*>(part),
                    bpi, N * K, static_cast<A*>(out));
    });
  });
}

void masked_reduce_backward(MaskedMode mode, DType dt, const void* grad, const int64_t gs[2],
                            const void* a, const int64_t as[4], const void* b,
                            const int64_t bs[4], const void* masks, const int64_t ms[4],
                            int64_t N, int64_t C, int64_t K, int64_t H, int64_t W, void* grad_a,
                            const int64_t gas[4], void* grad_b, const int64_t gbs[4],
                            void* grad_masks, const int64_t gms[4], void* stream) {
  const int64_t HW = H * W;
  if (N == 0 || HW == 0 || (grad_a == nullptr && grad_masks == nullptr)) return;
  if ((grad_a == nullptr) != (grad_b == nullptr)) {
    throw std::invalid_argument("tbd_ops: masked_reduce_backward writes grad_a and grad_b together");
  }
  const int64_t zero[4] = {0, 0, 0, 0};
  const int64_t* sa = grad_a != nullptr ? gas : zero;
  const int64_t* sb = grad_b != nullptr ? gbs : zero;
  const int64_t* sm = grad_masks != nullptr ? gms : zero;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dispatch_masked_mode(mode, [&](auto mtag) {
    constexpr MaskedMode M = decltype(mtag)::value;
    dispatch_dtype(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      for_each_grid_chunk(N, grid_blocks(HW, kMaxBlocksElementwise), [&](int64_t n0, dim3 grid) {
        launch_kernel((masked_grad_kernel<M, T, A>), grid, kBlock, 0, st, n0,
                      static_cast<const A*>(grad), gs[0], gs[1], static_cast<const T*>(a),
                      strides_of(as), static_cast<const T*>(b), strides_of(bs),
                      static_cast<const T*>(masks), strides_of(ms), C, K, W, HW,
                      static_cast<T*>(grad_a), strides_of(sa), static_cast<T*>(grad_b),
                      strides_of(sb), static_cast<T*>(grad_masks), strides_of(sm));
      });
    });
  });
}

}  // namespace cuda
}  // namespace tbd_ops
