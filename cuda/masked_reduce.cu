// Masked reductions (SPEC 1.5): out[n, k] = sum_hw masks[n, k, hw] * s[n, hw],
// s[n, hw] = sum_c term(a - b), term = d^2 (masked_sq_dist) or |d| (masked_l1),
// every level of a list in the same launches (a level table by value,
// cuda/level_table.cuh).
//
// Forward, two launches:
//   1. masked_partial_kernel<split>: the tile grid, one block per (level,
//      image, tile of locations). s of each location of the tile is summed in
//      the 8 channel groups of tbd_ops/masked_reduce.h (one thread per
//      location, or a warp per group for NCHW grids too small for the GPU, or
//      a lane per group for channels_last: coalesced loads in each layout) and
//      written to the term output; then, per mask k, one partial
//      sum masks[k] * s over the tile (block reduction, fixed order).
//   2. masked_combine_kernel: one thread per (level, image, mask) sums its
//      partials in tile order (deterministic; no atomics).
// Backward, one launch (masked_grad_kernel<split>, the tile grid): per
// location w = sum_k grad[n, k] * masks[n, k, hw]; the channels recompute
// a - b (nothing of size [N, C, H, W] is saved) and write only the gradients
// asked for: grad_a = term'(a - b) * w, grad_b = -grad_a; grad_masks[n, k, hw]
// = grad[n, k] * s[n, hw] from the forward's term (a and b are not read for
// it). Indices are 64-bit.
#include "masked_reduce.h"

#include "channel_max_spatial_softmax.h"  // channel_split_policy()
#include "common.cuh"
#include "level_table.cuh"

