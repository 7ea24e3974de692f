"""Benchmark of the PseCo ops vs their per-image PyTorch loops vs torch.compile.

Sizes of one semi-supervised Faster R-CNN step (SPEC 2), a batch of 4 unlabeled images, float32:

  prediction_guided_assign (assign): 1000 teacher boxes per image with their [1000, 80] class
      probabilities (softmax of 2 N(0, 1) logits) against 20 pseudo boxes (labels uniform in
      0..79); 60% of the boxes are jittered copies of a pseudo box (corners moved by up to 15%
      of its size, so that bags fill up), the rest anywhere in the 800x1333 image; valid is
      False for 2% of them. Eager: tbd_ops.reference.prediction_guided_assign, the per-image,
      per-pseudo-box loop of the public implementation (nonzero, sort and a host read per bag).
      No torch.compile: the loop's shapes depend on the data (nonzero per bag, a Python int
      from the bag's IoU sum), so dynamo would only break the graph at each of them.
  consistency_voting (voting): 512 sampled RoIs per image, 25% of them positives of one of the
      20 pseudo boxes (their predicted boxes jittered around it), the rest background boxes
      anywhere. Eager: tbd_ops.reference.consistency_voting (per image and pseudo box);
      torch.compile of it only with --full (the per-pseudo-box shapes make dynamo recompile
      until its limit).
  sigmoid_focal_loss (focal): the 4 x 512 = 2048 RoIs x 80 classes of the RoI head, logits
      ~ 2 N(0, 1) - 2, targets 75% background (= 80), per-RoI weight in [0.5, 1.5],
      reduction "sum". Eager: MMDetection's py_sigmoid_focal_loss (sigmoid, one-hot,
      binary_cross_entropy_with_logits times the focal weight, float32), i.e. the plain
      PyTorch formula users run where mmcv's compiled op is missing; fwd, bwd, fwd+bwd
      (gradient of the logits).

Bytes the ops must move (for GB/s), es = 4 bytes, N images:
  assign fwd: read boxes N*P*4*es, one score per box N*P*es, pseudo boxes N*M*4*es and labels
      N*M*8; write gt_inds N*P*8 and q N*P*es;
  voting fwd: read predicted boxes N*R*4*es, gt_inds N*R*8, pseudo boxes N*M*4*es; write sigma
      N*M*es, w N*R*es and reg_scale;
  focal fwd: read logits R*C*es, targets R*8, weights R*es, write the loss; bwd: read the loss
      gradient, logits, targets and weights, write the logits' gradient R*C*es;
      fwd+bwd: the sum.

    python benchmarks/bench_pseco.py [--device cpu|cuda] [--quick]
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F

import harness
import tbd_ops
from bench_decode_max_iou import random_gts
from harness import Case, Config, Inputs

ES = 4  # float32


def jitter(boxes: torch.Tensor, frac: float) -> torch.Tensor:
    """Corners moved by up to ``frac`` of the box size, x2 > x1 and y2 > y1 kept."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    out = boxes + (torch.rand_like(boxes) * 2 - 1) * frac * wh
    return torch.cat([out[:, :2], torch.maximum(out[:, 2:], out[:, :2] + 1)], dim=1)


def random_boxes(p: int, device) -> torch.Tensor:
    return random_gts(p, device)


def boxes_near(g: torch.Tensor, p: int, device, near: float = 0.6) -> torch.Tensor:
    """p boxes in random order: a fraction ``near`` of them jittered copies of boxes of g, the rest random."""
    k = int(p * near)
    b = torch.cat([jitter(g[torch.randint(len(g), (k,), device=device)], 0.15), random_boxes(p - k, device)])
    return b[torch.randperm(p, device=device)]


# ---- prediction_guided_assign ---------------------------------------------------------------------
def assign_case(n: int, p: int, m: int, c: int, name: str = None) -> Case:
    def make_inputs(device: torch.device) -> Inputs:
        boxes, scores, pseudo, labels, valid = [], [], [], [], []
        for _ in range(n):
            g = random_gts(m, device)
            boxes.append(boxes_near(g, p, device))
            scores.append(torch.softmax(torch.randn(p, c, device=device) * 2, dim=1))
            pseudo.append(g)
            labels.append(torch.randint(c, (m,), device=device))
            valid.append(torch.rand(p, device=device) >= 0.02)
        return Inputs((boxes, scores, pseudo, labels, valid))

    def bytes_moved(mode: str) -> int:
        return n * (p * 4 * ES + p * ES + m * 4 * ES + m * 8 + p * 8 + p * ES)

    def skip(provider: str, mode: str, cfg: Config):
        if provider == "compile":
            return "data-dependent loop (nonzero and a host read per bag): torch.compile does not apply"
        return None

    return Case(op="prediction_guided_assign", label="asgn", name=name or f"{n}x{p} boxes M{m} C{c}",
                params={"N": n, "P": p, "M": m, "C": c}, make_inputs=make_inputs,
                ours=tbd_ops.prediction_guided_assign, eager=tbd_ops.reference.prediction_guided_assign,
                bytes_moved=bytes_moved, modes=("fwd",), grad_args=(), skip=skip)


