"""Tiny COCO-format data sets and mmengine Runner configs for end-to-end tests.

Tests drive the detectors the way users do: a config file, ``Runner.from_cfg``,
checkpoints written by the Runner. The data are generated: bright rectangles
(the ground truths) on noise, written as PNG files plus an ``instances.json``.
"""
import json
import os
import textwrap
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

CLASSES = ("box", "bar", "blob")
MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


def make_coco(root, name: str = "train", num_images: int = 4, seed: int = 0, labeled: bool = True,
              sizes: Sequence = ((120, 160), (96, 128), (128, 112), (104, 144))) -> Dict[str, str]:
    """Writes ``root/<name>/*.png`` and ``root/annotations/<name>.json``; returns their paths.

    Every image has 1 to 3 rectangles of the three classes. ``labeled=False``
    writes the images with no annotations (an unlabeled set).
    """
    import cv2

    rng = np.random.default_rng(seed)
    root = Path(root)
    img_dir = root / name
    img_dir.mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        h, w = sizes[i % len(sizes)]
        img = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            bw, bh = int(rng.integers(w // 6, w // 2)), int(rng.integers(h // 6, h // 2))
            x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            label = int(rng.integers(0, len(CLASSES)))
            color = np.array([[200, 60, 60], [60, 200, 60], [60, 60, 200]][label], dtype=np.uint8)
            img[y:y + bh, x:x + bw] = color
            if labeled:
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=label + 1,
                                        bbox=[x, y, bw, bh], area=bw * bh, iscrowd=0))
        file_name = f"{i:04d}.png"
        cv2.imwrite(str(img_dir / file_name), img)
        images.append(dict(id=i + 1, file_name=file_name, height=h, width=w))
    ann = dict(images=images, annotations=annotations,
               categories=[dict(id=k + 1, name=c) for k, c in enumerate(CLASSES)])
    ann_file = root / "annotations" / f"{name}.json"
    ann_file.write_text(json.dumps(ann))
    return dict(data_root=str(root), ann_file=f"annotations/{name}.json", img_prefix=f"{name}/")


# Detectors as mmdet's own configs define them (ResNet-18, FPN), for the tests.
MMDET_CONFIGS = {
    "retinanet": "mmdet::retinanet/retinanet_r18_fpn_1x_coco.py",
    "atss": "mmdet::atss/atss_r18_fpn_8xb8-amp-lsj-200e_coco.py",
    "fcos": "mmdet::fcos/fcos_r18_fpn_gn-head-center-normbbox-centeronreg-giou_8xb8-amp-lsj-200e_coco.py",
    "faster_rcnn": "mmdet::faster_rcnn/faster-rcnn_r18_fpn_8xb8-amp-lsj-200e_coco.py",
}


def mmdet_model(arch: str, num_classes: int = len(CLASSES), depth: Optional[int] = None) -> dict:
    """The ``model`` of mmdet's config for ``arch``, made runnable in a CPU test.

    Changes only what a CPU test must: no pretrained download (``init_cfg=None``),
    no 1024x1024 batch resize (the LSJ recipes' ``batch_augments``), the number of
    classes, and torchvision's RoIAlign (mmcv-lite has no compiled ops).
    """
    from mmengine.hub import get_config

    model = get_config(MMDET_CONFIGS[arch]).model.to_dict()
    model["backbone"]["init_cfg"] = None
    if depth is not None:
        model["backbone"]["depth"] = depth
        model["neck"]["in_channels"] = [64, 128, 256, 512] if depth < 50 else [256, 512, 1024, 2048]
    model["data_preprocessor"].pop("batch_augments", None)
    if "roi_head" in model:
        model["roi_head"]["bbox_head"]["num_classes"] = num_classes
        model["roi_head"]["bbox_roi_extractor"]["roi_layer"]["use_torchvision"] = True
    else:
        model["bbox_head"]["num_classes"] = num_classes
    return model


def train_pipeline(scale=(160, 128)) -> List[dict]:
    return [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs"),
    ]


