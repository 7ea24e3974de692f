// cuda/level_table.cuh: the channel-split rule, the tiling of a level and the
// block -> (level, image, tile) lookup of a multi-level launch; and the
// multi-level launchers of p_c and the masked reductions run on the emulator
// against a host loop over the shared headers (the masked per-location sums
// bit for bit, the channel argmax exactly) for every split variant.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "channel_max_spatial_softmax.h"
#include "emu/simt.h"
#include "level_table.cuh"
#include "masked_reduce.h"
#include "tbd_ops/argmax.h"
#include "tbd_ops/masked_reduce.h"

using namespace tbd_ops;
using cuda::ChannelSplit;

namespace {

TEST(LevelTable, SplitRule) {
  const int64_t below = cuda::kSplitBelowLocations;
  EXPECT_EQ(below, 262144);  // an H100's 132 SMs x 2048 resident threads, rounded down to 2^18
  EXPECT_EQ(cuda::choose_split(false, below - 1, 0), ChannelSplit::kWarpSplit);
  EXPECT_EQ(cuda::choose_split(false, below, 0), ChannelSplit::kSerial);
  EXPECT_EQ(cuda::choose_split(false, 2 * 22300, 0), ChannelSplit::kWarpSplit);   // RetinaNet, batch 2
  EXPECT_EQ(cuda::choose_split(false, 16 * 22300, 0), ChannelSplit::kSerial);     // batch 16
  EXPECT_EQ(cuda::choose_split(true, 16 * 22300, 0), ChannelSplit::kLaneSplit);   // channels_last
  EXPECT_EQ(cuda::choose_split(false, 10, 1), ChannelSplit::kSerial);
  EXPECT_EQ(cuda::choose_split(false, 1 << 30, 2), ChannelSplit::kWarpSplit);
  EXPECT_EQ(cuda::choose_split(true, 10, 1), ChannelSplit::kLaneSplit);
}

TEST(LevelTable, Tiling) {
  // At most max_tiles tiles of a multiple of the step, covering hw.
  for (int64_t hw : {1, 31, 32, 33, 255, 256, 257, 16700, 100000, 1 << 22}) {
    for (int64_t step : {32, 256}) {
      const cuda::Tiling t = cuda::tiling(hw, step, 256);
      EXPECT_LE(t.tiles, 256);
      EXPECT_EQ(t.len % step, 0);
      EXPECT_GE(t.tiles * t.len, hw);
      EXPECT_LT((t.tiles - 1) * t.len, hw);
    }
  }
  EXPECT_EQ(cuda::tiling(0, 32, 256).tiles, 0);
}

TEST(LevelTable, BlockPosition) {
  cuda::LevelBlocks b{};
  b.count = 4;
  // Level 0: 2 images x 3 tiles; level 1 empty; level 2: 2 x 1; level 3: 1 x 5.
  const int64_t units[4] = {3, 1, 1, 5}, blocks[4] = {6, 0, 2, 5};
  int64_t o = 0;
  for (int l = 0; l < 4; ++l) {
    b.block0[l] = o;
    b.units[l] = units[l];
    o += blocks[l];
  }
  b.block0[4] = o;
  int64_t k = 0;
  for (int l = 0; l < 4; ++l) {
    for (int64_t j = 0; j < blocks[l]; ++j, ++k) {
      const cuda::BlockPos p = b.pos(k);
      EXPECT_EQ(p.l, l) << k;
      EXPECT_EQ(p.n, j / units[l]) << k;
      EXPECT_EQ(p.unit, j % units[l]) << k;
    }
  }
}

struct Level {
  int64_t N, C, H, W;
  std::vector<float> a, b, m;
};

std::vector<Level> make_levels(uint32_t seed, int64_t C, bool ties) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_int_distribution<int> small(-2, 2);
  std::vector<Level> out;
  for (auto hw : {std::pair<int64_t, int64_t>{7, 9}, {3, 33}, {1, 1}}) {
    Level lv{2, C, hw.first, hw.second, {}, {}, {}};
    const int64_t n = lv.N * C * lv.H * lv.W;
    for (int64_t i = 0; i < n; ++i) {
      lv.a.push_back(ties ? float(small(rng)) : nd(rng));
      lv.b.push_back(nd(rng));
    }
    for (int64_t i = 0; i < lv.N * 2 * lv.H * lv.W; ++i) lv.m.push_back(std::fabs(nd(rng)));
    out.push_back(lv);
  }
  return out;
}

