// CPU kernel of _device_values: the values, rounded to dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../device_values.h"

namespace tbd_ops {
namespace {

at::Tensor device_values_cpu(at::ArrayRef<double> values, const at::Tensor& like,
                             at::ScalarType dtype) {
  device_values_check(dtype);
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, like.options().dtype(dtype));
  for (size_t i = 0; i < values.size(); ++i) {
    if (dtype == at::kDouble) {
      out.mutable_data_ptr<double>()[i] = values[i];
    } else {
      out.mutable_data_ptr<float>()[i] = static_cast<float>(values[i]);
    }
  }
  return out;
}

}  // namespace

TBD_OPS_IMPL(CPU, "_device_values", TORCH_FN(device_values_cpu))

}  // namespace tbd_ops
