"""Benchmark of the whole TBD loss (tbd_ops.nn.TBDLoss) vs eager PyTorch vs torch.compile.

Problem: one distillation step of a one-stage detector on COCO-sized inputs: images resized to
fit 800x1333 and padded to 800x1344 (MMDetection's pad_size_divisor=32), five FPN levels,
strides 8..128 (100x168, 50x84, 25x42, 13x21, 7x11 = 22,400 locations), 256-channel features,
80 classes, student and teacher head outputs of the same shapes:

  RetinaNet: A = 9 anchors (MMDetection's AnchorGenerator, octave base scale 4, 3 scales,
             ratios 0.5/1/2), cls [N, 720, H, W], box deltas [N, 36, H, W] ~ N(0, 0.1),
             coder delta_xywh (means 0, stds 1);
  FCOS:      A = 1, points at (x + 0.5, y + 0.5) * stride, cls [N, 80, H, W], box
             distances [N, 4, H, W] in stride units (uniform in [0.5, 6.5]), coder distance
             with per-level scales = the strides (FCOS' norm_on_bbox).

Classification logits ~ 2 N(0, 1) - 4, student features ~ N(0, 1), teacher features ~ N(0, 1) and
3 times larger at the locations inside a ground truth (objects stand out in the features, so
that TFD's two terms L_c and L_r differ: with features independent of the masks they are
nearly equal, and TWG's gradient, proportional to L_c - L_r, is a float32 cancellation that
no two implementations agree on to 1e-3); 3 to 12 ground truths per image
(centres uniform, sqrt(area) log-uniform in [12, 600] px); each image has its own img_shape
(800x1333 and 800x1066 alternating: img_shapes), so decoded boxes are clipped per image. Batch 2 on CPU,
16 on CUDA (2 as well), float32. Default TBDLoss settings: IoU-guided HD, TWG (hidden 16),
1x1 adapters, alpha = beta = 1.

Providers:
  tbd_ops  TBDLoss.forward (p_c and p_r by the fused kernels, the HD loss, the adapters, TWG and
           masked_sq_dist K = 2 per level; on the CPU the 1x1 adapters as one batched GEMM each);
  eager    the same loss in plain float32 PyTorch, as a user would write it: per level p_c by
           amax(1) + softmax over H*W; p_r by decoding the whole batch ([N, P, 4]), the batched
           [N, P, G_max] IoU matrix against the ground truths padded to G_max with empty boxes,
           its max, then the max over the A anchors; the HD loss term by term; TFD as
           conv2d + ((F^t - phi(F^s))^2).sum(1) + bmm with the two masks; TWG with F.linear;
  compile  torch.compile(eager, dynamic=False).
The adapters' and TWG's parameters are the module's, passed to every provider (through
torch.func.functional_call for tbd_ops), so the losses agree and the guard compares both loss
values and the gradients of the student's cls scores, box predictions, features and of the
parameters.

Modes: fwd (nothing requires grad), bwd, fwd+bwd with gradients for the student's cls scores,
box predictions, features and the module's parameters.

Bytes (for GB/s; the compulsory traffic, so GB/s is a lower bound of what runs: the adapters'
1x1 convolution, a 256x256 GEMM per location, is part of the timed loss), es = 4 bytes:
  fwd: read every input once: student and teacher cls (2*N*A*C*HW), boxes (2*N*4A*HW) and
       features (2*N*256*HW), priors, ground truths;
  bwd: write the gradients of the student's cls, boxes and features (N*(A*C + 4A + 256)*HW);
  fwd+bwd: the sum.

    python benchmarks/bench_tbd_loss.py [--device cpu|cuda] [--quick]
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

import harness
import tbd_ops
from bench_decode_max_iou import IMG_H, IMG_W, STRIDES, eager_delta_decode, eager_iou_matrix, level_anchors, random_gts
from harness import Case, Config, Inputs

OP = "tbd_loss"
LABEL = "tbd"

LEVEL_HW = ((100, 168), (50, 84), (25, 42), (13, 21), (7, 11))  # 800x1344 (padded) / stride
NUM_CLASSES = 80
CHANNELS = 256
GTS_PER_IMAGE = (7, 3, 12, 5, 9, 4, 10, 6)  # cycled over the batch
MODELS = {"RetinaNet": dict(a=9, coder="delta_xywh"), "FCOS": dict(a=1, coder="distance")}


def level_points(stride: int, h: int, w: int, device) -> torch.Tensor:
    """[H*W, 2] points of one level (MMDetection's MlvlPointGenerator, offset 0.5)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], dim=-1)


def inside_gts(gts: List[torch.Tensor], h: int, w: int, stride: int) -> torch.Tensor:
    """[N, 1, H, W]: 1 where the location's centre lies in one of the image's ground truths."""
    dev = gts[0].device
    ys = ((torch.arange(h, device=dev) + 0.5) * stride).view(1, h, 1)
    xs = ((torch.arange(w, device=dev) + 0.5) * stride).view(1, 1, w)
    out = []
    for g in gts:
        x1, y1, x2, y2 = (g[:, i].view(-1, 1, 1) for i in range(4))
        out.append(((xs >= x1) & (xs <= x2) & (ys >= y1) & (ys <= y2)).any(0))
    return torch.stack(out)[:, None].float()


def make_loss(model: str, channels: int, num_levels: int) -> tbd_ops.nn.TBDLoss:
    cfg = MODELS[model]
    coder_cfg = {"scales": [float(s) for s in STRIDES[:num_levels]]} if cfg["coder"] == "distance" else {}
    with torch.random.fork_rng(devices=[]):  # the same parameters in every run
        torch.manual_seed(0)
        return tbd_ops.nn.TBDLoss(num_levels=num_levels, in_channels=channels, coder=cfg["coder"],
                                  coder_cfg=coder_cfg)


# ---- eager: the same loss in plain float32 PyTorch ------------------------------------------------
def eager_pc(x: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    return torch.softmax(x.amax(1).view(n, h * w), dim=1).view(n, h, w)


def eager_pr(bbox_pred, priors, gts, img_hw, coder: str, scale: float, means, stds, wh_ratio_clip):
    """Per-location max IoU [N, H, W]: batched decode, [N, P, G_max] IoU matrix, max over the A x G_max
    IoUs of a location (prior index (h * W + w) * A + a)."""
    n, a4, h, w = bbox_pred.shape
    d = bbox_pred.view(n, a4 // 4, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    if coder == "delta_xywh":
        boxes = eager_delta_decode(d, priors, means, stds, wh_ratio_clip)
    else:  # distance
        d = d * scale
        boxes = torch.cat([priors[:, :2] - d[..., :2], priors[:, :2] + d[..., 2:]], dim=-1)
    limit = img_hw.flip(-1).repeat(1, 2)[:, None, :]  # [N, 1, 4]: (w, h, w, h)
    iou = eager_iou_matrix(torch.minimum(boxes.clamp(min=0), limit), gts)
    # One amax over the A x G_max IoUs of a location (max over G, then over A, trips an Inductor
    # assertion in torch.compile of the backward, torch 2.11, on the 2x2 level).
    return iou.view(n, h, w, -1).amax(-1)


def eager_hd(pc_s, pr_s, pc_t, pr_t, mode: str, eps: float) -> torch.Tensor:
    total = 0.0
    for cs, rs, ct, rt in zip(pc_s, pr_s, pc_t, pr_t):
        diff = ((1 - torch.tanh((rt - ct).abs())) - (1 - torch.tanh((rs - cs).abs()))).abs()
        if mode == "plain":
            per_image = diff.mean((1, 2))
        else:
            psi = rt * torch.sqrt(1 + (ct - cs.detach()).abs())
            per_image = (psi * diff).sum((1, 2)) / psi.sum((1, 2)).clamp(min=eps)
        total = total + per_image.mean()
    return total


def _normalize(p: torch.Tensor) -> torch.Tensor:
    s = p.sum((1, 2), keepdim=True)
    return torch.where(s > 0, p / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(p))


def make_eager(loss: tbd_ops.nn.TBDLoss):
    """The eager loss for the settings of ``loss``; the parameters come in as a list, in the order
    of ``loss.named_parameters()``."""
    names = [k for k, _ in loss.named_parameters()]
    coder, scales, kw = loss.coder, loss.scales, loss.coder_kwargs
    means, stds = kw.get("means", (0.0,) * 4), kw.get("stds", (1.0,) * 4)
    wh_ratio_clip = kw.get("wh_ratio_clip", 16 / 1000)
    hd_mode, hd_eps, hd_w, tfd_w = loss.hd.mode, loss.hd.eps, loss.hd.loss_weight, loss.tfd.loss_weight
    assert loss.temperature == 1.0 and not loss.scale_by_hw and loss.tfd.twg is not None

    def eager(params, s_cls, s_box, s_feat, t_cls, t_box, t_feat, priors, gt_bboxes, img_shapes):
        p = dict(zip(names, params))
        n = s_cls[0].shape[0]
        g_max = max(g.shape[0] for g in gt_bboxes)
        gts = torch.stack([F.pad(g, (0, 0, 0, g_max - g.shape[0])) for g in gt_bboxes])  # [N, G_max, 4]
        img_hw = torch.tensor(img_shapes, dtype=s_box[0].dtype, device=s_box[0].device)

        def maps(cls, box):
            return ([eager_pc(c) for c in cls],
                    [eager_pr(b, pr, gts, img_hw, coder, s, means, stds, wh_ratio_clip)
                     for b, pr, s in zip(box, priors, scales)])

        pc_s, pr_s = maps(s_cls, s_box)
        with torch.no_grad():
            pc_t, pr_t = maps(t_cls, t_box)
        loss_hd = eager_hd(pc_s, pr_s, pc_t, pr_t, hd_mode, hd_eps) * hd_w
        loss_tfd = 0.0
        for l, (fs, ft) in enumerate(zip(s_feat, t_feat)):
            adapted = F.conv2d(fs, p[f"tfd.adapters.{l}.weight"], p[f"tfd.adapters.{l}.bias"])
            masks = torch.stack([_normalize(pc_t[l]), _normalize(pr_t[l])], dim=1)  # [N, 2, H, W]
            diff = ft - adapted
            sq = (diff * diff).sum(1)
            dist = torch.bmm(masks.flatten(2), sq.flatten(1).unsqueeze(2)).squeeze(2)  # [N, 2]
            pooled = torch.stack([m.mean((1, 2)) for m in (pc_t[l], pr_t[l], pc_s[l].detach(), pr_s[l].detach())], 1)
            hidden = torch.relu(F.linear(pooled, p["tfd.twg.fc1.weight"], p["tfd.twg.fc1.bias"]))
            weights = torch.softmax(F.linear(hidden, p["tfd.twg.fc2.weight"], p["tfd.twg.fc2.bias"]), dim=1)
            loss_tfd = loss_tfd + (weights * dist).sum(1).sum() / n
        return loss_hd, loss_tfd * tfd_w

    return eager


def make_ours(loss: tbd_ops.nn.TBDLoss):
    names = [k for k, _ in loss.named_parameters()]

    def ours(params, *args):
        out = torch.func.functional_call(loss, dict(zip(names, params)), args)
        return out["loss_hd"], out["loss_tfd"]

    return ours


def make_case(model: str, n: int, *, name: str = None, level_hw: Sequence[Tuple[int, int]] = LEVEL_HW,
              img: Tuple[int, int] = (IMG_H, IMG_W), channels: int = CHANNELS, num_classes: int = NUM_CLASSES,
              no_compile: str = None) -> Case:
    a, coder = MODELS[model]["a"], MODELS[model]["coder"]
    num_levels = len(level_hw)
    hw = sum(h * w for h, w in level_hw)
    k = a * num_classes
    loss = make_loss(model, channels, num_levels)  # the parameters shared by every provider
    gts_per_image = [GTS_PER_IMAGE[i % len(GTS_PER_IMAGE)] for i in range(n)]
    img_shapes = [(img[0], img[1]) if i % 2 == 0 else (img[0], img[1] * 4 // 5) for i in range(n)]

    def make_inputs(device: torch.device) -> Inputs:
        loss.to(device)
        params = [t.detach() for t in loss.parameters()]

        def level_list(ch, fn):
            return [fn(torch.randn(n, ch, h, w, device=device)) for h, w in level_hw]

        s_cls, t_cls = (level_list(k, lambda x: x * 2.0 - 4.0) for _ in range(2))
        if coder == "delta_xywh":
            s_box, t_box = (level_list(4 * a, lambda x: x * 0.1) for _ in range(2))
            priors = [level_anchors(s, h, w, a, device) for s, (h, w) in zip(STRIDES, level_hw)]
        else:
            s_box, t_box = (level_list(4 * a, lambda x: torch.rand_like(x) * 6.0 + 0.5) for _ in range(2))
            priors = [level_points(s, h, w, device) for s, (h, w) in zip(STRIDES, level_hw)]
        scale = torch.tensor([img[1] / IMG_W, img[0] / IMG_H] * 2, device=device)
        gts = [random_gts(g, device) * scale for g in gts_per_image]
        s_feat = level_list(channels, lambda x: x)
        t_feat = [torch.randn(n, channels, h, w, device=device) * (1 + 2 * inside_gts(gts, h, w, s))
                  for s, (h, w) in zip(STRIDES, level_hw)]
        return Inputs((params, s_cls, s_box, s_feat, t_cls, t_box, t_feat, priors, gts, img_shapes))

    n_params = sum(t.numel() for t in loss.parameters())

    def bytes_moved(mode: str) -> int:
        inputs = 2 * n * hw * (k + 4 * a + channels) + hw * (4 if coder == "delta_xywh" else 2) * a \
            + sum(gts_per_image) * 4 + n_params
        grads = n * hw * (k + 4 * a + channels) + n_params
        return 4 * {"fwd": inputs, "bwd": grads, "fwd+bwd": inputs + grads}[mode]

    def skip(provider: str, mode: str, cfg: Config):
        if provider == "compile" and no_compile and not cfg.full:
            return no_compile
        return None

    return Case(op=OP, label=LABEL, name=name or f"{model} A{a} C{num_classes} b{n}",
                params={"model": model, "A": a, "C": num_classes, "coder": coder, "N": n, "HW": hw,
                        "channels": channels, "G": "/".join(map(str, gts_per_image))},
                make_inputs=make_inputs, ours=make_ours(loss), eager=make_eager(loss),
                bytes_moved=bytes_moved, grad_args=(0, 1, 2, 3), skip=skip)


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    if not hasattr(tbd_ops, "harmony_distillation_loss"):
        return [], ["tbd loss: tbd_ops.harmony_distillation_loss is not in this build: skipped"]
    if cfg.quick:  # a 160x224 image: levels 20x28 .. 2x2, 32-channel features, 8 classes
        small = dict(level_hw=((20, 28), (10, 14), (5, 7), (3, 4), (2, 2)), img=(160, 224), channels=32,
                     num_classes=8)
        return [make_case("RetinaNet", 2, name="quick RetinaNet A9 C8 160x224 b2", **small),
                make_case("FCOS", 2, name="quick FCOS A1 C8 160x224 b2", **small)], []
    if cfg.device.type == "cuda":
        return [make_case(m, n) for n in (2, 16) for m in MODELS], []
    slow = "CPU: compiling this loss takes minutes (--full runs it)"
    return [make_case(m, 2, no_compile=slow) for m in MODELS], \
        ["tbd loss on CPU: batch 2 (16 on CUDA), no torch.compile (--full runs it: 2-3 minutes of compilation)"]


if __name__ == "__main__":
    import sys
    sys.exit(harness.exit_code(harness.main([sys.modules[__name__]], tag=LABEL)))
