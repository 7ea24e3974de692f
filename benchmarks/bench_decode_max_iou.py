"""Benchmark of tbd_ops.decode_max_iou (p_r) vs eager PyTorch vs torch.compile.

Problem: every box prediction of a 1333x800 image (all five FPN levels, strides 8..128,
P = 22,300 * A priors per image) is decoded with MMDetection's DeltaXYWHBBoxCoder and its
best IoU over the image's G ground truths is taken. The eager baseline is what a user would
write: MMDetection's decode on the whole batch, then the batched [N, P, G] IoU matrix (the
images have the same G, a padded batch) and its max; it holds about 8 N x P x G float32
temporaries at its peak (kept for backward with autograd); tbd_ops never forms the matrix.

  anchors: MMDetection's AnchorGenerator, (h, w, a) order per level, levels concatenated;
           A = 9: RetinaNet (octave base scale 4, 3 scales per octave, ratios 0.5/1/2);
           A = 1: ATSS/FCOS-like (one square anchor of 8 * stride)
  ground truths: G per image, centres uniform in the image, sqrt(area) log-uniform in
           [12, 600] px, aspect ratio in [1/2, 2], clipped to the image
  predictions: [N, P, 4] deltas ~ N(0, 0.1), stds 1, clipped to max_shape = (800, 1333)
  G in {7, 50, 100, 500}, A in {1, 9}, batch 2 and 16 (CUDA; a selection on CPU), float32.

Plus a [N, A*4, H, W] head-layout case (P3 only, read in place) and the memory case:
1 image, 151,200 anchors x 800 ground truths, forward (eager's IoU matrix alone is 461 MiB).

Bytes the op must move (for GB/s):
  fwd: read predictions N*P*4 + priors P*4 + ground truths sum(G)*4, write iou N*P and
       arg N*P (int64);
  bwd: read the iou gradient N*P, arg N*P (int64), predictions, priors and ground truths
       (to re-decode), write the prediction gradient N*P*4;
  fwd+bwd: the sum.

    python benchmarks/bench_decode_max_iou.py [--device cpu|cuda] [--quick]
"""
import math
from typing import List, Sequence, Tuple

import torch

import harness
import tbd_ops
from harness import Case, Config, Inputs

OP = "decode_max_iou"
LABEL = "p_r"

IMG_H, IMG_W = 800, 1333
STRIDES = (8, 16, 32, 64, 128)
LEVEL_HW = ((100, 167), (50, 84), (25, 42), (13, 21), (7, 11))  # ceil(800/s), ceil(1333/s)
CODER = dict(coder="delta_xywh", means=(0.0, 0.0, 0.0, 0.0), stds=(1.0, 1.0, 1.0, 1.0),
             max_shape=(IMG_H, IMG_W))
EAGER_MATRICES = 8  # peak of the eager baseline in N x P x G float32 matrices


def eager(bbox_pred, priors, gt_bboxes, *, coder="delta_xywh", means=(0.0,) * 4, stds=(1.0,) * 4,
          max_shape=None, wh_ratio_clip=16 / 1000):
    """Batched plain PyTorch: delta2bbox on [N, P, 4], then max over the [N, P, G] IoU matrix."""
    assert coder == "delta_xywh"
    if bbox_pred.dim() == 4:  # [N, A*4, H, W] -> [N, H*W*A, 4]
        n, c, h, w = bbox_pred.shape
        bbox_pred = bbox_pred.view(n, c // 4, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    boxes = eager_delta_decode(bbox_pred, priors, means, stds, wh_ratio_clip)
    if max_shape is not None:
        h, w = max_shape
        boxes = torch.minimum(boxes.clamp(min=0), boxes.new_tensor([w, h, w, h]))
    return eager_iou_matrix(boxes, torch.stack(list(gt_bboxes))).max(dim=-1)


def eager_delta_decode(deltas, priors, means, stds, wh_ratio_clip):
    """DeltaXYWHBBoxCoder.decode of [N, P, 4] deltas on [P, 4] priors in plain PyTorch (unclipped)."""
    d = deltas * deltas.new_tensor(stds) + deltas.new_tensor(means)
    r = abs(math.log(wh_ratio_clip))
    pxy, pwh = (priors[:, :2] + priors[:, 2:]) * 0.5, priors[:, 2:] - priors[:, :2]
    gxy, gwh = pxy + pwh * d[..., :2], pwh * d[..., 2:].clamp(-r, r).exp()
    return torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)


def eager_iou_matrix(boxes, gts):
    """The batched [N, P, G] IoU matrix of boxes [N, P, 4] and ground truths [N, G, 4]."""
    lt = torch.maximum(boxes[:, :, None, :2], gts[:, None, :, :2])
    rb = torch.minimum(boxes[:, :, None, 2:], gts[:, None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_b = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)
    area_g = (gts[..., 2:] - gts[..., :2]).clamp(min=0).prod(-1)
    return inter / (area_b[:, :, None] + area_g[:, None, :] - inter).clamp(min=1e-6)


def base_anchors(stride: int, a: int, device) -> torch.Tensor:
    """MMDetection AnchorGenerator base anchors (center offset 0): [A, 4]."""
    if a == 9:
        scales = torch.tensor([4.0 * 2 ** (i / 3) for i in range(3)])
        ratios = torch.tensor([0.5, 1.0, 2.0])
    elif a == 1:
        scales, ratios = torch.tensor([8.0]), torch.tensor([1.0])
    else:
        raise ValueError(a)
    h_ratios = ratios.sqrt()
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1).to(device)


