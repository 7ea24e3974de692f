// The CUDA launchers of harmony_distillation_loss, run on the emulator under
// all three schedules, against a host loop over the shared header
// (tbd_ops/harmony.h): the loss and normalizers (sums in another order: close)
// with levels spanning several blocks (small chunks), more levels than one
// launch holds, empty levels and N = 0; the gradients bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "harmony_loss.h"
#include "tbd_ops/harmony.h"
#include "emu/simt.h"

using namespace tbd_ops;

namespace {

struct Problem {
  int64_t N;
  std::vector<std::pair<int64_t, int64_t>> hw;
  std::vector<std::vector<double>> maps[4];  // contiguous [N, H, W] per level
};

Problem make_problem(int64_t N, std::vector<std::pair<int64_t, int64_t>> hw, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  Problem pb;
  pb.N = N;
  pb.hw = hw;
  for (auto& m : pb.maps) {
    for (auto [h, w] : hw) {
      std::vector<double> v(N * h * w);
      for (auto& x : v) x = u(rng);
      m.push_back(v);
    }
  }
  // Image 0 of every level without ground truth (p_r^t = 0).
  for (size_t l = 0; l < hw.size(); ++l) {
    const int64_t hw_l = hw[l].first * hw[l].second;
    for (int64_t i = 0; i < hw_l && N > 0; ++i) pb.maps[3][l][i] = 0.0;
  }
  return pb;
}

template <typename T> struct Typed {
  std::vector<std::vector<T>> maps[4];
  std::vector<cuda::HarmonyLevel> levels;
};

template <typename T> Typed<T> typed(const Problem& pb) {
  Typed<T> t;
  for (int k = 0; k < 4; ++k) {
    for (const auto& v : pb.maps[k]) t.maps[k].emplace_back(v.begin(), v.end());
  }
  for (size_t l = 0; l < pb.hw.size(); ++l) {
    cuda::HarmonyLevel lv{};
    const auto [h, w] = pb.hw[l];
    for (int k = 0; k < 4; ++k) {
      lv.maps[k] = t.maps[k][l].data();
      lv.st[k][0] = h * w;
      lv.st[k][1] = w;
      lv.st[k][2] = 1;
    }
    lv.H = h;
    lv.W = w;
    t.levels.push_back(lv);
  }
  return t;
}

template <typename T> cuda::DType dtype_of();
template <> cuda::DType dtype_of<float>() { return cuda::DType::kFloat; }
template <> cuda::DType dtype_of<double>() { return cuda::DType::kDouble; }

// Host reference in long double: loss and norm per (level, image).
template <HarmonyMode M, typename T>
long double host_loss(const Problem& pb, const Typed<T>& t, double eps, std::vector<long double>& norm) {
  long double total = 0;
  norm.assign(pb.hw.size() * pb.N, 0);
  for (size_t l = 0; l < pb.hw.size(); ++l) {
    const int64_t hw = pb.hw[l].first * pb.hw[l].second;
    for (int64_t n = 0; n < pb.N; ++n) {
      long double s = 0, ws = 0;
      for (int64_t i = 0; i < hw; ++i) {
        const long double c_s = t.maps[0][l][n * hw + i], r_s = t.maps[1][l][n * hw + i];
        const long double c_t = t.maps[2][l][n * hw + i], r_t = t.maps[3][l][n * hw + i];
        const long double w = M == HarmonyMode::kPlain ? 1.0L : r_t * std::sqrt(1.0L + std::fabs(c_t - c_s));
        const long double hs_s = 1 - std::tanh(std::fabs(r_s - c_s)), hs_t = 1 - std::tanh(std::fabs(r_t - c_t));
        s += w * std::fabs(hs_t - hs_s);
        ws += w;
      }
      long double nm = 0;
      if (hw > 0) nm = 1.0L / ((M == HarmonyMode::kPlain ? (long double)hw : std::max<long double>(ws, eps)) * pb.N);
      norm[l * pb.N + n] = nm;
      total += s * nm;
    }
  }
  return total;
}

template <HarmonyMode M, typename T> void check(const Problem& pb, int64_t chunk) {
  const Typed<T> t = typed<T>(pb);
  const int64_t L = static_cast<int64_t>(pb.hw.size());
  cuda::HarmonyArgs a{t.levels.data(), L, pb.N, M, 1e-6, chunk};
  std::vector<long double> norm_ref;
  const long double loss_ref = host_loss<M>(pb, t, 1e-6, norm_ref);
  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-12;
  std::vector<T> first_norm;
  T first_loss = 0;
  for (auto s : {tbd_emu::Schedule::kForward, tbd_emu::Schedule::kReverse, tbd_emu::Schedule::kShuffle}) {
    tbd_emu::set_schedule(s, 5);
    std::vector<T> ws(cuda::harmony_loss_workspace(a), T(NAN));
    std::vector<T> norm(L * pb.N, T(NAN));
    T loss = T(NAN);
    cuda::harmony_loss_forward(dtype_of<T>(), a, &loss, norm.data(), ws.data(), nullptr);
    ASSERT_NEAR(static_cast<double>(loss), static_cast<double>(loss_ref), tol * (1 + std::fabs((double)loss_ref)));
    for (size_t i = 0; i < norm.size(); ++i) {
      ASSERT_NEAR(norm[i], static_cast<double>(norm_ref[i]), tol * std::fabs((double)norm_ref[i])) << i;
    }
    if (s == tbd_emu::Schedule::kForward) {
      first_norm = norm;
      first_loss = loss;
    } else {  // every schedule: the same bits
      ASSERT_EQ(loss, first_loss);
      ASSERT_EQ(norm, first_norm);
    }
  }
  tbd_emu::set_schedule(tbd_emu::Schedule::kForward, 0);

  // Backward: every element of both gradients, bit for bit with the header.
  Typed<T> g = typed<T>(pb);
  std::vector<std::vector<T>> gc(L), gr(L);
  std::vector<cuda::HarmonyLevel> levels = t.levels;
  for (int64_t l = 0; l < L; ++l) {
    const auto [h, w] = pb.hw[l];
    gc[l].assign(pb.N * h * w, T(NAN));
    gr[l].assign(pb.N * h * w, T(NAN));
    levels[l].grads[0] = gc[l].data();
    levels[l].grads[1] = gr[l].data();
    for (int k = 0; k < 2; ++k) {
      levels[l].gst[k][0] = h * w;
      levels[l].gst[k][1] = w;
      levels[l].gst[k][2] = 1;
    }
  }
  cuda::HarmonyArgs b = a;
  b.levels = levels.data();
  const T grad = T(0.75);
  cuda::harmony_loss_backward(dtype_of<T>(), b, &grad, first_norm.data(), pb.N, 1, nullptr);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t hw = pb.hw[l].first * pb.hw[l].second;
    for (int64_t n = 0; n < pb.N; ++n) {
      const T coef = grad * first_norm[l * pb.N + n];
      for (int64_t i = 0; i < hw; ++i) {
        const int64_t o = n * hw + i;
        const T c_s = t.maps[0][l][o], r_s = t.maps[1][l][o], c_t = t.maps[2][l][o], r_t = t.maps[3][l][o];
        const T d = hd_grad_pr(coef, hd_weight<M>(c_s, c_t, r_t), c_s, r_s, harmony_score(c_t, r_t));
        ASSERT_EQ(gr[l][o], d) << "l=" << l << " n=" << n << " i=" << i;
        ASSERT_EQ(gc[l][o], -d) << "l=" << l << " n=" << n << " i=" << i;
      }
    }
  }
}

