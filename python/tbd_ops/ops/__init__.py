"""Python entry points of the operators: argument handling and fake kernels (autograd is in C++, csrc/<op>.cpp)."""
from .channel_max_spatial_softmax import channel_max_spatial_softmax
from .consistency_voting import consistency_voting
from .decode_max_iou import box_max_iou, decode_max_iou
from .harmony import harmony_distillation_loss, harmony_score
from .masked_reduce import masked_l1, masked_sq_dist
from .prediction_guided_assign import prediction_guided_assign
from .scale_consistency_loss import scale_consistency_loss
from .sigmoid_focal_loss import sigmoid_focal_loss

__all__ = [
    "channel_max_spatial_softmax",
    "decode_max_iou",
    "box_max_iou",
    "harmony_score",
    "harmony_distillation_loss",
    "masked_sq_dist",
    "masked_l1",
    "prediction_guided_assign",
    "consistency_voting",
    "scale_consistency_loss",
    "sigmoid_focal_loss",
]
