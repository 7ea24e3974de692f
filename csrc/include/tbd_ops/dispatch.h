// From a mode known at run time to code compiled for each mode (a template
// parameter of a kernel): dispatch_mode<kA, kB, ...>(value, f) calls
// f(std::integral_constant<E, kA>{}) when value == kA, and so on, and throws
// std::invalid_argument for any other value. Host code of the CPU kernels and
// of the CUDA launchers (no PyTorch, no CUDA).
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

namespace tbd_ops {

template <auto... kModes, typename E, typename F> void dispatch_mode(E value, F&& f) {
  static_assert(sizeof...(kModes) > 0, "dispatch_mode needs the modes to dispatch to");
  const bool found =
      ((value == kModes ? (f(std::integral_constant<decltype(kModes), kModes>{}), true) : false) || ...);
  if (!found) {
    throw std::invalid_argument("tbd_ops: unknown mode " + std::to_string(static_cast<long long>(value)));
  }
}

}  // namespace tbd_ops
