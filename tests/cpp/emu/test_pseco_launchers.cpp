// The sigmoid_focal_loss and consistency_voting launchers on the emulator
// against host loops over the shared headers, under the three schedules:
// focal loss past the grid-stride bound of its partial sums (several elements
// per thread) and a row with a target outside [0, C]; voting with more images
// than one launch takes (kVotingChunk), an image of more RoIs than a block has
// threads, and gt_inds outside [0, M_n].
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <random>
#include <vector>

#include "consistency_voting.h"
#include "emu/simt.h"
#include "sigmoid_focal_loss.h"
#include "tbd_ops/box.h"
#include "tbd_ops/focal.h"
#include "tbd_ops/voting.h"

using namespace tbd_ops;

namespace {

const tbd_emu::Schedule kSchedules[] = {tbd_emu::Schedule::kForward, tbd_emu::Schedule::kReverse,
                                        tbd_emu::Schedule::kShuffle};

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

TEST(FocalLauncher, ManyElementsPerThreadAndBadTarget) {
  const int64_t R = 2100, C = 130;  // R * C > 1024 blocks * 256 threads
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 4.f);
  std::uniform_real_distribution<float> ud(0.1f, 1.1f);
  std::vector<float> x(R * C), w(R), grad(R * C);
  std::vector<int64_t> t(R);
  for (auto& v : x) v = nd(rng);
  for (auto& v : grad) v = nd(rng);
  for (int64_t r = 0; r < R; ++r) {
    w[r] = ud(rng);
    t[r] = static_cast<int64_t>(rng() % (C + 1));
  }
  const int64_t bad = 777;
  t[bad] = C + 3;
  cuda::FocalArgs a{};
  a.logits = x.data();
  a.xs0 = C;
  a.xs1 = 1;
  a.targets = t.data();
  a.ts0 = 1;
  a.weight = w.data();
  a.R = R;
  a.C = C;
  a.gamma = 2.0;
  a.alpha = 0.25;
  // Host values.
  std::vector<float> loss(R * C), dx(R * C), dw(R);
  double total = 0;
  for (int64_t r = 0; r < R; ++r) {
    float acc = 0.f;
    for (int64_t c = 0; c < C; ++c) {
      const bool ok = focal_target_ok(t[r], C);
      const float l = ok ? focal_loss(x[r * C + c], t[r] == c, 2.0f, 0.25f) : NAN;
      const float d = ok ? focal_grad(x[r * C + c], t[r] == c, 2.0f, 0.25f) : NAN;
      loss[r * C + c] = l * w[r];
      dx[r * C + c] = grad[r * C + c] * w[r] * d;
      acc += grad[r * C + c] * l;
      if (r != bad) total += static_cast<double>(l) * w[r];
    }
    dw[r] = acc;
  }
  for (auto s : kSchedules) {
    tbd_emu::set_schedule(s, 3);
    a.reduction = FocalReduction::kNone;
    std::vector<float> out(R * C, -7.f), gx(R * C, -7.f), gw(R, -7.f);
    cuda::sigmoid_focal_loss_forward(cuda::DType::kFloat, a, out.data(), nullptr, nullptr);
    cuda::sigmoid_focal_loss_backward(cuda::DType::kFloat, a, grad.data(), C, 1, gx.data(), gw.data(),
                                      nullptr);
    for (int64_t i = 0; i < R * C; ++i) {
      ASSERT_TRUE(same_bits(out[i], loss[i])) << i;
      ASSERT_TRUE(same_bits(gx[i], dx[i])) << i;
    }
    for (int64_t r = 0; r < R; ++r) ASSERT_TRUE(same_bits(gw[r], dw[r])) << r;
    EXPECT_TRUE(std::isnan(out[bad * C]) && std::isnan(gx[bad * C + 5]) && std::isnan(gw[bad]));
    // Sum and mean without the bad row (its NaN would swallow them).
    std::vector<int64_t> t_ok = t;
    t_ok[bad] = C;
    cuda::FocalArgs b = a;
    b.targets = t_ok.data();
    double expect = total;
    for (int64_t c = 0; c < C; ++c) {
      expect += static_cast<double>(focal_loss(x[bad * C + c], false, 2.0f, 0.25f)) * w[bad];
    }
    for (auto red : {FocalReduction::kSum, FocalReduction::kMean}) {
      b.reduction = red;
      std::vector<float> part(cuda::focal_partials(b), -7.f);
      float v = -7.f;
      cuda::sigmoid_focal_loss_forward(cuda::DType::kFloat, b, &v, part.data(), nullptr);
      const double want = red == FocalReduction::kMean ? expect / (R * C) : expect;
      EXPECT_NEAR(v, want, 1e-5 * std::fabs(want));
    }
    // The scalar incoming gradient of "mean", read on the device.
    b.reduction = FocalReduction::kMean;
    const float g0 = 3.5f;
    std::vector<float> gx2(R * C, -7.f);
    cuda::sigmoid_focal_loss_backward(cuda::DType::kFloat, b, &g0, 0, 0, gx2.data(), nullptr, nullptr);
    const float gs = g0 / static_cast<float>(R * C);
    for (int64_t i = 0; i < R * C; i += 97) {
      const int64_t r = i / C, c = i % C;
      ASSERT_TRUE(same_bits(gx2[i], gs * w[r] * focal_grad(x[i], t_ok[r] == c, 2.0f, 0.25f))) << i;
    }
  }
  tbd_emu::set_schedule(tbd_emu::Schedule::kForward, 0);
}

