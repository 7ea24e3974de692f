// Pieces shared by every op's schema, checks and backends: the operator
// namespace, the argument checks with their uniform messages, the parser of
// string options, per-image row offsets and the autocast "promote" policy.
// Each op's validation lives in csrc/<op>.{h,cpp}; every check raises a Python
// ValueError/TypeError naming the argument, the expected and the actual value.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <vector>

// The operator namespace. The test-only emulated CUDA build compiles the same
// sources into a namespace of its own (-DTBD_OPS_LIB=tbd_ops_emu).
#ifndef TBD_OPS_LIB
#define TBD_OPS_LIB tbd_ops
#endif
#define TBD_OPS_STR2(x) #x
#define TBD_OPS_STR(x) TBD_OPS_STR2(x)
#define TBD_OPS_LIB_NAME TBD_OPS_STR(TBD_OPS_LIB)

// Whether this build registers the CUDA kernels: the extension built with them
// (-DTBD_OPS_WITH_CUDA) or the test-only emulated build (-DTBD_OPS_CUDA_EMU).
// Each csrc/<op>.cpp then ends with its CUDA registration (csrc/cuda_glue.h).
#if defined(TBD_OPS_WITH_CUDA) || defined(TBD_OPS_CUDA_EMU)
#define TBD_OPS_CUDA_GLUE 1
#else
#define TBD_OPS_CUDA_GLUE 0
#endif

// ---- registration ---------------------------------------------------------------------
// The kernels of one dispatch key in this library, as (name, TORCH_FN(kernel)) pairs:
//   TBD_OPS_IMPL(CPU, "op", TORCH_FN(op_cpu), "_op_backward", TORCH_FN(op_backward_cpu))
#define TBD_OPS_IMPL(key, ...) \
  TORCH_LIBRARY_IMPL(TBD_OPS_LIB, key, m) { ::tbd_ops::detail::impl_all(m, __VA_ARGS__); }
// The autocast kernels: the same ones for AutocastCPU and AutocastCUDA.
#define TBD_OPS_AUTOCAST_IMPL(...) \
  TBD_OPS_IMPL(AutocastCPU, __VA_ARGS__) TBD_OPS_IMPL(AutocastCUDA, __VA_ARGS__)

namespace tbd_ops {

constexpr double kIouEps = 1e-6;

namespace detail {
inline void impl_all(torch::Library&) {}
template <typename F, typename... Rest>
void impl_all(torch::Library& m, const char* name, F kernel, Rest... rest) {
  m.impl(name, kernel);
  impl_all(m, rest...);
}
}  // namespace detail

// ---- checks ---------------------------------------------------------------------------
// TypeError "<op>: <name> must be float32, float64, float16 or bfloat16, got <dtype>".
void check_float(const char* op, c10::string_view name, const at::Tensor& t);

// TypeError "<op>: <name> must be <expected>, got <dtype>" (int64, bool, Float, ...).
void check_dtype(const char* op, c10::string_view name, const at::Tensor& t, at::ScalarType expected);

// TypeError "<op>: <name> must have the dtype of <ref_name> (<dtype>), got <dtype>".
void check_same_dtype(const char* op, c10::string_view name, const at::Tensor& t,
                      c10::string_view ref_name, const at::Tensor& ref);

// ValueError "<op>: <name> must be on the device of <ref_name> (<device>), got <device>".
void check_same_device(const char* op, c10::string_view name, const at::Tensor& t,
                       c10::string_view ref_name, const at::Tensor& ref);

// Output dtype of reductions and accumulators: float32, or float64 for float64.
at::ScalarType acc_dtype(at::ScalarType t);

// ---- string options -------------------------------------------------------------------
template <typename E> struct Option {
  const char* name;
  E value;
};

// The value of the option named `value`; ValueError
// "<op>: <arg> must be "a", "b" or "c", got "x"" otherwise.
template <typename E, size_t N>
E parse_option(const char* op, const char* arg, c10::string_view value, const Option<E> (&options)[N]) {
  for (const Option<E>& o : options) {
    if (value == o.name) return o.value;
  }
  std::ostringstream names;
  for (size_t i = 0; i < N; ++i) {
    names << (i == 0 ? "" : (i + 1 == N ? " or " : ", ")) << '"' << options[i].name << '"';
  }
  TORCH_CHECK_VALUE(false, op, ": ", arg, " must be ", names.str(), ", got \"", std::string(value), "\"");
  return options[0].value;  // not reached
}

// ---- batches given per image ----------------------------------------------------------
// Row offsets of a batch given per image (counts[n] rows of image n, the
// images' rows concatenated): N + 1 offsets. Raises a ValueError naming `name`
// for a negative count or when the counts do not sum to `rows` (the rows of
// the tensor `rows_of`).
std::vector<int64_t> image_offsets(const char* op, const char* name, at::IntArrayRef counts,
                                   int64_t rows, const char* rows_of);

// The number of images of two batches given per image, one count per image in
// each (counts_a and counts_b of the same length N); ValueError
// "<op>: <a> and <b> must have one count per image each, got <x> and <y>" otherwise.
int64_t image_count(const char* op, const char* name_a, at::IntArrayRef counts_a,
                    const char* name_b, at::IntArrayRef counts_b);

// ---- dispatcher -----------------------------------------------------------------------
// The typed handle of operator TBD_OPS_LIB::<name> (keep it in a function-local static).
template <typename Sig> c10::TypedOperatorHandle<Sig> typed_op(const char* qualified_name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified_name, "").typed<Sig>();
}

// ---- autocast: the "promote" policy ---------------------------------------------------
// Under torch.autocast the ops run their floating inputs in the widest of
// their dtypes when these differ (e.g. fp16 predictions, fp32 anchors); inputs
// of one dtype, or with a non-floating one among them, run as they are (the
// op's checks then name what is wrong). An autocast kernel holds an
// AutocastOff for the call it forwards, asks promote_dtype(...) for the dtype
// to run in (nullopt: forward the call unchanged) and casts with cast_to.
struct AutocastOff {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

namespace detail {
struct Promotion {
  bool floating = true, mixed = false;
  at::ScalarType common = at::ScalarType::Undefined;
  void add(const at::Tensor& t) {
    if (!t.defined()) return;
    if (!at::isFloatingType(t.scalar_type())) {
      floating = false;
    } else if (common == at::ScalarType::Undefined) {
      common = t.scalar_type();
    } else if (t.scalar_type() != common) {
      mixed = true;
      common = at::promoteTypes(common, t.scalar_type());
    }
  }
  void add(const c10::optional<at::Tensor>& t) {
    if (t.has_value()) add(*t);
  }
  void add(at::TensorList ts) {
    for (const at::Tensor& t : ts) add(t);
  }
};
}  // namespace detail

// The widest floating dtype of the arguments (tensors, optional tensors,
// tensor lists) when they are all floating and not all of one dtype.
template <typename... Ts> c10::optional<at::ScalarType> promote_dtype(const Ts&... tensors) {
  detail::Promotion p;
  (p.add(tensors), ...);
  if (!p.floating || !p.mixed) return c10::nullopt;
  return p.common;
}

inline at::Tensor cast_to(const at::Tensor& t, at::ScalarType dtype) {
  return t.defined() ? t.to(dtype) : t;
}
inline c10::optional<at::Tensor> cast_to(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  if (!t.has_value()) return t;
  return cast_to(*t, dtype);
}
inline std::vector<at::Tensor> cast_to(at::TensorList ts, at::ScalarType dtype) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const at::Tensor& t : ts) out.push_back(cast_to(t, dtype));
  return out;
}

}  // namespace tbd_ops
