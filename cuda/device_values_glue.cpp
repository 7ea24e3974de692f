// CUDA registration of _device_values (see cuda/glue.h).
#include "../csrc/device_values.h"
#include "device_values.h"
#include "glue.h"

namespace tbd_ops {
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

TORCH_LIBRARY_IMPL(TBD_OPS_LIB, TBD_OPS_CUDA_KEY, m) {
  m.impl("_device_values", TORCH_FN(device_values_cuda));
}

}  // namespace tbd_ops