TEST(VotingLauncher, ManyImagesLargeImageAndBadIndices) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  std::vector<double> boxes, pseudo;
  std::vector<int64_t> gt, r_off{0}, m_off{0};
  for (int i = 0; i < 150; ++i) {
    const int64_t R = i == 70 ? 1000 : (i * 7) % 13, M = i == 70 ? 6 : i % 4;
    for (int64_t j = 0; j < M; ++j) {
      const double x = ud(rng) * 50, y = ud(rng) * 50;
      for (double v : {x, y, x + 5 + ud(rng) * 20, y + 5 + ud(rng) * 20}) pseudo.push_back(v);
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t g = M ? static_cast<int64_t>(rng() % (M + 1)) : 0;
      gt.push_back(g);
      const double* q = g ? &pseudo[(m_off.back() + g - 1) * 4] : nullptr;
      for (int k = 0; k < 4; ++k) boxes.push_back((q ? q[k] : 20.0) + ud(rng) * 6 - 3);
    }
    r_off.push_back(r_off.back() + R);
    m_off.push_back(m_off.back() + M);
  }
  gt[r_off[70] + 3] = 99;  // outside [0, M]: background
  gt[r_off[70] + 4] = -2;
  const int64_t R = r_off.back(), M = m_off.back();
  // Host: sums per pseudo box in RoI order, then w and the batch factor.
  std::vector<double> sum(M, 0), sig(M, 0), w_e(R, 0);
  std::vector<int64_t> cnt(M, 0);
  double num = 0, den = 0;
  for (size_t n = 0; n + 1 < r_off.size(); ++n) {
    const int64_t Mn = m_off[n + 1] - m_off[n];
    for (int64_t r = r_off[n]; r < r_off[n + 1]; ++r) {
      if (!voting_positive(gt[r], Mn)) continue;
      const double* b = &boxes[r * 4];
      const double* q = &pseudo[(m_off[n] + gt[r] - 1) * 4];
      sum[m_off[n] + gt[r] - 1] += box_iou(Box<double>{b[0], b[1], b[2], b[3]},
                                           Box<double>{q[0], q[1], q[2], q[3]}, 1e-6);
      ++cnt[m_off[n] + gt[r] - 1];
    }
  }
  for (int64_t j = 0; j < M; ++j) sig[j] = voting_mean(sum[j], cnt[j]);
  for (size_t n = 0; n + 1 < r_off.size(); ++n) {
    for (int64_t r = r_off[n]; r < r_off[n + 1]; ++r) {
      if (!voting_positive(gt[r], m_off[n + 1] - m_off[n])) continue;
      const double s = sig[m_off[n] + gt[r] - 1];
      w_e[r] = s * s;
      num += s;
      den += s * s;
    }
  }
  cuda::VotingArgs a{};
  a.pred_boxes = boxes.data();
  a.bs0 = 4;
  a.bs1 = 1;
  a.gt_inds = gt.data();
  a.gs0 = 1;
  a.pseudo_boxes = pseudo.data();
  a.r_offsets = r_off.data();
  a.m_offsets = m_off.data();
  a.N = static_cast<int64_t>(r_off.size()) - 1;
  a.eps = 1e-6;
  for (auto mode : {VotingMode::kPseCo, VotingMode::kPaper}) {
    a.mode = mode;
    for (auto s : kSchedules) {
      tbd_emu::set_schedule(s, 9);
      std::vector<double> sigma(M, -7), w(R, -7), sr(R, -7);
      double scale = -7;
      cuda::consistency_voting(cuda::DType::kDouble, a, sigma.data(), w.data(), &scale, sr.data(), nullptr);
      for (int64_t j = 0; j < M; ++j) ASSERT_NEAR(sigma[j], sig[j], 1e-14) << j;
      for (int64_t r = 0; r < R; ++r) {
        const double want = mode == VotingMode::kPseCo ? w_e[r] : std::sqrt(w_e[r]);
        ASSERT_NEAR(w[r], want, 1e-14) << r;
      }
      EXPECT_EQ(w[r_off[70] + 3], 0.0);
      EXPECT_EQ(w[r_off[70] + 4], 0.0);
      EXPECT_NEAR(scale, mode == VotingMode::kPseCo ? num / den : 1.0, 1e-12);
    }
  }
  tbd_emu::set_schedule(tbd_emu::Schedule::kForward, 0);
}

}  // namespace
