"""tbd_ops.mmdet PseCo pieces with the real mmdet 3.3.0 structures: the prediction-guided
assigner (TASK_UTILS, InstanceData -> AssignResult, with mmdet's samplers) and the fused focal
loss (MODELS) against mmdet's own FocalLoss and its unit-test cases."""
import pytest
import torch
import torch.nn.functional as F

from op_testing import DEVICES

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


# ---- PredictionGuidedAssigner with mmdet's samplers --------------------------------------------

@pytest.mark.parametrize("sampler", ["RandomSampler", "PseudoSampler"])
def test_quality_stays_in_step_when_the_sampler_adds_gts(sampler):
    """add_gt_as_proposals=True prepends the pseudo boxes as proposals to gt_inds, max_overlaps and
    labels; the quality must get the same rows (1 for a box against itself)."""
    p, m = 100, 3
    assigner = TASK_UTILS.build(dict(type="PredictionGuidedAssigner"))
    boxes, scores, pseudo, labels = proposals(p, m)
    gt = InstanceData(bboxes=pseudo, labels=labels)
    result = assigner.assign(InstanceData(bboxes=boxes, priors=boxes, scores=scores), gt)
    q = result.get_extra_property("quality").clone()
    gt_inds = result.gt_inds.clone()
    if sampler == "RandomSampler":
        cfg = dict(type=sampler, num=64, pos_fraction=0.25, neg_pos_ub=-1, add_gt_as_proposals=True)
        TASK_UTILS.build(cfg).sample(result, InstanceData(priors=boxes), gt)
    else:  # mmdet's AssignResult.add_gt_ directly (what every sampler with the flag calls)
        result.add_gt_(labels)
    quality = result.get_extra_property("quality")
    assert result.gt_inds.shape == result.max_overlaps.shape == result.labels.shape == quality.shape == (p + m,)
    assert torch.equal(result.gt_inds[:m], torch.arange(1, m + 1))
    assert torch.equal(quality[:m], torch.ones(m, dtype=q.dtype))
    assert torch.equal(quality[m:], q) and torch.equal(result.gt_inds[m:], gt_inds)


def test_quality_of_mmdet_samples_matches_the_assignment():
    """The quality read at a sampling result's positive rows is the assignment's quality of those
    proposals (or 1 for the added pseudo boxes)."""
    p, m = 200, 4
    assigner = TASK_UTILS.build(dict(type="PredictionGuidedAssigner"))
    boxes, scores, pseudo, labels = proposals(p, m)
    gt = InstanceData(bboxes=pseudo, labels=labels)
    result = assigner.assign(InstanceData(bboxes=boxes, scores=scores), gt)
    q = result.get_extra_property("quality").clone()
    sampler = TASK_UTILS.build(dict(type="RandomSampler", num=512, pos_fraction=0.25, neg_pos_ub=-1,
                                    add_gt_as_proposals=True))
    res = sampler.sample(result, InstanceData(priors=boxes), gt)
    quality = result.get_extra_property("quality")
    expected = torch.cat([torch.ones(m, dtype=q.dtype), q])[res.pos_inds]
    assert torch.equal(quality[res.pos_inds], expected)
    assert (quality[res.pos_inds][res.pos_is_gt.bool()] == 1).all()


