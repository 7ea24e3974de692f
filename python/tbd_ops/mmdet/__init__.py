"""MMDetection integration (mmdet 3.x, mmengine).

Importing ``tbd_ops.mmdet`` registers, in MMDetection's ``MODELS`` registry:

* the loss modules ``TBDLoss``, ``HarmonyDistillationLoss``,
  ``TaskDecoupledFeatureLoss`` and ``TaskWeightGenerator``;
* ``TBDSingleStageDetector`` and ``TBDTwoStageDetector``: one-stage and
  two-stage (RPN) students trained with Task-Balanced Distillation from a
  frozen teacher built from its config and checkpoint;
* PseCo: ``PredictionGuidedAssigner`` in ``TASK_UTILS``, ``FusedFocalLoss``
  (the fused sigmoid focal loss, mmdet's loss interface), ``ScaleConsistencyLoss``
  and ``ConsistencyVotingWeights`` in ``MODELS``;
* ``PseCoDetector``, PseCo semi-supervised Faster R-CNN (a ``SemiBaseDetector``:
  student and EMA teacher, trained with ``MeanTeacherHook`` and mmdet's
  semi-supervised data layout), and ``RoIFocalLoss``, the sigmoid focal loss
  for its RoI head (C class channels, sigmoid scores).

Use it from a config with ``custom_imports = dict(imports=["tbd_ops.mmdet"])``.
When mmdet or mmengine is not installed this module still imports; ``AVAILABLE``
is then False and ``IMPORT_ERROR`` says why.
"""
try:
    import mmdet  # noqa: F401
    import mmengine  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    AVAILABLE = False
    IMPORT_ERROR = e
    __all__ = ["AVAILABLE", "IMPORT_ERROR"]
else:
    AVAILABLE = True
    IMPORT_ERROR = None
    from .checkpoint import allow_mmengine_checkpoints

    # Runner resume and teacher checkpoints under torch >= 2.6 (weights_only=True); see checkpoint.py.
    allow_mmengine_checkpoints()
    import os as _os

    if _os.environ.get("TBD_OPS_MMCV_LITE", "0") == "1":
        # mmcv-lite (no compiled ops), e.g. CPU runs of python -m tbd_ops.mmdet.train: tbd_ops.mmcv_lite.
        from ..mmcv_lite import install as _install_mmcv_lite

        _install_mmcv_lite()
    try:
        import mmdet.models  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "mmcv._ext":
            raise
        raise ImportError("tbd_ops.mmdet: mmdet cannot import mmcv's compiled ops (mmcv._ext): install the full "
                          "mmcv, or with mmcv-lite (no compiled ops, e.g. for CPU runs) set TBD_OPS_MMCV_LITE=1 or "
                          "call tbd_ops.mmcv_lite.install() before importing mmdet") from e
    from .detector import TBDSingleStageDetector, TBDTwoStageDetector, coder_from_head  # noqa: F401  (registers)
    from .pseco import PredictionGuidedAssigner  # noqa: F401
    from .pseco_detector import PseCoDetector, RoIFocalLoss  # noqa: F401

    __all__ = ["AVAILABLE", "IMPORT_ERROR", "TBDSingleStageDetector", "TBDTwoStageDetector", "coder_from_head",
               "PredictionGuidedAssigner", "PseCoDetector", "RoIFocalLoss"]