def runtime(data: Dict[str, str], work_dir, max_iters: int = 2, batch_size: int = 2,
            checkpoint_interval: Optional[int] = None, lr: float = 0.01) -> dict:
    """The non-model part of a training config: data, loop, optimizer, hooks."""
    return dict(
        default_scope="mmdet",
        work_dir=str(work_dir),
        train_dataloader=dict(
            batch_size=batch_size, num_workers=0, persistent_workers=False,
            sampler=dict(type="DefaultSampler", shuffle=True),
            batch_sampler=dict(type="AspectRatioBatchSampler"),
            dataset=dict(type="CocoDataset", data_root=data["data_root"], ann_file=data["ann_file"],
                         data_prefix=dict(img=data["img_prefix"]), metainfo=dict(classes=CLASSES),
                         filter_cfg=dict(filter_empty_gt=True), pipeline=train_pipeline())),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=10 ** 9),
        val_cfg=None, val_dataloader=None, val_evaluator=None,
        test_cfg=None, test_dataloader=None, test_evaluator=None,
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=lr, momentum=0.9, weight_decay=1e-4),
                           clip_grad=dict(max_norm=10, norm_type=2)),
        param_scheduler=[],
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=1),
            param_scheduler=dict(type="ParamSchedulerHook"),
            checkpoint=dict(type="CheckpointHook", interval=checkpoint_interval or max_iters, by_epoch=False),
            sampler_seed=dict(type="DistSamplerSeedHook"),
            visualization=dict(type="DetVisualizationHook")),
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="gloo")),
        vis_backends=[dict(type="LocalVisBackend")],
        visualizer=dict(type="DetLocalVisualizer", vis_backends=[dict(type="LocalVisBackend")], name="visualizer"),
        log_processor=dict(type="LogProcessor", window_size=1, by_epoch=False),
        log_level="WARNING",
        load_from=None,
        resume=False,
        randomness=dict(seed=0),
    )


