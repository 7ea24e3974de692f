// The CUDA launchers of decode_max_iou, run on the emulator, against a host
// loop over the same shared headers (csrc/include/tbd_ops): per-element
// results bit for bit (no FMA contraction on either side), under all three
// schedules, across tiles (G > 1024) and chunks (N > 64).
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "decode_max_iou.h"
#include "tbd_ops/argmax.h"
#include "tbd_ops/box.h"
#include "tbd_ops/layout.h"
#include "emu/simt.h"

using namespace tbd_ops;

namespace {

struct Problem {
  int64_t N, P;
  std::vector<float> pred, priors, gts;
  std::vector<int64_t> offsets;
  CoderParams<double> params{};
};

Problem make_problem(int64_t N, int64_t P, const std::vector<int64_t>& counts, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  Problem pb;
  pb.N = N;
  pb.P = P;
  pb.pred.resize(N * P * 4);
  for (auto& v : pb.pred) v = (u(rng) - 0.5f) * 3.f;  // some deltas beyond the clamp
  pb.priors.resize(P * 4);
  for (int64_t p = 0; p < P; ++p) {
    const float x = u(rng) * 60, y = u(rng) * 60;
    pb.priors[p * 4 + 0] = x;
    pb.priors[p * 4 + 1] = y;
    pb.priors[p * 4 + 2] = x + 1 + u(rng) * 30;
    pb.priors[p * 4 + 3] = y + 1 + u(rng) * 30;
  }
  pb.offsets.assign(1, 0);
  for (int64_t c : counts) pb.offsets.push_back(pb.offsets.back() + c);
  pb.gts.resize(pb.offsets.back() * 4);
  for (int64_t g = 0; g < pb.offsets.back(); ++g) {
    const float x = u(rng) * 50, y = u(rng) * 50;
    pb.gts[g * 4 + 0] = x;
    pb.gts[g * 4 + 1] = y;
    pb.gts[g * 4 + 2] = x + 1 + u(rng) * 25;
    pb.gts[g * 4 + 3] = y + 1 + u(rng) * 25;
  }
  pb.params.coder = Coder::kDeltaXYWH;
  for (int k = 0; k < 4; ++k) {
    pb.params.mean[k] = 0.01 * k;
    pb.params.std[k] = k < 2 ? 0.1 : 0.2;
  }
  pb.params.max_ratio = 4.135166556742356;  // |log(0.016)|
  pb.params.scale = 1;
  pb.params.clip = true;
  pb.params.max_h = 70;
  pb.params.max_w = 80;
  return pb;
}

cuda::DecodeIouArgs args_of(const Problem& pb) {
  cuda::DecodeIouArgs a{};
  a.pred = pb.pred.data();
  a.pl = PredLayout{1, 1, pb.P, pb.P * 4, 1, 0, 4};  // [N, P, 4]
  a.priors = pb.priors.data();
  a.prior_s0 = 4;
  a.prior_s1 = 1;
  a.prior_dim = 4;
  a.gts = pb.gts.data();
  a.gt_offsets = pb.offsets.data();
  a.N = pb.N;
  a.P = pb.P;
  a.params = pb.params;
  a.eps = 1e-6;
  return a;
}

void check_forward(const Problem& pb) {
  const auto a = args_of(pb);
  const CoderParams<float> cp = cast_params<float>(pb.params);
  const auto cvt = [](float v) { return v; };
  for (auto s : {tbd_emu::Schedule::kForward, tbd_emu::Schedule::kReverse,
                 tbd_emu::Schedule::kShuffle}) {
    tbd_emu::set_schedule(s, 11);
    std::vector<float> iou(pb.N * pb.P, -7.f);
    std::vector<int64_t> arg(pb.N * pb.P, -7);
    cuda::decode_max_iou_forward(cuda::DType::kFloat, a, iou.data(), arg.data(), nullptr);
    for (int64_t n = 0; n < pb.N; ++n) {
      for (int64_t p = 0; p < pb.P; ++p) {
        float d[4], r[4];
        load_pred(pb.pred.data(), a.pl, n, p, d, cvt);
        load_prior(pb.priors.data(), 4, 1, 4, p, r, cvt);
        const Box<float> b = decode_box(d, r, cp);
        ArgMax<float> best = argmax_empty<float>();
        for (int64_t g = pb.offsets[n]; g < pb.offsets[n + 1]; ++g) {
          const float* q = &pb.gts[g * 4];
          argmax_update(best, box_iou(b, Box<float>{q[0], q[1], q[2], q[3]}, 1e-6f),
                        g - pb.offsets[n]);
        }
        const float expect = best.index < 0 ? 0.f : best.value;
        ASSERT_EQ(arg[n * pb.P + p], best.index) << "n=" << n << " p=" << p;
        ASSERT_EQ(iou[n * pb.P + p], expect) << "n=" << n << " p=" << p;  // bit for bit
      }
    }
  }
  tbd_emu::set_schedule(tbd_emu::Schedule::kForward, 0);
}

// Ground truth `row` becomes the decoded box of prediction (n, p): its best match (IoU 1).
void plant_exact_match(Problem& pb, int64_t n, int64_t p, int64_t row) {
  const auto a = args_of(pb);
  const CoderParams<float> cp = cast_params<float>(pb.params);
  const auto cvt = [](float v) { return v; };
  float d[4], r[4];
  load_pred(pb.pred.data(), a.pl, n, p, d, cvt);
  load_prior(pb.priors.data(), 4, 1, 4, p, r, cvt);
  const Box<float> b = decode_box(d, r, cp);
  const float q[4] = {b.x1, b.y1, b.x2, b.y2};
  for (int k = 0; k < 4; ++k) pb.gts[row * 4 + k] = q[k];
}

TEST(Launchers, DecodeMaxIouForwardMoreThanOneTile) {
  Problem pb = make_problem(2, 300, {1500, 3}, 1);  // 1500 ground truths: two shared tiles
  // The best matches sit at the tile boundaries: the last box of the first
  // tile, the first of the second, the last of all.
  plant_exact_match(pb, 0, 7, 1023);
  plant_exact_match(pb, 0, 8, 1024);
  plant_exact_match(pb, 0, 9, 1499);
  check_forward(pb);
}

TEST(Launchers, DecodeMaxIouForwardMoreThanOneChunk) {
  std::vector<int64_t> counts(70);
  for (int i = 0; i < 70; ++i) counts[i] = i % 5;  // includes images without ground truth
  check_forward(make_problem(70, 37, counts, 2));     // 70 images: two chunks of 64
}

TEST(Launchers, DecodeMaxIouBackwardWritesEveryRequestedElement) {
  std::vector<int64_t> counts(70);
  for (int i = 0; i < 70; ++i) counts[i] = i % 4;
  const Problem pb = make_problem(70, 45, counts, 3);
  const auto a = args_of(pb);
  std::vector<float> iou(pb.N * pb.P);
  std::vector<int64_t> arg(pb.N * pb.P);
  cuda::decode_max_iou_forward(cuda::DType::kFloat, a, iou.data(), arg.data(), nullptr);
  std::vector<float> grad(pb.N * pb.P, 1.f), gpred(pb.N * pb.P * 4, NAN), gpri(pb.P * 4, NAN),
      ggt(pb.offsets.back() * 4, NAN);
  std::vector<max_align_t> ws(
      cuda::decode_max_iou_backward_workspace(cuda::DType::kFloat, a, true, true) /
          sizeof(max_align_t) + 1);
  cuda::decode_max_iou_backward(cuda::DType::kFloat, a, grad.data(), pb.P, 1, arg.data(),
                                gpred.data(), a.pl, gpri.data(), ggt.data(), ws.data(), nullptr);
  for (float v : gpred) ASSERT_FALSE(std::isnan(v));
  for (float v : gpri) ASSERT_FALSE(std::isnan(v));
  for (float v : ggt) ASSERT_FALSE(std::isnan(v));
  // The ground-truth gradient of row g is the sum over the predictions that matched it;
  // the prior gradient is the float sum over the images in order, rounded once.
  const CoderParams<float> cp = cast_params<float>(pb.params);
  const auto cvt = [](float v) { return v; };
  std::vector<double> expect(ggt.size(), 0.0);
  std::vector<float> expect_pri(gpri.size(), 0.f);
  for (int64_t n = 0; n < pb.N; ++n) {
    for (int64_t p = 0; p < pb.P; ++p) {
      const int64_t g = arg[n * pb.P + p];
      if (g < 0) continue;
      float d[4], r[4];
      load_pred(pb.pred.data(), a.pl, n, p, d, cvt);
      load_prior(pb.priors.data(), 4, 1, 4, p, r, cvt);
      const DecodedBox<float> db = decode_box_full(d, r, cp);
      const float* q = &pb.gts[(pb.offsets[n] + g) * 4];
      Box<float> gb, gg;
      box_iou_backward(db.box, Box<float>{q[0], q[1], q[2], q[3]}, 1e-6f, 1.f, gb, gg);
      float dp[4], dr[4] = {0.f, 0.f, 0.f, 0.f};
      decode_box_backward(d, r, cp, db, gb, dp, dr);
      for (int k = 0; k < 4; ++k) expect_pri[p * 4 + k] += dr[k];
      const int64_t row = pb.offsets[n] + g;
      expect[row * 4 + 0] += gg.x1;
      expect[row * 4 + 1] += gg.y1;
      expect[row * 4 + 2] += gg.x2;
      expect[row * 4 + 3] += gg.y2;
    }
  }
  for (size_t i = 0; i < gpri.size(); ++i) ASSERT_EQ(gpri[i], expect_pri[i]) << i;  // bit for bit
  for (size_t i = 0; i < ggt.size(); ++i) EXPECT_NEAR(ggt[i], expect[i], 1e-4 + 1e-4 * std::fabs(expect[i])) << i;
}

}  // namespace
