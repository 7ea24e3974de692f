# Task-Balanced Distillation: an FCOS R18-FPN student (torchvision weights, RGB mean/std inputs) from
# mmdet's FCOS R50-caffe teacher (BGR inputs, mean only), COCO, 1x schedule. The distiller converts each
# batch to the teacher's normalization (tbd_ops.mmdet.teacher.InputConverter).
#   python -m tbd_ops.mmdet.train tbd_ops::tbd/tbd_fcos_r18-from-r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py
_base_ = "mmdet::fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py"
custom_imports = dict(imports=["tbd_ops.mmdet"], allow_failed_imports=False)

model = dict(
    type="TBDSingleStageDetector",
    data_preprocessor=dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True),
    backbone=dict(depth=18, style="pytorch", norm_cfg=dict(type="BN", requires_grad=True),
                  init_cfg=dict(type="Pretrained", checkpoint="torchvision://resnet18")),
    neck=dict(in_channels=[64, 128, 256, 512]),
    teacher_config="mmdet::fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py",
    # The teacher's trained weights: a checkpoint the Runner wrote for the teacher config above,
    # or MMDetection's model-zoo file (downloaded on first use).
    teacher_ckpt="https://download.openmmlab.com/mmdetection/v2.0/fcos/"
                 "fcos_center-normbbox-centeronreg-giou_r50_caffe_fpn_gn-head_1x_coco/"
                 "fcos_center-normbbox-centeronreg-giou_r50_caffe_fpn_gn-head_1x_coco-0a0d75a8.pth",
    tbd_loss=dict(hd_weight=1.0, tfd_weight=0.01, hd_mode="iou_guided", adapter_kernel=1),
)
