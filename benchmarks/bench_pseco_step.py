"""Benchmark of PseCo's unsupervised RoI step: fused ops for the batch vs the official per-image loops.

One training iteration's RoI step on the unlabeled images (what PseCoDetector.roi_losses does
around the RoI head), float32, at PseCo's sizes: 4 images, 1000 teacher proposals each (teacher
boxes and [1000, 80] class probabilities; 60% of the boxes are jittered copies of one of 20 pseudo
boxes, 2% of the proposals have zero area in the student's view), 512 sampled RoIs per image
(25% positives at most), 80 classes; the student's RoI head outputs for the 2048 sampled RoIs
(logits [2048, 80], deltas [2048, 320]) are the inputs that get gradients.

  tbd_ops: one prediction_guided_assign call for the batch (PLA with the valid rule), the RoI
      sampler per image, the student's boxes decoded at their labels, one consistency_voting call
      (PCV: w = sigma^2, reg_scale), the fused sigmoid_focal_loss (gamma 2, alpha 0.25, weight 10,
      sum / max(sum of label weights, 1)) and the PCV-weighted L1 (reg_scale * sum / max(R, 1)):
      PseCoDetector's path without the network.
  eager: the official PseCo_FRCNN code in plain PyTorch: per image a max-IoU assignment at 0.4 and
      the per-pseudo-box refinement loop (nonzero, sort, topk, a host read of the dynamic k), the
      same sampler, the per-image, per-pseudo-box PCV loop (unique, nonzero), mmdet's
      py_sigmoid_focal_loss formula and the L1 on the positives.
  compile: not run (data-dependent shapes and host reads in the loops).

Both sides sample the same RoIs (mmdet's RandomSampler logic with a seeded generator per image),
so the correctness guard compares the two losses and their gradients.

Bytes (for GB/s): fwd reads the teacher boxes, scores (one column per box is what PLA needs, but
the [P, C] matrix is the input: counted in full), proposals, pseudo boxes and labels, the logits
and deltas of the sampled RoIs; bwd writes the logits' and deltas' gradients; fwd+bwd the sum.

    python benchmarks/bench_pseco_step.py [--device cpu|cuda] [--quick]
"""
import math
from typing import List, Tuple

import torch
import torch.nn.functional as F

import harness
import tbd_ops
from bench_decode_max_iou import random_gts
from bench_pseco import boxes_near, jitter
from harness import Case, Config, Inputs

ES = 4
STDS = (0.1, 0.1, 0.2, 0.2)
IOU_THR, TOPK, ALPHA = 0.4, 12, 0.5
GAMMA, FOCAL_ALPHA, CLS_WEIGHT = 2.0, 0.25, 10.0


# ---- shared by both providers: the box coder and mmdet's RandomSampler ------------------------------
def encode(rois: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """DeltaXYWHBBoxCoder.encode (means 0, stds 0.1, 0.1, 0.2, 0.2)."""
    pw, ph = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    px, py = rois[:, 0] + 0.5 * pw, rois[:, 1] + 0.5 * ph
    gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
    d = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], 1)
    return d / d.new_tensor(STDS)


def decode(rois: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """DeltaXYWHBBoxCoder.decode without clip (wh_ratio_clip 16/1000)."""
    d = deltas * deltas.new_tensor(STDS)
    clip = abs(math.log(16 / 1000))
    pw, ph = rois[:, 2] - rois[:, 0], rois[:, 3] - rois[:, 1]
    px, py = rois[:, 0] + 0.5 * pw, rois[:, 1] + 0.5 * ph
    gw, gh = pw * d[:, 2].clamp(-clip, clip).exp(), ph * d[:, 3].clamp(-clip, clip).exp()
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    return torch.stack([gx - 0.5 * gw, gy - 0.5 * gh, gx + 0.5 * gw, gy + 0.5 * gh], 1)


def sample(gt_inds: torch.Tensor, num: int, seed: int) -> torch.Tensor:
    """mmdet's RandomSampler(num, pos_fraction=0.25, add_gt_as_proposals=False): row indices,
    positives first (a seeded generator, so that both providers draw the same RoIs)."""
    gen = torch.Generator(device=gt_inds.device).manual_seed(seed)

    def choose(inds, k):
        if inds.numel() <= k:
            return inds
        return inds[torch.randperm(inds.numel(), generator=gen, device=inds.device)[:k]]

    pos = choose(torch.nonzero(gt_inds > 0).flatten(), int(num * 0.25))
    neg = choose(torch.nonzero(gt_inds == 0).flatten(), num - pos.numel())
    return torch.cat([pos, neg])


def box_iou(a: torch.Tensor, b: torch.Tensor, aligned: bool = False) -> torch.Tensor:
    """mmdet's bbox_overlaps (eps 1e-6)."""
    if not aligned:
        a, b = a[:, None], b[None]
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter).clamp(min=1e-6)