namespace tbd_ops {
namespace cuda {
namespace {

constexpr int64_t kMaxTiles = 256;  // partial sums per (image, mask)

template <typename T, typename A> struct MaskedFwdTable {
  LevelBlocks tiles;
  const T* a[kMaxLevels];
  const T* b[kMaxLevels];
  const T* m[kMaxLevels];
  int64_t as[kMaxLevels][4], bs[kMaxLevels][4], ms[kMaxLevels][4];
  int C[kMaxLevels], K[kMaxLevels], W[kMaxLevels], HW[kMaxLevels], tile_len[kMaxLevels];
  A* term[kMaxLevels];
  int64_t part0[kMaxLevels];  // first partial of the level: part0 + (n * K + k) * tiles + tile
};

template <typename A> struct MaskedCombineTable {
  int count;
  int64_t e0[kMaxLevels + 1];  // first (image, mask) entry of each level
  int64_t tiles[kMaxLevels];
  int64_t part0[kMaxLevels];
  A* out[kMaxLevels];
};

template <typename T, typename A> struct MaskedGradTable {
  LevelBlocks tiles;
  const T* a[kMaxLevels];
  const T* b[kMaxLevels];
  const T* m[kMaxLevels];
  int64_t as[kMaxLevels][4], bs[kMaxLevels][4], ms[kMaxLevels][4];
  int C[kMaxLevels], K[kMaxLevels], W[kMaxLevels], HW[kMaxLevels], tile_len[kMaxLevels];
  const A* term[kMaxLevels];
  const A* grad[kMaxLevels];
  int64_t gs[kMaxLevels][2];
  T* ga[kMaxLevels];
  T* gb[kMaxLevels];
  T* gm[kMaxLevels];
  int64_t gas[kMaxLevels][4], gbs[kMaxLevels][4], gms[kMaxLevels][4];
};

// (h, w) of location i of an H*W plane (below 2^31 locations: 32-bit division).
struct Loc {
  int h, w;
  __device__ __forceinline__ Loc(int i, int W) : h(i / W), w(i - (i / W) * W) {}
  __device__ __forceinline__ int64_t off(const int64_t* s) const { return h * s[2] + w * s[3]; }
};

// Group g of a location: sum over c = g, g + 8, ... of term(a - b), in order from +0.
template <MaskedMode M, typename T, typename A>
__device__ __forceinline__ A group_sum(const T* pa, int64_t as1, const T* pb, int64_t bs1, int C, int g) {
  A acc = A(0);
  pa += g * as1;
  pb += g * bs1;
#pragma unroll 4
  for (int c = g; c < C; c += kGroups, pa += kGroups * as1, pb += kGroups * bs1) {
    acc += masked_term<M>(to_acc(*pa) - to_acc(*pb));
  }
  return acc;
}

// All 8 groups of a location in one thread (16 loads in flight), combined by the tree.
template <MaskedMode M, typename T, typename A>
__device__ __forceinline__ A serial_sum(const T* pa, int64_t as1, const T* pb, int64_t bs1, int C) {
  A acc[kGroups];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) acc[g] = A(0);
  int c0 = 0;
  for (; c0 + kGroups <= C; c0 += kGroups, pa += kGroups * as1, pb += kGroups * bs1) {
    A d[kGroups];
#pragma unroll
    for (int g = 0; g < kGroups; ++g) d[g] = to_acc(pa[g * as1]) - to_acc(pb[g * bs1]);
#pragma unroll
    for (int g = 0; g < kGroups; ++g) acc[g] += masked_term<M>(d[g]);
  }
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    if (c0 + g < C) acc[g] += masked_term<M>(to_acc(pa[g * as1]) - to_acc(pb[g * bs1]));
  }
  return masked_group_tree(acc);
}

template <MaskedMode M, ChannelSplit S, typename T, typename A>
__global__ void __launch_bounds__(kBlock)
masked_partial_kernel(MaskedFwdTable<T, A> t, A* __restrict__ partial) {
  const BlockPos p = t.tiles.pos(blockIdx.x);
  const int l = p.l;
  const int C = t.C[l], K = t.K[l], W = t.W[l], HW = t.HW[l];
  const int64_t* as = t.as[l];
  const int64_t* bs = t.bs[l];
  const T* a = t.a[l] + p.n * as[0];
  const T* b = t.b[l] + p.n * bs[0];
  A* term = t.term[l] + p.n * HW;
  const int i0 = static_cast<int>(p.unit) * t.tile_len[l];
  const int i1 = i0 + t.tile_len[l] < HW ? i0 + t.tile_len[l] : HW;
  // 1. s of every location of the tile into term.
  if constexpr (S == ChannelSplit::kSerial) {
    for (int i = i0 + threadIdx.x; i < i1; i += kBlock) {
      const Loc q(i, W);
      term[i] = serial_sum<M, T, A>(a + q.off(as), as[1], b + q.off(bs), bs[1], C);
    }
  } else if constexpr (S == ChannelSplit::kWarpSplit) {
    __shared__ SharedArray<A, kGroups * kSplitLocations> part;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int s0 = i0; s0 < i1; s0 += kSplitLocations) {
      const int i = s0 + lane;
      A acc = A(0);
      if (i < i1) {
        const Loc q(i, W);
        acc = group_sum<M, T, A>(a + q.off(as), as[1], b + q.off(bs), bs[1], C, warp);
      }
      part[warp * kSplitLocations + lane] = acc;
      __syncthreads();
      if (warp == 0 && i < i1) {
        A g[kGroups];
#pragma unroll
        for (int k = 0; k < kGroups; ++k) g[k] = part[k * kSplitLocations + lane];
        term[i] = masked_group_tree(g);
      }
      __syncthreads();  // part is reused by the next step
    }
  } else {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane & (kGroups - 1);
    for (int s0 = i0; s0 < i1; s0 += kSplitLocations) {
      const int i = s0 + warp * (32 / kGroups) + (lane >> 3);
      A acc = A(0);
      if (i < i1) {
        const Loc q(i, W);
        acc = group_sum<M, T, A>(a + q.off(as), as[1], b + q.off(bs), bs[1], C, g);
      }
      acc = lane_group_tree(acc, SumOp());
      if (g == 0 && i < i1) term[i] = acc;
    }
  }
  __syncthreads();  // the tile's term values (global memory) are visible to the block
  // 2. One partial per mask over the tile.
  const int64_t* ms = t.ms[l];
  const T* m = t.m[l] + p.n * ms[0];
  const int64_t tiles = t.tiles.units[l];
  for (int k = 0; k < K; ++k) {
    const T* mk = m + k * ms[1];
    A acc = A(0);
    for (int i = i0 + threadIdx.x; i < i1; i += kBlock) acc += to_acc(mk[Loc(i, W).off(ms)]) * term[i];
    acc = block_sum<kBlock>(acc);
    if (threadIdx.x == 0) partial[t.part0[l] + (p.n * K + k) * tiles + p.unit] = acc;
  }
}