const std::vector<std::pair<int64_t, int64_t>> kOdd = {{7, 5}, {1, 1}, {13, 3}, {0, 4}, {19, 23}};

TEST(HarmonyLaunchers, LevelsSpanningSeveralBlocks) {
  // Chunks of 1 .. 300 locations: up to 437 blocks per image and level,
  // partial last blocks, chunks beyond the block's 256 threads.
  const Problem pb = make_problem(3, kOdd, 1);
  for (int64_t chunk : {int64_t(1), int64_t(7), int64_t(256), int64_t(300)}) {
    SCOPED_TRACE(chunk);
    check<HarmonyMode::kIouGuided, float>(pb, chunk);
    check<HarmonyMode::kPlain, float>(pb, chunk);
    check<HarmonyMode::kIouGuided, double>(pb, chunk);
  }
}

TEST(HarmonyLaunchers, LevelOfSeveralDefaultChunks) {
  const Problem pb = make_problem(2, {{61, 67}, {3, 5}}, 6);  // 4087 locations: two blocks of 2048
  check<HarmonyMode::kIouGuided, float>(pb, 0);
  check<HarmonyMode::kPlain, double>(pb, 0);
}

TEST(HarmonyLaunchers, MoreLevelsThanOneLaunchHolds) {
  std::vector<std::pair<int64_t, int64_t>> hw;
  for (int l = 0; l < 2 * cuda::kHarmonyMaxLevels + 3; ++l) hw.push_back({1 + l % 5, 2 + (l * 3) % 7});
  hw[cuda::kHarmonyMaxLevels] = {0, 3};  // an empty level first in the second launch
  const Problem pb = make_problem(2, hw, 2);
  check<HarmonyMode::kIouGuided, double>(pb, 3);
  check<HarmonyMode::kPlain, float>(pb, 0);
}

TEST(HarmonyLaunchers, NoImagesGivesZero) {
  const Problem pb = make_problem(0, kOdd, 3);
  const Typed<float> t = typed<float>(pb);
  cuda::HarmonyArgs a{t.levels.data(), static_cast<int64_t>(kOdd.size()), 0, HarmonyMode::kIouGuided, 1e-6, 0};
  std::vector<float> ws(cuda::harmony_loss_workspace(a) + 1);
  float loss = NAN;
  cuda::harmony_loss_forward(cuda::DType::kFloat, a, &loss, nullptr, ws.data(), nullptr);
  EXPECT_EQ(loss, 0.f);
}

TEST(HarmonyLaunchers, NegativeChunkThrows) {
  const Problem pb = make_problem(1, {{2, 2}}, 4);
  const Typed<float> t = typed<float>(pb);
  cuda::HarmonyArgs a{t.levels.data(), 1, 1, HarmonyMode::kPlain, 1e-6, -1};
  EXPECT_THROW(cuda::harmony_loss_workspace(a), std::invalid_argument);
}

}  // namespace