def targets_of(rows, proposals, pseudo, labels, gt_inds, c):
    """Sampled RoIs, their pseudo box index (0 = background), label (c = background), regression target."""
    rois, inds, labs, tgts = [], [], [], []
    for i, r in enumerate(rows):
        g = gt_inds[i][r]
        rois.append(proposals[i][r])
        inds.append(g)
        if pseudo[i].shape[0]:
            j = (g - 1).clamp(min=0)
            labs.append(torch.where(g > 0, labels[i][j], torch.full_like(g, c)))
            t = encode(proposals[i][r], pseudo[i][j])
            tgts.append(torch.where((g > 0)[:, None], t, torch.zeros_like(t)))
        else:
            labs.append(torch.full_like(g, c))
            tgts.append(proposals[i].new_zeros(r.shape[0], 4))
    return torch.cat(rois), inds, torch.cat(labs), torch.cat(tgts)


# ---- tbd_ops: PseCoDetector's path ---------------------------------------------------------------------
def step_ours(logits, deltas, boxes, scores, proposals, pseudo, labels, num=512):
    c = logits.shape[1]
    counts = [p.shape[0] for p in proposals]
    allp = torch.cat(proposals)
    valid = (((allp[:, 2] - allp[:, 0]) * (allp[:, 3] - allp[:, 1])) > 0).split(counts)
    gt_inds, _ = tbd_ops.prediction_guided_assign(boxes, scores, pseudo, labels, valid=list(valid),
                                                  iou_thr=IOU_THR, topk=TOPK, alpha=ALPHA)
    rows = [sample(g, num, 1000 + i) for i, g in enumerate(gt_inds)]
    rois, inds, labs, tgts = targets_of(rows, proposals, pseudo, labels, gt_inds, c)
    r = rois.shape[0]
    pred = deltas.view(r, c, 4)[torch.arange(r, device=rois.device), labs.clamp(max=c - 1)]
    _, w, reg_scale = tbd_ops.consistency_voting(list(decode(rois, pred.detach()).split([x.numel() for x in rows])),
                                                 inds, pseudo)
    label_weights = logits.new_ones(r)
    loss_cls = CLS_WEIGHT * tbd_ops.sigmoid_focal_loss(logits, labs, label_weights, GAMMA, FOCAL_ALPHA, "sum") / \
        label_weights.sum().clamp(min=1)
    loss_bbox = reg_scale * ((pred - tgts).abs() * torch.cat(w)[:, None]).sum() / max(r, 1)
    return loss_cls, loss_bbox


# ---- eager: the official code's loops -------------------------------------------------------------
def official_pla(boxes, scores, pseudo, labels, proposals):
    """PseCo_FRCNN.prediction_guided_label_assign + assignment_refinement for one image."""
    gt_inds = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    if pseudo.shape[0] == 0:
        return gt_inds
    ious = box_iou(boxes, pseudo)
    u, j = ious.max(1)
    pos_inds = torch.nonzero(u >= IOU_THR).flatten()
    pos_gt = j[pos_inds]
    wh = proposals[:, 2:4] - proposals[:, :2]
    areas = wh.prod(dim=-1)[pos_inds]
    cls = scores[pos_inds]
    refined = torch.full_like(pos_gt, -1)
    for g in torch.unique(pos_gt):
        idx = torch.nonzero(pos_gt == g).reshape(-1)
        target_scores = cls[idx, labels[g]]
        target_ious = ious[pos_inds[idx], g]
        cost = (target_ious * target_scores).sqrt()
        _, order = torch.sort(cost, descending=True)
        topk_ious, _ = torch.topk(target_ious, min(idx.shape[0], TOPK), dim=0)
        k = torch.clamp(topk_ious.sum(0).int(), min=1)
        order = order[:k]
        order = order[areas[idx[order]] > 0]
        refined[idx[order]] = g
    gt_inds[pos_inds] = refined + 1
    return gt_inds


