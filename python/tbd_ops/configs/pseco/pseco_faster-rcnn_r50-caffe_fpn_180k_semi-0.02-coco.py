# PseCo Faster R-CNN R50-caffe FPN, COCO with 2% of train2017 labeled (fold 1), 180k iterations.
_base_ = ["./pseco_faster-rcnn_r50-caffe_fpn_180k_semi-0.1-coco.py"]

labeled_dataset = _base_.labeled_dataset
unlabeled_dataset = _base_.unlabeled_dataset
labeled_dataset.ann_file = "semi_anns/instances_train2017.1@2.json"
unlabeled_dataset.ann_file = "semi_anns/instances_train2017.1@2-unlabeled.json"
train_dataloader = dict(dataset=dict(datasets=[labeled_dataset, unlabeled_dataset]))
