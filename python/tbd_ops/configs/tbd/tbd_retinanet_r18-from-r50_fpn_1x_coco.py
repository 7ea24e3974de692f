# Task-Balanced Distillation: a RetinaNet R18-FPN student from a RetinaNet R50-FPN teacher, COCO, 1x schedule.
#   python -m tbd_ops.mmdet.train tbd_ops::tbd/tbd_retinanet_r18-from-r50_fpn_1x_coco.py
# The student, its data pipeline and schedule are mmdet's retinanet_r18_fpn_1x_coco.
_base_ = "mmdet::retinanet/retinanet_r18_fpn_1x_coco.py"
custom_imports = dict(imports=["tbd_ops.mmdet"], allow_failed_imports=False)

model = dict(
    type="TBDSingleStageDetector",
    teacher_config="mmdet::retinanet/retinanet_r50_fpn_1x_coco.py",
    # The teacher's trained weights: a checkpoint the Runner wrote for the teacher config above
    # (work_dirs/.../epoch_12.pth), or MMDetection's model-zoo file (downloaded on first use).
    teacher_ckpt="https://download.openmmlab.com/mmdetection/v2.0/retinanet/retinanet_r50_fpn_1x_coco/"
                 "retinanet_r50_fpn_1x_coco_20200130-c2398f9e.pth",
    tbd_loss=dict(hd_weight=1.0, tfd_weight=0.01, hd_mode="iou_guided", adapter_kernel=1),
)