def step_official(logits, deltas, boxes, scores, proposals, pseudo, labels, num=512):
    c = logits.shape[1]
    gt_inds = [official_pla(b, s, p, lb, pr) for b, s, p, lb, pr in zip(boxes, scores, pseudo, labels, proposals)]
    rows = [sample(g, num, 1000 + i) for i, g in enumerate(gt_inds)]
    rois, inds, labs, tgts = targets_of(rows, proposals, pseudo, labels, gt_inds, c)
    # compute_PCV: per image, per pseudo box
    sigma_list, offset = [], 0
    for i, r in enumerate(rows):
        n = r.numel()
        lab = labs[offset:offset + n]
        pos = ((lab >= 0) & (lab < c)).nonzero().reshape(-1)
        wgt = rois.new_zeros(n)
        if len(pos):
            pred = deltas[offset:offset + n].detach().view(n, c, 4)[pos, lab[pos]]
            dec = decode(rois[offset:offset + n][pos], pred)
            assigned = inds[i][pos] - 1
            iou = box_iou(dec, pseudo[i][assigned], aligned=True)
            pw = rois.new_zeros(pos.shape[0])
            for g in torch.unique(assigned):
                sel = (assigned == g).nonzero().reshape(-1)
                if sel.shape[0] > 0:
                    pw[sel] = iou[sel].mean()
            wgt[pos] = pw
        sigma_list.append(wgt)
        offset += n
    sigma = torch.cat(sigma_list)
    pos = (labs >= 0) & (labs < c)
    reg_scale = sigma.sum() / (sigma ** 2).sum() if pos.any() else 0.0
    # mmdet's py_sigmoid_focal_loss, reduction none, times the label weights
    label_weights = logits.new_ones(logits.shape[0])
    t = F.one_hot(labs, c + 1)[:, :c].type_as(logits)
    p = logits.sigmoid()
    pt = (1 - p) * t + p * (1 - t)
    focal = F.binary_cross_entropy_with_logits(logits, t, reduction="none") * \
        (FOCAL_ALPHA * t + (1 - FOCAL_ALPHA) * (1 - t)) * pt.pow(GAMMA)
    loss_cls = CLS_WEIGHT * (focal * label_weights[:, None]).sum() / max(label_weights.sum(), 1.0)
    r = rois.shape[0]
    if pos.any():
        pred = deltas.view(r, c, 4)[pos, labs[pos]]
        loss_bbox = reg_scale * ((pred - tgts[pos]).abs() * (sigma[pos] ** 2)[:, None]).sum() / max(r, 1)
    else:
        loss_bbox = deltas[pos].sum()
    return loss_cls, loss_bbox


# ---- the case --------------------------------------------------------------------------------------
def step_case(n: int, p: int, m: int, c: int, num: int, name: str = None) -> Case:
    def make_inputs(device: torch.device) -> Inputs:
        boxes, scores, proposals, pseudo, labels = [], [], [], [], []
        for _ in range(n):
            g = random_gts(m, device)
            tb = boxes_near(g, p, device)
            props = jitter(tb, 0.1)
            zero = torch.rand(p, device=device) < 0.02
            props[:, 2] = torch.where(zero, props[:, 0], props[:, 2])
            boxes.append(tb)
            proposals.append(props)
            scores.append(torch.softmax(torch.randn(p, c, device=device) * 2, dim=1))
            pseudo.append(g)
            labels.append(torch.randint(c, (m,), device=device))
        r = n * min(num, p)
        logits = torch.randn(r, c, device=device) * 2 - 2
        deltas = torch.randn(r, 4 * c, device=device) * 0.5
        return Inputs((logits, deltas, boxes, scores, proposals, pseudo, labels), dict(num=num))

    r = n * min(num, p)
    fwd = n * (p * 4 * ES + p * c * ES + p * 4 * ES + m * 4 * ES + m * 8) + r * c * ES + r * 4 * c * ES
    bwd = r * c * ES + r * 4 * c * ES

    def bytes_moved(mode: str) -> int:
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def skip(provider: str, mode: str, cfg: Config):
        if provider == "compile":
            return "per-image and per-pseudo-box loops with host reads: torch.compile does not apply"
        return None

    return Case(op="pseco_unsup_roi_step", label="step", name=name or f"{n}x{p} props M{m} C{c} R{num}",
                params={"N": n, "P": p, "M": m, "C": c, "R": num}, make_inputs=make_inputs,
                ours=step_ours, eager=step_official, bytes_moved=bytes_moved, grad_args=(0, 1), skip=skip)


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    if cfg.quick:
        return [step_case(2, 200, 5, 8, 64, name="quick 2x200 props M5 C8 R64")], []
    return [step_case(4, 1000, 20, 80, 512)], []


if __name__ == "__main__":
    import sys
    sys.exit(harness.exit_code(harness.main([sys.modules[__name__]], tag="pseco_step")))
