#include "common.h"

#include <c10/util/Exception.h>

namespace tbd_ops {

void check_float(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                   op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", st);
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace tbd_ops
