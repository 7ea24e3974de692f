// Pieces of the channel max and of the online (streaming) softmax.
#pragma once

#include "tbd_ops/argmax.h"

namespace tbd_ops {

// Online softmax statistics of a set of values y: m = max y, s = sum exp(y - m).
template <typename A> struct SoftmaxState {
  A m;
  A s;
};

template <typename A> TBD_HD SoftmaxState<A> softmax_empty() {
  return {-INFINITY, A(0)};
}

template <typename A> TBD_HD SoftmaxState<A> softmax_combine(SoftmaxState<A> a, SoftmaxState<A> b) {
  if (is_nan(a.m) || is_nan(b.m)) return {NAN, NAN};
  if (b.m == -INFINITY) return a;
  if (a.m == -INFINITY) return b;
  const A m = a.m > b.m ? a.m : b.m;
  return {m, a.s * math_exp(a.m - m) + b.s * math_exp(b.m - m)};
}

// Adds one value (one exp instead of the two of a general combine).
template <typename A> TBD_HD void softmax_add(SoftmaxState<A>& st, A y) {
  if (is_nan(y) || is_nan(st.m)) {
    st = {A(NAN), A(NAN)};
  } else if (y == -INFINITY) {
    // exp(-inf - m) = 0: nothing to add.
  } else if (st.m == INFINITY || (y == INFINITY && st.m != -INFINITY)) {
    st = {A(INFINITY), A(NAN)};  // exp(inf - inf) is NaN, as in the two-pass softmax
  } else if (y <= st.m) {
    st.s += math_exp(y - st.m);
  } else {
    st.s = st.s * math_exp(st.m - y) + A(1);
    st.m = y;
  }
}

// log of the normalizer: log sum exp(y).
template <typename A> TBD_HD A softmax_lse(SoftmaxState<A> st) {
  return st.m + math_log(st.s);
}

// Gradient of out = scale * softmax(z / T) with respect to z, for one element:
// dz = (1/T) * scale * p * (g - dot) where p = softmax(z/T), dot = sum(p * g).
template <typename A> TBD_HD A spatial_softmax_grad(A p, A g, A dot, A scale, A inv_t) {
  return inv_t * scale * p * (g - dot);
}

}  // namespace tbd_ops
