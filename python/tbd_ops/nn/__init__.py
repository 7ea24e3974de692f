"""Loss modules built on the tbd_ops kernels."""
from .pseco import (ConsistencyVotingWeights, PseCoAssigner, ScaleConsistencyLoss, SigmoidFocalLoss,
                    downsample_view)
from .tbd import HarmonyDistillationLoss, TaskDecoupledFeatureLoss, TaskWeightGenerator, TBDLoss

__all__ = ["HarmonyDistillationLoss", "TaskWeightGenerator", "TaskDecoupledFeatureLoss", "TBDLoss",
           "PseCoAssigner", "ConsistencyVotingWeights", "SigmoidFocalLoss", "ScaleConsistencyLoss",
           "downsample_view"]
