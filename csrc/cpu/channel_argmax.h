// The channel argmax of a tile of locations on the CPU (NCHW: channel k of the
// tile at base + k * s1), exact for any input (NaN included) with torch.max
// semantics (tbd_ops/argmax.h): float32 in 8-lane sweeps over up to 8 channels
// at a time, redone exactly row by row when the tile holds a NaN; other types
// row by row. Without the index (index false) float32 sweeps for the max only
// (the same values: a max does not depend on the order of its comparisons, and
// +0 / -0 ties give the same softmax).
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "simd.h"
#include "tbd_ops/argmax.h"

namespace tbd_ops {
namespace cpu {
// Internal linkage: target_clones resolvers are not shared between translation units.
namespace {

// Exact for any input (NaN included), torch.max semantics.
template <typename T, typename A>
TBD_CLONES void channel_argmax_rows(const T* base, int64_t K, int64_t s1, int64_t len, A* bv,
                                    int32_t* bi) {
  for (int64_t i = 0; i < len; ++i) {
    bv[i] = static_cast<A>(base[i]);
    bi[i] = 0;
  }
  for (int64_t k = 1; k < K; ++k) {
    const T* row = base + k * s1;
    for (int64_t i = 0; i < len; ++i) {
      const A v = static_cast<A>(row[i]);
      const bool take = argmax_takes(bv[i], v);
      bv[i] = take ? v : bv[i];
      bi[i] = take ? static_cast<int32_t>(k) : bi[i];
    }
  }
}

// float32: channels k .. k + R - 1 in one sweep over the tile, in registers:
// their max m (two interleaved chains of plain maxima), the lowest of them equal to m, and
// their sum (NaN when one of them is NaN; also for inf - inf, which only costs
// a redo). The running max moves to m only when strictly greater, so ties keep
// the lowest channel. A tile with a NaN sum is redone exactly by the caller.
// First: channels 0 .. R - 1, which initialize the running max.
// Index false: the max only (bi is not touched).
template <int R, bool First, bool Index>
__attribute__((always_inline)) inline void argmax_block_f32(const float* r, int64_t s1, int32_t k,
                                                            int64_t len, float* bv, int32_t* bi,
                                                            i32v& nanv, int32_t& nan1) {
  const int64_t vlen = len / kLanes * kLanes;
  u32v kv[R];
  if (Index)
    for (int j = 0; j < R; ++j) kv[j] = u32v(splat(k + j));
  for (int64_t i = 0; i < vlen; i += kLanes) {
    f32v v[R];
    for (int j = 0; j < R; ++j) v[j] = loadv<f32v>(r + j * s1 + i);
    f32v sum = v[0], m0 = v[0], m1 = v[R > 1 ? 1 : 0];
    for (int j = 1; j < R; ++j) sum += v[j];
    for (int j = 2; j < R; j += 2) m0 = v[j] > m0 ? v[j] : m0;
    for (int j = 3; j < R; j += 2) m1 = v[j] > m1 ? v[j] : m1;
    const f32v mx = m1 > m0 ? m1 : m0;
    nanv |= sum != sum;
    if (!Index) {
      if (First) {
        storev(bv + i, mx);
      } else {
        const f32v b = loadv<f32v>(bv + i);
        storev(bv + i, f32v(mx > b ? mx : b));
      }
      continue;
    }
    // The lowest channel equal to mx: an unsigned min over channel | (all ones
    // where not equal); no selects, and no NaN here, so one channel is equal.
    u32v idx = u32v(v[0] != mx) | kv[0];
    for (int j = 1; j < R; ++j) {
      const u32v c = u32v(v[j] != mx) | kv[j];
      idx = c < idx ? c : idx;
    }
    if (First) {
      storev(bv + i, mx);
      storev(bi + i, i32v(idx));
      continue;
    }
    const f32v b = loadv<f32v>(bv + i);
    const i32v t = mx > b;
    storev(bv + i, f32v(t ? mx : b));
    storev(bi + i, i32v(t ? i32v(idx) : loadv<i32v>(bi + i)));
  }
  for (int64_t i = vlen; i < len; ++i) {
    float m = r[i];
    int32_t idx = k;
    nan1 |= m != m;
    for (int j = 1; j < R; ++j) {
      const float v = r[j * s1 + i];
      nan1 |= v != v;
      if (v > m) {
        m = v;
        idx = k + j;
      }
    }
    if (First || m > bv[i]) {
      bv[i] = m;
      if (Index) bi[i] = idx;
    }
  }
}

constexpr int kRows = 8;  // channels per sweep

// argmax_block_f32 for 1 <= rows <= kRows.
template <bool First, bool Index>
__attribute__((always_inline)) inline void argmax_rows_f32(int64_t rows, const float* r, int64_t s1,
                                                           int32_t k, int64_t len, float* bv,
                                                           int32_t* bi, i32v& nanv, int32_t& nan1) {
  static_assert(kRows == 8, "the cases cover 1 .. kRows channels");
  switch (rows) {
    case 8: argmax_block_f32<8, First, Index>(r, s1, k, len, bv, bi, nanv, nan1); break;
    case 7: argmax_block_f32<7, First, Index>(r, s1, k, len, bv, bi, nanv, nan1); break;
    case 6: argmax_block_f32<6, First, Index>(r, s1, k, len, bv, bi, nanv, nan1); break;
    case 5: argmax_block_f32<5, First, Index>(r, s1, k, len, bv, bi, nanv, nan1); break;
    case 4: argmax_block_f32<4, First, Index>(r, s1, k, len, bv, bi, nanv, nan1); break;
    case 3: argmax_block_f32<3, First, Index>(r, s1, k, len, bv, bi, nanv, nan1); break;
    case 2: argmax_block_f32<2, First, Index>(r, s1, k, len, bv, bi, nanv, nan1); break;
    case 1: argmax_block_f32<1, First, Index>(r, s1, k, len, bv, bi, nanv, nan1); break;
    default: break;
  }
}

// Returns false when the tile holds a NaN (bv, bi are then unspecified).
// Index false: the max only, bi is not touched.
template <bool Index>
TBD_CLONES bool channel_max_f32(const float* base, int64_t K, int64_t s1, int64_t len, float* bv,
                                int32_t* bi) {
  i32v nanv = {};
  int32_t nan1 = 0;
  int64_t k = std::min<int64_t>(K, kRows);
  argmax_rows_f32<true, Index>(k, base, s1, 0, len, bv, bi, nanv, nan1);
  for (; k + kRows <= K; k += kRows)
    argmax_block_f32<kRows, false, Index>(base + k * s1, s1, static_cast<int32_t>(k), len, bv, bi,
                                          nanv, nan1);
  argmax_rows_f32<false, Index>(K - k, base + k * s1, s1, static_cast<int32_t>(k), len, bv, bi,
                                nanv, nan1);
  for (int l = 0; l < kLanes; ++l) nan1 |= nanv[l];
  return nan1 == 0;
}

// The channel max of the tile into bv and its argmax into bi; with index
// false bi is scratch (float32 then sweeps for the max only).
template <typename T, typename A>
void channel_argmax_tile(const T* base, int64_t K, int64_t s1, int64_t len, A* bv, int32_t* bi,
                         bool index) {
  if constexpr (std::is_same_v<T, float>) {
    if (index ? channel_max_f32<true>(base, K, s1, len, bv, bi)
              : channel_max_f32<false>(base, K, s1, len, bv, bi))
      return;
  }
  channel_argmax_rows(base, K, s1, len, bv, bi);
}

}  // namespace
}  // namespace cpu
}  // namespace tbd_ops
