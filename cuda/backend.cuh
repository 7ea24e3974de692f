// The one place where nvcc and the host compiler differ. Kernels in cuda/*.cu
// are plain CUDA; compiled by nvcc they run on the GPU, compiled by the host
// compiler (the test-only emulated build) they run on the SIMT emulator in
// cuda/emu. This header gives both builds the same names for:
//   - launching: launch_kernel(kernel, grid, block, smem_bytes, stream, args...)
//     checks the launch itself and throws std::runtime_error on failure, after
//     clearing the runtime's error state (cudaGetLastError), so that the
//     failure is not reported again by the next unrelated CUDA call;
//   - dynamic shared memory: dynamic_smem<T>();
//   - static shared arrays: SharedArray<T, N> (bounds-checked and refilled with
//     a poison pattern for every block under emulation);
//   - aligned vector loads: load_vec(p) (alignment-checked under emulation);
//   - stream-ordered memset: memset_async(p, value, bytes, stream);
//   - the > 48 KiB dynamic shared memory opt-in: set_max_dynamic_smem(kernel, bytes);
//   - the grid.y / grid.z limit launchers chunk by: max_grid_yz();
//   - device-side assertions: TBD_DEVICE_CHECK(cond, msg);
//   - device-wide algorithms: sort_pairs (CUB's radix sort on the GPU, a
//     stable host sort in the emulator).
// Block and warp reductions are built on these in cuda/reduce.cuh, one source
// for both builds.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#define TBD_CUDA_EMULATED 0
#else
#include <algorithm>
#include <numeric>
#include <vector>

#include "emu/simt.h"
#define TBD_CUDA_EMULATED 1
#endif

namespace tbd_ops {
namespace cuda {

#if defined(__CUDACC__)

template <typename T> __device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char tbd_dynamic_smem[];
  return reinterpret_cast<T*>(tbd_dynamic_smem);
}

template <typename T, int N> struct SharedArray {
  T data[N];
  __device__ __forceinline__ T& operator[](int64_t i) { return data[i]; }
};

template <typename V> __device__ __forceinline__ V load_vec(const V* p) { return *p; }

#define TBD_DEVICE_CHECK(cond, msg) ((void)0)

inline int64_t max_grid_yz() { return 65535; }

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // reported here, not again by the next CUDA call
    throw std::runtime_error(std::string("tbd_ops: ") + what + " failed: " + cudaGetErrorString(err));
  }
}

inline void memset_async(void* p, int value, size_t bytes, cudaStream_t stream) {
  check_cuda(cudaMemsetAsync(p, value, bytes, stream), "cudaMemsetAsync");
}

template <typename... P> void set_max_dynamic_smem(void (*kernel)(P...), size_t bytes) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

namespace detail {
[[noreturn]] inline void launch_failed(const char* kernel, const char* file, int line,
                                       cudaError_t err) {
  throw std::runtime_error(std::string(file) + ":" + std::to_string(line) +
                           ": CUDA launch of " + kernel + " failed: " + cudaGetErrorString(err));
}

template <typename... P, typename... Args>
void launch_kernel_at(const char* name, const char* file, int line, void (*kernel)(P...),
                      dim3 grid, dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  // The error of this launch, not a stale one from earlier work.
  const cudaError_t err = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) {
    // A launch error is also left in the runtime's last-error state: clear it,
    // or PyTorch's check after its next kernel reports it against that kernel.
    (void)cudaGetLastError();
    launch_failed(name, file, line, err);
  }
}
}  // namespace detail

// Stable sort of n (key, value) pairs by the low end_bit bits of the keys
// (keys are >= 0), on the stream; temp: sort_pairs_temp_bytes(n, end_bit).
inline size_t sort_pairs_temp_bytes(int64_t n, int end_bit) {
  size_t bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortPairs(
                 nullptr, bytes, static_cast<const int32_t*>(nullptr),
                 static_cast<int32_t*>(nullptr), static_cast<const int64_t*>(nullptr),
                 static_cast<int64_t*>(nullptr), n, 0, end_bit),
             "radix sort size query");
  return bytes;
}

inline void sort_pairs(const int32_t* keys_in, int32_t* keys_out, const int64_t* vals_in,
                       int64_t* vals_out, int64_t n, int end_bit, void* temp, size_t temp_bytes,
                       cudaStream_t stream) {
  check_cuda(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, vals_in,
                                             vals_out, n, 0, end_bit, stream),
             "radix sort");
}

#else  // emulated

template <typename T> inline T* dynamic_smem() {
  return static_cast<T*>(::tbd_emu::dynamic_smem());
}

