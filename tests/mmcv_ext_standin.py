"""A stand-in for ``mmcv._ext`` so that mmdet imports with mmcv-lite.

mmcv-lite ships mmcv's Python code without its compiled ops; ``mmcv.ops``
asserts at import time that ``mmcv._ext`` has every function it binds. The CPU
training path of the one-stage detectors under test (RetinaNet, FCOS, ATSS)
calls none of them; any call raises, so a test that reaches one fails loudly.
"""
import importlib.util
import sys
import types


class CompiledOpCalled(RuntimeError):
    pass


def _missing(name):
    def fn(*args, **kwargs):
        raise CompiledOpCalled(f"mmcv._ext.{name} was called, but mmcv-lite has no compiled ops")

    fn.__name__ = name
    return fn


def install() -> None:
    """Registers the stand-in unless a real ``mmcv._ext`` is importable."""
    if "mmcv._ext" in sys.modules:
        return
    try:
        if importlib.util.find_spec("mmcv._ext") is not None:
            return
    except ImportError:
        pass
    module = types.ModuleType("mmcv._ext")

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _missing(name)

    module.__getattr__ = __getattr__
    module.__doc__ = __doc__
    sys.modules["mmcv._ext"] = module
