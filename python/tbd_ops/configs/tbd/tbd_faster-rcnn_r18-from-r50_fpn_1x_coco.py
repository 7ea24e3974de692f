# Task-Balanced Distillation of a two-stage detector: a Faster R-CNN R18-FPN student from a Faster R-CNN
# R50-FPN teacher, COCO, 1x schedule. HD on the RPN outputs, TFD on the FPN features (TBDTwoStageDetector);
# the student's RPN and RoI losses are its own.
#   python -m tbd_ops.mmdet.train tbd_ops::tbd/tbd_faster-rcnn_r18-from-r50_fpn_1x_coco.py
_base_ = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
custom_imports = dict(imports=["tbd_ops.mmdet"], allow_failed_imports=False)

model = dict(
    type="TBDTwoStageDetector",
    backbone=dict(depth=18, init_cfg=dict(type="Pretrained", checkpoint="torchvision://resnet18")),
    neck=dict(in_channels=[64, 128, 256, 512]),
    teacher_config="mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py",
    # The teacher's trained weights: a checkpoint the Runner wrote for the teacher config above,
    # or MMDetection's model-zoo file (downloaded on first use).
    teacher_ckpt="https://download.openmmlab.com/mmdetection/v2.0/faster_rcnn/faster_rcnn_r50_fpn_1x_coco/"
                 "faster_rcnn_r50_fpn_1x_coco_20200130-047c8118.pth",
    tbd_loss=dict(hd_weight=1.0, tfd_weight=0.01, hd_mode="iou_guided", adapter_kernel=1),
)
