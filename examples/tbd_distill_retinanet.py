"""Task-Balanced Distillation of a RetinaNet (ResNet-18 FPN) student with MMDetection.

Trains ``tbd_ops.mmdet.TBDSingleStageDetector`` for a few dozen iterations on
synthetic images (bright rectangles on noise, the rectangles are the ground
truth) and prints the student's detection losses, the TBD losses and the
harmony ratio: the mean harmony score ``1 - tanh(|p_r - p_c|)`` of the student,
weighted by the teacher's ``p_r`` (1 when the student's classification and
localization quality agree where the teacher localizes well).

    python examples/tbd_distill_retinanet.py --iters 40           # CPU: a few minutes on 2 cores
    python examples/tbd_distill_retinanet.py --device cuda --iters 200

The teacher is a RetinaNet R-18 FPN with 128 channels, the student one with 64. By default the
teacher keeps its random initialization; ``--teacher-ckpt`` loads weights of that same teacher
(e.g. saved by a run of your own), a checkpoint of any other architecture is refused with the
keys that do not fit. To distill from a COCO model, write a config (README, "A config of your
own") and train with ``python -m tbd_ops.mmdet.train``.

Needs mmdet>=3.0 and mmengine. With ``mmcv-lite`` (mmcv without compiled ops)
pass ``--mmcv-lite``: a stand-in for ``mmcv._ext`` lets mmdet import; the
training path used here calls none of mmcv's compiled ops.
"""
import argparse
import time

import torch


def retinanet(channels, depth, num_classes):
    """mmdet's RetinaNet R-{depth} FPN (retinanet_r{depth}_fpn_1x_coco.py), narrowed to ``channels`` with two
    head convolutions, randomly initialized (no pretrained backbone to download)."""
    from mmengine.hub import get_config

    model = get_config(f"mmdet::retinanet/retinanet_r{depth}_fpn_1x_coco.py").model
    model.backbone.init_cfg = None
    model.neck.out_channels = channels
    model.bbox_head.update(num_classes=num_classes, in_channels=channels, stacked_convs=2, feat_channels=channels)
    return model.to_dict()


def synthetic_batch(batch, size, num_classes, generator):
    """Images of slightly different sizes with 1-3 bright rectangles each (no rectangle in every 4th image)."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    inputs, samples = [], []
    for i in range(batch):
        h = size - 16 * int(torch.randint(0, 3, (1,), generator=generator))
        w = size - 16 * int(torch.randint(0, 3, (1,), generator=generator))
        img = torch.randint(0, 60, (3, h, w), generator=generator, dtype=torch.uint8)
        count = 0 if i % 4 == 3 else int(torch.randint(1, 4, (1,), generator=generator))
        boxes, labels = [], []
        for _ in range(count):
            bw, bh = (torch.randint(16, max(17, w // 2), (1,), generator=generator).item(),
                      torch.randint(16, max(17, h // 2), (1,), generator=generator).item())
            x1 = torch.randint(0, w - bw, (1,), generator=generator).item()
            y1 = torch.randint(0, h - bh, (1,), generator=generator).item()
            label = int(torch.randint(0, num_classes, (1,), generator=generator))
            img[label % 3, y1:y1 + bh, x1:x1 + bw] = 230
            boxes.append([x1, y1, x1 + bw, y1 + bh])
            labels.append(label)
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        gt = InstanceData()
        gt.bboxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        gt.labels = torch.tensor(labels, dtype=torch.long)
        sample.gt_instances = gt
        inputs.append(img)
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


@torch.no_grad()
def harmony_ratio(model, inputs, samples):
    import tbd_ops

    feats = model.extract_feat(inputs)
    cls, reg = model.bbox_head(feats)[:2]
    t_cls, t_reg = model.teacher_model.bbox_head(model.teacher_model.extract_feat(inputs))[:2]
    sizes = [c.shape[-2:] for c in cls]
    priors = model.bbox_head.prior_generator.grid_priors(sizes, device=inputs.device)
    gts = [s.gt_instances.bboxes for s in samples]
    shapes = [s.metainfo["img_shape"] for s in samples]
    loss = model.tbd_loss
    pc_s, pr_s = loss.probabilities(list(cls), list(reg), priors, gts, shapes)
    _, pr_t = loss.probabilities(list(t_cls), list(t_reg), priors, gts, shapes)
    # p_c sums to 1 over a level; scale by H*W so that it is comparable with p_r.
    hs = [tbd_ops.harmony_score(p * p.shape[1] * p.shape[2], r) for p, r in zip(pc_s, pr_s)]
    num = sum((h * t).sum() for h, t in zip(hs, pr_t))
    den = sum(t.sum() for t in pr_t)
    return float(num / den) if den > 0 else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=160, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher-ckpt", default=None,
                        help="weights of this script's teacher, RetinaNet R-18 with 128 channels and --classes "
                             "classes (default: its random initialization)")
    parser.add_argument("--mmcv-lite", action="store_true", help="mmcv without compiled ops: nms from torchvision (tbd_ops.mmcv_lite)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if args.mmcv_lite:
        from tbd_ops import mmcv_lite

        mmcv_lite.install()
    from mmengine.logging import MMLogger
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    import tbd_ops.mmdet  # noqa: F401  (registers TBDSingleStageDetector and the losses)

    register_all_modules()
    MMLogger.get_instance("mmengine", log_level="WARNING")
    torch.manual_seed(args.seed)
    student = retinanet(channels=64, depth=18, num_classes=args.classes)
    teacher = retinanet(channels=128, depth=18, num_classes=args.classes)
    model = MODELS.build(dict(
        type="TBDSingleStageDetector",
        data_preprocessor=student["data_preprocessor"], backbone=student["backbone"], neck=student["neck"],
        bbox_head=student["bbox_head"], train_cfg=student["train_cfg"], test_cfg=student["test_cfg"],
        teacher_config=dict(model=teacher), teacher_ckpt=args.teacher_ckpt,
        # L_TFD sums squared feature differences over 64 channels: a small beta
        # keeps it on the scale of the detection losses.
        tbd_loss=dict(hd_weight=1.0, tfd_weight=0.01, hd_mode="iou_guided")))
    model.init_weights()
    model.to(args.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"student {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters "
          f"(TBD adapters + TWG: {sum(p.numel() for p in model.tbd_loss.parameters()) / 1e3:.1f}k); "
          f"device {args.device}")
    start = time.time()
    for it in range(1, args.iters + 1):
        data = model.data_preprocessor(synthetic_batch(args.batch, args.size, args.classes, generator), True)
        losses = model.loss(data["inputs"], data["data_samples"])
        total, log = model.parse_losses(losses)
        optim.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 35.0)
        optim.step()
        if it == 1 or it % 5 == 0 or it == args.iters:
            ratio = harmony_ratio(model, data["inputs"], data["data_samples"])
            parts = "  ".join(f"{k} {float(v):.4f}" for k, v in log.items() if k != "loss")
            print(f"iter {it:3d}  loss {float(total.detach()):.4f}  {parts}  harmony {ratio:.3f}  "
                  f"({time.time() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