def test_valid_defaults_to_the_official_positive_area_rule():
    """Without pred_instances.valid, a proposal (priors) with (x2 - x1) * (y2 - y1) <= 0 never
    becomes positive, whatever its regressed box, as in the official code; valid overrides it."""
    c = 3
    pseudo = torch.tensor([[10.0, 10.0, 50.0, 50.0]], dtype=torch.float64)
    labels = torch.tensor([1])
    # The teacher's regressed boxes: all on the pseudo box (one bag, IoU ~1 each).
    bboxes = pseudo.repeat(6, 1) + torch.tensor([[0.0, 0.0, 0.0, 0.0], [1, 0, 0, 0], [0, 1, 0, 0],
                                                 [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.float64)
    # The proposals they come from: zero width, zero height, inverted, both inverted, fine, fine.
    priors = torch.tensor([[20.0, 20.0, 20.0, 40.0], [20.0, 20.0, 40.0, 20.0], [40.0, 20.0, 20.0, 40.0],
                           [40.0, 40.0, 20.0, 20.0], [12.0, 12.0, 48.0, 48.0], [8.0, 8.0, 52.0, 52.0]],
                          dtype=torch.float64)
    scores = torch.full((6, c), 0.9, dtype=torch.float64)
    area_positive = torch.tensor([False, False, False, True, True, True])  # the official rule, by hand
    assigner = TASK_UTILS.build(dict(type="PredictionGuidedAssigner", iou_thr=0.4, topk=12, alpha=0.5))
    gt = InstanceData(bboxes=pseudo, labels=labels)
    default = assigner.assign(InstanceData(bboxes=bboxes, priors=priors, scores=scores), gt)
    no_filter = assigner.assign(
        InstanceData(bboxes=bboxes, priors=priors, scores=scores, valid=torch.ones(6, dtype=torch.bool)), gt)
    # k = floor(sum of the six IoUs) = 5 positives before the filter.
    assert int((no_filter.gt_inds > 0).sum()) == 5
    gt_ref, _ = ref.prediction_guided_assign([bboxes], [scores], [pseudo], [labels], valid=[area_positive])
    assert torch.equal(default.gt_inds, gt_ref[0])
    assert torch.equal(default.gt_inds > 0, (no_filter.gt_inds > 0) & area_positive)
    assert not torch.equal(default.gt_inds, no_filter.gt_inds)
    # Without priors there is no proposal to apply the rule to: no filter.
    only_boxes = assigner.assign(InstanceData(bboxes=bboxes, scores=scores), gt)
    assert torch.equal(only_boxes.gt_inds, no_filter.gt_inds)
    # priors alone: they are the boxes and the rule applies to them.
    only_priors = assigner.assign(InstanceData(priors=priors, scores=scores), gt)
    gt_ref, _ = ref.prediction_guided_assign([priors], [scores], [pseudo], [labels], valid=[area_positive])
    assert torch.equal(only_priors.gt_inds, gt_ref[0])


# ---- FusedFocalLoss against mmdet's FocalLoss ----------------------------------------------------

def focal_pair(reduction="mean", loss_weight=1.5):
    ours = MODELS.build(dict(type="FusedFocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25,
                             reduction=reduction, loss_weight=loss_weight))
    theirs = MODELS.build(dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25,
                               reduction=reduction, loss_weight=loss_weight))
    return ours, theirs


def focal_weight(kind, r, c):
    """The weight shapes mmdet's FocalLoss accepts: per row [R] / [R, 1], per element [R, C] / [R * C]."""
    if kind is None:
        return None
    shape = {"row": (r,), "row1": (r, 1), "elem": (r, c), "flat": (r * c,)}[kind]
    return torch.rand(shape, dtype=torch.float64)


def run_both(ours, theirs, logits, targets, weight, device, **kw):
    """ours on `device` and mmdet's FocalLoss on the CPU; values and gradients (logits, weight)."""
    x = logits.clone().to(device).requires_grad_()
    w = None if weight is None else weight.clone().to(device).requires_grad_()
    a = ours(x, targets.to(device), w, **kw)
    xb = logits.clone().requires_grad_()
    wb = None if weight is None else weight.clone().requires_grad_()
    b = theirs(xb, targets, wb, **kw)
    assert a.shape == b.shape
    torch.testing.assert_close(a.detach().cpu(), b.detach(), rtol=1e-9, atol=1e-12, equal_nan=True)
    if b.numel() and torch.isfinite(b).all():
        g = torch.randn(b.shape, dtype=torch.float64)
        ga = torch.autograd.grad(a, [x] + ([w] if w is not None else []), g.to(device))
        gb = torch.autograd.grad(b, [xb] + ([wb] if wb is not None else []), g)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u.cpu(), v, rtol=1e-8, atol=1e-12)
    return a


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("avg_factor", [None, 37.0, 0.0, "tensor"])
@pytest.mark.parametrize("weight_kind", [None, "row", "row1", "elem", "flat"])
def test_fused_focal_loss_equals_mmdet_focal_loss(device, reduction, avg_factor, weight_kind):
    """mmdet's weight_reduce_loss rules: "none" with avg_factor keeps the per-element loss, "mean"
    divides the sum by avg_factor + eps, "sum" with avg_factor raises ValueError; weights per row
    or per element as mmdet reshapes them; loss_weight."""
    ours, theirs = focal_pair(reduction)
    r, c = 129, 7
    logits = torch.randn(r, c, dtype=torch.float64) * 3
    targets = torch.randint(0, c + 1, (r,))  # c = background
    weight = focal_weight(weight_kind, r, c)
    if avg_factor == "tensor":
        avg_factor = torch.tensor(37.0, dtype=torch.float64)
    if reduction == "sum" and avg_factor is not None:
        with pytest.raises(ValueError, match="avg_factor"):
            ours(logits.to(device), targets.to(device), weight, avg_factor=avg_factor)
        with pytest.raises(ValueError):
            theirs(logits, targets, weight, avg_factor=avg_factor)
        return
    a = run_both(ours, theirs, logits, targets, weight, device, avg_factor=avg_factor)
    assert a.shape == ((r, c) if reduction == "none" else ())


