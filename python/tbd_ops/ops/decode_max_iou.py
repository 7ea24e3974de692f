"""p_r: fused box decode + max IoU against every ground truth (SPEC 1.2)."""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ._device_values import device_values
from ._utils import (CODERS, acc_dtype, as_float, as_floats, cat_images, check_option, check_tensor, image_list,
                     levels, register_fake, same_dtype_and_device, schema_defaults)

_OP = "decode_max_iou"
DEFAULTS = schema_defaults(_OP)  # coder, means, stds, scale, max_shape, wh_ratio_clip

Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def _flatten_gts(op: str, gt_bboxes, n: int, ref: torch.Tensor) -> Tuple[torch.Tensor, List[int]]:
    """Ragged ground truths (list of N [G_n, 4], or [N, G, 4]) -> ([sum G_n, 4], counts)."""
    if isinstance(gt_bboxes, torch.Tensor):
        if gt_bboxes.dim() != 3:
            raise ValueError(
                f"{op}: gt_bboxes must be a list of N tensors [G_n, 4] or one tensor [N, G, 4], "
                f"got a tensor of shape {tuple(gt_bboxes.shape)}"
            )
        gt_bboxes = list(gt_bboxes.unbind(0))
    gt_bboxes = image_list(op, "gt_bboxes", gt_bboxes, n)
    for i, g in enumerate(gt_bboxes):
        if g.dim() != 2 or g.shape[1] != 4:
            raise ValueError(f"{op}: gt_bboxes[{i}] must be [G, 4], got shape {tuple(g.shape)}")
    counts = [g.shape[0] for g in gt_bboxes]
    return (cat_images(gt_bboxes) if n else ref.new_empty((0, 4))), counts


def _is_pair_list(value) -> bool:
    """A list/tuple of (h, w) pairs (one per image) rather than one (h, w)."""
    return isinstance(value, (list, tuple)) and (
        len(value) == 0
        or isinstance(value[0], (list, tuple))
        or (isinstance(value[0], torch.Tensor) and value[0].dim() > 0)
    )


def _shapes_on_device(op: str, max_shape, n: int, ref: torch.Tensor) -> torch.Tensor:
    """A list of N (h, w) -> [N, 2] on the device of ``ref`` in its accumulation dtype.

    Checked on the host, then written by one small kernel that gets the values
    as parameters: no host-to-device copy, no synchronization, capturable.
    """
    if len(max_shape) != n:
        raise ValueError(f"{op}: max_shape must hold one (h, w) per image (N = {n}), got {len(max_shape)}")
    flat = []
    for i, hw in enumerate(max_shape):
        vals = as_floats(op, f"max_shape[{i}]", hw, None)
        if len(vals) < 2:
            raise ValueError(f"{op}: max_shape[{i}] must be (h, w), got {hw!r}")
        if not all(math.isfinite(v) and v >= 0 for v in vals[:2]):
            raise ValueError(f"{op}: max_shape must hold finite sizes >= 0, got max_shape[{i}] = {hw!r}")
        flat += vals[:2]
    return device_values(flat, ref, acc_dtype(ref.dtype)).view(n, 2)


def _max_shape_args(op: str, max_shape, n: int, ref: torch.Tensor):
    """max_shape -> (one (h, w) as floats or None, per-image [N, 2] tensor or None).

    Per-image shapes stay on (or go to) the device of ``ref`` without a device
    synchronization: a tensor is passed as is (the kernels read it), a list is
    checked on the host and written to the device by a kernel (_shapes_on_device).
    """
    if max_shape is None:
        return None, None
    if isinstance(max_shape, torch.Tensor):
        if max_shape.dim() == 1 and max_shape.device.type == "cpu":
            pass  # one (h, w) on the host: read below, as a sequence
        elif max_shape.dim() == 1:
            if max_shape.shape[0] != 2:
                raise ValueError(f"{op}: max_shape must be (h, w), got a tensor of shape {tuple(max_shape.shape)}")
            return None, max_shape.reshape(1, 2).expand(n, 2)  # the same (h, w) for every image
        else:
            return None, max_shape  # [N, 2]: checked by the op
    elif _is_pair_list(max_shape):
        return None, _shapes_on_device(op, max_shape, n, ref)
    ms = as_floats(op, "max_shape", max_shape, None)[:2]
    if len(ms) != 2:
        raise ValueError(f"{op}: max_shape must be (h, w), got {max_shape!r}")
    return ms, None


