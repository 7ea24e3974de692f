"""tbd_ops.mmdet PseCo pieces with the real mmdet 3.3.0 structures: the prediction-guided
assigner (TASK_UTILS, InstanceData -> AssignResult) and the fused focal loss (MODELS) against
mmdet's own FocalLoss."""
import pytest
import torch

from tbd_ops import mmcv_lite

mmcv_lite.install()
pytest.importorskip("mmdet", reason="mmdet is not installed (make test installs mmdet==3.3.0)")

from mmengine.structures import InstanceData  # noqa: E402
from mmdet.models.task_modules.assigners import AssignResult  # noqa: E402
from mmdet.registry import MODELS, TASK_UTILS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

import tbd_ops  # noqa: E402
import tbd_ops.mmdet  # noqa: E402,F401
from tbd_ops import reference as ref  # noqa: E402

register_all_modules()


def proposals(p, m, c=5, dtype=torch.float64):
    centers = torch.rand(m, 2, dtype=dtype) * 200
    pseudo = torch.cat([centers - 20, centers + 20], 1)
    src = torch.randint(0, max(m, 1), (p,))
    jitter = torch.randn(p, 4, dtype=dtype) * 6
    boxes = (pseudo[src] + jitter) if m else torch.rand(p, 4, dtype=dtype) * 100
    boxes = torch.cat([boxes[:, :2], torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)], 1)
    scores = torch.rand(p, c, dtype=dtype)
    labels = torch.randint(0, c, (m,))
    return boxes, scores, pseudo, labels


@pytest.mark.parametrize("m", [0, 1, 4])
def test_assigner_with_mmdet_structures(m):
    assigner = TASK_UTILS.build(dict(type="PredictionGuidedAssigner", iou_thr=0.4, topk=12, alpha=0.5))
    boxes, scores, pseudo, labels = proposals(300, m)
    valid = torch.rand(300) > 0.1
    pred = InstanceData(bboxes=boxes, scores=scores, valid=valid)
    gt = InstanceData(bboxes=pseudo, labels=labels)
    result = assigner.assign(pred, gt)
    assert isinstance(result, AssignResult) and result.num_gts == m
    gt_inds, q = ref.prediction_guided_assign([boxes], [scores], [pseudo], [labels], valid=[valid])
    assert torch.equal(result.gt_inds, gt_inds[0])
    torch.testing.assert_close(result.get_extra_property("quality"), q[0], rtol=1e-9, atol=0)
    pos = result.gt_inds > 0
    if m:
        assert pos.any()
        assert torch.equal(result.labels[pos], labels[result.gt_inds[pos] - 1])
        iou = ref.pairwise_iou(boxes, pseudo).max(1).values
        torch.testing.assert_close(result.max_overlaps, iou, rtol=1e-9, atol=1e-12)
    assert (result.labels[~pos] == -1).all()
    # Sampling with mmdet's own sampler works on the result.
    sampler = TASK_UTILS.build(dict(type="RandomSampler", num=64, pos_fraction=0.25, neg_pos_ub=-1,
                                    add_gt_as_proposals=False))
    res = sampler.sample(result, InstanceData(priors=boxes), gt)
    assert res.pos_inds.numel() == min(int(pos.sum()), 16)


def test_assigner_needs_scores():
    assigner = TASK_UTILS.build(dict(type="PredictionGuidedAssigner"))
    boxes, _, pseudo, labels = proposals(10, 2)
    with pytest.raises(ValueError, match="scores"):
        assigner.assign(InstanceData(bboxes=boxes), InstanceData(bboxes=pseudo, labels=labels))


@pytest.mark.parametrize("reduction,avg_factor", [("mean", None), ("sum", None), ("mean", 37.0), ("none", None)])
def test_fused_focal_loss_equals_mmdet_focal_loss(reduction, avg_factor):
    ours = MODELS.build(dict(type="FusedFocalLoss", gamma=2.0, alpha=0.25, reduction=reduction, loss_weight=1.5))
    theirs = MODELS.build(dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, reduction=reduction,
                               loss_weight=1.5))
    r, c = 129, 7
    logits = (torch.randn(r, c, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, c + 1, (r,))  # c = background
    weight = torch.rand(r, dtype=torch.float64)
    a = ours(logits, targets, weight, avg_factor=avg_factor)
    b = theirs(logits, targets, weight, avg_factor=avg_factor)
    if reduction == "none":
        b = b * 1.0
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    g = torch.randn_like(a)
    (ga,) = torch.autograd.grad(a, logits, g)
    (gb,) = torch.autograd.grad(b, logits, g)
    torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-12)
