// The SIMT emulator itself: builtins, barriers, warp collectives, schedules,
// shared memory poisoning, and every error it must report (file:line, never a
// hang). Kernels here are plain CUDA, as in cuda/*.cu.
#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "backend.cuh"
#include "reduce.cuh"

using tbd_emu::Schedule;
using namespace tbd_ops::cuda;

namespace {

const Schedule kSchedules[] = {Schedule::kForward, Schedule::kReverse, Schedule::kShuffle};

struct ScheduleGuard {
  ~ScheduleGuard() { tbd_emu::set_schedule(Schedule::kForward, 0); }
};

// Runs f under each schedule and returns the results.
template <typename F> std::vector<std::vector<float>> under_all(F f) {
  ScheduleGuard g;
  std::vector<std::vector<float>> out;
  for (Schedule s : kSchedules) {
    tbd_emu::set_schedule(s, 42);
    out.push_back(f());
  }
  return out;
}

// Expects `stmt` to throw a KernelError whose message starts with this file and
// `line` and contains `what`.
#define EXPECT_KERNEL_ERROR(stmt, line, needle)                                            \
  do {                                                                                   \
    try {                                                                                \
      stmt;                                                                              \
      ADD_FAILURE() << "no error from " #stmt;                                           \
    } catch (const tbd_emu::KernelError& e) {                                            \
      const std::string msg = e.what();                                                  \
      EXPECT_NE(msg.find(std::string(__FILE__) + ":" + std::to_string(line) + ":"),     \
                std::string::npos)                                                       \
          << msg;                                                                        \
      EXPECT_NE(msg.find(needle), std::string::npos) << msg;                             \
    }                                                                                    \
  } while (0)

__global__ void index_kernel(int* out) {
  const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const int nt = blockDim.x * blockDim.y * blockDim.z;
  out[b * nt + t] = b * 1000 + t;
}

TEST(Emulator, BuiltinIndices3D) {
  const dim3 grid(2, 3, 2), block(4, 2, 3);
  std::vector<int> out(12 * 24, -1);
  launch_kernel(index_kernel, grid, block, 0, nullptr, out.data());
  for (int b = 0; b < 12; ++b)
    for (int t = 0; t < 24; ++t) EXPECT_EQ(out[b * 24 + t], b * 1000 + t);
}

// Reverses 64 values through shared memory; with_barrier=false drops the
// __syncthreads between the store and the load.
template <bool kBarrier> __global__ void reverse_kernel(const float* in, float* out) {
  __shared__ SharedArray<float, 64> buf;
  buf[threadIdx.x] = in[threadIdx.x];
  if (kBarrier) __syncthreads();
  out[threadIdx.x] = buf[63 - threadIdx.x];
}

template <bool kBarrier> std::vector<float> run_reverse() {
  std::vector<float> in(64), out(64, 0.f);
  for (int i = 0; i < 64; ++i) in[i] = float(i);
  launch_kernel((reverse_kernel<kBarrier>), 1, 64, 0, nullptr, in.data(), out.data());
  return out;
}

TEST(Emulator, BarrierMakesSharedStoresVisibleUnderEverySchedule) {
  for (const auto& out : under_all(run_reverse<true>)) {
    for (int i = 0; i < 64; ++i) EXPECT_EQ(out[i], float(63 - i));
  }
}

TEST(Emulator, MissingBarrierShowsAsScheduleDependentResult) {
  const auto r = under_all(run_reverse<false>);
  const bool all_equal = r[0] == r[1] && r[1] == r[2];
  EXPECT_FALSE(all_equal) << "the three schedules cannot tell a missing __syncthreads";
}

__global__ void shuffle_kernel(int* out) {
  const int lane = threadIdx.x;
  out[0 * 32 + lane] = __shfl_down_sync(0xffffffffu, lane * 10, 3);
  out[1 * 32 + lane] = __shfl_xor_sync(0xffffffffu, lane * 10, 5);
  out[2 * 32 + lane] = __shfl_sync(0xffffffffu, lane * 10, 7);
  out[3 * 32 + lane] = __shfl_up_sync(0xffffffffu, lane * 10, 2, 8);  // width 8
  out[4 * 32 + lane] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
}

TEST(Emulator, WarpShufflesAndBallot) {
  std::vector<int> out(5 * 32);
  launch_kernel(shuffle_kernel, 1, 32, 0, nullptr, out.data());
  unsigned ballot = 0;
  for (int l = 0; l < 32; l += 3) ballot |= 1u << l;
  for (int l = 0; l < 32; ++l) {
    EXPECT_EQ(out[l], (l + 3 < 32 ? l + 3 : l) * 10);
    EXPECT_EQ(out[32 + l], (l ^ 5) * 10);
    EXPECT_EQ(out[64 + l], 70);
    EXPECT_EQ(out[96 + l], (l % 8 >= 2 ? l - 2 : l) * 10);
    EXPECT_EQ(static_cast<unsigned>(out[128 + l]), ballot);
  }
}

template <typename T> __global__ void block_sum_kernel(const T* in, T* out) {
  const T s = block_sum<256>(in[blockIdx.x * 256 + threadIdx.x]);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// The same fixed order on the host: a shuffle-down tree per warp, warps in order.
template <typename T> T tree_sum(const T* v) {
  T warp[8];
  for (int w = 0; w < 8; ++w) {
    T lane[32];
    for (int l = 0; l < 32; ++l) lane[l] = v[w * 32 + l];
    for (int off = 16; off > 0; off >>= 1)
      for (int l = 0; l < 32; ++l) lane[l] = lane[l] + (l + off < 32 ? lane[l + off] : lane[l]);
    warp[w] = lane[0];
  }
  T acc = warp[0];
  for (int w = 1; w < 8; ++w) acc = acc + warp[w];
  return acc;
}

template <typename T> void check_block_sum() {
  std::vector<T> in(3 * 256);
  for (size_t i = 0; i < in.size(); ++i) in[i] = T(1) / T(i + 3) * (i % 2 ? T(1) : T(-0.7));
  std::vector<T> first;
  ScheduleGuard g;
  for (Schedule s : kSchedules) {
    tbd_emu::set_schedule(s, 7);
    std::vector<T> out(3);
    launch_kernel((block_sum_kernel<T>), 3, 256, 0, nullptr, in.data(), out.data());
    for (int b = 0; b < 3; ++b) EXPECT_EQ(out[b], tree_sum(in.data() + b * 256)) << b;
    if (first.empty()) first = out;
    EXPECT_EQ(out, first);  // bitwise: the order is fixed
  }
}

TEST(Emulator, BlockSumIsAFixedTreeFloat) { check_block_sum<float>(); }
TEST(Emulator, BlockSumIsAFixedTreeDouble) { check_block_sum<double>(); }

__global__ void atomic_kernel(int* counter) { atomicAdd(counter, static_cast<int>(threadIdx.x)); }

TEST(Emulator, AtomicAdd) {
  int c = 0;
  launch_kernel(atomic_kernel, 4, 128, 0, nullptr, &c);
  EXPECT_EQ(c, 4 * (127 * 128 / 2));
}

// Every block reads its dynamic and static shared memory before writing it.
__global__ void poison_kernel(uint32_t* seen) {
  uint32_t* dyn = dynamic_smem<uint32_t>();
  __shared__ SharedArray<uint32_t, 4> st;
  if (threadIdx.x == 0) {
    seen[blockIdx.x * 2] = dyn[3];
    seen[blockIdx.x * 2 + 1] = st[3];
    dyn[3] = 5;
    st[3] = 6;
  }
}

TEST(Emulator, SharedMemoryPoisonedForEveryBlock) {
  std::vector<uint32_t> seen(6, 0);
  launch_kernel(poison_kernel, 3, 32, 16, nullptr, seen.data());
  for (uint32_t v : seen) EXPECT_EQ(v, 0xffffffffu);
}

// ---- errors ------------------------------------------------------------------------------
constexpr int kDivergentLine = __LINE__ + 5;  // the second site (forward schedule)
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

TEST(EmulatorErrors, DivergentBarrier) {
  EXPECT_KERNEL_ERROR(launch_kernel(divergent_barrier_kernel, 1, 64, 0, nullptr), kDivergentLine,
                      "divergent __syncthreads");
}

constexpr int kExitLine = __LINE__ + 3;
__global__ void barrier_after_exit_kernel() {
  if (threadIdx.x == 5) return;
  __syncthreads();
}

TEST(EmulatorErrors, BarrierAfterSomeThreadsExited) {
  ScheduleGuard g;
  for (Schedule s : kSchedules) {
    tbd_emu::set_schedule(s, 3);
    try {
      launch_kernel(barrier_after_exit_kernel, 1, 64, 0, nullptr);
      ADD_FAILURE() << "no error";
    } catch (const tbd_emu::KernelError& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("__syncthreads"), std::string::npos) << msg;
      EXPECT_NE(msg.find(std::to_string(kExitLine)), std::string::npos) << msg;
    }
  }
}

constexpr int kExitedLaneLine = __LINE__ + 3;
__global__ void shuffle_exited_lane_kernel(int* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1, 1);
}

