// What the registration glue (cuda/<op>_glue.cpp) needs from PyTorch's CUDA
// side: a device guard, the current stream, output allocation and the
// dispatch key. The test-only emulated build (-DTBD_OPS_CUDA_EMU) runs the
// same glue on CPU tensors: no guard, no stream, outputs filled with 0xFF
// bytes (NaN, or -1 for integers) so that an element a kernel forgets to write
// shows in the tests, and registration for the CPU key of its own namespace.
#pragma once

#include <ATen/ATen.h>

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

}  // namespace cuda_glue
}  // namespace tbd_ops
