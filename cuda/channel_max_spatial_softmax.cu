// p_c = softmax over H*W of (max_k x[n, k, h, w]) / T, every level of a list
// in the same launches (a level table by value, cuda/level_table.cuh).
//
// Forward, two launches:
//   1. cmss_max_kernel<split>: the tile grid, one block per (level, image,
//      tile of locations). Each location's K logits are read once (any
//      strides) and reduced to the channel max and its argmax, one thread per
//      location or the channels spread over 8 threads (ChannelSplit: warps
//      along channel groups for NCHW grids too small for the GPU, lanes along
//      channels for channels_last); the argmax of the groups is merged exactly
//      (argmax_merge), so the variant never changes the result. y = z / T goes
//      to log_p, the argmax to argmax, and y into an online-softmax state; a
//      block reduction writes one (m, s) partial per block.
//   2. cmss_normalize_kernel: the chunk grid (2048 locations per block); each
//      block combines its image's partials in tile order (deterministic), then
//      writes log_p = y - lse and out = scale * exp(log_p).
// Backward, two launches: cmss_dot_kernel (chunk grid) writes fixed-order
// partials of dot = sum(p * g) per image; cmss_scatter_kernel<split> (tile
// grid) sums them in order and writes dx = 0 everywhere except
// dx[argmax] = (1/T) * scale * p * (g - dot), with coalesced stores for NCHW
// (threads or warps along locations) and channels_last (lanes along channels).
// No atomics, no host synchronization.
#include "channel_max_spatial_softmax.h"

#include "common.cuh"
#include "level_table.cuh"
#include "tbd_ops/softmax.h"

