"""Run MMDetection on ``mmcv-lite`` (mmcv's Python code without its compiled ops), e.g. on CPU.

``mmcv.ops`` asserts at import time that the compiled module ``mmcv._ext`` binds
every function it uses, so with mmcv-lite mmdet cannot even be imported.
``install()`` registers a stand-in ``mmcv._ext`` (a real module with a module
spec, so that importlib and mmengine treat it as installed) in which:

* ``nms`` is ``torchvision.ops.nms`` (mmcv's ``offset`` honoured), which is all
  that the RPN and the box post-processing of mmdet's detectors call;
* every other compiled op raises ``CompiledOpCalled`` naming it, so nothing
  silently computes a wrong result.

RoI heads need ``roi_layer=dict(type="RoIAlign", ..., use_torchvision=True)``
(an mmcv option) to run without compiled ops. ``install()`` does nothing when a
real ``mmcv._ext`` is importable. Needs ``torchvision`` for ``nms``.
"""
import importlib.machinery
import importlib.util
import sys
import types

__all__ = ["install", "CompiledOpCalled"]

_NAME = "mmcv._ext"


class CompiledOpCalled(RuntimeError):
    """A compiled mmcv op that mmcv-lite does not have was called."""


# What to change in a config instead, for the compiled ops that have a pure-PyTorch option.
_HINTS = {
    "roi_align": "or give the RoI extractor roi_layer=dict(type=\"RoIAlign\", ..., use_torchvision=True), e.g. "
                 "--cfg-options model.roi_head.bbox_roi_extractor.roi_layer.use_torchvision=True "
                 "(model.detector.roi_head... for PseCo; a two-stage TBD teacher needs it in its own config too)",
}


def _missing(name: str):
    hint = next((h for prefix, h in _HINTS.items() if name.startswith(prefix + "_")), None)

    def fn(*args, **kwargs):
        raise CompiledOpCalled(f"mmcv._ext.{name} was called, but mmcv-lite has no compiled ops "
                               f"(install the full mmcv for it{', ' + hint if hint else ''})")

    fn.__name__ = name
    return fn


def nms(bboxes, scores, iou_threshold: float, offset: int = 0):
    """mmcv's ``ext_module.nms``: indices of the kept boxes, highest score first."""
    import torchvision

    if offset:
        # mmcv's legacy "+1" convention: a box spans x1..x2 inclusive.
        bboxes = bboxes.clone()
        bboxes[:, 2:] += offset
    return torchvision.ops.nms(bboxes, scores, float(iou_threshold))


def _has_real_ext() -> bool:
    if _NAME in sys.modules:
        return True
    try:
        return importlib.util.find_spec(_NAME) is not None
    except (ImportError, ValueError):
        return False


def install() -> None:
    """Registers the stand-in ``mmcv._ext`` unless a real one is importable."""
    if _has_real_ext():
        return
    module = types.ModuleType(_NAME, __doc__)
    module.__spec__ = importlib.machinery.ModuleSpec(_NAME, loader=None, origin="tbd_ops.mmcv_lite")
    module.nms = nms
    module.CompiledOpCalled = CompiledOpCalled

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(name)

    module.__getattr__ = __getattr__
    sys.modules[_NAME] = module
