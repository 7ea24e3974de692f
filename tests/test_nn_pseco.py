"""tbd_ops.nn PseCo modules: thin wrappers over the fused ops, checked against tbd_ops.reference."""
import pytest
import torch

import tbd_ops
from tbd_ops import reference as ref
from tbd_ops.nn import ConsistencyVotingWeights, PseCoAssigner, SigmoidFocalLoss
from op_testing import DEVICES


def batch(device, sizes=((60, 3), (0, 2), (45, 0), (80, 5)), c=4):
    boxes, scores, pseudo, labels, valid = [], [], [], [], []
    for p, m in sizes:
        centers = torch.rand(m, 2, dtype=torch.float64) * 100
        pb = torch.cat([centers - 15, centers + 15], 1)
        src = torch.randint(0, max(m, 1), (p,))
        b = pb[src] + torch.randn(p, 4, dtype=torch.float64) * 4 if m else torch.rand(p, 4, dtype=torch.float64) * 50
        b = torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2] + 1)], 1)
        boxes.append(b.to(device))
        scores.append(torch.rand(p, c, dtype=torch.float64, device=device))
        pseudo.append(pb.to(device))
        labels.append(torch.randint(0, c, (m,), device=device))
        valid.append(torch.rand(p, device=device) > 0.2)
    return boxes, scores, pseudo, labels, valid


@pytest.mark.parametrize("device", DEVICES)
def test_assigner_and_voting_modules(device):
    boxes, scores, pseudo, labels, valid = batch(device)
    assigner = PseCoAssigner(iou_thr=0.4, topk=12, alpha=0.5)
    gt_inds, q = assigner(boxes, scores, pseudo, labels, valid)
    gt_ref, q_ref = ref.prediction_guided_assign(boxes, scores, pseudo, labels, valid=valid)
    for a, b in zip(gt_inds, gt_ref):
        assert torch.equal(a, b)
    for a, b in zip(q, q_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    assert sum(int((g > 0).sum()) for g in gt_inds) > 0
    pred = [b + torch.randn_like(b) for b in boxes]
    for mode in ("pseco", "paper"):
        sigma, w, scale = ConsistencyVotingWeights(mode)(pred, gt_inds, pseudo)
        s_ref, w_ref, scale_ref = ref.consistency_voting(pred, gt_inds, pseudo, mode=mode)
        for a, b in zip(sigma + w, s_ref + w_ref):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(scale, scale_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_focal_loss_module(device):
    logits = (torch.randn(37, 6, dtype=torch.float64, device=device) * 3).requires_grad_()
    targets = torch.randint(0, 7, (37,), device=device)
    weight = torch.rand(37, dtype=torch.float64, device=device)
    total = ref.sigmoid_focal_loss(logits, targets, weight, reduction="sum")
    mod = SigmoidFocalLoss(gamma=2.0, alpha=0.25, reduction="mean", loss_weight=2.0)
    torch.testing.assert_close(mod(logits, targets, weight, avg_factor=10.0),
                               2.0 * total / (10.0 + torch.finfo(torch.float32).eps), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mod(logits, targets, weight),
                               2.0 * ref.sigmoid_focal_loss(logits, targets, weight, reduction="mean"),
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mod(logits, targets, reduction_override="none"),
                               2.0 * ref.sigmoid_focal_loss(logits, targets, reduction="none"), rtol=1e-9, atol=1e-12)
    g = torch.autograd.grad(mod(logits, targets, weight, avg_factor=3.0), logits)[0]
    g_ref = torch.autograd.grad(2.0 * ref.sigmoid_focal_loss(logits, targets, weight, reduction="sum") /
                                (3.0 + torch.finfo(torch.float32).eps), logits)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="iou_thr"):
        PseCoAssigner(iou_thr=0.0)
    with pytest.raises(ValueError, match="topk"):
        PseCoAssigner(topk=0)
    with pytest.raises(ValueError, match="alpha"):
        PseCoAssigner(alpha=1.5)
    with pytest.raises(ValueError, match="mode"):
        ConsistencyVotingWeights("vote")
    with pytest.raises(ValueError, match="reduction"):
        SigmoidFocalLoss(reduction="avg")
    with pytest.raises(ValueError, match="use_sigmoid"):
        SigmoidFocalLoss(use_sigmoid=False)
    with pytest.raises(ValueError, match="activated"):
        SigmoidFocalLoss(activated=True)
    mod = SigmoidFocalLoss()
    with pytest.raises(ValueError, match="weight"):
        mod(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.ones(4, 2))
    with pytest.raises(ValueError, match="avg_factor"):
        mod(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), avg_factor=2.0, reduction_override="sum")
    with pytest.raises(ValueError, match="reduction_override"):
        mod(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), reduction_override="avg")


@pytest.mark.parametrize("device", DEVICES)
def test_focal_loss_module_avg_factor_and_element_weights(device):
    """mmdet's reduction rules against the reference composed by hand: "none" with avg_factor is
    the per-element loss; per-element [R, C] weights multiply it before the reduction."""
    logits = (torch.randn(23, 5, dtype=torch.float64, device=device) * 3).requires_grad_()
    targets = torch.randint(0, 6, (23,), device=device)
    w_el = torch.rand(23, 5, dtype=torch.float64, device=device)
    el = ref.sigmoid_focal_loss(logits, targets, reduction="none")
    eps = torch.finfo(torch.float32).eps
    mod = SigmoidFocalLoss(reduction="none", loss_weight=3.0)
    torch.testing.assert_close(mod(logits, targets, avg_factor=7.0), 3.0 * el, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(mod(logits, targets, w_el, avg_factor=7.0), 3.0 * el * w_el, rtol=1e-9, atol=1e-12)
    for override, expected in (("sum", (el * w_el).sum()), ("mean", (el * w_el).mean())):
        torch.testing.assert_close(mod(logits, targets, w_el, reduction_override=override), 3.0 * expected,
                                   rtol=1e-9, atol=1e-12)
    got = mod(logits, targets, w_el, avg_factor=7.0, reduction_override="mean")
    expected = 3.0 * (el * w_el).sum() / (7.0 + eps)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    g = torch.autograd.grad(got, logits)[0]
    torch.testing.assert_close(g, torch.autograd.grad(expected, logits)[0], rtol=1e-9, atol=1e-12)
    # 16-bit logits with per-element weights: reduced in float32, like the fused reductions.
    half = mod(logits.detach().half(), targets, w_el.float(), reduction_override="sum")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), 3.0 * (ref.sigmoid_focal_loss(logits.detach().half().double(),
                                                                           targets, reduction="none") * w_el).sum(),
                               rtol=2e-3, atol=1e-3)