@pytest.mark.parametrize("module_reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("override", [None, "none", "sum", "mean"])
@pytest.mark.parametrize("avg_factor", [None, 12.5])
def test_reduction_override_like_mmdet(module_reduction, override, avg_factor):
    ours, theirs = focal_pair(module_reduction, loss_weight=0.7)
    r, c = 40, 5
    logits = torch.randn(r, c, dtype=torch.float64) * 2
    targets = torch.randint(0, c + 1, (r,))
    weight = torch.rand(r, dtype=torch.float64)
    kw = dict(avg_factor=avg_factor, reduction_override=override)
    if (override or module_reduction) == "sum" and avg_factor is not None:
        with pytest.raises(ValueError, match="avg_factor"):
            ours(logits, targets, weight, **kw)
        with pytest.raises(ValueError):
            theirs(logits, targets, weight, **kw)
        return
    run_both(ours, theirs, logits, targets, weight, "cpu", **kw)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("avg_factor", [None, 4.0])
def test_empty_batch_like_mmdet(reduction, avg_factor):
    ours, theirs = focal_pair(reduction)
    logits, targets = torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    for weight in (None, torch.zeros(0, dtype=torch.float64)):
        if reduction == "sum" and avg_factor is not None:  # an error in mmdet: in ours too
            with pytest.raises(ValueError):
                ours(logits, targets, weight, avg_factor=avg_factor)
            with pytest.raises(ValueError):
                theirs(logits, targets, weight, avg_factor=avg_factor)
            continue
        run_both(ours, theirs, logits, targets, weight, "cpu", avg_factor=avg_factor)


def test_float32_logits_like_mmdet():
    ours, theirs = focal_pair("mean")
    logits = torch.randn(64, 9) * 3
    targets = torch.randint(0, 10, (64,))
    weight = torch.rand(64)
    for kw in (dict(), dict(avg_factor=11.0), dict(reduction_override="none", avg_factor=11.0)):
        a, b = ours(logits, targets, weight, **kw), theirs(logits, targets, weight, **kw)
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


class TestMMDetFocalLossCases:
    """mmdet 3.3.0's own unit tests of FocalLoss (tests/test_models/test_losses/test_loss.py:
    test_FocalLoss_loss with integer targets, test_loss_with_reduction_override), run on
    FusedFocalLoss built as they build FocalLoss (whose use_sigmoid defaults to True; ours must be
    written), plus the values."""

    @staticmethod
    def loss_class():
        return MODELS.build(dict(type="FusedFocalLoss", use_sigmoid=True))

    def test_focal_loss_loss(self):
        pred = torch.rand((10, 5))
        target = torch.randint(0, 5, (10,))
        theirs = MODELS.build(dict(type="FocalLoss"))
        loss = self.loss_class()(pred, target)
        assert isinstance(loss, torch.Tensor)
        torch.testing.assert_close(loss, theirs(pred, target))
        loss = self.loss_class()(pred, target, reduction_override="mean")
        assert isinstance(loss, torch.Tensor)
        loss = self.loss_class()(pred, target, avg_factor=10)
        assert isinstance(loss, torch.Tensor)
        torch.testing.assert_close(loss, theirs(pred, target, avg_factor=10))
        with pytest.raises(ValueError):
            self.loss_class()(pred, target, avg_factor=10, reduction_override="sum")
        for reduction_override in [None, "none", "mean"]:
            loss = self.loss_class()(pred, target, avg_factor=10, reduction_override=reduction_override)
            assert isinstance(loss, torch.Tensor)
            torch.testing.assert_close(
                loss, theirs(pred, target, avg_factor=10, reduction_override=reduction_override))

    def test_loss_with_reduction_override(self):
        pred = torch.rand((10, 4))
        target = torch.rand((10, 4)),
        with pytest.raises(AssertionError):
            self.loss_class()(pred, target, None, reduction_override=True)
        with pytest.raises(ValueError, match="reduction_override"):
            self.loss_class()(pred, torch.zeros(10, dtype=torch.long), reduction_override="avg")

    def test_one_hot_targets_are_refused_clearly(self):
        """mmdet's 4-D case feeds one-hot targets of the rank of pred: not integer targets."""
        pred = torch.rand((3, 5, 4, 4))
        target = F.one_hot(torch.randint(0, 5, (3 * 4 * 4,)), 5).reshape(3, 4, 4, 5).permute(0, 3, 1, 2)
        with pytest.raises(ValueError, match="class indices"):
            self.loss_class()(pred, target)
        with pytest.raises(ValueError, match="class indices"):
            self.loss_class()(torch.rand(10, 5), F.one_hot(torch.randint(0, 5, (10,)), 5))


def test_use_sigmoid_and_activated():
    loss = MODELS.build(dict(type="FusedFocalLoss", use_sigmoid=True))
    assert loss.use_sigmoid is True and loss.activated is False  # mmdet's heads read these
    with pytest.raises(ValueError, match=r"use_sigmoid must be True.*C \+ 1"):
        MODELS.build(dict(type="FusedFocalLoss", use_sigmoid=False))
    with pytest.raises(ValueError, match=r"FusedFocalLoss: write use_sigmoid=True in the loss config"):
        MODELS.build(dict(type="FusedFocalLoss", gamma=2.0, alpha=0.25))
    with pytest.raises(ValueError, match="activated"):
        MODELS.build(dict(type="FusedFocalLoss", use_sigmoid=True, activated=True))


def test_retina_head_with_fused_focal_loss():
    """As the README writes the config: C class channels; use_sigmoid=False never builds."""
    cfg = dict(type="RetinaHead", num_classes=4, in_channels=8, stacked_convs=1, feat_channels=8,
               loss_cls=dict(type="FusedFocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0))
    head = MODELS.build(cfg)
    assert head.cls_out_channels == 4
    cfg["loss_cls"]["use_sigmoid"] = False
    with pytest.raises(ValueError, match="use_sigmoid"):
        MODELS.build(cfg)
    # Left out, mmdet's head would read False (C + 1 channels, background trained as a class).
    del cfg["loss_cls"]["use_sigmoid"]
    with pytest.raises(ValueError, match="write use_sigmoid=True"):
        MODELS.build(cfg)


@pytest.mark.parametrize("bad", [torch.rand(7), torch.rand(10, 3), torch.rand(10, 5, 1), torch.tensor(1.0)])
def test_bad_weight_shape(bad):
    loss = MODELS.build(dict(type="FusedFocalLoss", use_sigmoid=True))
    with pytest.raises(ValueError, match=r"weight must be .* got"):
        loss(torch.rand(10, 5), torch.randint(0, 6, (10,)), bad)
