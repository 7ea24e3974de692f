"""PseCo's prediction-guided label assignment (SPEC 2.1), the whole batch per launch."""
from typing import List, Optional, Sequence, Tuple

import torch

from ._utils import as_float, as_int, cat_images, check_rows, image_list, register_fake, schema_defaults

_OP = "prediction_guided_assign"
DEFAULTS = schema_defaults(_OP)  # iou_thr, topk, alpha


def prediction_guided_assign(
    boxes: Sequence[torch.Tensor],
    scores: Sequence[torch.Tensor],
    pseudo_boxes: Sequence[torch.Tensor],
    pseudo_labels: Sequence[torch.Tensor],
    valid: Optional[Sequence[torch.Tensor]] = None,
    iou_thr: float = DEFAULTS["iou_thr"],
    topk: int = DEFAULTS["topk"],
    alpha: float = DEFAULTS["alpha"],
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Prediction-guided label assignment of PseCo, for a batch of images.

    For every proposal p of an image: ``u[p]`` is its largest IoU with the
    image's pseudo boxes and ``j*(p)`` that pseudo box (the lowest index on
    ties). The bag of pseudo box j holds the proposals with ``j*(p) = j`` and
    ``u[p] >= iou_thr``. Its size ``k_j = max(1, floor(sum of the
    min(|bag|, topk) largest u))``, the floor of the exact sum of those IoUs
    (no rounding: IoUs that add up to exactly 5, as PseCo's 1 + .85 + .85 +
    .75 + .65 + .45 + .45 in float32, give k = 5). The ``k_j`` members of largest quality
    ``q = s^alpha * u^(1 - alpha)``, ``s = scores[p, pseudo_labels[j]]``, become
    positives (equal q: the lower proposal index first), except those with
    ``valid[p] = False``.

    All images run in one launch; nothing synchronizes with the host.

    Args:
        boxes: N tensors ``[P_n, 4]`` (teacher boxes of the proposals).
        scores: N tensors ``[P_n, C]`` (teacher class probabilities), C >= 1.
        pseudo_boxes: N tensors ``[M_n, 4]`` (``M_n`` may be 0).
        pseudo_labels: N int64 tensors ``[M_n]`` with values in ``[0, C)``. The
            CPU kernel raises on a label outside; the CUDA kernel takes the
            score of such a pseudo box as 0 (it never reads out of bounds).
        valid: None, or N bool tensors ``[P_n]``.
        iou_thr: in (0, 1]. topk: >= 1. alpha: in [0, 1].

    Returns:
        ``(gt_inds, q)``, lists of N tensors ``[P_n]``: ``gt_inds`` int64, 0 for
        background and ``j + 1`` for a positive of pseudo box j; ``q`` the
        quality of every proposal against its best pseudo box ``j*(p)``
        (positive or not; 0 in an image without pseudo boxes), computed in
        float32 (float64 for float64 input) and returned in the dtype of
        ``scores``. Neither output has a gradient.
    """
    boxes = image_list(_OP, "boxes", boxes, None)
    n = len(boxes)
    scores = image_list(_OP, "scores", scores, n)
    pseudo_boxes = image_list(_OP, "pseudo_boxes", pseudo_boxes, n)
    pseudo_labels = image_list(_OP, "pseudo_labels", pseudo_labels, n)
    if valid is not None:
        valid = image_list(_OP, "valid", valid, n)
    if n == 0:
        return [], []
    for i in range(n):
        check_rows(_OP, "boxes", boxes, i, "P", 4)
        check_rows(_OP, "scores", scores, i, "P", "C", like=("boxes", boxes))
        if scores[i].shape[1] != scores[0].shape[1]:
            raise ValueError(f"{_OP}: scores[{i}] must have the C = {scores[0].shape[1]} columns of scores[0], "
                             f"got shape {tuple(scores[i].shape)}")
        check_rows(_OP, "pseudo_boxes", pseudo_boxes, i, "M", 4)
        check_rows(_OP, "pseudo_labels", pseudo_labels, i, "M", like=("pseudo_boxes", pseudo_boxes))
        if valid is not None:
            check_rows(_OP, "valid", valid, i, "P", like=("boxes", boxes))
    p_counts = [b.shape[0] for b in boxes]
    m_counts = [g.shape[0] for g in pseudo_boxes]
    gt_inds, q = torch.ops.tbd_ops.prediction_guided_assign.default(
        cat_images(boxes), cat_images(scores), cat_images(pseudo_boxes), cat_images(pseudo_labels), p_counts, m_counts,
        None if valid is None else cat_images(valid), as_float(_OP, "iou_thr", iou_thr), as_int(_OP, "topk", topk),
        as_float(_OP, "alpha", alpha),
    )
    return list(gt_inds.split(p_counts)), list(q.split(p_counts))


@register_fake("tbd_ops::prediction_guided_assign")
def _fake(boxes, scores, pseudo_boxes, pseudo_labels, proposal_counts, pseudo_counts, valid=None,
          iou_thr=DEFAULTS["iou_thr"], topk=DEFAULTS["topk"], alpha=DEFAULTS["alpha"]):
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: f"{_OP}: boxes must be [P, 4]")
    torch._check(len(proposal_counts) == len(pseudo_counts),
                 lambda: f"{_OP}: proposal_counts and pseudo_counts must have one count per image each")
    p = boxes.shape[0]
    return boxes.new_empty((p,), dtype=torch.long), scores.new_empty((p,))
