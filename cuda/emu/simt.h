// SIMT emulation of the CUDA execution model on the host (no GPU, no CUDA
// runtime). Included only through cuda/backend.cuh when the kernels are
// compiled by the host compiler.
//
// Every block runs on the launching OS thread; its threads are fibers that run
// until they reach __syncthreads, a warp collective (__shfl_*_sync,
// __ballot_sync, __syncwarp) or the end of the kernel. The order in which the
// waiting threads resume is the schedule (forward, reverse or a seeded
// shuffle), so a missing barrier shows as a different result under another
// schedule. What a GPU would do wrong is reported as an error with the file
// and line, never a hang: a barrier that not every thread of the block
// reaches, a warp collective whose mask names exited or absent lanes, lanes
// that disagree on the mask, a launch over the limits of sm_90 (static plus
// dynamic shared memory included), a misaligned vector access, an
// out-of-bounds index into a static shared array.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- keywords -------------------------------------------------------------
// The toolkit's host_defines.h (pulled in by cuda_fp16.h) already defines
// __global__, __device__, __host__, __forceinline__, __align__ and
// __launch_bounds__ as nothing or as plain attributes for host compilers.
// Shared memory is the one keyword with a meaning: one instance per block.
// Blocks run one at a time per OS thread, so a thread_local static is shared
// by the fibers of the running block and private to the launching thread.
#undef __shared__
#define __shared__ static thread_local

// Types only: cudaError_t, cudaStream_t, dim3 (the toolkit's host headers; the
// CUDA runtime library is neither called nor linked).
#include <driver_types.h>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#endif

namespace tbd_emu {

constexpr int kWarpSize = 32;
// sm_90 limits (CUDA C Programming Guide, compute capability 9.0).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockDim[3] = {1024, 1024, 64};
constexpr unsigned kMaxGridDim[3] = {2147483647u, 65535u, 65535u};
// The grid.y / grid.z limit the launches are checked against and launchers
// chunk by (cuda/backend.cuh max_grid_yz()). Tests lower it to exercise the
// chunking of large batches at small sizes; default 65535 as on the GPU.
void set_grid_yz_limit(unsigned limit);
unsigned grid_yz_limit();
// Shared memory per block: static + dynamic at most 48 KiB without the
// opt-in; with it (cudaFuncAttributeMaxDynamicSharedMemorySize = X) dynamic at
// most X and static + X at most 227 KiB; static alone at most 48 KiB.
constexpr size_t kDefaultMaxDynamicSmem = 48 * 1024;
constexpr size_t kMaxStaticSmem = 48 * 1024;
constexpr size_t kMaxDynamicSmemOptIn = 227 * 1024;  // 232448 bytes on sm_90

enum class Schedule : int { kForward = 0, kReverse = 1, kShuffle = 2 };

// The schedule used by launches from this OS thread (default: forward).
void set_schedule(Schedule s, uint64_t seed = 0);
Schedule schedule();
// Kernel launches run so far by this process (all threads).
uint64_t launch_count();
// Device operations per name since the last reset (all threads): every kernel
// launch under the kernel's name as launch_kernel spells it, and the
// stream-ordered operations of cuda/backend.cuh ("memset", "sort_pairs").
// Sorted by name.
std::vector<std::pair<std::string, uint64_t>> op_counts();
void reset_op_counts();
void count_op(const char* name);

// The emulated cudaGetLastError: a rejected launch leaves its error here, as
// the CUDA runtime does, until it is read. get_last_error() returns it and
// clears it; peek_last_error() only returns it ("" = none).
std::string get_last_error();
std::string peek_last_error();

// Thrown by a launch whose kernel did something a GPU would not forgive.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Reports an error of the running thread and ends the launch (never returns).
[[noreturn]] void fail(const char* file, int line, const std::string& msg);

// Index of the running block (changes for every block run; 0 = none).
uint64_t block_epoch();

// Warp collectives: the value of `lane_src` (shfl) or the ballot of `pred`.
// `kind` distinguishes the collectives so that lanes meeting at different
// ones are reported.
enum class Collective : int { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kSyncWarp };
uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int arg, int width,
                         const char* file, int line);
void syncthreads(const char* file, int line);

