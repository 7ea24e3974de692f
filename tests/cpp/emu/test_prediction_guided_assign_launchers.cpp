// The prediction_guided_assign launcher on the emulator against a host loop
// over the shared headers: gt_inds exactly and q bit for bit, under the three
// schedules, with the shared-memory tile of bag members lowered far below the
// bag sizes (the tile loop) and at its default (bags held at once).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "emu/simt.h"
#include "prediction_guided_assign.h"
#include "tbd_ops/argmax.h"
#include "tbd_ops/assign.h"
#include "tbd_ops/box.h"

using namespace tbd_ops;

namespace {

struct Problem {
  std::vector<float> boxes, scores, pseudo;
  std::vector<int64_t> labels, p_off{0}, m_off{0};
  std::vector<uint8_t> valid;  // bool storage
  int64_t C = 4;
};

Problem make_problem(const std::vector<std::pair<int64_t, int64_t>>& sizes, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  Problem pb;
  for (auto [P, M] : sizes) {
    const int64_t g0 = pb.m_off.back();
    for (int64_t j = 0; j < M; ++j) {
      const float x = std::round(u(rng) * 50), y = std::round(u(rng) * 50);
      for (float v : {x, y, x + 5 + std::round(u(rng) * 25), y + 5 + std::round(u(rng) * 25)}) {
        pb.pseudo.push_back(v);
      }
      pb.labels.push_back(static_cast<int64_t>(u(rng) * pb.C) % pb.C);
    }
    for (int64_t p = 0; p < P; ++p) {
      if (M > 0 && p % 5 != 4) {
        const int64_t j = g0 + static_cast<int64_t>(u(rng) * M) % M;
        for (int k = 0; k < 4; ++k) pb.boxes.push_back(pb.pseudo[j * 4 + k] + std::round(u(rng) * 6 - 3));
      } else {
        const float x = u(rng) * 60, y = u(rng) * 60;
        for (float v : {x, y, x + 3 + u(rng) * 20, y + 3 + u(rng) * 20}) pb.boxes.push_back(v);
      }
      // Few distinct score rows: ties in q.
      const int row = static_cast<int>(u(rng) * 3);
      for (int64_t c = 0; c < pb.C; ++c) pb.scores.push_back(0.1f + 0.2f * ((row + c) % 4));
      pb.valid.push_back(u(rng) < 0.85f);
    }
    pb.p_off.push_back(pb.p_off.back() + P);
    pb.m_off.push_back(g0 + M);
  }
  return pb;
}

// Host loop: the algorithm of SPEC 2.1 over the same headers, in T.
template <typename T>
void expected(const Problem& pb, double thr, int64_t topk, double alpha, std::vector<int64_t>& gt,
              std::vector<T>& q) {
  const int64_t P = pb.p_off.back();
  gt.assign(P, 0);
  q.assign(P, T(0));
  std::vector<T> u(P, T(0));
  std::vector<int64_t> js(P, -1);
  for (size_t n = 0; n + 1 < pb.p_off.size(); ++n) {
    const int64_t g0 = pb.m_off[n], M = pb.m_off[n + 1] - g0;
    for (int64_t p = pb.p_off[n]; p < pb.p_off[n + 1]; ++p) {
      const float* b = &pb.boxes[p * 4];
      ArgMax<T> best = argmax_empty<T>();
      for (int64_t j = 0; j < M; ++j) {
        const float* g = &pb.pseudo[(g0 + j) * 4];
        argmax_update(best, box_iou(Box<T>{b[0], b[1], b[2], b[3]}, Box<T>{g[0], g[1], g[2], g[3]}, T(1e-6)), j);
      }
      if (best.index < 0) continue;
      u[p] = best.value;
      js[p] = best.index;
      q[p] = assign_quality(T(pb.scores[p * pb.C + pb.labels[g0 + best.index]]), best.value, alpha, 1.0 - alpha);
    }
    for (int64_t j = 0; j < M; ++j) {
      std::vector<int64_t> bag;
      for (int64_t p = pb.p_off[n]; p < pb.p_off[n + 1]; ++p) {
        if (js[p] == j && u[p] >= static_cast<T>(thr)) bag.push_back(p);
      }
      if (bag.empty()) continue;
      std::vector<int64_t> by_u = bag, by_q = bag;
      std::sort(by_u.begin(), by_u.end(), [&](int64_t a, int64_t c) { return ranks_before(u[a], a, u[c], c); });
      std::sort(by_q.begin(), by_q.end(), [&](int64_t a, int64_t c) { return ranks_before(q[a], a, q[c], c); });
      BagSum sum = bag_sum_empty();
      for (int64_t r = 0; r < std::min<int64_t>(topk, bag.size()); ++r) bag_sum_add(sum, u[by_u[r]]);
      const int64_t k = std::min<int64_t>(dynamic_k(sum), bag.size());
      for (int64_t r = 0; r < k; ++r) {
        if (pb.valid[by_q[r]]) gt[by_q[r]] = j + 1;
      }
    }
  }
}

// T = float: the problem as it is; T = double: its values converted (exactly).
template <typename T = float>
void check(const Problem& pb, double thr, int64_t topk, double alpha, int tile) {
  constexpr cuda::DType dt = std::is_same<T, double>::value ? cuda::DType::kDouble : cuda::DType::kFloat;
  const std::vector<T> boxes(pb.boxes.begin(), pb.boxes.end()), scores(pb.scores.begin(), pb.scores.end()),
      pseudo(pb.pseudo.begin(), pb.pseudo.end());
  cuda::AssignArgs a{};
  a.boxes = boxes.data();
  a.bs0 = 4;
  a.bs1 = 1;
  a.scores = scores.data();
  a.ss0 = pb.C;
  a.ss1 = 1;
  a.C = pb.C;
  a.pseudo_boxes = pseudo.data();
  a.pseudo_labels = pb.labels.data();
  a.valid = reinterpret_cast<const bool*>(pb.valid.data());
  a.p_offsets = pb.p_off.data();
  a.m_offsets = pb.m_off.data();
  a.N = static_cast<int64_t>(pb.p_off.size()) - 1;
  a.iou_thr = thr;
  a.alpha = alpha;
  a.eps = 1e-6;
  a.topk = topk;
  std::vector<int64_t> gt_e;
  std::vector<T> q_e;
  expected<T>(pb, thr, topk, alpha, gt_e, q_e);
  const int64_t P = pb.p_off.back();
  int64_t positives = 0;
  for (int64_t v : gt_e) positives += v > 0;
  EXPECT_GT(positives, 0);
  const size_t ws = cuda::prediction_guided_assign_workspace(dt, a);
  for (auto s : {tbd_emu::Schedule::kForward, tbd_emu::Schedule::kReverse, tbd_emu::Schedule::kShuffle}) {
    tbd_emu::set_schedule(s, 5);
    std::vector<int64_t> gt(P, -7);
    std::vector<T> q(P, T(-7));
    std::vector<double> work(ws / sizeof(double) + 1);
    cuda::prediction_guided_assign(dt, a, gt.data(), q.data(), work.data(), nullptr, tile);
    for (int64_t p = 0; p < P; ++p) {
      ASSERT_EQ(gt[p], gt_e[p]) << "p=" << p << " tile=" << tile;
      ASSERT_EQ(q[p], q_e[p]) << "p=" << p;  // bit for bit
    }
  }
  tbd_emu::set_schedule(tbd_emu::Schedule::kForward, 0);
}

TEST(AssignLauncher, TileLoopAgreesWithHost) {
  const Problem pb = make_problem({{300, 3}, {0, 2}, {45, 0}, {611, 5}, {1, 1}}, 7);
  for (int tile : {1, 7, 256, 0, cuda::kAssignMaxTile}) {
    check(pb, 0.4, 12, 0.5, tile);
    check(pb, 0.3, 400, 0.3, tile);  // large k: many positives ranked across tiles
  }
}

// float64 members are 24 bytes: the largest tile is 48 KiB of dynamic shared
// memory, which with the kernel's static shared memory needs the opt-in.
TEST(AssignLauncher, Float64LargestTileOptsIn) {
  const Problem pb = make_problem({{300, 3}, {0, 2}, {611, 5}}, 11);
  for (int tile : {7, 0, cuda::kAssignMaxTile}) check<double>(pb, 0.4, 12, 0.5, tile);
}

TEST(AssignLauncher, TileAboveTheMaximumThrows) {
  const Problem pb = make_problem({{20, 2}}, 3);
  cuda::AssignArgs a{};
  a.boxes = pb.boxes.data();
  a.bs0 = 4;
  a.bs1 = 1;
  a.scores = pb.scores.data();
  a.ss0 = pb.C;
  a.ss1 = 1;
  a.C = pb.C;
  a.pseudo_boxes = pb.pseudo.data();
  a.pseudo_labels = pb.labels.data();
  a.p_offsets = pb.p_off.data();
  a.m_offsets = pb.m_off.data();
  a.N = 1;
  a.iou_thr = 0.4;
  a.alpha = 0.5;
  a.eps = 1e-6;
  a.topk = 12;
  std::vector<int64_t> gt(20);
  std::vector<float> q(20);
  std::vector<double> work(cuda::prediction_guided_assign_workspace(cuda::DType::kFloat, a) / 8 + 1);
  EXPECT_THROW(cuda::prediction_guided_assign(cuda::DType::kFloat, a, gt.data(), q.data(), work.data(),
                                              nullptr, cuda::kAssignMaxTile + 1),
               std::invalid_argument);
}

TEST(AssignLauncher, ManyImages) {
  std::vector<std::pair<int64_t, int64_t>> sizes;
  for (int i = 0; i < 140; ++i) sizes.push_back({(i * 7) % 13, i % 3});
  check(make_problem(sizes, 9), 0.4, 12, 0.5, 0);
}

}  // namespace
