// Running argmax shared by the channel max (p_c) and the max over ground truths (p_r).
#pragma once

#include "tbd_ops/math.h"

namespace tbd_ops {

// Running argmax with torch.max(dim) semantics: the first NaN wins, otherwise
// the largest value, and on ties the lowest index.
template <typename T> struct ArgMax {
  T value;
  int64_t index;  // -1 while empty
};

template <typename T> TBD_HD ArgMax<T> argmax_empty() { return {T(0), -1}; }

// Whether a later candidate v replaces the current best value (branch-free
// form, usable in vectorized loops).
template <typename T> TBD_HD bool argmax_takes(T best, T v) {
  // Bitwise on ints: no short-circuit branches, so loops over it vectorize.
  return static_cast<bool>(static_cast<int>(!is_nan(best)) &
                           (static_cast<int>(is_nan(v)) | static_cast<int>(v > best)));
}

// Feed candidates in increasing index order.
template <typename T> TBD_HD void argmax_update(ArgMax<T>& a, T v, int64_t idx) {
  if (a.index < 0 || argmax_takes(a.value, v)) { a.value = v; a.index = idx; }
}

// The same running argmax for candidates that are NaN or >= some floor (IoUs
// are NaN or >= -0.0), started by argmax_below(v) with a value v below that
// floor instead of argmax_empty(): the first candidate always replaces v (it is
// not <= v), later ones replace the best as argmax_takes says (`!(v <= best)`
// is v > best or v NaN while best is not NaN), so no emptiness test per
// candidate. The index stays -1 while empty.
// The (value, index) form lets a hot loop keep a 32-bit index; written with
// selects, so that T and I may also be CPU vector types of floats and of
// 32-bit ints (GCC vector extensions: a running argmax per lane).
template <typename T> TBD_HD ArgMax<T> argmax_below(T v) { return {v, -1}; }
template <typename T, typename I>
TBD_HD void argmax_update_above(T& value, I& index, T v, I idx) {
  const auto above = !(v <= value);  // v > value, or v NaN
  const auto take = above & (value == value);  // and value not NaN
  value = take ? v : value;
  index = take ? idx : index;
}
template <typename T> TBD_HD void argmax_update_above(ArgMax<T>& a, T v, int64_t idx) {
  argmax_update_above(a.value, a.index, v, idx);
}

// The argmax of two disjoint sets of candidates, each found by argmax_update:
// the same result as feeding every candidate in index order (the first NaN,
// else the largest value, the lowest index on ties), whatever the grouping of
// the candidates and the order of the merges (commutative and associative).
template <typename T> TBD_HD ArgMax<T> argmax_merge(const ArgMax<T>& a, const ArgMax<T>& b) {
  if (a.index < 0) return b;
  if (b.index < 0) return a;
  const bool an = is_nan(a.value), bn = is_nan(b.value);
  bool take_b;
  if (an || bn) {
    take_b = (an && bn) ? b.index < a.index : bn;
  } else {
    take_b = b.value > a.value || (b.value == a.value && b.index < a.index);
  }
  return take_b ? b : a;
}

// The argmax of v[0, n) (index -1 when n is 0).
template <typename T> TBD_HD ArgMax<T> argmax_of(const T* v, int64_t n) {
  ArgMax<T> a = argmax_empty<T>();
  for (int64_t i = 0; i < n; ++i) argmax_update(a, v[i], i);
  return a;
}

}  // namespace tbd_ops