def decode_max_iou(
    bbox_pred: Tensors,
    priors: Optional[Tensors],
    gt_bboxes,
    *,
    coder: str = DEFAULTS["coder"],
    means: Sequence[float] = DEFAULTS["means"],
    stds: Sequence[float] = DEFAULTS["stds"],
    scale: Union[float, Sequence[float]] = DEFAULTS["scale"],
    max_shape=None,
    wh_ratio_clip: float = DEFAULTS["wh_ratio_clip"],
):
    """Decode every prediction and take its max IoU over the image's ground truths.

    The predictions x ground-truth IoU matrix is never formed: memory is O(P + G).

    Args:
        bbox_pred: ``[N, A*4, H, W]`` head output (read in place, prior order
            ``(h, w, a)``) or ``[N, P, 4]``; or a list of levels.
        priors: ``[P, 4]`` anchors (``delta_xywh``), ``[P, 2]`` points
            (``distance``; ``[P, 4]`` points with strides also accepted), None for
            ``coder="none"``; a list for list input.
        gt_bboxes: list of N tensors ``[G_n, 4]`` (``G_n`` may be 0) or ``[N, G, 4]``.
        coder: ``"delta_xywh"`` (MMDetection's DeltaXYWHBBoxCoder), ``"distance"``
            (``distance2bbox(points, ltrb * scale)``) or ``"none"``.
        means, stds, wh_ratio_clip: ``delta_xywh`` parameters.
        scale: ``distance`` multiplier, one number or one per level.
        max_shape: clip decoded boxes to ``[0, w] x [0, h]``: None (no clip),
            one ``(h, w)`` for every image, or one per image as an ``[N, 2]``
            tensor (any float or integer dtype, on the device of ``bbox_pred``;
            read by the kernels, no synchronization) or a list of N ``(h, w)``
            (MMDetection's per-image ``img_shape``). Applies to every level of
            list input.

    Returns:
        ``(iou [N, P], arg [N, P] int64)``: the max IoU in the dtype of
        ``bbox_pred`` (0 for an image without ground truth) and the index of the
        maximizing ground truth (lowest on ties, -1 without ground truth). A list
        of such pairs for list input.
    """
    check_option(_OP, "coder", coder, CODERS)
    first = bbox_pred[0] if isinstance(bbox_pred, (list, tuple)) and len(bbox_pred) else bbox_pred
    if _is_pair_list(max_shape) and isinstance(first, torch.Tensor) and first.dim() > 0:
        max_shape = _shapes_on_device(_OP, max_shape, first.shape[0], first)  # once for every level
    per_level, is_list = levels(_OP, ("bbox_pred", "priors", "scale"), bbox_pred, priors, scale,
                                broadcast=("priors", "scale"))
    flat = None
    if is_list:
        preds = [b for b, _, _ in per_level]
        if (preds and all(isinstance(b, torch.Tensor) and b.dim() > 0 for b in preds)
                and same_dtype_and_device(preds) and len({b.shape[0] for b in preds}) == 1):
            # The levels share one batch: the ground truths are flattened once for all of them.
            flat = _flatten_gts(_OP, gt_bboxes, first.shape[0], first)
        return [_decode(b, p, gt_bboxes, flat, coder, means, stds, s, max_shape, wh_ratio_clip)
                for b, p, s in per_level]
    return _decode(bbox_pred, priors, gt_bboxes, flat, coder, means, stds, scale, max_shape, wh_ratio_clip)


