// Pieces shared by every op's schema, checks and backends: the operator
// namespace, dtype checks, accumulation dtype. Each op's validation lives in
// csrc/<op>.{h,cpp}; every check raises a Python ValueError/TypeError naming
// the argument, the expected and the actual value.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

// The operator namespace. The test-only emulated CUDA build compiles the same
// sources into a namespace of its own (-DTBD_OPS_LIB=tbd_ops_emu).
#ifndef TBD_OPS_LIB
#define TBD_OPS_LIB tbd_ops
#endif
#define TBD_OPS_STR2(x) #x
#define TBD_OPS_STR(x) TBD_OPS_STR2(x)
#define TBD_OPS_LIB_NAME TBD_OPS_STR(TBD_OPS_LIB)

namespace tbd_ops {

constexpr double kIouEps = 1e-6;

// Raises a TypeError unless t is float32, float64, float16 or bfloat16.
void check_float(const char* op, const char* name, const at::Tensor& t);

// Output dtype of reductions and accumulators: float32, or float64 for float64.
at::ScalarType acc_dtype(at::ScalarType t);

// Row offsets of a batch given per image (counts[n] rows of image n, the
// images' rows concatenated): N + 1 offsets. Raises a ValueError naming `name`
// for a negative count or when the counts do not sum to `rows` (the rows of
// the tensor `rows_of`).
std::vector<int64_t> image_offsets(const char* op, const char* name, at::IntArrayRef counts,
                                   int64_t rows, const char* rows_of);

}  // namespace tbd_ops
