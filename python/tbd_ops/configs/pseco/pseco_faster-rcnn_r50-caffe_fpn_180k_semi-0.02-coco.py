# PseCo Faster R-CNN R50-caffe FPN, COCO with 2% of train2017 labeled (fold 1), 180k iterations.
_base_ = ["./pseco_faster-rcnn_r50-caffe_fpn_180k_semi-0.1-coco.py"]

split = "semi_anns/instances_train2017.1@2"  # mmdet's semi-supervised COCO split: 2% labeled, fold 1
labeled_dataset = dict(_base_.labeled_dataset, ann_file=f"{split}.json")
unlabeled_dataset = dict(_base_.unlabeled_dataset, ann_file=f"{split}-unlabeled.json")
train_dataloader = dict(dataset=dict(datasets=[labeled_dataset, unlabeled_dataset]))
