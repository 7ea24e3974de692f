// _device_values: a short list of host numbers as a 1-D tensor on the device
// of another tensor, without a host-to-device copy (on CUDA the values travel
// as kernel parameters: no pinned memory, no synchronization, capturable in a
// CUDA graph, where the values are part of the graph as any Python number).
#pragma once

#include <ATen/core/Tensor.h>

#include "common.h"

namespace tbd_ops {

// Raises a TypeError unless dtype is float32 or float64.
void device_values_check(at::ScalarType dtype);

}  // namespace tbd_ops