TEST(EmulatorErrors, ShuffleMaskNamesExitedLane) {
  ScheduleGuard g;
  std::vector<int> out(32);
  for (Schedule s : kSchedules) {
    tbd_emu::set_schedule(s, 5);
    EXPECT_KERNEL_ERROR(launch_kernel(shuffle_exited_lane_kernel, 1, 32, 0, nullptr, out.data()),
                        kExitedLaneLine, "exited");
  }
}

constexpr int kAbsentLine = __LINE__ + 2;
__global__ void shuffle_partial_warp_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}

TEST(EmulatorErrors, ShuffleMaskNamesAbsentLanes) {
  std::vector<int> out(48);
  EXPECT_KERNEL_ERROR(launch_kernel(shuffle_partial_warp_kernel, 1, 48, 0, nullptr, out.data()),
                      kAbsentLine, "absent");
}

constexpr int kDisagreeLine = __LINE__ + 2;
__global__ void shuffle_mask_disagree_kernel(int* out) {
  out[threadIdx.x] = __shfl_sync(threadIdx.x < 16 ? 0xffffffffu : 0xffff0000u, 1, 0);
}

TEST(EmulatorErrors, LanesDisagreeOnMask) {
  std::vector<int> out(32);
  EXPECT_KERNEL_ERROR(launch_kernel(shuffle_mask_disagree_kernel, 1, 32, 0, nullptr, out.data()),
                      kDisagreeLine, "disagree");
}

