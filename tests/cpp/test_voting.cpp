// tbd_ops/voting.h: the mean IoU of a pseudo box, the per-RoI weight of both
// modes, the batch factor and the positive test.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "tbd_ops/voting.h"

namespace {

using namespace tbd_ops;

TEST(Voting, MeanOfNoPositiveIsZero) {
  EXPECT_EQ(voting_mean(0.0f, 0), 0.0f);
  EXPECT_EQ(voting_mean(1.5, 3), 0.5);
  EXPECT_EQ(voting_mean(0.7f, 1), 0.7f);
  EXPECT_TRUE(std::isnan(voting_mean(std::nan(""), 2)));
}

TEST(Voting, WeightModes) {
  EXPECT_EQ(voting_weight(0.6, VotingMode::kPseCo), 0.6 * 0.6);
  EXPECT_EQ(voting_weight(0.6, VotingMode::kPaper), 0.6);
  EXPECT_EQ(voting_weight(0.0f, VotingMode::kPseCo), 0.0f);
}

TEST(Voting, BatchFactor) {
  // sum s / max(sum s^2, eps)
  EXPECT_DOUBLE_EQ(voting_scale(1.5, 0.9, VotingMode::kPseCo), 1.5 / 0.9);
  EXPECT_EQ(voting_scale(0.0, 0.0, VotingMode::kPseCo), 0.0);  // no positives
  EXPECT_DOUBLE_EQ(voting_scale(1e-4, 1e-8, VotingMode::kPseCo), 1e-4 / 1e-6);  // eps clamp
  EXPECT_EQ(voting_scale(3.0f, 2.0f, VotingMode::kPaper), 1.0f);
  EXPECT_EQ(voting_scale(0.0f, 0.0f, VotingMode::kPaper), 1.0f);
  EXPECT_TRUE(std::isnan(voting_scale(std::nan(""), 1.0, VotingMode::kPseCo)));
  EXPECT_TRUE(std::isnan(voting_scale(1.0, std::nan(""), VotingMode::kPseCo)));
  // Equal sigma s everywhere: the factor is 1 / s.
  const double s = 0.8;
  EXPECT_NEAR(voting_scale(5 * s, 5 * s * s, VotingMode::kPseCo), 1 / s, 1e-15);
}

TEST(Voting, Positive) {
  EXPECT_FALSE(voting_positive(0, 3));
  EXPECT_TRUE(voting_positive(1, 3));
  EXPECT_TRUE(voting_positive(3, 3));
  EXPECT_FALSE(voting_positive(4, 3));
  EXPECT_FALSE(voting_positive(-1, 3));
  EXPECT_FALSE(voting_positive(1, 0));
  EXPECT_FALSE(voting_positive(std::numeric_limits<int64_t>::min(), 3));
}

}  // namespace
