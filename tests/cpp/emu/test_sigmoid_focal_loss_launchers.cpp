// The sigmoid_focal_loss launchers on the emulator against host loops over
// the shared header (tbd_ops/focal.h), under the three schedules: past the
// grid-stride bound of the partial sums (several elements per thread) and a
// row with a target outside [0, C].
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <cstdint>
#include <random>
#include <vector>

#include "emu/simt.h"
#include "sigmoid_focal_loss.h"
#include "tbd_ops/focal.h"

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

}  // namespace