__global__ void deadlock_kernel(int* out) {
  // Lane 5 skips the shuffle its warp waits for and waits at the barrier,
  // which in turn waits for the rest of its warp.
  if (threadIdx.x != 5 && threadIdx.x < 32) out[threadIdx.x] = __shfl_sync(0xffffffffu, 1, 0);
  __syncthreads();
}

TEST(EmulatorErrors, DeadlockIsReportedNotHung) {
  ScheduleGuard g;
  std::vector<int> out(64);
  for (Schedule s : kSchedules) {
    tbd_emu::set_schedule(s, 9);
    try {
      launch_kernel(deadlock_kernel, 1, 64, 0, nullptr, out.data());
      ADD_FAILURE() << "no error";
    } catch (const tbd_emu::KernelError& e) {
      EXPECT_NE(std::string(e.what()).find("deadlock"), std::string::npos) << e.what();
    }
  }
}

__global__ void empty_kernel() {}

TEST(EmulatorErrors, LaunchLimits) {
  const int line = __LINE__ + 1;
  EXPECT_KERNEL_ERROR(launch_kernel(empty_kernel, 1, 1025, 0, nullptr), line, "1024 threads");
  EXPECT_THROW(launch_kernel(empty_kernel, 1, dim3(1, 1, 65), 0, nullptr), tbd_emu::KernelError);
  EXPECT_THROW(launch_kernel(empty_kernel, dim3(1, 65536), 32, 0, nullptr), tbd_emu::KernelError);
  EXPECT_THROW(launch_kernel(empty_kernel, dim3(1, 1, 65536), 32, 0, nullptr),
               tbd_emu::KernelError);
  EXPECT_THROW(launch_kernel(empty_kernel, 0, 32, 0, nullptr), tbd_emu::KernelError);
  // Dynamic shared memory: 48 KiB by default, more only after the opt-in, never > 227 KiB.
  EXPECT_NO_THROW(launch_kernel(empty_kernel, 1, 32, 48 * 1024, nullptr));
  EXPECT_THROW(launch_kernel(empty_kernel, 1, 32, 49 * 1024, nullptr), tbd_emu::KernelError);
}