def _decode(bbox_pred, priors, gt_bboxes, flat, coder, means, stds, scale, max_shape, wh_ratio_clip):
    """decode_max_iou of one level; ``flat``: the ground truths already flattened (or None)."""
    check_tensor(_OP, "bbox_pred", bbox_pred)
    if priors is not None:
        check_tensor(_OP, "priors", priors)
    if bbox_pred.dim() not in (3, 4) or (bbox_pred.dim() == 3 and bbox_pred.shape[2] != 4):
        raise ValueError(f"{_OP}: bbox_pred must be [N, A*4, H, W] or [N, P, 4], got shape {tuple(bbox_pred.shape)}")
    gts, counts = flat if flat is not None else _flatten_gts(_OP, gt_bboxes, bbox_pred.shape[0], bbox_pred)
    ms, shapes = _max_shape_args(_OP, max_shape, bbox_pred.shape[0], bbox_pred)
    return tuple(
        torch.ops.tbd_ops.decode_max_iou.default(
            bbox_pred, priors, gts, counts, coder,
            as_floats(_OP, "means", means, 4), as_floats(_OP, "stds", stds, 4),
            as_float(_OP, "scale", scale), ms, as_float(_OP, "wh_ratio_clip", wh_ratio_clip), shapes,
        )
    )


def box_max_iou(boxes: Tensors, gt_bboxes):
    """Max IoU of already-decoded boxes ``[N, P, 4]`` over each image's ground truths.

    Returns ``(iou [N, P], arg [N, P] int64)`` as :func:`decode_max_iou`.
    """
    per_level, is_list = levels("box_max_iou", ("boxes",), boxes)
    if is_list:
        return [box_max_iou(b, gt_bboxes) for (b,) in per_level]
    check_tensor("box_max_iou", "boxes", boxes)
    if boxes.dim() != 3 or boxes.shape[2] != 4:
        raise ValueError(f"box_max_iou: boxes must be [N, P, 4], got shape {tuple(boxes.shape)}")
    gts, counts = _flatten_gts("box_max_iou", gt_bboxes, boxes.shape[0], boxes)
    return tuple(torch.ops.tbd_ops.box_max_iou.default(boxes, gts, counts))


def _num_priors(bbox_pred):
    if bbox_pred.dim() == 4:
        return bbox_pred.shape[1] // 4 * bbox_pred.shape[2] * bbox_pred.shape[3]
    return bbox_pred.shape[1]


@register_fake("tbd_ops::decode_max_iou")
def _fake(bbox_pred, priors, gt_bboxes, gt_counts, coder=DEFAULTS["coder"], means=DEFAULTS["means"],
          stds=DEFAULTS["stds"], scale=DEFAULTS["scale"], max_shape=None, wh_ratio_clip=DEFAULTS["wh_ratio_clip"],
          max_shapes=None):
    torch._check(bbox_pred.dim() in (3, 4), lambda: f"{_OP}: bbox_pred must be [N, A*4, H, W] or [N, P, 4]")
    torch._check(len(gt_counts) == bbox_pred.shape[0], lambda: f"{_OP}: gt_counts must have one count per image")
    if max_shapes is not None:
        torch._check(max_shapes.dim() == 2 and max_shapes.shape[1] == 2
                     and max_shapes.shape[0] == bbox_pred.shape[0],
                     lambda: f"{_OP}: max_shape per image must be [N, 2]")
    n, p = bbox_pred.shape[0], _num_priors(bbox_pred)
    return bbox_pred.new_empty((n, p)), bbox_pred.new_empty((n, p), dtype=torch.long)


@register_fake("tbd_ops::_decode_max_iou_backward")
def _fake_backward(grad_iou, arg, bbox_pred, priors, gt_bboxes, gt_counts, coder, means, stds,
                   scale, max_shape, wh_ratio_clip, output_mask, max_shapes=None):
    empty = bbox_pred.new_empty((0,))
    g_pred = torch.empty_like(bbox_pred) if output_mask[0] else empty
    want_priors = output_mask[1] and priors is not None and coder != "none"
    g_priors = priors.new_empty(priors.shape) if want_priors else bbox_pred.new_empty((0,))
    g_gts = gt_bboxes.new_empty(gt_bboxes.shape) if output_mask[2] else bbox_pred.new_empty((0,))
    return g_pred, g_priors, g_gts