namespace tbd_ops {
namespace cuda {

namespace {
int g_split_policy = 0;
}  // namespace

int set_channel_split_policy(int policy) {
  if (policy < 0 || policy > 2) throw std::invalid_argument("tbd_ops: channel split policy must be 0, 1 or 2");
  const int old = g_split_policy;
  g_split_policy = policy;
  return old;
}
int channel_split_policy() { return g_split_policy; }

namespace {

constexpr int64_t kMaxTiles = 256;   // partial softmax states per image
constexpr int64_t kChunk = 2048;     // locations per block of the elementwise grid

template <typename A> struct SoftmaxCombineOp {
  __device__ __forceinline__ SoftmaxState<A> operator()(const SoftmaxState<A>& a,
                                                        const SoftmaxState<A>& b) const {
    return softmax_combine(a, b);
  }
};

template <typename A> struct ArgMaxMergeOp {
  __device__ __forceinline__ ArgMax<A> operator()(const ArgMax<A>& a, const ArgMax<A>& b) const {
    return argmax_merge(a, b);
  }
};

// The levels of one launch, by value.
template <typename T, typename A> struct CmssTable {
  LevelBlocks tiles;   // tile grid: units = tiles per image
  LevelBlocks chunks;  // chunk grid: units = chunks of kChunk locations per image
  const T* x[kMaxLevels];
  int64_t xs[kMaxLevels][4];
  int64_t K[kMaxLevels], W[kMaxLevels], HW[kMaxLevels], tile_len[kMaxLevels];
  A* log_p[kMaxLevels];
  int64_t* argmax[kMaxLevels];
  T* out[kMaxLevels];
  int64_t part0[kMaxLevels];  // first (image, tile) state of the level in the partials
  A scale[kMaxLevels];
};

template <typename T, typename A> struct CmssGradTable {
  LevelBlocks tiles, chunks;
  const T* grad[kMaxLevels];
  int64_t gs[kMaxLevels][3];
  const A* log_p[kMaxLevels];
  const int64_t* argmax[kMaxLevels];
  T* dx[kMaxLevels];
  int64_t ds[kMaxLevels][4];
  int64_t K[kMaxLevels], W[kMaxLevels], HW[kMaxLevels], tile_len[kMaxLevels];
  int64_t part0[kMaxLevels];  // first (image, chunk) partial of the level
  A scale[kMaxLevels];
};

// The channel argmax of the location at px over the channels of group g of
// `groups` (k = g, g + groups, ...), in increasing order.
template <typename T, typename A>
__device__ __forceinline__ ArgMax<A> group_argmax(const T* px, int64_t s1, int64_t K, int g,
                                                  int groups) {
  ArgMax<A> am = argmax_empty<A>();
#pragma unroll 4
  for (int64_t k = g; k < K; k += groups) argmax_update(am, to_acc(px[k * s1]), k);
  return am;
}

// One thread per location: the 8 channel groups side by side (8 loads and
// compare chains in flight), merged exactly.
template <typename T, typename A>
__device__ __forceinline__ ArgMax<A> serial_argmax(const T* px, int64_t s1, int64_t K) {
  ArgMax<A> am[kGroups];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) am[g] = argmax_empty<A>();
  int64_t k0 = 0;
  for (; k0 + kGroups <= K; k0 += kGroups) {
    A v[kGroups];
#pragma unroll
    for (int g = 0; g < kGroups; ++g) v[g] = to_acc(px[(k0 + g) * s1]);
#pragma unroll
    for (int g = 0; g < kGroups; ++g) argmax_update(am[g], v[g], k0 + g);
  }
#pragma unroll
  for (int g = 0; g < kGroups; ++g) {
    if (k0 + g < K) argmax_update(am[g], to_acc(px[(k0 + g) * s1]), k0 + g);
  }
  ArgMaxMergeOp<A> op;
  return op(op(op(am[0], am[4]), op(am[2], am[6])), op(op(am[1], am[5]), op(am[3], am[7])));
}

__device__ __forceinline__ int64_t loc_offset(const int64_t* s, int64_t i, int64_t W) {
  const int64_t h = i / W;
  return h * s[2] + (i - h * W) * s[3];
}

// kArgmax false (the no-grad op): no argmax is kept; a separate instantiation, so that the
// kernel that keeps it is unchanged (a run-time null check cost its one-thread-per-location
// variant registers and a spill). Left alone, ptxas gives the float-accumulating no-argmax
// variants 80 registers (37.5 % occupancy); 4 blocks per SM fit them in 64 without spills.
// The others keep the plain bound (0 blocks: none given; an explicit 1 changes ptxas' choices,
// and float64 would spill at 64).
template <bool kArgmax, typename A> constexpr int kMaxKernelMinBlocks = kArgmax || sizeof(A) == 8 ? 0 : 4;

template <ChannelSplit S, bool kArgmax, typename T, typename A>
__global__ void __launch_bounds__(kBlock, kMaxKernelMinBlocks<kArgmax, A>)
cmss_max_kernel(CmssTable<T, A> t, A inv_t, A* __restrict__ part_m, A* __restrict__ part_s) {
  const BlockPos p = t.tiles.pos(blockIdx.x);
  const int l = p.l;
  const int64_t K = t.K[l], W = t.W[l], HW = t.HW[l];
  const int64_t* xs = t.xs[l];
  const T* xn = t.x[l] + p.n * xs[0];
  A* lp = t.log_p[l] + p.n * HW;
  int64_t* am_out = kArgmax ? t.argmax[l] + p.n * HW : nullptr;
  const int64_t i0 = p.unit * t.tile_len[l];
  const int64_t i1 = i0 + t.tile_len[l] < HW ? i0 + t.tile_len[l] : HW;
  SoftmaxState<A> st = softmax_empty<A>();
  if constexpr (S == ChannelSplit::kSerial) {
    for (int64_t i = i0 + threadIdx.x; i < i1; i += kBlock) {
      const ArgMax<A> am = serial_argmax<T, A>(xn + loc_offset(xs, i, W), xs[1], K);
      const A y = am.value * inv_t;
      lp[i] = y;
      if constexpr (kArgmax) am_out[i] = am.index;
      softmax_add(st, y);
    }
  } else if constexpr (S == ChannelSplit::kWarpSplit) {
    // Warp w: channel group w of 32 locations (lanes); the groups meet in shared memory.
    __shared__ SharedArray<ArgMax<A>, kGroups * kSplitLocations> part;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int64_t b = i0; b < i1; b += kSplitLocations) {
      const int64_t i = b + lane;
      ArgMax<A> am = argmax_empty<A>();
      if (i < i1) am = group_argmax<T, A>(xn + loc_offset(xs, i, W), xs[1], K, warp, kGroups);
      part[warp * kSplitLocations + lane] = am;
      __syncthreads();
      if (warp == 0 && i < i1) {
        ArgMaxMergeOp<A> op;
        const ArgMax<A>* g = &part[lane];
        const ArgMax<A> best =
            op(op(op(g[0 * 32], g[4 * 32]), op(g[2 * 32], g[6 * 32])),
               op(op(g[1 * 32], g[5 * 32]), op(g[3 * 32], g[7 * 32])));
        const A y = best.value * inv_t;
        lp[i] = y;
        if constexpr (kArgmax) am_out[i] = best.index;
        softmax_add(st, y);
      }
      __syncthreads();  // part is reused by the next step
    }
  } else {
    // 8 lanes per location, lane j reads channels j, j + 8, ...: consecutive
    // lanes read consecutive channels (channels_last).
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane & (kGroups - 1);
    for (int64_t b = i0; b < i1; b += kSplitLocations) {
      const int64_t i = b + warp * (32 / kGroups) + (lane >> 3);
      ArgMax<A> am = argmax_empty<A>();
      if (i < i1) am = group_argmax<T, A>(xn + loc_offset(xs, i, W), xs[1], K, g, kGroups);
      am = lane_group_tree(am, ArgMaxMergeOp<A>());
      if (g == 0 && i < i1) {
        const A y = am.value * inv_t;
        lp[i] = y;
        if constexpr (kArgmax) am_out[i] = am.index;
        softmax_add(st, y);
      }
    }
  }
  st = block_reduce<kBlock>(st, SoftmaxCombineOp<A>());
  if (threadIdx.x == 0) {
    const int64_t j = t.part0[l] + p.n * t.tiles.units[l] + p.unit;
    part_m[j] = st.m;
    part_s[j] = st.s;
  }
}

// Every thread gets the combination of the image's tile states in tile order.
template <typename A>
__device__ SoftmaxState<A> combine_partials(const A* pm, const A* ps, int64_t count) {
  SoftmaxState<A> st = softmax_empty<A>();
  for (int64_t b = threadIdx.x; b < count; b += kBlock) {
    st = softmax_combine(st, SoftmaxState<A>{pm[b], ps[b]});
  }
  return block_reduce<kBlock>(st, SoftmaxCombineOp<A>());
}

template <typename A> __device__ A sum_partials(const A* p, int64_t count) {
  A s = A(0);
  for (int64_t b = threadIdx.x; b < count; b += kBlock) s += p[b];
  return block_sum<kBlock>(s);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
cmss_normalize_kernel(CmssTable<T, A> t, const A* __restrict__ part_m, const A* __restrict__ part_s) {
  const BlockPos p = t.chunks.pos(blockIdx.x);
  const int l = p.l;
  const int64_t HW = t.HW[l];
  const int64_t j0 = t.part0[l] + p.n * t.tiles.units[l];
  const A lse = softmax_lse(combine_partials(part_m + j0, part_s + j0, t.tiles.units[l]));
  A* lp = t.log_p[l] + p.n * HW;
  T* out = t.out[l] + p.n * HW;
  const A scale = t.scale[l];
  const int64_t i1 = (p.unit + 1) * kChunk < HW ? (p.unit + 1) * kChunk : HW;
  for (int64_t i = p.unit * kChunk + threadIdx.x; i < i1; i += kBlock) {
    const A v = lp[i] - lse;
    lp[i] = v;
    out[i] = from_acc<T>(math_exp(v) * scale);
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kBlock)
cmss_dot_kernel(CmssGradTable<T, A> t, A* __restrict__ part) {
  const BlockPos p = t.chunks.pos(blockIdx.x);
  const int l = p.l;
  const int64_t W = t.W[l], HW = t.HW[l];
  const int64_t* gs = t.gs[l];
  const T* g = t.grad[l] + p.n * gs[0];
  const A* lp = t.log_p[l] + p.n * HW;
  const int64_t i1 = (p.unit + 1) * kChunk < HW ? (p.unit + 1) * kChunk : HW;
  A s = A(0);
  for (int64_t i = p.unit * kChunk + threadIdx.x; i < i1; i += kBlock) {
    const int64_t h = i / W, w = i - h * W;
    s += math_exp(lp[i]) * to_acc(g[h * gs[1] + w * gs[2]]);
  }
  s = block_sum<kBlock>(s);
  if (threadIdx.x == 0) part[t.part0[l] + p.n * t.chunks.units[l] + p.unit] = s;
}

template <ChannelSplit S, typename T, typename A>
__global__ void __launch_bounds__(kBlock)
cmss_scatter_kernel(CmssGradTable<T, A> t, A inv_t, const A* __restrict__ part) {
  const BlockPos p = t.tiles.pos(blockIdx.x);
  const int l = p.l;
  const int64_t K = t.K[l], W = t.W[l], HW = t.HW[l];
  const A dot = sum_partials(part + t.part0[l] + p.n * t.chunks.units[l], t.chunks.units[l]);
  const A scale = t.scale[l];
  const int64_t* gs = t.gs[l];
  const int64_t* ds = t.ds[l];
  const T* g = t.grad[l] + p.n * gs[0];
  const A* lp = t.log_p[l] + p.n * HW;
  const int64_t* am = t.argmax[l] + p.n * HW;
  T* dx = t.dx[l] + p.n * ds[0];
  const T zero = from_acc<T>(A(0));
  const int64_t i0 = p.unit * t.tile_len[l];
  const int64_t i1 = i0 + t.tile_len[l] < HW ? i0 + t.tile_len[l] : HW;
  // The channels k0, k0 + step, ... of location i.
  auto write = [&](int64_t i, int64_t k0, int64_t step) {
    const int64_t h = i / W, w = i - h * W;
    const A dz = spatial_softmax_grad(math_exp(lp[i]), to_acc(g[h * gs[1] + w * gs[2]]), dot,
                                      scale, inv_t);
    const T dzt = from_acc<T>(dz);
    const int64_t a = am[i];
    T* pd = dx + h * ds[2] + w * ds[3];
    for (int64_t k = k0; k < K; k += step) pd[k * ds[1]] = (k == a) ? dzt : zero;
  };
  for_each_tile_location<S>(i0, i1, write);
}

bool empty_level(int64_t N, int64_t H, int64_t W) { return N == 0 || H * W == 0; }

// The split of a launch: lanes along channels when every level of the group
// has a channel stride of 1 (channels_last, or K = 1 alike); the location
// count of the whole call decides the rest.
template <typename Lv, typename Stride>
ChannelSplit split_of(const Lv* lv, int64_t g0, int count, int64_t locations, Stride&& channel_stride) {
  bool channel_fast = true;
  for (int j = 0; j < count; ++j) {
    const Lv& v = lv[g0 + j];
    if (empty_level(v.N, v.H, v.W)) continue;
    channel_fast = channel_fast && v.K > 1 && channel_stride(v) == 1;
  }
  return choose_split(channel_fast, locations, channel_split_policy());
}

template <typename Lv> int64_t locations_of(const Lv* lv, int64_t L) {
  int64_t n = 0;
  for (int64_t l = 0; l < L; ++l) n += lv[l].N * lv[l].H * lv[l].W;
  return n;
}

// Fills the tile and chunk grids of a level group; returns the blocks of each.
template <typename Table, typename Lv>
void fill_grids(Table& t, const Lv* lv, int64_t g0, int count, ChannelSplit split,
                int64_t& tile_blocks, int64_t& chunk_blocks) {
  t.tiles.count = t.chunks.count = count;
  tile_blocks = chunk_blocks = 0;
  for (int j = 0; j < count; ++j) {
    const Lv& v = lv[g0 + j];
    const int64_t hw = v.H * v.W;
    const Tiling ti = tiling(empty_level(v.N, v.H, v.W) ? 0 : hw, locations_per_step(split), kMaxTiles);
    t.tile_len[j] = ti.len;
    t.tiles.units[j] = ti.tiles > 0 ? ti.tiles : 1;
    t.chunks.units[j] = hw > 0 ? ceil_div(hw, kChunk) : 1;
    t.tiles.block0[j] = tile_blocks;
    t.chunks.block0[j] = chunk_blocks;
    if (!empty_level(v.N, v.H, v.W)) {
      tile_blocks += v.N * t.tiles.units[j];
      chunk_blocks += v.N * t.chunks.units[j];
    }
    t.K[j] = v.K;
    t.W[j] = v.W;
    t.HW[j] = hw;
  }
  t.tiles.block0[count] = tile_blocks;
  t.chunks.block0[count] = chunk_blocks;
  check_blocks(tile_blocks, "channel_max_spatial_softmax");
  check_blocks(chunk_blocks, "channel_max_spatial_softmax");
}

template <typename Lv> int64_t tiles_of(const Lv& v, ChannelSplit split) {
  if (empty_level(v.N, v.H, v.W)) return 0;
  return v.N * tiling(v.H * v.W, locations_per_step(split), kMaxTiles).tiles;
}

// Tiles of the largest step (the split variants): an upper bound for any split.
template <typename Lv> int64_t max_tiles_of(const Lv& v) {
  return tiles_of(v, ChannelSplit::kWarpSplit);
}

}  // namespace

int64_t cmss_forward_workspace(const CmssLevel* levels, int64_t L) {
  int64_t n = 0;
  for (int64_t l = 0; l < L; ++l) n += max_tiles_of(levels[l]);
  return 2 * n;
}

int64_t cmss_backward_workspace(const CmssGradLevel* levels, int64_t L) {
  int64_t n = 0;
  for (int64_t l = 0; l < L; ++l) {
    const CmssGradLevel& v = levels[l];
    if (!empty_level(v.N, v.H, v.W)) n += v.N * ceil_div(v.H * v.W, kChunk);
  }
  return n;
}

void cmss_forward(DType dt, const CmssLevel* levels, int64_t L, double temperature,
                  bool scale_by_hw, void* workspace, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t locations = locations_of(levels, L);
  const int64_t states = cmss_forward_workspace(levels, L) / 2;
  // Every level or none keeps its argmax; an empty level has no storage (a null pointer) either way.
  bool keep_argmax = false;
  for (int64_t l = 0; l < L; ++l) keep_argmax = keep_argmax || levels[l].argmax != nullptr;
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    A* pm = static_cast<A*>(workspace);
    A* ps = pm + states;
    const A inv_t = A(1) / static_cast<A>(temperature);
    int64_t part = 0;
    for_each_level_group(L, [&](int64_t g0, int count) {
      const ChannelSplit split =
          split_of(levels, g0, count, locations, [](const CmssLevel& v) { return v.xs[1]; });
      CmssTable<T, A> t{};
      int64_t tile_blocks, chunk_blocks;
      fill_grids(t, levels, g0, count, split, tile_blocks, chunk_blocks);
      for (int j = 0; j < count; ++j) {
        const CmssLevel& v = levels[g0 + j];
        t.x[j] = static_cast<const T*>(v.x);
        for (int d = 0; d < 4; ++d) t.xs[j][d] = v.xs[d];
        t.log_p[j] = static_cast<A*>(v.log_p);
        t.argmax[j] = v.argmax;
        t.out[j] = static_cast<T*>(v.out);
        t.part0[j] = part;
        t.scale[j] = scale_by_hw ? static_cast<A>(v.H * v.W) : A(1);
        part += tiles_of(v, split);
      }
      if (tile_blocks == 0) return;
      dispatch_split(split, [&](auto stag) {
        constexpr ChannelSplit S = decltype(stag)::value;
        if (keep_argmax) {
          launch_kernel((cmss_max_kernel<S, true, T, A>), dim3(static_cast<unsigned>(tile_blocks)), kBlock,
                        0, s, t, inv_t, pm, ps);
        } else {
          launch_kernel((cmss_max_kernel<S, false, T, A>), dim3(static_cast<unsigned>(tile_blocks)), kBlock,
                        0, s, t, inv_t, pm, ps);
        }
      });
      launch_kernel((cmss_normalize_kernel<T, A>), dim3(static_cast<unsigned>(chunk_blocks)), kBlock, 0,
                    s, t, static_cast<const A*>(pm), static_cast<const A*>(ps));
    });
  });
}

