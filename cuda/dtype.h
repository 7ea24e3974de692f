// The element types of the CUDA launchers' raw pointers. Plain C++ (no
// PyTorch, no CUDA headers): the registration glue of csrc/<op>.cpp maps a
// tensor's dtype to one of these; the launchers of cuda/<op>.cu dispatch on it.
#pragma once

namespace tbd_ops {
namespace cuda {

enum class DType : int { kFloat = 0, kDouble = 1, kHalf = 2, kBFloat16 = 3 };

}  // namespace cuda
}  // namespace tbd_ops
