// Shared pieces of the CUDA registration glue (cuda/<op>_glue.cpp): dtype
// mapping and the conversion of launcher errors into Python errors. The glue
// validates, allocates on the right device and calls the launchers of
// cuda/<op>.cu on the current stream; the kernels see only raw pointers,
// sizes and strides.
//
// Also compiled, with -DTBD_OPS_CUDA_EMU, into the test-only emulated build,
// where it runs on CPU tensors against the SIMT emulator (cuda/torch_backend.h).
#pragma once

#include <torch/library.h>

#include <exception>

#include "dtype.h"
#include "torch_backend.h"

namespace tbd_ops {
namespace cuda_glue {

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