template <typename T, int N> struct SharedArray {
  T data[N];
  uint64_t epoch;
  T& operator[](int64_t i) {
    if (epoch != ::tbd_emu::block_epoch()) {  // first touch in this block: poison, count
      std::memset(static_cast<void*>(data), 0xFF, sizeof(data));
      epoch = ::tbd_emu::block_epoch();
      ::tbd_emu::note_static_smem(sizeof(data));
    }
    if (i < 0 || i >= N) {
      ::tbd_emu::fail(__FILE__, __LINE__,
                      "static shared array index " + std::to_string(i) + " out of bounds [0, " +
                          std::to_string(N) + ")");
    }
    return data[i];
  }
};

namespace detail {
inline void check_aligned(const void* p, size_t align, const char* file, int line) {
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    ::tbd_emu::fail(file, line,
                    "misaligned vector access: address " +
                        std::to_string(reinterpret_cast<uintptr_t>(p)) + " is not a multiple of " +
                        std::to_string(align));
  }
}
}  // namespace detail

template <typename V> inline V load_vec_at(const V* p, const char* file, int line) {
  detail::check_aligned(p, alignof(V), file, line);
  return *p;
}
#define load_vec(p) load_vec_at((p), __FILE__, __LINE__)

#define TBD_DEVICE_CHECK(cond, msg) \
  ((cond) ? (void)0 : ::tbd_emu::fail(__FILE__, __LINE__, std::string("check failed: ") + (msg)))

// 65535 as on the GPU unless a test lowers it (tbd_emu::set_grid_yz_limit).
inline int64_t max_grid_yz() { return ::tbd_emu::grid_yz_limit(); }

inline void memset_async(void* p, int value, size_t bytes, cudaStream_t) {
  ::tbd_emu::count_op("memset");
  if (bytes > 0) std::memset(p, value, bytes);  // the emulator runs everything in order
}

template <typename... P> void set_max_dynamic_smem(void (*kernel)(P...), size_t bytes) {
  if (bytes > ::tbd_emu::kMaxDynamicSmemOptIn) {
    throw std::runtime_error("tbd_ops: cudaFuncSetAttribute(MaxDynamicSharedMemorySize) failed: " +
                             std::to_string(bytes) + " bytes is over the sm_90 maximum");
  }
  ::tbd_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

inline size_t sort_pairs_temp_bytes(int64_t, int) { return 0; }

inline void sort_pairs(const int32_t* keys_in, int32_t* keys_out, const int64_t* vals_in,
                       int64_t* vals_out, int64_t n, int end_bit, void*, size_t, cudaStream_t) {
  ::tbd_emu::count_op("sort_pairs");  // several kernels of CUB's radix sort on the GPU
  const uint32_t mask = end_bit >= 32 ? 0xffffffffu : ((1u << end_bit) - 1u);
  std::vector<int64_t> idx(static_cast<size_t>(n));
  std::iota(idx.begin(), idx.end(), int64_t(0));
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    return (static_cast<uint32_t>(keys_in[a]) & mask) < (static_cast<uint32_t>(keys_in[b]) & mask);
  });
  for (int64_t i = 0; i < n; ++i) {
    keys_out[i] = keys_in[idx[i]];
    vals_out[i] = vals_in[idx[i]];
  }
}

namespace detail {
template <typename... P> struct KernelCall {
  void (*kernel)(P...);
  std::tuple<P...> params;
  static void run(void* self) {
    auto* c = static_cast<KernelCall*>(self);
    std::apply(c->kernel, c->params);  // every thread gets its own copy of the parameters
  }
};

template <typename... P, typename... Args>
void launch_kernel_at(const char* name, const char* file, int line, void (*kernel)(P...),
                      dim3 grid, dim3 block, size_t smem, cudaStream_t, Args&&... args) {
  KernelCall<P...> call{kernel, std::tuple<P...>(std::forward<Args>(args)...)};
  const ::tbd_emu::LaunchSite site{name, file, line};
  try {
    ::tbd_emu::launch(reinterpret_cast<const void*>(kernel), grid, block, smem,
                      &KernelCall<P...>::run, &call, site);
  } catch (const ::tbd_emu::KernelError&) {
    (void)::tbd_emu::get_last_error();  // as cudaGetLastError in the GPU build
    throw;
  }
}
}  // namespace detail

#endif

}  // namespace cuda
}  // namespace tbd_ops

// launch_kernel(kernel, grid, block, dynamic_smem_bytes, stream, args...)
#define launch_kernel(kernel, ...) \
  ::tbd_ops::cuda::detail::launch_kernel_at(#kernel, __FILE__, __LINE__, kernel, __VA_ARGS__)
