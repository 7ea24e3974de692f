"""Python entry points of the operators: argument handling, fake kernels and autograd."""
from .channel_max_spatial_softmax import channel_max_spatial_softmax
from .decode_max_iou import box_max_iou, decode_max_iou
from .masked_reduce import masked_l1, masked_sq_dist

__all__ = ["channel_max_spatial_softmax", "decode_max_iou", "box_max_iou"]
__all__ += ["masked_sq_dist", "masked_l1"]
from .scale_consistency_loss import scale_consistency_loss

__all__ += ["scale_consistency_loss"]
