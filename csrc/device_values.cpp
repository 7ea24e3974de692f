// _device_values: schema and checks (see device_values.h).
#include "device_values.h"

#include <torch/library.h>

#include "common.h"

namespace tbd_ops {

void device_values_check(at::ScalarType dtype) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble,
                   "_device_values: dtype must be float32 or float64, got ", dtype);
}

TORCH_LIBRARY_FRAGMENT(TBD_OPS_LIB, m) {
  m.def("_device_values(float[] values, Tensor like, ScalarType dtype) -> Tensor");
}

}  // namespace tbd_ops
