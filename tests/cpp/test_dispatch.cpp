// tbd_ops/dispatch.h: a run-time mode reaches the code compiled for it.
#include "tbd_ops/dispatch.h"

#include <gtest/gtest.h>

#include <stdexcept>

#include "tbd_ops/harmony.h"
#include "tbd_ops/masked_reduce.h"

namespace {

using namespace tbd_ops;

template <MaskedMode M> int compiled_for() { return static_cast<int>(M) + 10; }

TEST(Dispatch, EachModeReachesItsInstantiation) {
  for (MaskedMode m : {MaskedMode::kSqDist, MaskedMode::kL1}) {
    int got = -1;
    dispatch_masked_mode(m, [&](auto tag) {
      constexpr MaskedMode kM = decltype(tag)::value;  // a compile-time constant
      got = compiled_for<kM>();
    });
    EXPECT_EQ(got, static_cast<int>(m) + 10);
  }
  int calls = 0;
  dispatch_mode<HarmonyMode::kIouGuided, HarmonyMode::kPlain>(HarmonyMode::kPlain, [&](auto tag) {
    EXPECT_EQ(decltype(tag)::value, HarmonyMode::kPlain);
    ++calls;
  });
  EXPECT_EQ(calls, 1);  // exactly once
}

TEST(Dispatch, UnknownModeThrows) {
  const auto bad = static_cast<MaskedMode>(7);
  const auto call = [&] { dispatch_masked_mode(bad, [](auto) {}); };
  EXPECT_THROW(call(), std::invalid_argument);
}

}  // namespace
