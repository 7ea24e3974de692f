// harmony_score (SPEC 1.3) on CUDA: one thread per element (grid-stride), any
// rank up to kHarmonyMaxRank and any strides; a flat index where every tensor
// is contiguous. Indices are 64-bit.
#include "common.cuh"
#include "harmony_score.h"

namespace tbd_ops {
namespace cuda {
namespace {

// ---- harmony_score ----------------------------------------------------------------

// Unrolled over the maximal rank so that the size/stride arrays are indexed
// with constants (a dynamic index would put the kernel parameters on the stack).
__device__ __forceinline__ int64_t nd_offset(const NdShape& shape, const NdStrides& st, int64_t i) {
  int64_t off = 0;
#pragma unroll
  for (int k = 0; k < kHarmonyMaxRank; ++k) {
    const int d = kHarmonyMaxRank - 1 - k;
    if (d < shape.rank) {
      const int64_t size = shape.sizes[d];
      const int64_t q = i / size;
      off += (i - q * size) * st.s[d];
      i = q;
    }
  }
  return off;
}

template <typename T, bool kFlat>
__global__ void __launch_bounds__(kBlock)
harmony_score_kernel(NdShape shape, int64_t numel, const T* __restrict__ pc, NdStrides cs,
                     const T* __restrict__ pr, NdStrides rs, T* __restrict__ out, NdStrides os) {
  for (int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * kBlock) {
    const int64_t oc = kFlat ? i : nd_offset(shape, cs, i);
    const int64_t orr = kFlat ? i : nd_offset(shape, rs, i);
    const int64_t oo = kFlat ? i : nd_offset(shape, os, i);
    out[oo] = from_acc<T>(harmony_score(to_acc(pc[oc]), to_acc(pr[orr])));
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock)
harmony_score_grad_kernel(NdShape shape, int64_t numel, const T* __restrict__ grad, NdStrides gs,
                          const T* __restrict__ pc, NdStrides cs, const T* __restrict__ pr,
                          NdStrides rs, T* __restrict__ gc, NdStrides gcs, T* __restrict__ gr,
                          NdStrides grs) {
  for (int64_t i = blockIdx.x * int64_t(kBlock) + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * kBlock) {
    const auto g = to_acc(grad[nd_offset(shape, gs, i)]);
    const auto d = harmony_grad_pr(g, to_acc(pc[nd_offset(shape, cs, i)]),
                                   to_acc(pr[nd_offset(shape, rs, i)]));
    if (gc != nullptr) gc[nd_offset(shape, gcs, i)] = from_acc<T>(-d);
    if (gr != nullptr) gr[nd_offset(shape, grs, i)] = from_acc<T>(d);
  }
}

bool is_flat(const NdShape& shape, const NdStrides& st) {
  int64_t expect = 1;
  for (int d = shape.rank - 1; d >= 0; --d) {
    if (shape.sizes[d] != 1 && st.s[d] != expect) return false;
    expect *= shape.sizes[d];
  }
  return true;
}

int64_t numel_of(const NdShape& shape) {
  if (shape.rank < 0 || shape.rank > kHarmonyMaxRank) {
    throw std::invalid_argument("tbd_ops: harmony_score supports up to 8 dimensions per launch");
  }
  int64_t n = 1;
  for (int d = 0; d < shape.rank; ++d) n *= shape.sizes[d];
  return n;
}

}  // namespace

void harmony_score_forward(DType dt, const NdShape& shape, const void* p_c, const NdStrides& cs,
                           const void* p_r, const NdStrides& rs, void* out, const NdStrides& os,
                           void* stream) {
  const int64_t numel = numel_of(shape);
  if (numel == 0) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool flat = is_flat(shape, cs) && is_flat(shape, rs) && is_flat(shape, os);
  const dim3 grid(static_cast<unsigned>(grid_blocks(numel, kMaxBlocksElementwise)));
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pc = static_cast<const T*>(p_c);
    const T* pr = static_cast<const T*>(p_r);
    T* po = static_cast<T*>(out);
    if (flat) {
      launch_kernel((harmony_score_kernel<T, true>), grid, kBlock, 0, st, shape, numel, pc, cs, pr,
                    rs, po, os);
    } else {
      launch_kernel((harmony_score_kernel<T, false>), grid, kBlock, 0, st, shape, numel, pc, cs, pr,
                    rs, po, os);
    }
  });
}

void harmony_score_backward(DType dt, const NdShape& shape, const void* grad, const NdStrides& gs,
                            const void* p_c, const NdStrides& cs, const void* p_r,
                            const NdStrides& rs, void* grad_p_c, const NdStrides& gcs,
                            void* grad_p_r, const NdStrides& grs, void* stream) {
  const int64_t numel = numel_of(shape);
  if (numel == 0 || (grad_p_c == nullptr && grad_p_r == nullptr)) return;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const dim3 grid(static_cast<unsigned>(grid_blocks(numel, kMaxBlocksElementwise)));
    launch_kernel((harmony_score_grad_kernel<T>), grid, kBlock, 0, st, shape, numel,
                  static_cast<const T*>(grad), gs, static_cast<const T*>(p_c), cs,
                  static_cast<const T*>(p_r), rs,
                  static_cast<T*>(grad_p_c), gcs, static_cast<T*>(grad_p_r), grs);
  });
}

}  // namespace cuda
}  // namespace tbd_ops
