// Rows of boxes on the CPU: the conversion of a [n, 4] array to Box<A> once,
// and the largest IoU of one box against a row of boxes with its argmax (the
// inner loop of the decode_max_iou and prediction_guided_assign kernels).
// The IoUs of one box are computed in a loop compiled for AVX2 and the
// baseline ISA (picked at load time), then scanned with torch.max semantics
// (tbd_ops/argmax.h): the first NaN, else the lowest index on ties. With the
// boxes' areas computed once (box_areas), the IoUs take box_iou_with_areas.
#pragma once

#include <cstdint>
#include <vector>

#include "tbd_ops/argmax.h"
#include "tbd_ops/box.h"

namespace tbd_ops {
namespace cpu {
// Internal linkage: target_clones resolvers are not shared between translation units.
namespace {

// Boxes [n, 4] (contiguous) converted to A.
template <typename A, typename T> std::vector<Box<A>> load_boxes(const T* boxes, int64_t n) {
  std::vector<Box<A>> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = load_box<A>(boxes, i, CastTo<A>());
  return out;
}

template <typename A>
__attribute__((target_clones("avx2", "default"))) void iou_row(const Box<A>& b, const Box<A>* boxes,
                                                               int64_t n, A eps, A* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = box_iou(b, boxes[j], eps);
}

// max_j IoU(b, boxes[j]) over j < n and its index (-1 when n is 0); `row` is
// the caller's scratch (one per thread).
template <typename A>
ArgMax<A> max_iou(const Box<A>& b, const Box<A>* boxes, int64_t n, A eps, std::vector<A>& row) {
  row.resize(n);
  iou_row(b, boxes, n, eps, row.data());
  return argmax_of(row.data(), n);
}

// box_area of every box.
template <typename A> std::vector<A> box_areas(const std::vector<Box<A>>& boxes) {
  std::vector<A> out(boxes.size());
  for (size_t i = 0; i < boxes.size(); ++i) out[i] = box_area(boxes[i]);
  return out;
}

template <typename A>
__attribute__((target_clones("avx2", "default"))) void iou_row_with_areas(
    const Box<A>& b, A area_b, const Box<A>* boxes, const A* areas, int64_t n, A eps, A* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = box_iou_with_areas(b, area_b, boxes[j], areas[j], eps);
}

// max_iou from the areas of the boxes (box_areas) and whether one of them is
// NaN: box_iou_with_areas when neither b's area nor one of theirs is NaN,
// else box_iou; the same result bit for bit.
template <typename A>
ArgMax<A> max_iou(const Box<A>& b, const Box<A>* boxes, const A* areas, bool nan_area, int64_t n,
                  A eps, std::vector<A>& row) {
  const A area_b = box_area(b);
  if (nan_area || is_nan(area_b)) return max_iou(b, boxes, n, eps, row);
  row.resize(n);
  iou_row_with_areas(b, area_b, boxes, areas, n, eps, row.data());
  return argmax_of(row.data(), n);
}

}  // namespace
}  // namespace cpu
}  // namespace tbd_ops
