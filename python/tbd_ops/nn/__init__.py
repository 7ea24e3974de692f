"""Loss modules built on the tbd_ops kernels."""
from .tbd import HarmonyDistillationLoss, TaskDecoupledFeatureLoss, TaskWeightGenerator, TBDLoss

__all__ = ["HarmonyDistillationLoss", "TaskWeightGenerator", "TaskDecoupledFeatureLoss", "TBDLoss"]