// out[n, k] of every level = sum of its partials in tile order.
template <typename A>
__global__ void __launch_bounds__(kBlock)
masked_combine_kernel(MaskedCombineTable<A> t, const A* __restrict__ partial) {
  const int64_t total = t.e0[t.count];
  for (int64_t j = blockIdx.x * int64_t(kBlock) + threadIdx.x; j < total; j += int64_t(gridDim.x) * kBlock) {
    int l = 0;
    while (l + 1 < t.count && t.e0[l + 1] <= j) ++l;
    const int64_t e = j - t.e0[l];
    const A* part = partial + t.part0[l] + e * t.tiles[l];
    A s = A(0);
    for (int64_t c = 0; c < t.tiles[l]; ++c) s += part[c];
    t.out[l][e] = s;
  }
}

template <MaskedMode M, ChannelSplit S, typename T, typename A>
__global__ void __launch_bounds__(kBlock)
masked_grad_kernel(MaskedGradTable<T, A> t) {
  const BlockPos p = t.tiles.pos(blockIdx.x);
  const int l = p.l;
  const int C = t.C[l], K = t.K[l], W = t.W[l], HW = t.HW[l];
  const A* grad = t.grad[l] + p.n * t.gs[l][0];
  const int64_t g1 = t.gs[l][1];
  T* ga = t.ga[l];
  T* gb = t.gb[l];
  T* gm = t.gm[l];
  const bool want_ab = ga != nullptr || gb != nullptr;
  const int i0 = static_cast<int>(p.unit) * t.tile_len[l];
  const int i1 = i0 + t.tile_len[l] < HW ? i0 + t.tile_len[l] : HW;
  // The channels c0, c0 + step, ... of location i; grad_masks by the thread with c0 == 0.
  auto run = [&](int i, int c0, int step) {
    const Loc q(i, W);
    if (want_ab) {
      const int64_t* ms = t.ms[l];
      const T* pm = t.m[l] + p.n * ms[0] + q.off(ms);
      A w = A(0);
      for (int k = 0; k < K; ++k) w += grad[k * g1] * to_acc(pm[k * ms[1]]);
      const int64_t as1 = t.as[l][1], bs1 = t.bs[l][1];
      const T* pa = t.a[l] + p.n * t.as[l][0] + q.off(t.as[l]) + c0 * as1;
      const T* pb = t.b[l] + p.n * t.bs[l][0] + q.off(t.bs[l]) + c0 * bs1;
      if (ga != nullptr && gb != nullptr) {
        const int64_t ga1 = t.gas[l][1], gb1 = t.gbs[l][1];
        T* pga = ga + p.n * t.gas[l][0] + q.off(t.gas[l]) + c0 * ga1;
        T* pgb = gb + p.n * t.gbs[l][0] + q.off(t.gbs[l]) + c0 * gb1;
#pragma unroll 4
        for (int c = c0; c < C; c += step) {
          const A g = masked_grad_a<M>(to_acc(*pa) - to_acc(*pb), w);
          *pga = from_acc<T>(g);
          *pgb = from_acc<T>(-g);
          pa += step * as1;
          pb += step * bs1;
          pga += step * ga1;
          pgb += step * gb1;
        }
      } else {
        // One of the two (TFD: the teacher side is detached): sign 1 for a, -1 for b.
        const bool is_a = ga != nullptr;
        const int64_t o1 = is_a ? t.gas[l][1] : t.gbs[l][1];
        T* po = is_a ? ga + p.n * t.gas[l][0] + q.off(t.gas[l]) : gb + p.n * t.gbs[l][0] + q.off(t.gbs[l]);
        po += c0 * o1;
#pragma unroll 4
        for (int c = c0; c < C; c += step) {
          const A g = masked_grad_a<M>(to_acc(*pa) - to_acc(*pb), w);
          *po = from_acc<T>(is_a ? g : -g);
          pa += step * as1;
          pb += step * bs1;
          po += step * o1;
        }
      }
    }
    if (gm != nullptr && c0 == 0) {
      const A s = t.term[l][p.n * HW + i];
      const int64_t* gms = t.gms[l];
      T* pgm = gm + p.n * gms[0] + q.off(gms);
      for (int k = 0; k < K; ++k) pgm[k * gms[1]] = from_acc<T>(grad[k * g1] * s);
    }
  };
  for_each_tile_location<S>(i0, i1, run);
}

