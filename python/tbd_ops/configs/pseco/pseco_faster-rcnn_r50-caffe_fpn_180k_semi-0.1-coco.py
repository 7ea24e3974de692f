# PseCo (Li et al., ECCV 2022) on Faster R-CNN R50-caffe FPN, COCO with 10% of train2017 labeled
# (fold 1), 180k iterations: the official PseCo_faster_rcnn_r50_caffe_fpn_coco_180k.py in mmdet 3.x
# form, with mmdet's semi-supervised data layout (configs/soft_teacher).
#   python -m tbd_ops.mmdet.train tbd_ops::pseco/pseco_faster-rcnn_r50-caffe_fpn_180k_semi-0.1-coco.py
_base_ = [
    "mmdet::_base_/models/faster-rcnn_r50_fpn.py",
    "mmdet::_base_/default_runtime.py",
    "mmdet::_base_/datasets/semi_coco_detection.py",
]
custom_imports = dict(imports=["tbd_ops.mmdet"], allow_failed_imports=False)

detector = _base_.model
detector.data_preprocessor = dict(
    type="DetDataPreprocessor",
    mean=[103.530, 116.280, 123.675],
    std=[1.0, 1.0, 1.0],
    bgr_to_rgb=False,
    pad_size_divisor=32)
detector.backbone = dict(
    type="ResNet",
    depth=50,
    num_stages=4,
    out_indices=(0, 1, 2, 3),
    frozen_stages=1,
    norm_cfg=dict(type="BN", requires_grad=False),
    norm_eval=True,
    style="caffe",
    init_cfg=dict(type="Pretrained", checkpoint="open-mmlab://detectron2/resnet50_caffe"))
# P2-P7: the student's view V1 and the teacher use P3-P7, the downsampled view V2 uses P2-P6.
detector.neck = dict(
    type="FPN",
    in_channels=[256, 512, 1024, 2048],
    out_channels=256,
    num_outs=6,
    add_extra_convs="on_input")
detector.rpn_head.anchor_generator = dict(
    type="AnchorGenerator", scales=[4], ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128])
detector.roi_head.bbox_roi_extractor = dict(
    type="SingleRoIExtractor",
    roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=0),
    out_channels=256,
    featmap_strides=[8, 16, 32, 64])
# Sigmoid focal classification (C channels, sigmoid scores), for labeled and unlabeled images.
detector.roi_head.bbox_head.loss_cls = dict(type="RoIFocalLoss", gamma=2.0, alpha=0.25, loss_weight=10.0)
detector.train_cfg.rcnn.sampler.add_gt_as_proposals = False

model = dict(
    _delete_=True,
    type="PseCoDetector",
    detector=detector,
    data_preprocessor=dict(type="MultiBranchDataPreprocessor", data_preprocessor=detector.data_preprocessor),
    # mmdet's generic keys; every PseCo setting is the official value by default (PseCoDetector's
    # defaults, the semi_train_cfg table of the README): name a key here to change it.
    semi_train_cfg=dict(freeze_teacher=True, sup_weight=1.0, unsup_weight=2.0),
    semi_test_cfg=dict(predict_on="teacher"))

# 10% of COCO train2017 labeled, the rest unlabeled (mmdet's semi-supervised COCO splits)
labeled_dataset = _base_.labeled_dataset
unlabeled_dataset = _base_.unlabeled_dataset
labeled_dataset.ann_file = "semi_anns/instances_train2017.1@10.json"
unlabeled_dataset.ann_file = "semi_anns/instances_train2017.1@10-unlabeled.json"
unlabeled_dataset.data_prefix = dict(img="train2017/")
# 5 images per GPU, 1 labeled : 4 unlabeled (8 GPUs in the official schedule)
train_dataloader = dict(
    batch_size=5,
    sampler=dict(type="GroupMultiSourceSampler", batch_size=5, source_ratio=[1, 4]),
    dataset=dict(datasets=[labeled_dataset, unlabeled_dataset]))

train_cfg = dict(type="IterBasedTrainLoop", max_iters=180000, val_interval=5000)
val_cfg = dict(type="TeacherStudentValLoop")
test_cfg = dict(type="TestLoop")

param_scheduler = [
    dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type="MultiStepLR", begin=0, end=180000, by_epoch=False, milestones=[120000], gamma=0.1),
]
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=0.01, momentum=0.9, weight_decay=0.0001))

default_hooks = dict(checkpoint=dict(by_epoch=False, interval=5000, max_keep_ckpts=10))
log_processor = dict(by_epoch=False)
# teacher = 0.999 * teacher + 0.001 * student after every iteration
custom_hooks = [dict(type="MeanTeacherHook", momentum=0.001)]
