"""Python entry points of the operators: argument handling, fake kernels and autograd."""
from .channel_max_spatial_softmax import channel_max_spatial_softmax
from .decode_max_iou import box_max_iou, decode_max_iou
from .prediction_guided_assign import prediction_guided_assign

__all__ = ["channel_max_spatial_softmax", "decode_max_iou", "box_max_iou", "prediction_guided_assign"]