bool has_work(const MaskedLevel& v) { return v.N > 0 && v.H * v.W > 0; }

// Sizes the kernels index with 32 bits (a level's H*W locations, C, K). Locations stay below
// 2^30, so that a tile's end (i0 + tile_len, at most H*W + H*W / 256) and a thread's next
// location (i + kBlock) cannot overflow either.
void check_sizes(const MaskedLevel* lv, int64_t L) {
  for (int64_t l = 0; l < L; ++l) {
    if (lv[l].H * lv[l].W >= (int64_t(1) << 30) || lv[l].C > 0x7fffffff || lv[l].K > 0x7fffffff) {
      throw std::invalid_argument(
          "tbd_ops: masked reduction: H * W must be below 2^30, C and K below 2^31 on CUDA");
    }
  }
}

int64_t locations_of(const MaskedLevel* lv, int64_t L) {
  check_sizes(lv, L);
  int64_t n = 0;
  for (int64_t l = 0; l < L; ++l) n += lv[l].N * lv[l].H * lv[l].W;
  return n;
}

// Lanes along channels when every level with work reads its channels with
// stride 1 (channels_last); the call's location count decides the rest.
template <typename Stride>
ChannelSplit split_of(const MaskedLevel* lv, int64_t g0, int count, int64_t locations, Stride&& fast) {
  bool channel_fast = true;
  for (int j = 0; j < count; ++j) {
    const MaskedLevel& v = lv[g0 + j];
    if (has_work(v)) channel_fast = channel_fast && v.C > 1 && fast(v);
  }
  return choose_split(channel_fast, locations, channel_split_policy());
}

int64_t tiles_of(const MaskedLevel& v, ChannelSplit split) {
  return has_work(v) ? tiling(v.H * v.W, locations_per_step(split), kMaxTiles).tiles : 0;
}

// Fills the tile grid and the level sizes of a table; returns its blocks.
template <typename Table>
int64_t fill_tiles(Table& t, const MaskedLevel* lv, int64_t g0, int count, ChannelSplit split) {
  t.tiles.count = count;
  int64_t blocks = 0;
  for (int j = 0; j < count; ++j) {
    const MaskedLevel& v = lv[g0 + j];
    const Tiling ti = tiling(has_work(v) ? v.H * v.W : 0, locations_per_step(split), kMaxTiles);
    t.tiles.block0[j] = blocks;
    t.tiles.units[j] = ti.tiles > 0 ? ti.tiles : 1;
    t.tile_len[j] = static_cast<int>(ti.len);
    if (has_work(v)) blocks += v.N * ti.tiles;
    t.C[j] = static_cast<int>(v.C);
    t.K[j] = static_cast<int>(v.K);
    t.W[j] = static_cast<int>(v.W);
    t.HW[j] = static_cast<int>(v.H * v.W);
    for (int d = 0; d < 4; ++d) {
      t.as[j][d] = v.as[d];
      t.bs[j][d] = v.bs[d];
      t.ms[j][d] = v.ms[d];
    }
  }
  t.tiles.block0[count] = blocks;
  check_blocks(blocks, "masked reduction");
  return blocks;
}

}  // namespace

int64_t masked_reduce_forward_workspace(const MaskedLevel* levels, int64_t L) {
  int64_t n = 0;  // the tiles of the split variants: an upper bound for any split
  for (int64_t l = 0; l < L; ++l) n += levels[l].N * levels[l].K * tiles_of(levels[l], ChannelSplit::kWarpSplit);
  return n;
}