// Dynamic shared memory of the running block (refilled with 0xFF bytes for
// every block: NaN as float, -1 as integer).
void* dynamic_smem();
size_t dynamic_smem_bytes();

// Opt-in above 48 KiB of dynamic shared memory, per kernel (cudaFuncSetAttribute).
void set_max_dynamic_smem(const void* kernel, size_t bytes);

// Static shared memory: a static shared array (SharedArray of cuda/backend.cuh)
// calls this when a block first touches it. The emulator adds up the arrays a
// block touches, checks static + dynamic against the kernel's limit (an error
// of the launch, as the GPU's "too many resources requested for launch") and
// remembers the kernel's static size, so that later launches are checked
// before they run.
void note_static_smem(size_t bytes);
// The static shared memory seen so far for the kernel (0 before it ran).
size_t static_smem_bytes(const void* kernel);

// Runs body(ctx) for every thread of the grid.
struct LaunchSite {
  const char* kernel;
  const char* file;
  int line;
};
void launch(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*),
            void* ctx, const LaunchSite& site);

// Block-wide builtins of the running thread. (Not initial-exec TLS: the
// emulator is also loaded into Python with dlopen.)
extern thread_local uint3 tls_thread_idx;
extern thread_local uint3 tls_block_idx;
extern thread_local dim3 tls_block_dim;
extern thread_local dim3 tls_grid_dim;

template <typename T> uint64_t pack(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp shuffles move trivially copyable values of at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T> T unpack(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace tbd_emu

// ---- builtins visible to kernels ---------------------------------------------
#define threadIdx (::tbd_emu::tls_thread_idx)
#define blockIdx (::tbd_emu::tls_block_idx)
#define blockDim (::tbd_emu::tls_block_dim)
#define gridDim (::tbd_emu::tls_grid_dim)
#define warpSize (::tbd_emu::kWarpSize)

#define __syncthreads() ::tbd_emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(mask)                                                                  \
  ((void)::tbd_emu::warp_collective(::tbd_emu::Collective::kSyncWarp, (mask), 0, 0, 32, \
                                    __FILE__, __LINE__))
#define __shfl_sync(mask, v, ...) ::tbd_emu::shfl_(::tbd_emu::Collective::kShfl, (mask), (v), __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(mask, v, ...) ::tbd_emu::shfl_(::tbd_emu::Collective::kShflUp, (mask), (v), __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(mask, v, ...) ::tbd_emu::shfl_(::tbd_emu::Collective::kShflDown, (mask), (v), __FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, ...) ::tbd_emu::shfl_(::tbd_emu::Collective::kShflXor, (mask), (v), __FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, pred)                                                             \
  static_cast<unsigned>(::tbd_emu::warp_collective(::tbd_emu::Collective::kBallot, (mask), \
                                                   (pred) ? 1 : 0, 0, 32, __FILE__, __LINE__))

namespace tbd_emu {
template <typename T>
T shfl_(Collective kind, unsigned mask, T v, const char* file, int line, int arg,
        int width = kWarpSize) {
  return unpack<T>(warp_collective(kind, mask, pack(v), arg, width, file, line));
}
}  // namespace tbd_emu

// Atomics: fibers of one launch never run at the same time, so a plain
// read-modify-write is atomic here: *p = update(old), old returned.
namespace tbd_emu {
template <typename T, typename F> T atomic_update(T* p, F update) {
  const T old = *p;
  *p = update(old);
  return old;
}
}  // namespace tbd_emu
template <typename T> T atomicAdd(T* p, T v) {
  return tbd_emu::atomic_update(p, [v](T old) { return old + v; });
}
template <typename T> T atomicMax(T* p, T v) {
  return tbd_emu::atomic_update(p, [v](T old) { return old < v ? v : old; });
}
template <typename T> T atomicMin(T* p, T v) {
  return tbd_emu::atomic_update(p, [v](T old) { return v < old ? v : old; });
}
template <typename T> T atomicExch(T* p, T v) {
  return tbd_emu::atomic_update(p, [v](T) { return v; });
}
template <typename T> T atomicCAS(T* p, T cmp, T v) {
  return tbd_emu::atomic_update(p, [cmp, v](T old) { return old == cmp ? v : old; });
}
