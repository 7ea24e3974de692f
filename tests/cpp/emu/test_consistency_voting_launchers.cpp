// The consistency_voting launchers on the emulator against host loops over
// the shared headers (tbd_ops/voting.h, tbd_ops/box.h), under the three
// schedules: more images than one launch takes (kChunkImages), an image of
// more RoIs than a block has threads, and gt_inds outside [0, M_n].
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "consistency_voting.h"
#include "emu/simt.h"
#include "tbd_ops/box.h"
#include "tbd_ops/voting.h"

using namespace tbd_ops;

namespace {

const tbd_emu::Schedule kSchedules[] = {tbd_emu::Schedule::kForward, tbd_emu::Schedule::kReverse,
                                        tbd_emu::Schedule::kShuffle};

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