# ---- consistency_voting ---------------------------------------------------------------------------
def voting_case(n: int, r: int, m: int, pos_fraction: float = 0.25, name: str = None) -> Case:
    def make_inputs(device: torch.device) -> Inputs:
        preds, inds, pseudo = [], [], []
        for _ in range(n):
            g = random_gts(m, device)
            npos = int(r * pos_fraction)
            j = torch.randint(m, (npos,), device=device)
            b = torch.cat([jitter(g[j], 0.2), random_boxes(r - npos, device)])
            gi = torch.cat([j + 1, torch.zeros(r - npos, dtype=torch.long, device=device)])
            perm = torch.randperm(r, device=device)
            preds.append(b[perm])
            inds.append(gi[perm])
            pseudo.append(g)
        return Inputs((preds, inds, pseudo))

    def bytes_moved(mode: str) -> int:
        return n * (r * 4 * ES + r * 8 + m * 4 * ES + m * ES + r * ES) + 4

    def skip(provider: str, mode: str, cfg: Config):
        if provider == "compile" and not cfg.full:
            return ("per-pseudo-box loop with data-dependent shapes: dynamo recompiles up to its limit "
                    "(about a minute), then runs eager (--full runs it)")
        return None

    return Case(op="consistency_voting", label="vote", name=name or f"{n}x{r} RoIs M{m}",
                params={"N": n, "R": r, "M": m, "pos": pos_fraction}, make_inputs=make_inputs,
                ours=lambda *a: tbd_ops.consistency_voting(*a),
                eager=lambda *a: tbd_ops.reference.consistency_voting(*a),
                bytes_moved=bytes_moved, modes=("fwd",), grad_args=(), skip=skip)


# ---- sigmoid_focal_loss ---------------------------------------------------------------------------
def py_sigmoid_focal_loss(logits, targets, weight=None, gamma: float = 2.0, alpha: float = 0.25,
                          reduction: str = "sum"):
    """MMDetection's py_sigmoid_focal_loss with the background index C (float32)."""
    c = logits.shape[1]
    target = F.one_hot(targets, c + 1)[:, :c].type_as(logits)
    p = logits.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * focal_weight
    if weight is not None:
        loss = loss * weight[:, None]
    return loss.sum() if reduction == "sum" else loss.mean() if reduction == "mean" else loss


def focal_case(r: int, c: int, name: str = None) -> Case:
    def make_inputs(device: torch.device) -> Inputs:
        logits = torch.randn(r, c, device=device) * 2 - 2
        targets = torch.randint(c, (r,), device=device)
        targets[torch.rand(r, device=device) < 0.75] = c  # background
        weight = torch.rand(r, device=device) + 0.5
        return Inputs((logits, targets, weight), dict(gamma=2.0, alpha=0.25, reduction="sum"))

    def bytes_moved(mode: str) -> int:
        fwd = r * c * ES + r * 8 + r * ES + 4
        bwd = 4 + r * c * ES + r * 8 + r * ES + r * c * ES
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    return Case(op="sigmoid_focal_loss", label="foc", name=name or f"{r} RoIs C{c}",
                params={"R": r, "C": c}, make_inputs=make_inputs,
                ours=lambda *a, **k: tbd_ops.sigmoid_focal_loss(*a, **k), eager=py_sigmoid_focal_loss,
                bytes_moved=bytes_moved, grad_args=(0,))


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    if cfg.quick:
        out = [assign_case(2, 200, 5, 8, name="quick 2x200 boxes M5 C8"),
               voting_case(2, 128, 5, name="quick 2x128 RoIs M5"),
               focal_case(256, 8, name="quick 256 RoIs C8")]
    else:
        out = [assign_case(4, 1000, 20, 80), voting_case(4, 512, 20), focal_case(4 * 512, 80)]
    missing = [c.op for c in out if not hasattr(tbd_ops, c.op) or not hasattr(tbd_ops.reference, c.op)]
    notes = [f"{op}: not in this build of tbd_ops (or its reference): skipped" for op in missing]
    return [c for c in out if c.op not in missing], notes


if __name__ == "__main__":
    import sys
    sys.exit(harness.exit_code(harness.main([sys.modules[__name__]], tag="pseco")))