void cmss_backward(DType dt, const CmssGradLevel* levels, int64_t L, double temperature,
                   bool scale_by_hw, void* workspace, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t locations = locations_of(levels, L);
  dispatch_dtype(dt, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = acc_t<T>;
    A* part = static_cast<A*>(workspace);
    const A inv_t = A(1) / static_cast<A>(temperature);
    int64_t part0 = 0;
    for_each_level_group(L, [&](int64_t g0, int count) {
      const ChannelSplit split =
          split_of(levels, g0, count, locations, [](const CmssGradLevel& v) { return v.ds[1]; });
      CmssGradTable<T, A> t{};
      int64_t tile_blocks, chunk_blocks;
      fill_grids(t, levels, g0, count, split, tile_blocks, chunk_blocks);
      for (int j = 0; j < count; ++j) {
        const CmssGradLevel& v = levels[g0 + j];
        t.grad[j] = static_cast<const T*>(v.grad);
        for (int d = 0; d < 3; ++d) t.gs[j][d] = v.gs[d];
        t.log_p[j] = static_cast<const A*>(v.log_p);
        t.argmax[j] = v.argmax;
        t.dx[j] = static_cast<T*>(v.dx);
        for (int d = 0; d < 4; ++d) t.ds[j][d] = v.ds[d];
        t.part0[j] = part0;
        t.scale[j] = scale_by_hw ? static_cast<A>(v.H * v.W) : A(1);
        if (!empty_level(v.N, v.H, v.W)) part0 += v.N * t.chunks.units[j];
      }
      if (tile_blocks == 0) return;
      launch_kernel((cmss_dot_kernel<T, A>), dim3(static_cast<unsigned>(chunk_blocks)), kBlock, 0, s,
                    t, part);
      dispatch_split(split, [&](auto stag) {
        constexpr ChannelSplit S = decltype(stag)::value;
        launch_kernel((cmss_scatter_kernel<S, T, A>), dim3(static_cast<unsigned>(tile_blocks)), kBlock,
                      0, s, t, inv_t, static_cast<const A*>(part));
      });
    });
  });
}

}  // namespace cuda
}  // namespace tbd_ops
