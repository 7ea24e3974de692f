# Task-Balanced Distillation: an ATSS R18-FPN student from an ATSS R50-FPN teacher, COCO, 1x schedule.
#   python -m tbd_ops.mmdet.train tbd_ops::tbd/tbd_atss_r18-from-r50_fpn_1x_coco.py
_base_ = "mmdet::atss/atss_r50_fpn_1x_coco.py"
custom_imports = dict(imports=["tbd_ops.mmdet"], allow_failed_imports=False)

model = dict(
    type="TBDSingleStageDetector",
    backbone=dict(depth=18, init_cfg=dict(type="Pretrained", checkpoint="torchvision://resnet18")),
    neck=dict(in_channels=[64, 128, 256, 512]),
    teacher_config="mmdet::atss/atss_r50_fpn_1x_coco.py",
    # The teacher's trained weights: a checkpoint the Runner wrote for the teacher config above,
    # or MMDetection's model-zoo file (downloaded on first use).
    teacher_ckpt="https://download.openmmlab.com/mmdetection/v2.0/atss/atss_r50_fpn_1x_coco/"
                 "atss_r50_fpn_1x_coco_20200209-985f7bd0.pth",
    tbd_loss=dict(hd_weight=1.0, tfd_weight=0.01, hd_mode="iou_guided", adapter_kernel=1),
)
