"""What a piece of code would ask of a GPU, observed on the `cuda_emu` device.

``observe()`` is a context manager; inside it every ``torch.ops.tbd_ops`` call
runs on the emulated CUDA build once (forward schedule; the three-schedule
comparison is the op suites' job) and the returned ``Observation`` records:

- ``calls``: per tbd_ops call (forward and backward ops) the device operations
  it issued, by name: kernel launches by kernel name, ``memset`` and
  ``sort_pairs`` (one device-wide radix sort: several kernels of CUB on a GPU);
- ``aten``: the other ATen operators on tensors, which on a GPU launch at least
  one kernel each; views, ``detach``, allocations (``empty*``) and host scalars
  are left out, so this is an estimate of PyTorch's own launches;
- ``syncs``: everything that on a GPU copies between host and device or makes
  the host wait for the device: a read of a device value on the host
  (``item()``, ``int()``, ``bool()``: ``aten::_local_scalar_dense``), ops whose
  output size depends on device values (``nonzero``, boolean-mask indexing,
  ``masked_select``, ``unique``, ``repeat_interleave`` without
  ``output_size``), a tensor made from host data (``torch.tensor``,
  ``as_tensor``: ``aten::lift_fresh``, a host-to-device copy), and the Python
  methods that do not reach the dispatcher on CPU tensors: ``tolist()``,
  ``cpu()``, ``numpy()``, ``pin_memory()``.

On ``cuda_emu`` every tensor is a CPU tensor standing for a device tensor, so
each of these is a copy or a synchronization that the same code would do on a
GPU; the glue's own host-side work inside a tbd_ops call is not visible (it
does not run on a GPU build either). One report is stricter than a GPU: an
indexed assignment of a Python number (``x[i] = 0.0``) makes a tensor from
host data on the CPU, while on a GPU it fills a device scalar; write
``x[i].fill_(0.0)``.
"""
import contextlib
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import dispatch as emu_dispatch

# ATen ops that synchronize with the host on a GPU, and why.
SYNC_OPS = {
    "aten::_local_scalar_dense": "a device value read on the host (item(), int(), float(), bool())",
    "aten::nonzero": "nonzero: the output size depends on device values",
    "aten::masked_select": "masked_select: the output size depends on device values",
    "aten::_unique2": "unique: the output size depends on device values",
    "aten::unique_dim": "unique: the output size depends on device values",
    "aten::unique_consecutive": "unique_consecutive: the output size depends on device values",
    "aten::equal": "torch.equal: a bool on the host",
    "aten::is_nonzero": "a device value read on the host",
    "aten::lift_fresh": "a tensor from host data (torch.tensor / as_tensor): a host-to-device copy",
    "aten::lift_fresh_copy": "a tensor from host data (torch.tensor / as_tensor): a host-to-device copy",
    "aten::_pin_memory": "pin_memory: pinned host memory and a host-to-device copy",
}
# Ops that launch no kernel on a GPU (besides views): allocations, aliases.
NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty",
             "aten::new_empty_strided", "aten::detach", "aten::alias", "aten::lift_fresh",
             "aten::lift_fresh_copy", "aten::scalar_tensor", "aten::_local_scalar_dense",
             "aten::is_pinned", "aten::set_", "aten::resize_"}
PY_METHODS = {"tolist": "tolist(): a device-to-host copy",
              "cpu": "cpu(): a device-to-host copy",
              "numpy": "numpy(): a device-to-host copy",
              "pin_memory": "pin_memory(): pinned host memory for a host-to-device copy"}


@dataclass
class Observation:
    calls: List[Tuple[str, Counter]] = field(default_factory=list)  # (tbd_ops op, device operations)
    aten: Counter = field(default_factory=Counter)
    syncs: List[Tuple[str, str]] = field(default_factory=list)      # (what, where in our code)

    def device_ops(self, op: str = None) -> int:
        """Device operations of the tbd_ops calls (of `op` only when given)."""
        return sum(sum(c.values()) for name, c in self.calls if op is None or name == op)

    def kernels(self) -> Counter:
        """Device operations by name over every tbd_ops call."""
        total = Counter()
        for _, c in self.calls:
            total.update(c)
        return total

    def op_calls(self) -> Counter:
        return Counter(name for name, _ in self.calls)

    def aten_ops(self) -> int:
        return sum(self.aten.values())

    def summary(self) -> str:
        lines = [f"tbd_ops calls: {dict(self.op_calls())}",
                 f"device operations of tbd_ops ({self.device_ops()}): {dict(self.kernels())}",
                 f"other ATen ops ({self.aten_ops()}): {dict(self.aten)}"]
        lines += [f"SYNC {what} at {where}" for what, where in self.syncs]
        return "\n".join(lines)


def _where() -> str:
    """The innermost frame of the library or of a test that led here."""
    frames = traceback.extract_stack()[:-2]
    for f in reversed(frames):
        path = f.filename.replace("\\", "/")
        if "/tbd_ops/" in path and "/tests/emu/" not in path:
            return f"{path.rsplit('/python/', 1)[-1]}:{f.lineno} ({f.name})"
    for f in reversed(frames):
        if "/tests/" in f.filename.replace("\\", "/") and "/tests/emu/" not in f.filename.replace("\\", "/"):
            return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name})"
    return "?"


def _is_sync(func, args, kwargs) -> str:
    name = func._schema.name
    if name in SYNC_OPS:
        return SYNC_OPS[name]
    if name == "aten::repeat_interleave" and func._overloadname.startswith("Tensor") \
            and kwargs.get("output_size") is None and (len(args) < 3 or args[-1] is None):
        return "repeat_interleave without output_size: the output size depends on device values"
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()):
            return f"{name[6:]} with a boolean mask: a nonzero on the device"
    return ""


class _Observer(TorchDispatchMode):
    def __init__(self, obs: Observation):
        super().__init__()
        self.obs = obs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracing = any(isinstance(t, torch.Tensor) and (is_fake(t) or t.device.type == "meta")
                      for t in tree_leaves((args, kwargs)))
        if func.namespace == "tbd_ops" and not tracing:
            name = func._schema.name.split("::", 1)[1]
            target = getattr(getattr(torch.ops.tbd_ops_emu, name), func._overloadname)
            emu = emu_dispatch.emu
            emu.set_schedule(0, 0)
            before = Counter(emu.op_counts())
            out = target(*args, **kwargs)
            after = Counter(emu.op_counts())
            after.subtract(before)
            self.obs.calls.append((name, Counter({k: v for k, v in after.items() if v})))
            return out
        if not tracing:
            why = _is_sync(func, args, kwargs)
            if why:
                self.obs.syncs.append((why, _where()))
            qualified = func._schema.name
            if not func.is_view and qualified not in NO_KERNEL:
                self.obs.aten[qualified[6:] if qualified.startswith("aten::") else qualified] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def observe():
    """Records what the block would ask of a GPU (see the module docstring)."""
    if emu_dispatch.emu is None:
        raise RuntimeError(emu_dispatch.UNAVAILABLE)
    obs = Observation()
    saved = {m: getattr(torch.Tensor, m) for m in PY_METHODS}

    def patched(method):
        original = saved[method]

        def call(self, *args, **kwargs):
            obs.syncs.append((PY_METHODS[method], _where()))
            return original(self, *args, **kwargs)
        return call

    try:
        for m in PY_METHODS:
            setattr(torch.Tensor, m, patched(m))
        with _Observer(obs):
            yield obs
    finally:
        for m, f in saved.items():
            setattr(torch.Tensor, m, f)
