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
from ..nn.pseco import assigner_args


@MODELS.register_module(name="FusedFocalLoss", force=True)
class FusedFocalLoss(SigmoidFocalLoss):
    """``tbd_ops.nn.SigmoidFocalLoss`` as an MMDetection loss type. ``use_sigmoid=True`` must be in
    the config: mmdet's heads read it from there (a missing key means False, and the head gets
    C + 1 class channels, where this loss would train background as a class)."""

    def __init__(self, *args, use_sigmoid: Optional[bool] = None, **kwargs):
        if use_sigmoid is None:
            raise ValueError(
                "FusedFocalLoss: write use_sigmoid=True in the loss config. MMDetection's heads read use_sigmoid "
                "from the config, not from the loss (missing means False): they would get C + 1 class channels "
                "and this loss would train background as a class")
        super().__init__(*args, use_sigmoid=use_sigmoid, **kwargs)


MODELS.register_module(name="ScaleConsistencyLoss", module=ScaleConsistencyLoss, force=True)
MODELS.register_module(name="ConsistencyVotingWeights", module=ConsistencyVotingWeights, force=True)


class PseCoAssignResult(AssignResult):
    """mmdet's ``AssignResult`` with the assignment quality as the extra property
    ``"quality"`` ``[P]``, kept row for row with ``gt_inds``: when a sampler with
    ``add_gt_as_proposals=True`` prepends the ground truths as proposals
    (``add_gt_``), their quality, 1 (a box against itself), is prepended too."""

    def add_gt_(self, gt_labels: torch.Tensor) -> None:
        super().add_gt_(gt_labels)
        q = self.get_extra_property("quality")
        if q is not None:
            self._extra_properties["quality"] = torch.cat([q.new_ones(len(gt_labels)), q])


def positive_area(boxes: torch.Tensor) -> torch.Tensor:
    """PseCo's ``valid`` rule: ``(x2 - x1) * (y2 - y1) > 0`` per box ``[P, 4]`` -> ``[P]`` bool."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) > 0


@TASK_UTILS.register_module()
class PredictionGuidedAssigner(BaseAssigner):
    """PseCo's prediction-guided label assignment (SPEC 2.1) with mmdet's assigner interface.

    ``assign(pred_instances, gt_instances, gt_instances_ignore=None)``, with
    ``gt_instances`` the pseudo boxes (``bboxes``, ``labels``) and in
    ``pred_instances``:

    - ``bboxes`` ``[P, 4]``: the teacher's boxes regressed from the proposals
      (at its top class, in the student's view); they give the IoUs. Without
      ``bboxes`` the ``priors`` are used.
    - ``priors`` ``[P, 4]``: the proposals (RoIs) in the student's view, as
      mmdet's RoI heads pass them.
    - ``scores`` ``[P, C]``: the teacher's class probabilities, read at the
      pseudo labels (required).
    - ``valid`` ``[P]`` bool (optional): proposals that may become positive.
      **Default: the official PseCo rule**, a proposal is valid when its area
      in the student's view is positive, ``(x2 - x1) * (y2 - y1) > 0`` of
      ``priors``; without ``priors`` (and without ``valid``) every proposal
      is valid. Pass ``valid`` to override (all ``True`` to switch it off).

    Returns a :class:`PseCoAssignResult`: ``gt_inds`` 0 for background,
    ``j + 1`` for pseudo box j; ``max_overlaps`` the proposal's max IoU with
    the pseudo boxes; ``labels`` the pseudo label of positives, -1 otherwise;
    the quality ``q`` as the extra property ``"quality"``, which stays in step
    with the rows when mmdet's samplers add the ground truths as proposals
    (quality 1 for them). ``gt_instances_ignore`` is not used.
    """

    def __init__(self, iou_thr: float = 0.4, topk: int = 12, alpha: float = 0.5):
        self.iou_thr, self.topk, self.alpha = assigner_args("PredictionGuidedAssigner", iou_thr, topk, alpha)

    def assign(self, pred_instances: InstanceData, gt_instances: InstanceData,
               gt_instances_ignore: Optional[InstanceData] = None, **kwargs) -> PseCoAssignResult:
        priors = get_box_tensor(pred_instances.priors) if "priors" in pred_instances else None
        if "bboxes" in pred_instances:
            boxes = get_box_tensor(pred_instances.bboxes)
        elif priors is not None:
            boxes = priors
        else:
            raise ValueError("PredictionGuidedAssigner: pred_instances needs 'bboxes' (or 'priors') [P, 4]")
        if "scores" not in pred_instances:
            raise ValueError("PredictionGuidedAssigner: pred_instances needs the teacher's 'scores' [P, C]")
        scores = pred_instances.scores
        if "valid" in pred_instances:
            valid = pred_instances.valid
        elif priors is not None and priors.dim() == 2 and priors.shape[-1] == 4:
            valid = positive_area(priors)
        else:
            valid = None
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
        result = PseCoAssignResult(num_gts, gt_inds, max_overlaps, labels=labels)
        result.set_extra_property("quality", q)
        return result