void masked_reduce_forward(MaskedMode mode, DType dt, const MaskedLevel* levels, int64_t L,
                           void* workspace, void* stream) {
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t locations = locations_of(levels, L);
  dispatch_masked_mode(mode, [&](auto mtag) {
    constexpr MaskedMode M = decltype(mtag)::value;
    dispatch_dtype(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      A* partial = static_cast<A*>(workspace);
      int64_t part = 0;
      for_each_level_group(L, [&](int64_t g0, int count) {
        const ChannelSplit split = split_of(levels, g0, count, locations, [](const MaskedLevel& v) {
          return v.as[1] == 1 && v.bs[1] == 1;
        });
        MaskedFwdTable<T, A> t{};
        const int64_t blocks = fill_tiles(t, levels, g0, count, split);
        MaskedCombineTable<A> c{};
        c.count = count;
        for (int j = 0; j < count; ++j) {
          const MaskedLevel& v = levels[g0 + j];
          t.a[j] = static_cast<const T*>(v.a);
          t.b[j] = static_cast<const T*>(v.b);
          t.m[j] = static_cast<const T*>(v.masks);
          t.term[j] = static_cast<A*>(v.term);
          t.part0[j] = part;
          c.e0[j + 1] = c.e0[j] + v.N * v.K;
          c.tiles[j] = tiles_of(v, split);
          c.part0[j] = part;
          c.out[j] = static_cast<A*>(v.out);
          part += v.N * v.K * c.tiles[j];
        }
        if (blocks > 0) {
          dispatch_split(split, [&](auto stag) {
            constexpr ChannelSplit S = decltype(stag)::value;
            launch_kernel((masked_partial_kernel<M, S, T, A>), dim3(static_cast<unsigned>(blocks)), kBlock,
                          0, st, t, partial);
          });
        }
        const int64_t entries = c.e0[count];
        if (entries > 0) {
          const int64_t cblocks = ceil_div(entries, kBlock);
          launch_kernel((masked_combine_kernel<A>),
                        dim3(static_cast<unsigned>(cblocks < 1024 ? cblocks : 1024)), kBlock, 0, st, c,
                        static_cast<const A*>(partial));
        }
      });
    });
  });
}

void masked_reduce_backward(MaskedMode mode, DType dt, const MaskedLevel* levels, int64_t L,
                            void* stream) {
  for (int64_t l = 0; l < L; ++l) {
    if (levels[l].grad_masks != nullptr && levels[l].term == nullptr && has_work(levels[l])) {
      throw std::invalid_argument("tbd_ops: masked_reduce_backward: grad_masks needs the forward's term");
    }
  }
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t locations = locations_of(levels, L);
  dispatch_masked_mode(mode, [&](auto mtag) {
    constexpr MaskedMode M = decltype(mtag)::value;
    dispatch_dtype(dt, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = acc_t<T>;
      for_each_level_group(L, [&](int64_t g0, int count) {
        bool want_ab = false;
        for (int j = 0; j < count; ++j) {
          want_ab = want_ab || levels[g0 + j].grad_a != nullptr || levels[g0 + j].grad_b != nullptr;
        }
        // Lanes along channels where the channels are read and written with
        // stride 1; grad_masks alone needs one thread per location.
        const ChannelSplit split =
            want_ab ? split_of(levels, g0, count, locations,
                               [](const MaskedLevel& v) {
                                 return v.as[1] == 1 && v.bs[1] == 1 &&
                                        (v.grad_a == nullptr || v.gas[1] == 1) &&
                                        (v.grad_b == nullptr || v.gbs[1] == 1);
                               })
                    : ChannelSplit::kSerial;
        MaskedGradTable<T, A> t{};
        const int64_t blocks = fill_tiles(t, levels, g0, count, split);
        bool any = false;
        for (int j = 0; j < count; ++j) {
          const MaskedLevel& v = levels[g0 + j];
          t.a[j] = static_cast<const T*>(v.a);
          t.b[j] = static_cast<const T*>(v.b);
          t.m[j] = static_cast<const T*>(v.masks);
          t.term[j] = static_cast<const A*>(v.term);
          t.grad[j] = static_cast<const A*>(v.grad);
          t.gs[j][0] = v.gs[0];
          t.gs[j][1] = v.gs[1];
          t.ga[j] = static_cast<T*>(v.grad_a);
          t.gb[j] = static_cast<T*>(v.grad_b);
          t.gm[j] = static_cast<T*>(v.grad_masks);
          for (int d = 0; d < 4; ++d) {
            t.gas[j][d] = v.gas[d];
            t.gbs[j][d] = v.gbs[d];
            t.gms[j][d] = v.gms[d];
          }
          any = any || v.grad_a != nullptr || v.grad_b != nullptr || v.grad_masks != nullptr;
        }
        if (blocks == 0 || !any) return;
        dispatch_split(split, [&](auto stag) {
          constexpr ChannelSplit S = decltype(stag)::value;
          launch_kernel((masked_grad_kernel<M, S, T, A>), dim3(static_cast<unsigned>(blocks)), kBlock, 0,
                        st, t);
        });
      });
    });
  });
}

}  // namespace cuda
}  // namespace tbd_ops
