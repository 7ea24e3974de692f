"""PseCo (semi-supervised detection) losses and label assignment as ``nn.Module``s (SPEC 2).

Thin modules over the fused ops: ``PseCoAssigner`` (prediction-guided label
assignment), ``ConsistencyVotingWeights`` (positive-proposal consistency
voting), ``SigmoidFocalLoss`` and ``ScaleConsistencyLoss``; and
``downsample_view`` to build PseCo's second view (nearest x0.5) with its boxes.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tbd_ops

__all__ = ["PseCoAssigner", "ConsistencyVotingWeights", "SigmoidFocalLoss", "ScaleConsistencyLoss",
           "downsample_view"]

_REDUCTIONS = ("none", "sum", "mean")


class PseCoAssigner(nn.Module):
    """Prediction-guided label assignment (SPEC 2.1) for a whole batch in one call.

    ``forward(boxes, scores, pseudo_boxes, pseudo_labels, valid=None)`` takes
    lists per image (``[P_n, 4]`` teacher boxes, ``[P_n, C]`` teacher class
    probabilities, ``[M_n, 4]`` pseudo boxes, ``[M_n]`` labels, optional
    ``[P_n]`` bool) and returns ``(gt_inds, q)`` lists: ``gt_inds`` 0 for
    background, ``j + 1`` for pseudo box j; ``q`` the assignment quality.
    """

    def __init__(self, iou_thr: float = 0.4, topk: int = 12, alpha: float = 0.5):
        super().__init__()
        self.iou_thr, self.topk, self.alpha = float(iou_thr), int(topk), float(alpha)
        if not (0 < self.iou_thr <= 1):
            raise ValueError(f"PseCoAssigner: iou_thr must be in (0, 1], got {iou_thr}")
        if self.topk < 1:
            raise ValueError(f"PseCoAssigner: topk must be >= 1, got {topk}")
        if not (0 <= self.alpha <= 1):
            raise ValueError(f"PseCoAssigner: alpha must be in [0, 1], got {alpha}")

    def forward(self, boxes, scores, pseudo_boxes, pseudo_labels, valid=None):
        return tbd_ops.prediction_guided_assign(boxes, scores, pseudo_boxes, pseudo_labels, valid=valid,
                                                iou_thr=self.iou_thr, topk=self.topk, alpha=self.alpha)

    def extra_repr(self) -> str:
        return f"iou_thr={self.iou_thr}, topk={self.topk}, alpha={self.alpha}"


class ConsistencyVotingWeights(nn.Module):
    """Positive-proposal consistency voting (SPEC 2.2).

    ``forward(pred_boxes, gt_inds, pseudo_boxes)`` -> ``(sigma, w, reg_scale)``:
    per pseudo box the mean IoU of its positives, per RoI the regression weight,
    and the batch factor (a 0-d tensor). Constants: no gradient flows.
    """

    def __init__(self, mode: str = "pseco"):
        super().__init__()
        if mode not in ("pseco", "paper"):
            raise ValueError(f"ConsistencyVotingWeights: mode must be 'pseco' or 'paper', got {mode!r}")
        self.mode = mode

    def forward(self, pred_boxes, gt_inds, pseudo_boxes):
        return tbd_ops.consistency_voting(pred_boxes, gt_inds, pseudo_boxes, mode=self.mode)


class SigmoidFocalLoss(nn.Module):
    """Fused sigmoid focal loss (SPEC 2.4) with MMDetection's loss interface.

    ``forward(logits [R, C], targets [R] in [0, C] (C = background), weight=None,
    avg_factor=None, reduction_override=None)``. With ``avg_factor`` the sum is
    divided by it (PseCo: the number of sampled RoIs), as mmdet's losses do.
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, reduction: str = "mean",
                 loss_weight: float = 1.0, use_sigmoid: bool = True):
        super().__init__()
        if not use_sigmoid:
            raise ValueError("SigmoidFocalLoss: only use_sigmoid=True is supported")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"SigmoidFocalLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.gamma, self.alpha, self.reduction, self.loss_weight = float(gamma), float(alpha), reduction, float(loss_weight)

    def forward(self, logits: Tensor, targets: Tensor, weight: Optional[Tensor] = None,
                avg_factor: Optional[float] = None, reduction_override: Optional[str] = None) -> Tensor:
        reduction = reduction_override or self.reduction
        if reduction not in _REDUCTIONS:
            raise ValueError(f"SigmoidFocalLoss: reduction_override must be one of {_REDUCTIONS}, got {reduction!r}")
        if weight is not None and weight.dim() != 1:
            raise ValueError(f"SigmoidFocalLoss: weight must be [R] (one weight per row), got {tuple(weight.shape)}")
        if avg_factor is not None:
            if reduction == "none":
                raise ValueError("SigmoidFocalLoss: avg_factor needs reduction 'mean' or 'sum'")
            loss = tbd_ops.sigmoid_focal_loss(logits, targets, weight, gamma=self.gamma, alpha=self.alpha,
                                              reduction="sum")
            if reduction == "mean":
                loss = loss / (avg_factor + torch.finfo(torch.float32).eps)
        else:
            loss = tbd_ops.sigmoid_focal_loss(logits, targets, weight, gamma=self.gamma, alpha=self.alpha,
                                              reduction=reduction)
        return loss * self.loss_weight


class ScaleConsistencyLoss(nn.Module):
    """Multi-view scale consistency (SPEC 2.3): ``loss_weight * scale_consistency_loss``.

    ``forward(feats_v1, feats_v2, mask=None)`` with the aligned level lists
    (V1's P3-P7 and V2's P2-P6) and optional per-level masks ``[N, 1, H, W]``.
    """

    def __init__(self, loss_weight: float = 1.0):
        super().__init__()
        self.loss_weight = float(loss_weight)

    def forward(self, feats_v1, feats_v2, mask=None) -> Tensor:
        return tbd_ops.scale_consistency_loss(feats_v1, feats_v2, mask) * self.loss_weight


def downsample_view(images: Tensor, boxes: Optional[Sequence[Tensor]] = None
                    ) -> Tuple[Tensor, Optional[List[Tensor]]]:
    """PseCo's view V2: the images downsampled by 2 (nearest) and the V1 boxes mapped to it.

    ``images`` ``[N, C, H, W]``; ``boxes`` a list of ``[G_n, 4]`` (x1, y1, x2, y2)
    in V1 pixels. Returns ``(images_v2 [N, C, ceil(H/2), ceil(W/2)], boxes_v2)``;
    with nearest sampling pixel ``(y, x)`` of V2 is pixel ``(2y, 2x)`` of V1, so a
    V1 coordinate maps to half its value.
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"downsample_view: images must be [N, C, H, W], got {got}")
    v2 = F.interpolate(images, scale_factor=0.5, mode="nearest")
    out_boxes = None
    if boxes is not None:
        out_boxes = []
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"downsample_view: boxes[{i}] must be [G, 4], got {got}")
            out_boxes.append(b * 0.5)
    return v2, out_boxes