// The masked per-location sums of every split variant equal the host's 8-group tree, bit for bit.
TEST(LevelTable, MaskedTermsOfEverySplit) {
  for (int64_t C : {1, 5, 8, 21}) {
    const std::vector<Level> lv = make_levels(static_cast<uint32_t>(C), C, false);
    for (int policy : {1, 2}) {
      for (bool channels_last : {false, true}) {
        cuda::set_channel_split_policy(policy);
        std::vector<cuda::MaskedLevel> ml;
        std::vector<std::vector<float>> out(lv.size()), term(lv.size());
        for (size_t l = 0; l < lv.size(); ++l) {
          const Level& v = lv[l];
          const int64_t HW = v.H * v.W;
          cuda::MaskedLevel x{};
          x.a = v.a.data();
          x.b = v.b.data();
          x.masks = v.m.data();
          // NCHW, or the same values read as NHWC (a different tensor, the same check).
          const int64_t s[4] = {C * HW, channels_last ? 1 : HW, channels_last ? v.W * C : v.W,
                                channels_last ? C : 1};
          for (int d = 0; d < 4; ++d) x.as[d] = x.bs[d] = s[d];
          const int64_t ms[4] = {2 * HW, HW, v.W, 1};
          for (int d = 0; d < 4; ++d) x.ms[d] = ms[d];
          x.N = v.N;
          x.C = C;
          x.K = 2;
          x.H = v.H;
          x.W = v.W;
          out[l].assign(v.N * 2, -7.f);
          term[l].assign(v.N * HW, -7.f);
          x.out = out[l].data();
          x.term = term[l].data();
          ml.push_back(x);
        }
        std::vector<float> ws(cuda::masked_reduce_forward_workspace(ml.data(), 3));
        cuda::masked_reduce_forward(MaskedMode::kSqDist, cuda::DType::kFloat, ml.data(), 3, ws.data(), nullptr);
        for (size_t l = 0; l < lv.size(); ++l) {
          const cuda::MaskedLevel& x = ml[l];
          for (int64_t n = 0; n < x.N; ++n) {
            for (int64_t h = 0; h < x.H; ++h) {
              for (int64_t w = 0; w < x.W; ++w) {
                float g[kMaskedGroups] = {};
                for (int64_t c = 0; c < C; ++c) {
                  const int64_t o = n * x.as[0] + c * x.as[1] + h * x.as[2] + w * x.as[3];
                  g[c % kMaskedGroups] += masked_term<MaskedMode::kSqDist>(lv[l].a[o] - lv[l].b[o]);
                }
                ASSERT_EQ(term[l][n * x.H * x.W + h * x.W + w], masked_group_tree(g))
                    << "C=" << C << " policy=" << policy << " cl=" << channels_last << " level " << l;
              }
            }
          }
        }
      }
    }
  }
  cuda::set_channel_split_policy(0);
}

// The channel argmax of every split variant is torch.max's (ties: the lowest channel).
TEST(LevelTable, ChannelArgmaxOfEverySplit) {
  for (int64_t K : {1, 7, 8, 37}) {
    const std::vector<Level> lv = make_levels(100 + static_cast<uint32_t>(K), K, true);
    for (int policy : {1, 2}) {
      for (bool channels_last : {false, true}) {
        cuda::set_channel_split_policy(policy);
        std::vector<cuda::CmssLevel> cl;
        std::vector<std::vector<float>> out(lv.size()), lp(lv.size());
        std::vector<std::vector<int64_t>> am(lv.size());
        for (size_t l = 0; l < lv.size(); ++l) {
          const Level& v = lv[l];
          const int64_t HW = v.H * v.W;
          cuda::CmssLevel x{};
          x.x = v.a.data();
          const int64_t s[4] = {K * HW, channels_last ? 1 : HW, channels_last ? v.W * K : v.W,
                                channels_last ? K : 1};
          for (int d = 0; d < 4; ++d) x.xs[d] = s[d];
          x.N = v.N;
          x.K = K;
          x.H = v.H;
          x.W = v.W;
          out[l].assign(v.N * HW, -7.f);
          lp[l].assign(v.N * HW, -7.f);
          am[l].assign(v.N * HW, -7);
          x.out = out[l].data();
          x.log_p = lp[l].data();
          x.argmax = am[l].data();
          cl.push_back(x);
        }
        std::vector<float> ws(cuda::cmss_forward_workspace(cl.data(), 3));
        cuda::cmss_forward(cuda::DType::kFloat, cl.data(), 3, 1.0, false, ws.data(), nullptr);
        for (size_t l = 0; l < lv.size(); ++l) {
          const cuda::CmssLevel& x = cl[l];
          for (int64_t n = 0; n < x.N; ++n) {
            for (int64_t i = 0; i < x.H * x.W; ++i) {
              ArgMax<float> best = argmax_empty<float>();
              for (int64_t k = 0; k < K; ++k) {
                const int64_t o = n * x.xs[0] + k * x.xs[1] + (i / x.W) * x.xs[2] + (i % x.W) * x.xs[3];
                argmax_update(best, lv[l].a[o], k);
              }
              ASSERT_EQ(am[l][n * x.H * x.W + i], best.index)
                  << "K=" << K << " policy=" << policy << " cl=" << channels_last << " level " << l;
            }
          }
        }
      }
    }
  }
  cuda::set_channel_split_policy(0);
}

// argmax_merge of any grouping equals the running argmax in index order (NaN, ties, +-0).
TEST(LevelTable, ArgmaxMergeOfGroups) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<std::vector<float>> cases = {
      {1, 3, 3, 2, 3}, {0.f, -0.f, 0.f}, {-0.f, 0.f}, {2, nan, 5, nan}, {nan, nan}, {-1, -1, -1, -1, -1, -1, -1, -1, -1}};
  for (const auto& v : cases) {
    const ArgMax<float> want = argmax_of(v.data(), static_cast<int64_t>(v.size()));
    for (int groups : {1, 2, 3, 8}) {
      ArgMax<float> merged = argmax_empty<float>();
      for (int g = groups - 1; g >= 0; --g) {  // groups merged in reverse order
        ArgMax<float> part = argmax_empty<float>();
        for (size_t k = g; k < v.size(); k += groups) argmax_update(part, v[k], static_cast<int64_t>(k));
        merged = argmax_merge(part, merged);
      }
      EXPECT_EQ(merged.index, want.index) << groups;
    }
  }
}

}  // namespace