__global__ void big_smem_kernel(int* out) { out[0] = dynamic_smem<int>()[64 * 256 - 1]; }

TEST(EmulatorErrors, DynamicSharedMemoryOptIn) {
  int out = 0;
  EXPECT_THROW(launch_kernel(big_smem_kernel, 1, 32, 64 * 1024, nullptr, &out),
               tbd_emu::KernelError);
  set_max_dynamic_smem(big_smem_kernel, 64 * 1024);
  EXPECT_NO_THROW(launch_kernel(big_smem_kernel, 1, 32, 64 * 1024, nullptr, &out));
  EXPECT_EQ(out, -1);  // poisoned
  EXPECT_THROW(set_max_dynamic_smem(big_smem_kernel, 228 * 1024), std::runtime_error);
}

// N values of T of static shared memory next to the dynamic shared memory (each instantiation a kernel
// of its own).
template <typename T, int N> __global__ void static_smem_kernel(int* out) {
  __shared__ SharedArray<T, N> table;
  table[threadIdx.x] = T(1);
  out[0] = dynamic_smem<int>()[0];
}
// 4 KiB.
constexpr auto static_and_dynamic_smem_kernel = static_smem_kernel<int, 1024>;

TEST(EmulatorErrors, StaticSharedMemoryCountsAgainstTheLimit) {
  int out = 0;
  // 4 KiB static + 44 KiB dynamic = 48 KiB: fits without the opt-in.
  EXPECT_NO_THROW(launch_kernel(static_and_dynamic_smem_kernel, 1, 32, 44 * 1024, nullptr, &out));
  EXPECT_EQ(tbd_emu::static_smem_bytes(reinterpret_cast<const void*>(static_and_dynamic_smem_kernel)),
            4096u);
  // One byte more: the GPU refuses the launch (known static size: before it runs).
  const int line = __LINE__ + 1;
  auto over = [&] { launch_kernel(static_and_dynamic_smem_kernel, 1, 32, 44 * 1024 + 1, nullptr, &out); };
  EXPECT_KERNEL_ERROR(over(), line, "4096 bytes of static + 45057 bytes of dynamic shared memory");
  // With the opt-in it runs; static + opt-in may not pass 227 KiB.
  set_max_dynamic_smem(static_and_dynamic_smem_kernel, 64 * 1024);
  EXPECT_NO_THROW(launch_kernel(static_and_dynamic_smem_kernel, 1, 32, 64 * 1024, nullptr, &out));
  set_max_dynamic_smem(static_and_dynamic_smem_kernel, 227 * 1024);
  EXPECT_THROW(launch_kernel(static_and_dynamic_smem_kernel, 1, 32, 1024, nullptr, &out),
               tbd_emu::KernelError);
  set_max_dynamic_smem(static_and_dynamic_smem_kernel, 64 * 1024);
}

// The same kind of kernel seen for the first time (4 KiB): the static array is counted
// when a block touches it, and the launch fails with the launch site.
constexpr auto first_static_smem_kernel = static_smem_kernel<double, 512>;

