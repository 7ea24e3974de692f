// Host entry point of the _device_values kernel (plain C++: no PyTorch, no
// CUDA headers).
#pragma once

#include <cstdint>

#include "dtype.h"

namespace tbd_ops {
namespace cuda {

// Values per launch (kernel parameters: 8 bytes each).
constexpr int kDeviceValuesPerLaunch = 128;

// out[i] = values[i] rounded to dt (kFloat or kDouble) for i < n, written by
// ceil(n / kDeviceValuesPerLaunch) launches that carry the values as kernel
// parameters: nothing is copied from host memory, nothing synchronizes.
void device_values(DType dt, const double* values, int64_t n, void* out, void* stream);

}  // namespace cuda
}  // namespace tbd_ops