def write_config(path, cfg: dict, header: str = "") -> str:
    """Writes ``cfg`` as a Python config file (what a user edits), with ``header`` lines first."""
    lines = [textwrap.dedent(header).strip()] if header else []
    lines += [f"{k} = {v!r}" for k, v in cfg.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


# The settings of mmdet's base configs (dataset, schedule, runtime) that config_on_base replaces whole.
_BASE_DICTS = {"train_dataloader", "train_cfg", "optim_wrapper", "default_hooks", "env_cfg", "visualizer",
               "log_processor"}


def config_on_base(path, base, model: dict, cfg: dict, header: str = "") -> str:
    """Writes a config file that starts from ``_base_ = base`` (a path or ``mmdet::`` name), merges
    ``model`` into the base's model and replaces the base's data, schedule and runtime by ``cfg``."""
    replaced = {k: (dict(v, _delete_=True) if k in _BASE_DICTS else v) for k, v in cfg.items()}
    text = [f"_base_ = {str(base)!r}", textwrap.dedent(header).strip(), f"model = {model!r}"]
    text += [f"{k} = {v!r}" for k, v in replaced.items()]
    Path(path).write_text("\n".join(t for t in text if t) + "\n")
    return str(path)


def runner(config_path, **overrides):
    """``Runner.from_cfg(Config.fromfile(path))`` with ``overrides`` merged (``--cfg-options``), as
    ``tools/train.py`` builds it."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    cfg = Config.fromfile(str(config_path))
    cfg.merge_from_dict(overrides)
    if cfg.get("visualizer") is not None:
        # The visualizer is a process-wide instance per name: a second Runner in this process would
        # otherwise log into the first one's work_dir.
        cfg.visualizer.name = f"visualizer_{uuid.uuid4().hex}"
    return Runner.from_cfg(cfg)


def train(config_path, **overrides):
    """``runner(path, **overrides).train()``, as ``tools/train.py`` does; returns the runner."""
    r = runner(config_path, **overrides)
    r.train()
    return r


def scalars(work_dir) -> List[dict]:
    """The per-iteration scalars the LoggerHook wrote (``vis_data/scalars.json`` of the newest run)."""
    files = sorted(Path(work_dir).glob("*/vis_data/scalars.json"))
    assert files, f"no scalars.json under {work_dir}"
    return [json.loads(line) for line in files[-1].read_text().splitlines() if line.strip()]


def detection_batch(model, num_classes: int = len(CLASSES), shapes=((100, 128), (72, 96)),
                    raw: bool = False):
    """A preprocessed batch of images of different ``img_shape`` (padded into one tensor); the last
    image has no ground truth. ``raw=True`` also returns the uint8 images and unprocessed samples."""
    import torch
    from mmengine.structures import InstanceData
    from mmdet.structures import DetDataSample

    inputs, samples = [], []
    for i, (h, w) in enumerate(shapes):
        inputs.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
        sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0)))
        gt = InstanceData()
        if i < len(shapes) - 1:
            xy = torch.rand(3, 2) * torch.tensor([w * 0.6, h * 0.6])
            wh = 16 + torch.rand(3, 2) * torch.tensor([w * 0.35, h * 0.35])
            gt.bboxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1)
            gt.labels = torch.randint(0, num_classes, (3,))
        else:
            gt.bboxes = torch.zeros(0, 4)
            gt.labels = torch.zeros(0, dtype=torch.long)
        sample.gt_instances = gt
        samples.append(sample)
    data = model.data_preprocessor(dict(inputs=[x.clone() for x in inputs], data_samples=samples), training=True)
    if raw:
        return data["inputs"], data["data_samples"], inputs
    return data["inputs"], data["data_samples"]


# ---- semi-supervised detection (mmdet's semi_coco_detection layout) ----------------------------------
BRANCHES = ["sup", "unsup_teacher", "unsup_student"]
SEMI_META_KEYS = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "flip", "flip_direction",
                  "homography_matrix")


def semi_pipelines(scale=(160, 128), student_scales=((144, 112), (176, 144))) -> Dict[str, List[dict]]:
    """mmdet's sup / unsup (teacher weak, student strong) pipelines, small and fast.

    The teacher's view is resized to ``scale`` and flipped at random, the
    student's view resized to a random scale in ``student_scales`` and flipped
    at random, so that the ``homography_matrix`` between the views is a real
    transform (scale and flip).
    """
    sup = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="MultiBranch", branch_field=BRANCHES, sup=dict(type="PackDetInputs")),
    ]
    weak = [
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs", meta_keys=SEMI_META_KEYS),
    ]
    strong = [
        dict(type="RandomResize", scale=list(student_scales), keep_ratio=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs", meta_keys=SEMI_META_KEYS),
    ]
    unsup = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadEmptyAnnotations"),
        dict(type="MultiBranch", branch_field=BRANCHES, unsup_teacher=weak, unsup_student=strong),
    ]
    return dict(sup=sup, unsup=unsup)


def semi_runtime(labeled: Dict[str, str], unlabeled: Dict[str, str], work_dir, max_iters: int = 2,
                 batch_size: int = 3, source_ratio: Sequence[int] = (1, 2), checkpoint_interval: Optional[int] = None,
                 lr: float = 0.01, ema_momentum: float = 0.001, scale=(160, 128),
                 student_scales=((144, 112), (176, 144))) -> dict:
    """``runtime()`` with mmdet's semi-supervised data: a ConcatDataset of the labeled and the
    unlabeled set, ``GroupMultiSourceSampler`` (``source_ratio`` images of each per batch) and
    ``MeanTeacherHook(momentum=ema_momentum)``; ``scale``, ``student_scales`` as in ``semi_pipelines``."""
    cfg = runtime(labeled, work_dir, max_iters=max_iters, batch_size=batch_size,
                  checkpoint_interval=checkpoint_interval, lr=lr)
    pipes = semi_pipelines(scale, student_scales)

    def dataset(data, pipeline, filter_empty_gt):
        return dict(type="CocoDataset", data_root=data["data_root"], ann_file=data["ann_file"],
                    data_prefix=dict(img=data["img_prefix"]), metainfo=dict(classes=CLASSES),
                    filter_cfg=dict(filter_empty_gt=filter_empty_gt), pipeline=pipeline)

    cfg["train_dataloader"] = dict(
        batch_size=batch_size, num_workers=0, persistent_workers=False,
        sampler=dict(type="GroupMultiSourceSampler", batch_size=batch_size, source_ratio=list(source_ratio)),
        dataset=dict(type="ConcatDataset", datasets=[dataset(labeled, pipes["sup"], True),
                                                     dataset(unlabeled, pipes["unsup"], False)]))
    cfg["custom_hooks"] = [dict(type="MeanTeacherHook", momentum=ema_momentum)]
    return cfg


def train_with_hooks(config_path, hooks: Sequence = (), **overrides):
    """``train()`` with extra hook objects registered (priority LOWEST: after the config's hooks)."""
    r = runner(config_path, **overrides)
    for hook in hooks:
        r.register_hook(hook, priority="LOWEST")
    r.train()
    return r
