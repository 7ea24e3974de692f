// The torch side of the CUDA kernels, shared by the CUDA registrations at the
// end of csrc/<op>.cpp: a device guard, the current stream, output
// allocation, the dispatch key, the dtype of the launchers
// (cuda/dtype.h) and the conversion of launcher errors into Python errors.
// The registration validates, allocates on the right device and calls the
// launchers of cuda/<op>.cu on the current stream; the kernels see only raw
// pointers, sizes and strides.
//
// The test-only emulated build (-DTBD_OPS_CUDA_EMU) compiles the same
// registrations against the SIMT emulator and runs them on CPU tensors: no
// guard, no stream, outputs filled with 0xFF bytes (NaN, or -1 for integers)
// so that an element a kernel forgets to write shows in the tests, and
// registration for the CPU key of its own namespace.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <exception>

#include "../cuda/dtype.h"

#ifdef TBD_OPS_CUDA_EMU
#define TBD_OPS_CUDA_KEY CPU
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#define TBD_OPS_CUDA_KEY CUDA
#endif

namespace tbd_ops {
namespace cuda_glue {

#ifdef TBD_OPS_CUDA_EMU
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline void* current_stream() { return nullptr; }
inline at::Tensor poisoned(at::Tensor t) {
  if (t.numel() > 0) {
    std::memset(t.mutable_data_ptr(), 0xFF, t.numel() * t.element_size());
  }
  return t;
}
#else
using DeviceGuard = c10::cuda::CUDAGuard;
inline void* current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
inline at::Tensor poisoned(at::Tensor t) { return t; }
#endif

// Outputs and scratch buffers the kernels must fully write.
inline at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opts,
                        at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  return poisoned(at::empty(sizes, opts, fmt));
}
inline at::Tensor empty_like(const at::Tensor& t) { return poisoned(at::empty_like(t)); }

inline cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "tbd_ops: unsupported dtype ", t.scalar_type());
  }
}

// Kernel-side errors (std::exception from the launchers) become Python errors.
template <typename F> void launch(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace cuda_glue
}  // namespace tbd_ops
