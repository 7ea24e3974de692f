// _device_values: schema, checks and the CUDA registration (see device_values.h).
#include <torch/library.h>

#include "device_values.h"
#include "common.h"

#if TBD_OPS_CUDA_GLUE
#include "../cuda/device_values.h"
#include "cuda_glue.h"
#endif

namespace tbd_ops {

void device_values_check(at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "_device_values: dtype must be float32 or float64, got ", dtype);
}

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def("_device_values(float[] values, Tensor like, ScalarType dtype) -> Tensor");
}

// No gradient: `like` only names the device, and the values are host numbers. Past autograd,
// the output is a plain tensor even when `like` requires grad.
TORCH_LIBRARY_IMPL(TBD_OPS_LIB, Autograd, m) {
  m.impl("_device_values", torch::CppFunction::makeFallthrough());
}

// ---- CUDA registration (builds with the CUDA kernels): validation, allocation, device
// guard and current stream; the kernels are cuda/device_values.cu, the shared pieces csrc/cuda_glue.h.
#if TBD_OPS_CUDA_GLUE

namespace cuda_glue {
namespace {

at::Tensor device_values_cuda(at::ArrayRef<double> values, const at::Tensor& like,
                              at::ScalarType dtype) {
  device_values_check(dtype);
  const cuda_glue::DeviceGuard guard(like.device());
  at::Tensor out = cuda_glue::empty({static_cast<int64_t>(values.size())}, like.options().dtype(dtype));
  cuda_glue::launch([&] {
    cuda::device_values(dtype == at::kDouble ? cuda::DType::kDouble : cuda::DType::kFloat,
                        values.data(), static_cast<int64_t>(values.size()),
                        out.mutable_data_ptr(), cuda_glue::current_stream());
  });
  return out;
}

}  // namespace

TBD_OPS_IMPL(TBD_OPS_CUDA_KEY, "_device_values", TORCH_FN(device_values_cuda))

}  // namespace cuda_glue

#endif  // TBD_OPS_CUDA_GLUE

}  // namespace tbd_ops
