// _device_values: host numbers written to device memory by a kernel that gets
// them as parameters (see cuda/device_values.h).
#include <stdexcept>

#include "common.cuh"
#include "device_values.h"

namespace tbd_ops {
namespace cuda {
namespace {

struct ValueChunk {
  int count;
  double v[kDeviceValuesPerLaunch];
};

template <typename T>
__global__ void __launch_bounds__(kDeviceValuesPerLaunch)
device_values_kernel(ValueChunk chunk, T* __restrict__ out) {
  const int i = threadIdx.x;
  if (i < chunk.count) out[i] = static_cast<T>(chunk.v[i]);
}

}  // namespace

void device_values(DType dt, const double* values, int64_t n, void* out, void* stream) {
  if (dt != DType::kFloat && dt != DType::kDouble) {
    throw std::invalid_argument("_device_values: dtype must be float32 or float64");
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  for (int64_t i0 = 0; i0 < n; i0 += kDeviceValuesPerLaunch) {
    ValueChunk c;
    c.count = static_cast<int>(n - i0 < kDeviceValuesPerLaunch ? n - i0 : kDeviceValuesPerLaunch);
    for (int i = 0; i < kDeviceValuesPerLaunch; ++i) c.v[i] = i < c.count ? values[i0 + i] : 0.0;
    if (dt == DType::kDouble) {
      launch_kernel(device_values_kernel<double>, 1, kDeviceValuesPerLaunch, 0, s, c,
                    static_cast<double*>(out) + i0);
    } else {
      launch_kernel(device_values_kernel<float>, 1, kDeviceValuesPerLaunch, 0, s, c,
                    static_cast<float*>(out) + i0);
    }
  }
}

}  // namespace cuda
}  // namespace tbd_ops
