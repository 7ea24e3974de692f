// tbd_ops/box.h on 8-lane GCC vectors (as the CPU kernels run it): decode_box_full,
// decode_box_backward and box_iou_backward instantiated with a vector type give,
// lane by lane, the values of the scalar functions bit for bit (NaN payloads
// aside), on random boxes and on the special values: NaN, +-inf, +-0.0, ties,
// degenerate and inverted boxes, deltas beyond the wh_ratio_clip clamp, boxes
// outside the clip shape.
// The vector arguments of these (inlined) template functions never cross an ABI
// boundary between differently compiled units.
#pragma GCC diagnostic ignored "-Wpsabi"
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "tbd_ops/box.h"
#include "test_util.h"

namespace {

using namespace tbd_ops;
using tbd_test::Rng;

constexpr int kLanes = 8;
typedef float v8 __attribute__((vector_size(4 * kLanes)));

v8 splat8(float a) { return v8{a, a, a, a, a, a, a, a}; }

CoderParams<float> params(Coder coder, bool clip) {
  CoderParams<float> c;
  c.coder = coder;
  const float mean[4] = {0.01f, -0.02f, 0.0f, 0.03f}, std[4] = {0.1f, 0.1f, 0.2f, 0.2f};
  for (int k = 0; k < 4; ++k) {
    c.mean[k] = coder == Coder::kDeltaXYWH ? mean[k] : 0.0f;
    c.std[k] = coder == Coder::kDeltaXYWH ? std[k] : 1.0f;
  }
  c.max_ratio = std::fabs(std::log(0.016f));
  c.scale = coder == Coder::kDistance ? 8.0f : 1.0f;
  c.clip = clip;
  c.max_h = 45.0f;
  c.max_w = 50.0f;
  return c;
}

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

// A coordinate-sized value: mostly ordinary, sometimes special.
float draw(Rng& rng, float lo, float hi, bool special) {
  if (special && rng.coin(0.3)) {
    const float s[] = {kNaN, kInf, -kInf, 0.0f, -0.0f, 50.0f, 45.0f, 1e30f, -1e30f, 1e-40f};
    return s[rng.integer(0, 9)];
  }
  return static_cast<float>(rng.uniform(lo, hi));
}

// The same bits, or both NaN (the host compiler may order the operands of a
// NaN-producing operation either way, so the payload may differ).
::testing::AssertionResult SameBits(float vec, float scalar, const std::string& what) {
  uint32_t a, b;
  std::memcpy(&a, &vec, 4);
  std::memcpy(&b, &scalar, 4);
  if (a == b || (std::isnan(vec) && std::isnan(scalar))) return ::testing::AssertionSuccess();
  char bits[64];
  std::snprintf(bits, sizeof(bits), " (0x%08x vs 0x%08x)", static_cast<unsigned>(a), static_cast<unsigned>(b));
  return ::testing::AssertionFailure() << what << ": vector lane " << vec << " vs scalar " << scalar << bits;
}

struct Lanes {
  float d[4][kLanes], r[4][kLanes], gt[4][kLanes], g[kLanes];
};

// Compares every output of one 8-lane call with the 8 scalar calls (the
// prediction's gradient also without the prior's).
void check_lanes(const Lanes& in, const CoderParams<float>& cp, const std::string& where) {
  const float eps = 1e-6f;
  const CoderParams<v8> vcp = convert_params<v8>(cp, splat8);
  v8 d[4], r[4], dp[4], dr[4];
  for (int k = 0; k < 4; ++k) {
    std::memcpy(&d[k], in.d[k], sizeof(v8));
    std::memcpy(&r[k], in.r[k], sizeof(v8));
    dr[k] = splat8(0.0f);
  }
  v8 gtv[4], gv;
  for (int k = 0; k < 4; ++k) std::memcpy(&gtv[k], in.gt[k], sizeof(v8));
  std::memcpy(&gv, in.g, sizeof(v8));
  const DecodedBox<v8> vdb = decode_box_full(d, r, vcp);
  Box<v8> vgb, vgg;
  box_iou_backward(vdb.box, Box<v8>{gtv[0], gtv[1], gtv[2], gtv[3]}, splat8(eps), gv, vgb, vgg);
  decode_box_backward(d, r, vcp, vdb, vgb, dp, dr);
  v8 dp_only[4];  // without the prior's gradient (d_prior = nullptr), as the prediction pass calls it then
  decode_box_backward(d, r, vcp, vdb, vgb, dp_only, static_cast<v8*>(nullptr));

  for (int i = 0; i < kLanes; ++i) {
    const float sd[4] = {in.d[0][i], in.d[1][i], in.d[2][i], in.d[3][i]};
    const float sr[4] = {in.r[0][i], in.r[1][i], in.r[2][i], in.r[3][i]};
    const DecodedBox<float> db = decode_box_full(sd, sr, cp);
    Box<float> gb, gg;
    box_iou_backward(db.box, Box<float>{in.gt[0][i], in.gt[1][i], in.gt[2][i], in.gt[3][i]}, eps, in.g[i], gb,
                     gg);
    float sdp[4], sdr[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    decode_box_backward(sd, sr, cp, db, gb, sdp, sdr);
    const std::string at = where + ", lane " + std::to_string(i) + ", ";
    const float vec[] = {vdb.box.x1[i],       vdb.box.y1[i],       vdb.box.x2[i],       vdb.box.y2[i],
                         vdb.unclipped.x1[i], vdb.unclipped.y1[i], vdb.unclipped.x2[i], vdb.unclipped.y2[i],
                         vdb.ew[i],           vdb.eh[i],           vgb.x1[i],           vgb.y1[i],
                         vgb.x2[i],           vgb.y2[i],           vgg.x1[i],           vgg.y1[i],
                         vgg.x2[i],           vgg.y2[i],           dp[0][i],            dp[1][i],
                         dp[2][i],            dp[3][i],            dr[0][i],            dr[1][i],
                         dr[2][i],            dr[3][i]};
    const float sca[] = {db.box.x1,       db.box.y1,       db.box.x2,       db.box.y2,       db.unclipped.x1,
                         db.unclipped.y1, db.unclipped.x2, db.unclipped.y2, db.ew,           db.eh,
                         gb.x1,           gb.y1,           gb.x2,           gb.y2,           gg.x1,
                         gg.y1,           gg.x2,           gg.y2,           sdp[0],          sdp[1],
                         sdp[2],          sdp[3],          sdr[0],          sdr[1],          sdr[2],
                         sdr[3]};
    const char* names[] = {"box.x1",  "box.y1",  "box.x2",  "box.y2",  "unclipped.x1", "unclipped.y1",
                           "unclipped.x2", "unclipped.y2", "ew", "eh", "d box.x1", "d box.y1",
                           "d box.x2", "d box.y2", "d gt.x1", "d gt.y1", "d gt.x2", "d gt.y2",
                           "d pred[0]", "d pred[1]", "d pred[2]", "d pred[3]", "d prior[0]",
                           "d prior[1]", "d prior[2]", "d prior[3]"};
    for (int j = 0; j < 26; ++j) ASSERT_TRUE(SameBits(vec[j], sca[j], at + names[j]));
    for (int k = 0; k < 4; ++k) ASSERT_TRUE(SameBits(dp_only[k][i], sdp[k], at + "d pred, no prior"));
  }
}

class BoxLanes : public ::testing::TestWithParam<std::tuple<Coder, bool, bool>> {};

TEST_P(BoxLanes, VectorLanesEqualScalarBitwise) {
  const auto [coder, clip, special] = GetParam();
  const CoderParams<float> cp = params(coder, clip);
  Rng rng(1234 + static_cast<int>(coder) * 4 + clip * 2 + special);
  int zero_gradients = 0, tied = 0;
  for (int round = 0; round < 400; ++round) {
    Lanes in;
    for (int i = 0; i < kLanes; ++i) {
      // The prior: an anchor (delta_xywh), a point (distance) or nothing.
      const float x = draw(rng, -5, 55, special), y = draw(rng, -5, 50, special);
      const float w = static_cast<float>(rng.uniform(-2, 30)), h = static_cast<float>(rng.uniform(-2, 30));
      const float pr[4] = {x, y, x + w, y + h};
      for (int k = 0; k < 4; ++k) {
        in.r[k][i] = coder == Coder::kDeltaXYWH ? pr[k] : (coder == Coder::kDistance && k < 2 ? pr[k] : 0.0f);
      }
      for (int k = 0; k < 4; ++k) {
        if (coder == Coder::kDeltaXYWH) {
          in.d[k][i] = draw(rng, -30, 30, special);  // beyond the clamp at |.| > 4.1 / 0.2
        } else if (coder == Coder::kDistance) {
          in.d[k][i] = draw(rng, -0.5, 4, special);
        } else {
          in.d[k][i] = k < 2 ? draw(rng, -5, 50, special) : in.d[k - 2][i] + draw(rng, -3, 30, special);
        }
      }
      // The ground truth: random, or sharing coordinates with the prediction
      // (coder none: ties of the min/max and touching boxes).
      const bool tie = coder == Coder::kNone && rng.coin(0.4);
      for (int k = 0; k < 4; ++k) {
        in.gt[k][i] = tie && rng.coin(0.5) ? in.d[k][i] : draw(rng, k < 2 ? -5 : 5, k < 2 ? 40 : 60, special);
      }
      if (tie) ++tied;
      in.g[i] = rng.coin(0.1) ? 0.0f : draw(rng, -2, 2, special);
      zero_gradients += in.g[i] == 0.0f;
    }
    check_lanes(in, cp, "round " + std::to_string(round));
    if (HasFatalFailure()) return;
  }
  EXPECT_GT(zero_gradients, 0);
  if (coder == Coder::kNone) {
    EXPECT_GT(tied, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(CodersClipSpecial, BoxLanes,
                         ::testing::Combine(::testing::Values(Coder::kDeltaXYWH, Coder::kDistance, Coder::kNone),
                                            ::testing::Bool(), ::testing::Bool()));

}  // namespace
