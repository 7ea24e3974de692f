"""PseCo pieces for MMDetection 3.x: the prediction-guided assigner (``TASK_UTILS``)
and the fused sigmoid focal loss (``MODELS``)."""
from typing import Optional

import torch
from mmengine.structures import InstanceData
from mmdet.models.task_modules.assigners import AssignResult, BaseAssigner
from mmdet.registry import MODELS, TASK_UTILS
from mmdet.structures.bbox import get_box_tensor

import tbd_ops
from ..nn import ConsistencyVotingWeights, ScaleConsistencyLoss, SigmoidFocalLoss

MODELS.register_module(name="FusedFocalLoss", module=SigmoidFocalLoss, force=True)
MODELS.register_module(name="ScaleConsistencyLoss", module=ScaleConsistencyLoss, force=True)
MODELS.register_module(name="ConsistencyVotingWeights", module=ConsistencyVotingWeights, force=True)


@TASK_UTILS.register_module()
class PredictionGuidedAssigner(BaseAssigner):
    """PseCo's prediction-guided label assignment (SPEC 2.1) with mmdet's assigner interface.

    ``assign(pred_instances, gt_instances, gt_instances_ignore=None)``:
    ``pred_instances.bboxes`` (or ``.priors``) ``[P, 4]`` are the teacher's boxes
    regressed from the proposals, ``pred_instances.scores`` ``[P, C]`` its class
    probabilities (indexed by the pseudo labels), optional ``pred_instances.valid``
    ``[P]`` bool; ``gt_instances`` holds the pseudo boxes (``bboxes``, ``labels``).
    Returns an ``AssignResult``: ``gt_inds`` 0 for background, ``j + 1`` for pseudo
    box j; ``max_overlaps`` the proposal's max IoU with the pseudo boxes;
    ``labels`` the pseudo label of positives, -1 otherwise; the quality ``q`` as
    the extra property ``"quality"``.
    """

    def __init__(self, iou_thr: float = 0.4, topk: int = 12, alpha: float = 0.5):
        self.iou_thr, self.topk, self.alpha = float(iou_thr), int(topk), float(alpha)

    def assign(self, pred_instances: InstanceData, gt_instances: InstanceData,
               gt_instances_ignore: Optional[InstanceData] = None, **kwargs) -> AssignResult:
        if "bboxes" in pred_instances:
            boxes = get_box_tensor(pred_instances.bboxes)
        elif "priors" in pred_instances:
            boxes = get_box_tensor(pred_instances.priors)
        else:
            raise ValueError("PredictionGuidedAssigner: pred_instances needs 'bboxes' (or 'priors') [P, 4]")
        if "scores" not in pred_instances:
            raise ValueError("PredictionGuidedAssigner: pred_instances needs the teacher's 'scores' [P, C]")
        scores = pred_instances.scores
        valid = pred_instances.valid if "valid" in pred_instances else None
        gt_bboxes = get_box_tensor(gt_instances.bboxes).to(boxes.dtype)
        gt_labels = gt_instances.labels
        gt_inds, q = tbd_ops.prediction_guided_assign(
            [boxes], [scores], [gt_bboxes], [gt_labels], valid=None if valid is None else [valid],
            iou_thr=self.iou_thr, topk=self.topk, alpha=self.alpha)
        gt_inds, q = gt_inds[0], q[0]
        num_gts = gt_bboxes.shape[0]
        if num_gts == 0:
            max_overlaps = boxes.new_zeros(boxes.shape[0])
            labels = gt_inds.new_full((boxes.shape[0],), -1)
        else:
            max_overlaps = tbd_ops.box_max_iou(boxes[None], [gt_bboxes])[0][0]
            pos = gt_inds > 0
            labels = torch.where(pos, gt_labels[(gt_inds - 1).clamp(min=0)], torch.full_like(gt_inds, -1))
        result = AssignResult(num_gts, gt_inds, max_overlaps, labels=labels)
        result.set_extra_property("quality", q)
        return result