def level_anchors(stride: int, h: int, w: int, a: int, device) -> torch.Tensor:
    """[H*W*A, 4] anchors of one level, prior index (y*W + x)*A + a."""
    sy, sx = torch.meshgrid(torch.arange(h, device=device) * float(stride),
                            torch.arange(w, device=device) * float(stride), indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
    return (shifts + base_anchors(stride, a, device)[None]).reshape(-1, 4)


def pyramid_anchors(a: int, device) -> torch.Tensor:
    return torch.cat([level_anchors(s, h, w, a, device) for s, (h, w) in zip(STRIDES, LEVEL_HW)])


def random_anchors(p: int, device) -> torch.Tensor:
    """p anchors with centres uniform in the image, sizes 16..512 px, ratios 1/2..2."""
    cx, cy = torch.rand(p, device=device) * IMG_W, torch.rand(p, device=device) * IMG_H
    size = torch.exp(torch.empty(p, device=device).uniform_(math.log(16), math.log(512)))
    ratio = torch.exp(torch.empty(p, device=device).uniform_(math.log(0.5), math.log(2.0)))
    w, h = size / ratio.sqrt(), size * ratio.sqrt()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def random_gts(g: int, device) -> torch.Tensor:
    cx, cy = torch.rand(g, device=device) * IMG_W, torch.rand(g, device=device) * IMG_H
    size = torch.exp(torch.empty(g, device=device).uniform_(math.log(12), math.log(600)))
    ratio = torch.exp(torch.empty(g, device=device).uniform_(math.log(0.5), math.log(2.0)))
    w, h = size / ratio.sqrt(), size * ratio.sqrt()
    x1, y1 = (cx - w / 2).clamp(0, IMG_W - 1), (cy - h / 2).clamp(0, IMG_H - 1)
    x2, y2 = torch.maximum((cx + w / 2).clamp(max=IMG_W), x1 + 1), torch.maximum((cy + h / 2).clamp(max=IMG_H), y1 + 1)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def make_case(a: int, g: int, n: int, *, name: str = None, head_layout: bool = False,
              anchors: int = None, modes: Sequence[str] = harness.MODES,
              dtype: torch.dtype = torch.float32, no_compile: str = None) -> Case:
    if head_layout:  # P3 only, [N, A*4, H, W]
        h, w = LEVEL_HW[0]
        p = h * w * a
    else:
        p = anchors if anchors is not None else sum(h * w for h, w in LEVEL_HW) * a
    es = torch.empty(0, dtype=dtype).element_size()

    def make_inputs(device: torch.device) -> Inputs:
        if head_layout:
            priors = level_anchors(STRIDES[0], h, w, a, device)
            pred = torch.randn(n, a * 4, h, w, device=device) * 0.1
        else:
            priors = pyramid_anchors(a, device) if anchors is None else random_anchors(p, device)
            pred = torch.randn(n, p, 4, device=device) * 0.1
        gts = [random_gts(g, device).to(dtype) for _ in range(n)]
        return Inputs((pred.to(dtype), priors.to(dtype), gts), dict(CODER))

    def bytes_moved(mode: str) -> int:
        fwd = (n * p * 4 + p * 4 + n * g * 4) * es + n * p * es + n * p * 8
        bwd = n * p * es + n * p * 8 + (n * p * 4 + p * 4 + n * g * 4) * es + n * p * 4 * es
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    def skip(provider: str, mode: str, cfg: Config):
        if provider == "compile" and no_compile:
            return no_compile
        need = n * p * g * 4 * EAGER_MATRICES
        if need > cfg.mem_budget:
            return f"eager needs ~{need / 2**30:.1f} GiB"
        return None

    return Case(op=OP, label=LABEL, name=name or f"A{a} G{g} b{n}" + (" P3 NCHW" if head_layout else ""),
                params={"A": a, "G": g, "N": n, "P": p, "layout": "NCHW" if head_layout else "NP4"},
                make_inputs=make_inputs, ours=tbd_ops.decode_max_iou, eager=eager,
                bytes_moved=bytes_moved, dtype=dtype, modes=tuple(modes), skip=skip)


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    if cfg.quick:
        return [make_case(1, 7, 2, name="quick A1 G7 b2 P2000", anchors=2000),
                make_case(9, 20, 1, name="quick A9 G20 b1 P6000", anchors=6000, modes=("fwd",))], []
    mem = make_case(1, 800, 1, name="mem P151200 G800 b1", anchors=151200, modes=("fwd",))
    if cfg.device.type == "cuda" or cfg.full:
        out = [make_case(a, g, n) for n in (2, 16) for a in (1, 9) for g in (7, 50, 100, 500)]
        return out + [make_case(9, 50, 2, head_layout=True), mem], []
    # CPU: a selection that finishes in a few minutes on 2 cores.
    slow = "CPU: compiling and running this case takes minutes"
    out = [make_case(1, 7, 2), make_case(1, 100, 2), make_case(9, 50, 2, no_compile=slow),
           make_case(9, 50, 2, head_layout=True, no_compile=slow), mem]
    return out, ["p_r on CPU: batch 2, A=1 with G in {7, 100}, A=9 with G=50 (no torch.compile there), "
                 "the memory case forward; the whole matrix runs on CUDA or with --full"]


if __name__ == "__main__":
    import sys
    sys.exit(harness.exit_code(harness.main([sys.modules[__name__]], tag=LABEL)))
