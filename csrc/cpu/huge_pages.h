// Transparent huge pages for large fresh outputs of the CPU kernels (Linux).
// A fresh allocation of tens of MiB comes from mmap, and its first write
// faults once per 4 KiB page; for a [2, 256, 100, 168] float32 gradient the
// faults (and the kernel's zeroing of each page) take longer than the kernel
// that writes it. Asking for 2 MiB pages before the first write makes that one
// fault per 2 MiB. A hint only: no effect on values, ignored where
// unsupported (or when transparent huge pages are off).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace tbd_ops {
namespace cpu {
namespace {

constexpr int64_t kHugePage = int64_t(2) << 20;

// The 2 MiB-aligned pages inside t's storage, if it is at least 4 MiB.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!t.defined() || !t.is_cpu()) return;
  const auto nbytes = static_cast<int64_t>(t.storage().nbytes());
  if (nbytes < 2 * kHugePage) return;
  const auto p = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t mask = static_cast<uintptr_t>(kHugePage) - 1;
  const uintptr_t begin = (p + mask) & ~mask, end = (p + static_cast<uintptr_t>(nbytes)) & ~mask;
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace
}  // namespace cpu
}  // namespace tbd_ops
