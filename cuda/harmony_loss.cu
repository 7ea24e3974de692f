// harmony_distillation_loss (SPEC 1.4) on CUDA. Forward, two launches for up to
// kHarmonyMaxLevels levels (all FPN levels of a detector):
//   1. harmony_partial_kernel: one block per (level, image, chunk of `chunk`
//      locations) of every level (a table of level pointers, strides and sizes
//      passed by value); each thread sums w * |HS^t - HS^s| and w over its
//      locations in order, then a block reduction in fixed order writes the
//      two partials of the block.
//   2. harmony_combine_kernel: one block; one thread per (level, image) sums
//      its partials in chunk order and writes the normalizer and the image's
//      term; the terms are then summed in a fixed order (per-thread strided
//      sums, then the block tree) into the loss.
// No atomics, no host synchronization: the result is the same on every run.
// Backward, one launch: the grid of the forward, elementwise, with the
// normalizers saved by the forward (nothing is reduced).
// Indices are 64-bit.
#include "common.cuh"
#include "harmony_loss.h"

namespace tbd_ops {
namespace cuda {
namespace {

// ---- harmony_distillation_loss --------------------------------------------------

// The levels of one launch, by value (a kernel parameter).
template <typename T> struct LevelTable {
  int count;        // levels in this launch
  int64_t level0;   // global index of the first (row of norm / terms)
  int64_t N, chunk;
  const T* maps[kHarmonyMaxLevels][4];
  int64_t st[kHarmonyMaxLevels][4][3];
  T* grads[kHarmonyMaxLevels][2];
  int64_t gst[kHarmonyMaxLevels][2][3];
  int64_t W[kHarmonyMaxLevels], HW[kHarmonyMaxLevels], chunks[kHarmonyMaxLevels];
  int64_t block0[kHarmonyMaxLevels];  // first block of the level in this launch
  int64_t part0[kHarmonyMaxLevels];   // first (image, chunk) pair of the level in the partials
};

template <typename A> struct Pair {
  A s, w;
};
struct PairSum {
  template <typename A> __device__ __forceinline__ Pair<A> operator()(const Pair<A>& a, const Pair<A>& b) const {
    return {a.s + b.s, a.w + b.w};
  }
};

// Block b of a launch: its level l, image n and first location i0.
struct BlockPos {
  int l;
  int64_t n, c, i0, i1;
};

template <typename T> __device__ __forceinline__ BlockPos block_pos(const LevelTable<T>& t, int64_t b) {
  BlockPos p;
  p.l = 0;
  while (p.l + 1 < t.count && t.block0[p.l + 1] <= b) ++p.l;
  const int64_t local = b - t.block0[p.l];
  p.n = local / t.chunks[p.l];
  p.c = local - p.n * t.chunks[p.l];
  p.i0 = p.c * t.chunk;
  p.i1 = p.i0 + t.chunk < t.HW[p.l] ? p.i0 + t.chunk : t.HW[p.l];
  return p;
}

template <typename T> __device__ __forceinline__ int64_t map_offset(const LevelTable<T>& t, int l, int k,
                                                                    int64_t n, int64_t h, int64_t w) {
  return n * t.st[l][k][0] + h * t.st[l][k][1] + w * t.st[l][k][2];
}

// partial[2 * (part0 + local)] = sum w |HS^t - HS^s|, [.. + 1] = sum w over the
// block's locations.
template <HarmonyMode M, typename T, typename A>
__global__ void __launch_bounds__(kBlock)
harmony_partial_kernel(LevelTable<T> t, A* __restrict__ partial) {
  const BlockPos p = block_pos(t, blockIdx.x);
  const int l = p.l;
  const int64_t W = t.W[l];
  Pair<A> acc{A(0), A(0)};
  // The image's base pointers and the (h, w) strides of the four maps, once.
  const T* m[4];
  int64_t sh[4], sw[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    m[k] = t.maps[l][k] + p.n * t.st[l][k][0];
    sh[k] = t.st[l][k][1];
    sw[k] = t.st[l][k][2];
  }
  // (h, w) of location i, advanced by kBlock locations per step without a division.
  const int64_t dh = kBlock / W, dw = kBlock - dh * W;
  int64_t h = (p.i0 + threadIdx.x) / W, w = p.i0 + threadIdx.x - h * W;
#pragma unroll 1
  for (int64_t i = p.i0 + threadIdx.x; i < p.i1; i += kBlock) {
    const A pc_s = to_acc(m[0][h * sh[0] + w * sw[0]]);
    const A pr_s = to_acc(m[1][h * sh[1] + w * sw[1]]);
    const A pc_t = to_acc(m[2][h * sh[2] + w * sw[2]]);
    const A pr_t = to_acc(m[3][h * sh[3] + w * sw[3]]);
    const A wt = hd_weight<M>(pc_s, pc_t, pr_t);
    acc.s += hd_term(wt, harmony_score(pc_s, pr_s), harmony_score(pc_t, pr_t));
    acc.w += wt;
    h += dh;
    w += dw;
    if (w >= W) {
      w -= W;
      ++h;
    }
  }
  acc = block_reduce<kBlock>(acc, PairSum());
  if (threadIdx.x == 0) {
    const int64_t j = t.part0[l] + p.n * t.chunks[l] + p.c;
    partial[2 * j] = acc.s;
    partial[2 * j + 1] = acc.w;
  }
}

// One block. norm / term rows level0 .. level0 + count; with loss != null
// (the last launch) also loss = the sum of the terms of all L * N images.
template <HarmonyMode M, typename T, typename A>
__global__ void __launch_bounds__(kBlock)
harmony_combine_kernel(LevelTable<T> t, A eps, const A* __restrict__ partial, A* __restrict__ norm,
                       A* __restrict__ term, int64_t total, A* __restrict__ loss) {
  const int64_t N = t.N;
  for (int64_t j = threadIdx.x; j < t.count * N; j += kBlock) {
    const int l = static_cast<int>(j / N);
    const int64_t n = j - l * N;
    const A* part = partial + 2 * (t.part0[l] + n * t.chunks[l]);
    A s = A(0), w = A(0);
    for (int64_t c = 0; c < t.chunks[l]; ++c) {
      s += part[2 * c];
      w += part[2 * c + 1];
    }
    const A nm = hd_norm<M>(w, t.HW[l], N, eps);
    const int64_t row = (t.level0 + l) * N + n;
    norm[row] = nm;
    term[row] = s * nm;
  }
  if (loss != nullptr) {  // uniform over the block
    __syncthreads();      // the terms of this launch are written
    A acc = A(0);
    for (int64_t j = threadIdx.x; j < total; j += kBlock) acc += term[j];
    acc = block_sum<kBlock>(acc);
    if (threadIdx.x == 0) *loss = acc;
  }
}

template <HarmonyMode M, typename T, typename A>
__global__ void __launch_bounds__(kBlock)
harmony_loss_grad_kernel(LevelTable<T> t, const A* __restrict__ grad, const A* __restrict__ norm,
                         int64_t ns0, int64_t ns1) {
  const BlockPos p = block_pos(t, blockIdx.x);
  const int l = p.l;
  const int64_t W = t.W[l];
  const A coef = grad[0] * norm[(t.level0 + l) * ns0 + p.n * ns1];
  T* gc = t.grads[l][0];
  T* gr = t.grads[l][1];
  // (h, w) of location i, advanced by kBlock locations per step without a division.
  const int64_t dh = kBlock / W, dw = kBlock - dh * W;
  int64_t h = (p.i0 + threadIdx.x) / W, w = p.i0 + threadIdx.x - h * W;
#pragma unroll 1
  for (int64_t i = p.i0 + threadIdx.x; i < p.i1; i += kBlock) {
    const A pc_s = to_acc(t.maps[l][0][map_offset(t, l, 0, p.n, h, w)]);
    const A pr_s = to_acc(t.maps[l][1][map_offset(t, l, 1, p.n, h, w)]);
    const A pc_t = to_acc(t.maps[l][2][map_offset(t, l, 2, p.n, h, w)]);
    const A pr_t = to_acc(t.maps[l][3][map_offset(t, l, 3, p.n, h, w)]);
    const A wt = hd_weight<M>(pc_s, pc_t, pr_t);
    const A d = hd_grad_pr(coef, wt, pc_s, pr_s, harmony_score(pc_t, pr_t));
    if (gc != nullptr) gc[p.n * t.gst[l][0][0] + h * t.gst[l][0][1] + w * t.gst[l][0][2]] = from_acc<T>(-d);
    if (gr != nullptr) gr[p.n * t.gst[l][1][0] + h * t.gst[l][1][1] + w * t.gst[l][1][2]] = from_acc<T>(d);
    h += dh;
    w += dw;
    if (w >= W) {
      w -= W;
      ++h;
    }
  }
}

int64_t chunk_of(const HarmonyArgs& a) {
  if (a.chunk < 0) throw std::invalid_argument("tbd_ops: harmony_distillation_loss chunk must be >= 0");
  return a.chunk == 0 ? kHarmonyChunk : a.chunk;
}

int64_t chunks_of(const HarmonyLevel& lv, int64_t chunk) { return ceil_div(lv.H * lv.W, chunk); }

// Calls f(table, blocks) for each group of up to kHarmonyMaxLevels levels, in
// order; part0 counts (image, chunk) pairs over all levels before.
template <typename T, typename F> void for_each_group(const HarmonyArgs& a, F&& f) {
  const int64_t chunk = chunk_of(a);
  int64_t part = 0;
  for (int64_t g0 = 0; g0 < a.L; g0 += kHarmonyMaxLevels) {
    LevelTable<T> t{};
    t.count = static_cast<int>(a.L - g0 < kHarmonyMaxLevels ? a.L - g0 : kHarmonyMaxLevels);
    t.level0 = g0;
    t.N = a.N;
    t.chunk = chunk;
    int64_t blocks = 0;
    for (int l = 0; l < t.count; ++l) {
      const HarmonyLevel& lv = a.levels[g0 + l];
      for (int k = 0; k < 4; ++k) {
        t.maps[l][k] = static_cast<const T*>(lv.maps[k]);
        for (int d = 0; d < 3; ++d) t.st[l][k][d] = lv.st[k][d];
      }
      for (int k = 0; k < 2; ++k) {
        t.grads[l][k] = static_cast<T*>(lv.grads[k]);
        for (int d = 0; d < 3; ++d) t.gst[l][k][d] = lv.gst[k][d];
      }
      t.W[l] = lv.W;
      t.HW[l] = lv.H * lv.W;
      t.chunks[l] = chunks_of(lv, chunk);
      t.block0[l] = blocks;
      t.part0[l] = part;
      blocks += a.N * t.chunks[l];
      part += a.N * t.chunks[l];
    }
    if (blocks > 0x7fffffff) throw std::invalid_argument("tbd_ops: harmony_distillation_loss: too many blocks");
    f(t, blocks, g0 + t.count == a.L);
  }
}

}  // namespace

int64_t harmony_loss_workspace(const HarmonyArgs& a) {
  const int64_t chunk = chunk_of(a);
  int64_t pairs = 0;
  for (int64_t l = 0; l < a.L; ++l) pairs += a.N * chunks_of(a.levels[l], chunk);
  return 2 * pairs + a.L * a.N;
}

void harmony_loss_forward(DType dt, const HarmonyArgs& a, void* loss, void* norm, void* workspace,
                          void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t pairs2 = harmony_loss_workspace(a) - a.L * a.N;
  dispatch_harmony_mode(a.mode, [&](auto mtag) {
    constexpr HarmonyMode M = decltype(mtag)::value;
    dispatch_dtype(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      A* partial = static_cast<A*>(workspace);
      A* term = partial + pairs2;
      for_each_group<T>(a, [&](const LevelTable<T>& t, int64_t blocks, bool last) {
        if (blocks > 0) {
          launch_kernel((harmony_partial_kernel<M, T, A>), dim3(static_cast<unsigned>(blocks)), kBlock,
                        0, st, t, partial);
        }
        launch_kernel((harmony_combine_kernel<M, T, A>), dim3(1), kBlock, 0, st, t,
                      static_cast<A>(a.eps), static_cast<const A*>(partial), static_cast<A*>(norm),
                      term, a.L * a.N, last ? static_cast<A*>(loss) : static_cast<A*>(nullptr));
      });
    });
  });
}

void harmony_loss_backward(DType dt, const HarmonyArgs& a, const void* grad, const void* norm,
                           int64_t ns0, int64_t ns1, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  dispatch_harmony_mode(a.mode, [&](auto mtag) {
    constexpr HarmonyMode M = decltype(mtag)::value;
    dispatch_dtype(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      for_each_group<T>(a, [&](const LevelTable<T>& t, int64_t blocks, bool) {
        if (blocks == 0) return;
        launch_kernel((harmony_loss_grad_kernel<M, T, A>), dim3(static_cast<unsigned>(blocks)), kBlock,
                      0, st, t, static_cast<const A*>(grad), static_cast<const A*>(norm), ns0, ns1);
      });
    });
  });
}

}  // namespace cuda
}  // namespace tbd_ops
