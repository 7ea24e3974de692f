"""The `cuda_emu` test device: CPU tensors whose tbd_ops calls run the CUDA path
(registration glue, launchers, kernels) on the SIMT emulator.

`EmulatedCuda` is a TorchDispatchMode: below autograd, every
``torch.ops.tbd_ops.<op>`` call (forward and backward ops) is sent to the
emulated build ``torch.ops.tbd_ops_emu.<op>``, which runs it once per thread
schedule (forward, reverse, seeded shuffle) and requires bitwise-identical
outputs: our reductions are deterministic, so any difference is a race (a
missing ``__syncthreads``, a read of shared memory before it is written).
"""
import glob
import importlib.util
import os
import random

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import emu_sources

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEDULES = ((0, "forward"), (1, "reverse"), (2, "shuffle"))


def _load():
    """(module, None), (None, why it is missing) or (None, why it is stale)."""
    paths = sorted(glob.glob(os.path.join(HERE, "tbd_ops_emu*.so")))
    if not paths:
        return None, "the emulated CUDA build is missing: run `make build-emu` (or `make test`)", False
    spec = importlib.util.spec_from_file_location("tbd_ops_emu", paths[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.sources_digest() if hasattr(module, "sources_digest") else None
    if built != emu_sources.digest():
        return None, (f"the emulated CUDA build {os.path.basename(paths[0])} was built from other sources than "
                      "those of csrc/ and cuda/ now (it would test old code): run `make build-emu`"), True
    return module, None, False


# emu: the module, or None with UNAVAILABLE saying why; STALE: it exists but is
# out of date (the tests that need it fail instead of being skipped).
emu, UNAVAILABLE, STALE = _load()
stats = {"calls": 0}


def _bits(t):
    """The bytes of a tensor (NaN payloads included), for bitwise comparison."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _same(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride(), (
            f"{where}: shape/dtype/strides differ between schedules: "
            f"{tuple(a.shape)}/{a.dtype}/{a.stride()} vs {tuple(b.shape)}/{b.dtype}/{b.stride()}")
        if not torch.equal(_bits(a), _bits(b)):
            n = int((_bits(a) != _bits(b)).sum())
            raise AssertionError(f"{where}: {n} bytes differ between thread schedules (a race in a kernel)")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


class EmulatedCuda(TorchDispatchMode):
    """schedules=False: run each call once, under the schedule in force (set by
    the caller, e.g. op_testing.all_schedules around a whole forward and backward)."""

    def __init__(self, schedules: bool = True):
        super().__init__()
        self.schedules = schedules

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "tbd_ops" or any(
                isinstance(t, torch.Tensor) and (is_fake(t) or t.device.type == "meta")
                for t in tree_leaves((args, kwargs))):
            return func(*args, **kwargs)  # not ours, or tracing (fake kernels)
        name = func._schema.name.split("::", 1)[1]
        target = getattr(getattr(torch.ops.tbd_ops_emu, name), func._overloadname)
        if not self.schedules:
            stats["calls"] += 1
            return target(*args, **kwargs)
        seed = random.getrandbits(63)
        results = []
        for sched, label in SCHEDULES:
            emu.set_schedule(sched, seed)
            results.append((label, target(*args, **kwargs)))
        emu.set_schedule(0, 0)
        first_label, first = results[0]
        for label, other in results[1:]:
            _same(first, other, f"{name} ({first_label} vs {label} schedule, shuffle seed {seed})")
        stats["calls"] += 1
        return first
