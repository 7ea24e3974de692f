#include "common.h"

#include <c10/util/Exception.h>

namespace tbd_ops {

namespace {

// The names users write: int64 and bool; the floating types as PyTorch prints them.
std::string dtype_name(at::ScalarType t) {
  if (t == at::kLong) return "int64";
  if (t == at::kBool) return "bool";
  return c10::toString(t);
}

}  // namespace

void check_float(const char* op, c10::string_view name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

void check_dtype(const char* op, c10::string_view name, const at::Tensor& t, at::ScalarType expected) {
  TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": ", name, " must be ", dtype_name(expected),
                   ", got ", t.scalar_type());
}

void check_same_dtype(const char* op, c10::string_view name, const at::Tensor& t,
                      c10::string_view ref_name, const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
}

void check_same_device(const char* op, c10::string_view name, const at::Tensor& t,
                       c10::string_view ref_name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the device of ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<int64_t> image_offsets(const char* op, const char* name, at::IntArrayRef counts,
                                   int64_t rows, const char* rows_of) {
  std::vector<int64_t> off(counts.size() + 1, 0);
  for (size_t n = 0; n < counts.size(); ++n) {
    TORCH_CHECK_VALUE(counts[n] >= 0, op, ": ", name, " must be >= 0, got ", counts[n],
                      " for image ", n);
    // Checked before the addition: a sum that wrapped around could match the rows again.
    TORCH_CHECK_VALUE(counts[n] <= rows - off[n], op, ": ", name, " must sum to the rows of ",
                      rows_of, " (", rows, "), got more by image ", n, " (", off[n], " + ",
                      counts[n], ")");
    off[n + 1] = off[n] + counts[n];
  }
  TORCH_CHECK_VALUE(off.back() == rows, op, ": ", name, " must sum to the rows of ", rows_of,
                    " (", rows, "), got ", off.back());
  return off;
}

int64_t image_count(const char* op, const char* name_a, at::IntArrayRef counts_a,
                    const char* name_b, at::IntArrayRef counts_b) {
  TORCH_CHECK_VALUE(counts_a.size() == counts_b.size(), op, ": ", name_a, " and ", name_b,
                    " must have one count per image each, got ", counts_a.size(), " and ",
                    counts_b.size());
  return static_cast<int64_t>(counts_a.size());
}

}  // namespace tbd_ops