TEST(EmulatorErrors, StaticSharedMemoryOverTheLimitOnTheFirstLaunch) {
  int out = 0;
  const int line = __LINE__ + 1;
  auto over = [&] { launch_kernel(first_static_smem_kernel, 1, 32, 45 * 1024, nullptr, &out); };
  EXPECT_KERNEL_ERROR(over(), line, "4096 bytes of static + 46080 bytes of dynamic shared memory");
}

TEST(EmulatorErrors, RejectedLaunchLeavesNoErrorBehind) {
  // The runtime keeps a launch error until cudaGetLastError reads it ...
  const tbd_emu::LaunchSite site{"empty_kernel", __FILE__, __LINE__};
  EXPECT_THROW(tbd_emu::launch(reinterpret_cast<const void*>(&empty_kernel), 1, 1025, 0,
                               [](void*) {}, nullptr, site),
               tbd_emu::KernelError);
  EXPECT_NE(tbd_emu::peek_last_error().find("1024 threads"), std::string::npos);
  EXPECT_NE(tbd_emu::get_last_error(), "");
  EXPECT_EQ(tbd_emu::get_last_error(), "");
  // ... and launch_kernel reads it when it reports the failure, so that the next
  // CUDA call of someone else does not report it again.
  EXPECT_THROW(launch_kernel(empty_kernel, 1, 1025, 0, nullptr), tbd_emu::KernelError);
  EXPECT_EQ(tbd_emu::peek_last_error(), "");
  int out = 0;
  EXPECT_THROW(launch_kernel(first_static_smem_kernel, 1, 32, 47 * 1024, nullptr, &out),
               tbd_emu::KernelError);
  EXPECT_EQ(tbd_emu::peek_last_error(), "");
}

TEST(Emulator, CountsLaunchesAndStreamOperationsPerName) {
  tbd_emu::reset_op_counts();
  std::vector<int> idx(64);
  for (int i = 0; i < 3; ++i) launch_kernel(index_kernel, 2, 32, 0, nullptr, idx.data());
  launch_kernel((reverse_kernel<true>), 1, 64, 0, nullptr, reinterpret_cast<float*>(idx.data()),
                reinterpret_cast<float*>(idx.data()));
  memset_async(idx.data(), 0, sizeof(int) * idx.size(), nullptr);
  const auto counts = tbd_emu::op_counts();
  const std::vector<std::pair<std::string, uint64_t>> want = {
      {"index_kernel", 3}, {"memset", 1}, {"reverse_kernel", 1}};
  EXPECT_EQ(counts, want);
  tbd_emu::reset_op_counts();
  EXPECT_TRUE(tbd_emu::op_counts().empty());
}

struct alignas(16) Vec4 {
  float v[4];
};

constexpr int kMisalignedLine = __LINE__ + 2;
__global__ void misaligned_kernel(const float* p, float* out) {
  const Vec4 v = load_vec(reinterpret_cast<const Vec4*>(p + 1));
  out[0] = v.v[0];
}

TEST(EmulatorErrors, MisalignedVectorLoad) {
  alignas(16) float buf[12] = {};
  float out = 0;
  EXPECT_KERNEL_ERROR(launch_kernel(misaligned_kernel, 1, 32, 0, nullptr, buf, &out),
                      kMisalignedLine, "misaligned");
}

__global__ void shared_oob_kernel(int* out) {
  __shared__ SharedArray<int, 32> a;
  a[threadIdx.x] = 1;  // 33 threads: one past the end
  out[0] = 0;
}

TEST(EmulatorErrors, StaticSharedOutOfBoundsAndRecovery) {
  int out = 1;
  try {
    launch_kernel(shared_oob_kernel, 1, 33, 0, nullptr, &out);
    ADD_FAILURE() << "no error";
  } catch (const tbd_emu::KernelError& e) {
    EXPECT_NE(std::string(e.what()).find("index 32 out of bounds [0, 32)"), std::string::npos)
        << e.what();
  }
  // The emulator is usable again after an error.
  std::vector<int> idx(24);
  launch_kernel(index_kernel, 1, 24, 0, nullptr, idx.data());
  EXPECT_EQ(idx[23], 23);
}

}  // namespace
