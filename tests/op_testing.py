"""What every op test suite shares: devices, dtypes, tolerances, random boxes,
the emulator's thread schedules, torch.compile against eager, and the test
contract of an op.

An op's test file states what is particular to the op (its sample inputs, its
reference, its tolerances) in a subclass of :class:`OpContract`; the contract
runs the same checks for every op on ``cpu``, ``cuda_emu`` and ``cuda``:

- values and gradients against the reference (float64 reference on the same
  values) for every sample: the dtypes and layouts each op lists, strided
  inputs that cross its chunk and tile sizes included;
- ``torch.autograd.gradcheck`` on the float64 samples marked for it;
- ``torch.library.opcheck`` of every operator the samples call, forward and
  backward (recorded while they run), with the inputs they were called with;
- ``torch.compile(fullgraph=True)`` against eager, values and gradients;
- the emulated CUDA build against the CPU kernels under the three thread
  schedules: per-element outputs bit for bit, reductions to rounding.
"""
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

import tbd_ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "emu"))
import dispatch as emu_dispatch  # noqa: E402

F64 = torch.float64

# ---- devices ---------------------------------------------------------------------------------------
HAS_CUDA = torch.cuda.is_available() and tbd_ops.cuda_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of tbd_ops")
# Skipped when the emulated build is missing, failed (with the message saying
# `make build-emu`) when it is older than its sources: see conftest.py.
requires_emu = pytest.mark.requires_emu

# Devices of the op suites:
#   cpu       the CPU kernels;
#   cuda_emu  CPU tensors, but every tbd_ops op runs the CUDA path (glue, launchers,
#             kernels) on the SIMT emulator, under three thread schedules that must
#             agree bit for bit (tests/emu/dispatch.py); the test sees device "cpu";
#   cuda      a real GPU.
CUDA_EMU = pytest.param("cpu", id="cuda_emu", marks=[requires_emu, pytest.mark.cuda_emu])
DEVICES = ["cpu", CUDA_EMU, pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]

# ---- dtypes and tolerances -------------------------------------------------------------------------
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
REDUCED = [torch.float32, torch.float16, torch.bfloat16]

# Tolerances of the kernels against the float64 reference, per input dtype
# (outputs are rounded to the input dtype; math runs in float32 inside).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-4),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3),
}
# Gradients carry one more cancellation (e.g. g - sum(p * g)): looser in float32.
GRAD_TOL = dict(TOL)
GRAD_TOL[torch.float32] = dict(rtol=1e-4, atol=1e-5)
# The emulated CUDA build against the CPU kernels where a sum runs in another order.
RED_TOL = {
    torch.float64: dict(rtol=1e-12, atol=1e-14),
    torch.float32: dict(rtol=1e-5, atol=1e-7),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return tbd_ops.ops._utils.acc_dtype(dtype)


# ---- random inputs ---------------------------------------------------------------------------------
def rand(shape, device="cpu", dtype=F64, lo=0.0, hi=1.0):
    """Uniform in [lo, hi), drawn in float64 and rounded to dtype."""
    return (torch.rand(shape, device=device, dtype=F64) * (hi - lo) + lo).to(dtype)


def randn(shape, device="cpu", dtype=F64, scale=1.0):
    return (torch.randn(shape, device=device, dtype=F64) * scale).to(dtype)


def rand_boxes(n, device="cpu", dtype=F64, extent=60.0, min_wh=1.0, max_wh=30.0):
    """n boxes (x1, y1, x2, y2): corners uniform in [0, extent), sizes in [min_wh, max_wh)."""
    xy = torch.rand(n, 2, device=device, dtype=F64) * extent
    wh = torch.rand(n, 2, device=device, dtype=F64) * (max_wh - min_wh) + min_wh
    return torch.cat([xy, xy + wh], 1).to(dtype)


def anchors(h, w, stride, a, dtype=F64, device="cpu"):
    """A anchors per location of an h x w level, in the (h, w, a) order of the kernels: [h * w * a, 4]."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64), indexing="ij")
    cx, cy = (xs.reshape(-1, 1) + 0.5) * stride, (ys.reshape(-1, 1) + 0.5) * stride
    sizes = stride * torch.tensor([2.0 ** (i / max(a, 1)) for i in range(a)], dtype=F64) * 4
    half = sizes.view(1, a) / 2
    out = torch.stack([cx - half, cy - half, cx + half, cy + half], -1).reshape(-1, 4)
    return out.to(device=device, dtype=dtype)


def points(h, w, stride, dtype=F64, device="cpu"):
    """Location centres of an h x w level: [h * w, 2] (x, y)."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).add(0.5).mul(stride).to(device=device, dtype=dtype)


def strided(t: torch.Tensor, kind: str = "padded") -> torch.Tensor:
    """The values of t in a non-contiguous layout: "padded" (the last dimension
    padded by 3: no contiguous plane), "transposed" (the last two dimensions
    stored transposed), "channels_last" (4-D)."""
    if kind == "padded":
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
        wide[..., 1:t.shape[-1] + 1] = t
        return wide[..., 1:t.shape[-1] + 1]
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    raise ValueError(kind)


# ---- comparisons -----------------------------------------------------------------------------------
def bitwise_equal(a: torch.Tensor, b: torch.Tensor, strides: bool = False) -> bool:
    """Same shape, dtype (and strides if asked) and the same bytes (NaN payloads included)."""
    if a.shape != b.shape or a.dtype != b.dtype or (strides and a.stride() != b.stride()):
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_bitwise(a, b, what=""):
    assert bitwise_equal(a, b), f"{what}: {int((a != b).sum())} of {a.numel()} elements differ"


def all_schedules(fn, seed: int = 1234):
    """fn() under the emulator's three thread schedules (forward, reverse, seeded
    shuffle); the results must agree bit for bit. Returns the first."""
    results = []
    try:
        for sched, _ in emu_dispatch.SCHEDULES:
            emu_dispatch.emu.set_schedule(sched, seed)
            results.append(fn())
    finally:
        emu_dispatch.emu.set_schedule(0, 0)
    first = tree_leaves(results[0])
    for other in results[1:]:
        for x, y in zip(first, tree_leaves(other)):
            if isinstance(x, torch.Tensor):
                assert bitwise_equal(x, y), "thread schedules disagree"
    return results[0]


def assert_compiles_like_eager(fn, *args, **kwargs):
    """torch.compile(fn, fullgraph=True) gives eager's values, and the same
    gradients with respect to every input that requires grad."""
    inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.requires_grad]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, want = compiled(*args, **kwargs), fn(*args, **kwargs)
    got_leaves, want_leaves = tree_leaves(got), tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for x, y in zip(got_leaves, want_leaves):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(x, y, equal_nan=True)
            # A compiled output that lost (or gained) its graph would skip the gradient check below.
            assert x.requires_grad == y.requires_grad, "compiled and eager outputs differ in requires_grad"
    diff = [(x, y) for x, y in zip(got_leaves, want_leaves) if isinstance(x, torch.Tensor) and x.requires_grad]
    if inputs and diff:
        outs = [x for x, _ in diff]
        g = [torch.randn_like(x) for x in outs]
        grads = torch.autograd.grad(outs, inputs, g, allow_unused=True)
        grads_eager = torch.autograd.grad([y for _, y in diff], inputs, g, allow_unused=True)
        for a, b in zip(grads, grads_eager):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, equal_nan=True)


def run_single_threaded(fn):
    """fn() with one intra-op thread (to compare against the multi-threaded result)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return fn()
    finally:
        torch.set_num_threads(threads)


def run_without_host_sync(fn):
    """fn() with every host synchronization of CUDA made an error (torch.cuda.set_sync_debug_mode)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---- the test contract of an op --------------------------------------------------------------------
@dataclass
class Sample:
    """Arguments of one call of the op's public function. Tensors that require
    grad are the differentiable inputs; ``gradcheck`` marks a small float64
    sample for torch.autograd.gradcheck, ``opcheck=False`` leaves a large one
    out of torch.library.opcheck."""
    args: tuple
    kwargs: Dict[str, Any] = field(default_factory=dict)
    name: str = ""
    gradcheck: bool = False
    opcheck: bool = True

    def dtype(self) -> torch.dtype:
        floats = [t for t in tree_leaves((self.args, self.kwargs))
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
        return floats[0].dtype if floats else torch.float32


def _leaf_copy(t, dtype=None):
    """A new leaf with t's values and strides (a view of t), or converted to dtype."""
    if not isinstance(t, torch.Tensor):
        return t
    out = t.detach() if dtype is None or not t.is_floating_point() else t.detach().to(dtype)
    return out.requires_grad_(t.requires_grad and out.is_floating_point())


def _differentiable(args) -> List[torch.Tensor]:
    return [t for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.requires_grad]


def call_with_grads(fn, args, kwargs, grad_outputs=None, dtype=None):
    """fn(*args, **kwargs) on fresh leaves (converted to dtype if given) and the
    gradients of its differentiable outputs (weighted by grad_outputs, or ones;
    none when grad_outputs is empty) with respect to the inputs that require
    grad (zeros where unused)."""
    a, kw = tree_map(lambda t: _leaf_copy(t, dtype), (args, kwargs))
    out = fn(*a, **kw)
    inputs = _differentiable((a, kw))
    outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = []
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(t) for t in outs]
    if inputs and outs and grad_outputs:
        go = [g.to(t.dtype) for g, t in zip(grad_outputs, outs)]
        grads = torch.autograd.grad(outs, inputs, go, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]
    return out, list(grads), inputs


class _Recorder(TorchDispatchMode):
    """Records the tbd_ops operator calls below autograd: those of the forward
    with their arguments as given, those of the backward detached (the backward
    ops are not differentiable)."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "tbd_ops":
            if self.backward:
                detach = lambda t: t.detach() if isinstance(t, torch.Tensor) else t  # noqa: E731
                self.calls.append((func, tree_map(detach, args), tree_map(detach, kwargs)))
            else:
                self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


class OpContract:
    """The shared tests of an op. A subclass (``class TestContract(OpContract)``
    in the op's test file) sets ``op`` and ``reference`` (staticmethod) and
    implements ``samples(device)``; it may override the tolerances, the
    comparison of outputs, and which outputs of the emulated build must equal
    the CPU kernels bit for bit."""

    op: Callable = None
    reference: Callable = None
    # False for ops whose outputs are constants (no gradcheck).
    differentiable = True
    # Outputs that are reductions in another order on each side are compared
    # to RED_TOL between the emulated build and the CPU kernels; every other
    # output must be bitwise equal. Leaves of the flattened outputs, by index,
    # or "all"; None: every output is per-element.
    reduction_outputs: Optional[Sequence[int]] = None
    # Arguments (positional index or keyword) whose gradients are sums in
    # another order on each side, or "all"; None: every gradient is per-element.
    reduction_grads: Optional[Sequence] = None
    # False: the reference runs on the inputs in their own dtype instead of converted to float64
    # (for ops whose outputs are decisions made in the accumulation dtype, which float64 can flip).
    reference_in_float64 = True
    # True for ops whose every kernel call takes a single tensor (p_c: one map per level).
    one_tensor_per_call = False

    def samples(self, device) -> List[Sample]:
        raise NotImplementedError

    def value_tol(self, sample: Sample) -> dict:
        return TOL[sample.dtype()]

    def grad_tol(self, sample: Sample) -> dict:
        return GRAD_TOL[sample.dtype()]

    def emulated_tol(self, want: torch.Tensor, sample=None, grad_outputs=None) -> dict:
        """Tolerance of a reduction of the emulated build against the CPU kernels (for a gradient,
        ``sample`` and the incoming ``grad_outputs`` are given too)."""
        return RED_TOL[want.dtype]

    def compare(self, got, want, tol, what):
        """got (the op) against want (the reference in float64)."""
        gl, wl = tree_leaves(got), tree_leaves(want)
        assert len(gl) == len(wl), f"{what}: {len(gl)} outputs, the reference gives {len(wl)}"
        for i, (x, y) in enumerate(zip(gl, wl)):
            if not isinstance(x, torch.Tensor):
                assert x == y, f"{what}[{i}]"
                continue
            assert x.shape == y.shape, f"{what}[{i}]: shape {tuple(x.shape)} vs {tuple(y.shape)}"
            if x.is_floating_point():
                torch.testing.assert_close(x.double(), y.double(), equal_nan=True, **tol, msg=lambda m: f"{what}[{i}]: {m}")
            else:
                assert torch.equal(x.cpu(), y.to(x.dtype).cpu()), f"{what}[{i}]: integer outputs differ"

    def _grad_outputs(self, out):
        """Random incoming gradients, rounded to the dtype of each output (the reference gets
        the same values in float64)."""
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        return [torch.randn(t.shape, dtype=F64, device=t.device).to(t.dtype) for t in outs]

    # -- the shared tests ----------------------------------------------------------------------------
    @pytest.mark.parametrize("device", DEVICES)
    def test_values_and_gradients(self, device):
        """Every sample against the float64 reference on the same values."""
        for s in self.samples(device):
            out, _, _ = call_with_grads(type(self).op, s.args, s.kwargs)
            go = self._grad_outputs(out)
            out, grads, inputs = call_with_grads(type(self).op, s.args, s.kwargs, go)
            ref_dtype = F64 if self.reference_in_float64 else None
            ref_out, ref_grads, _ = call_with_grads(type(self).reference, s.args, s.kwargs, go, dtype=ref_dtype)
            self.compare(out, ref_out, self.value_tol(s), f"{s.name}: values")
            for g, x in zip(grads, inputs):
                assert g.dtype == x.dtype and g.shape == x.shape, f"{s.name}: gradient dtype/shape"
            OpContract.compare(self, grads, ref_grads, self.grad_tol(s), f"{s.name}: gradients")

    @pytest.mark.parametrize("device", DEVICES)
    def test_each_input_alone_gets_its_gradient(self, device):
        """The backward computes only the gradients asked for: with one differentiable input
        requiring grad at a time, that input gets exactly the gradient it gets when every input
        requires one (bit for bit: the same kernels), and the others get none. Catches a gradient
        returned at the wrong position among the tensors (a Tensor[] argument counts one per
        tensor, an absent Tensor? none)."""
        if not self.differentiable:
            pytest.skip("the op's outputs are constants")
        checked = 0
        for s in self.samples(device):
            flat, spec = tree_flatten((s.args, s.kwargs))
            pos = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]
            if len(pos) < 2:
                continue

            def run(wanted, go=None, flat=flat, spec=spec):
                leaves = [t.detach().requires_grad_(i in wanted) if i in pos else t for i, t in enumerate(flat)]
                args, kwargs = tree_unflatten(leaves, spec)
                out = type(self).op(*args, **kwargs)
                floats = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
                if go is None:
                    go = [torch.randn(t.shape, dtype=F64, device=t.device).to(t.dtype) for t in floats]
                outs = [(t, g) for t, g in zip(floats, go) if t.requires_grad]
                inputs = [leaves[i] for i in wanted]
                grads = [None] * len(inputs)
                if outs:
                    grads = torch.autograd.grad([t for t, _ in outs], inputs, [g for _, g in outs], allow_unused=True)
                return go, {i: g for i, g in zip(wanted, grads)}

            go, full = run(set(pos))
            for i in pos:
                _, alone = run({i}, go)
                want, got = full[i], alone[i]
                if want is None or got is None:
                    assert got is None or not got.any(), f"{s.name}: input {i} alone got a gradient, none with all"
                    assert want is None or not want.any(), f"{s.name}: input {i} alone got no gradient"
                    continue
                assert bitwise_equal(got, want), (
                    f"{s.name}: the gradient of input {i} alone differs from the one with every input requiring grad")
            checked += 1
        if not checked:
            pytest.skip("no sample has two differentiable inputs")

    @pytest.mark.parametrize("device", DEVICES)
    def test_double_backward_raises(self, device):
        """The gradients are not differentiable: under create_graph=True differentiating them
        again raises instead of treating them as constants (a wrong second derivative)."""
        if not self.differentiable:
            pytest.skip("the op's outputs are constants")
        s = next(s for s in self.samples(device) if s.gradcheck)
        a, kw = tree_map(_leaf_copy, (s.args, s.kwargs))
        out = type(self).op(*a, **kw)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        inputs = _differentiable((a, kw))
        grads = torch.autograd.grad(outs, inputs, [torch.ones_like(t) for t in outs], create_graph=True,
                                    allow_unused=True)
        grads = [g for g in grads if g is not None]
        assert grads and all(g.requires_grad for g in grads), s.name
        with pytest.raises(RuntimeError, match="not differentiable"):
            torch.autograd.grad(sum(g.sum() for g in grads), inputs, allow_unused=True)
        # The same with respect to the incoming gradients, on which the gradients depend linearly.
        out = type(self).op(*a, **kw)
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        v = [torch.ones_like(t).requires_grad_() for t in outs]
        grads = torch.autograd.grad(outs, inputs, v, create_graph=True, allow_unused=True)
        with pytest.raises(RuntimeError, match="not differentiable"):
            torch.autograd.grad(sum(g.sum() for g in grads if g is not None), v, allow_unused=True)

    @pytest.mark.parametrize("device", DEVICES)
    def test_compiled_autograd_matches_eager(self, device):
        """The backward traced by compiled autograd (torch._dynamo.compiled_autograd; here with an
        eager compiler of the traced graph) gives the eager gradients."""
        if not self.differentiable:
            pytest.skip("the op's outputs are constants")
        from torch._dynamo import compiled_autograd
        samples = [s for s in self.samples(device) if s.gradcheck][:2]
        assert samples, "no sample is marked for gradcheck"
        for s in samples:
            _, want, _ = call_with_grads(type(self).op, s.args, s.kwargs)
            a, kw = tree_map(_leaf_copy, (s.args, s.kwargs))
            out = type(self).op(*a, **kw)
            total = sum(t.sum() for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad)
            with compiled_autograd._enable(lambda gm: gm):
                total.backward()
            got = [x.grad if x.grad is not None else torch.zeros_like(x) for x in _differentiable((a, kw))]
            assert len(got) == len(want), s.name
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda m: f"{s.name}: {m}")

    def test_a_meta_input_among_cpu_inputs_raises(self):
        """Each tensor of a sample in turn on the meta device, the others on the CPU: an error
        that names the device, never a result. (The Meta key outranks CPU: such a call reaches
        the fake kernel, which returned uninitialized tensors before it checked devices.)"""
        if self.one_tensor_per_call:
            pytest.skip("each call of the op takes one tensor (levels on several devices run one by one)")

        def tensors(s):
            return [i for i, t in enumerate(tree_leaves((s.args, s.kwargs))) if isinstance(t, torch.Tensor)]

        s = next(s for s in self.samples("cpu") if len(tensors(s)) > 1)  # e.g. a list of levels
        flat, spec = tree_flatten((s.args, s.kwargs))
        pos = tensors(s)
        for i in pos:
            leaves = [t.detach() if isinstance(t, torch.Tensor) else t for t in flat]
            leaves[i] = torch.empty_strided(flat[i].shape, flat[i].stride(), dtype=flat[i].dtype, device="meta")
            args, kwargs = tree_unflatten(leaves, spec)
            with pytest.raises((ValueError, RuntimeError, NotImplementedError)) as err:
                type(self).op(*args, **kwargs)
            assert "meta" in str(err.value), f"{s.name}, tensor {i}: {err.value}"

    @pytest.mark.parametrize("device", DEVICES)
    def test_gradcheck(self, device):
        if not self.differentiable:
            pytest.skip("the op's outputs are constants")
        checked = 0
        for s in self.samples(device):
            if not s.gradcheck:
                continue
            flat, spec = tree_flatten((s.args, s.kwargs))
            pos = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.requires_grad]

            def fn(*xs, flat=flat, spec=spec, pos=pos):
                leaves = list(flat)
                for i, x in zip(pos, xs):
                    leaves[i] = x
                args, kwargs = tree_unflatten(leaves, spec)
                out = type(self).op(*args, **kwargs)
                return tuple(t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())

            xs = tuple(flat[i].detach().requires_grad_() for i in pos)
            assert torch.autograd.gradcheck(fn, xs), s.name
            checked += 1
        assert checked, "no sample is marked for gradcheck"

    @pytest.mark.parametrize("device", DEVICES)
    def test_opcheck(self, device):
        """opcheck of every operator call the samples make (forward and backward)."""
        seen = set()
        for s in self.samples(device):
            if not s.opcheck:
                continue
            rec = _Recorder()
            a, kw = tree_map(_leaf_copy, (s.args, s.kwargs))
            with rec:
                out = type(self).op(*a, **kw)
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            inputs = _differentiable((a, kw))
            if outs and inputs:
                rec.backward = True
                with rec:
                    torch.autograd.grad(outs, inputs, [torch.ones_like(t) for t in outs], allow_unused=True)
            for func, args, kwargs in rec.calls:
                opcheck(func, args, kwargs)
                seen.add(func)
        assert seen

    @pytest.mark.parametrize("device", DEVICES)
    def test_compile_fullgraph_matches_eager(self, device):
        s = self.samples(device)[0]
        args, kwargs = tree_map(_leaf_copy, (s.args, s.kwargs))
        assert_compiles_like_eager(type(self).op, *args, **kwargs)

    @requires_emu
    @pytest.mark.emulated
    def test_emulated_matches_cpu(self):
        """The emulated CUDA build against the CPU kernels on the same inputs:
        per-element results bit for bit, reductions to rounding, under the
        three thread schedules."""
        for s in self.samples("cpu"):
            out_c, grads_c, _ = call_with_grads(type(self).op, s.args, s.kwargs)
            go = self._grad_outputs(out_c)
            out_c, grads_c, _ = call_with_grads(type(self).op, s.args, s.kwargs, go)

            def emulated(s=s, go=go):
                with emu_dispatch.EmulatedCuda(schedules=False):
                    out, grads, _ = call_with_grads(type(self).op, s.args, s.kwargs, go)
                return out, grads

            out_e, grads_e = all_schedules(emulated, seed=99)
            self._compare_emulated(out_e, out_c, self.reduction_outputs, f"{s.name}: values", s)
            # The argument each gradient belongs to (in the order of call_with_grads' inputs).
            owners = [key for key, v in [*enumerate(s.args), *s.kwargs.items()]
                      for t in tree_leaves(v) if isinstance(t, torch.Tensor) and t.requires_grad]
            red = self.reduction_grads
            if red not in (None, "all"):
                red = [i for i, key in enumerate(owners) if key in red]
            self._compare_emulated(grads_e, grads_c, red, f"{s.name}: gradients", s, go)

    def _compare_emulated(self, got, want, reductions, what, sample=None, grad_outputs=None):
        gl, wl = tree_leaves(got), tree_leaves(want)
        assert len(gl) == len(wl)
        for i, (x, y) in enumerate(zip(gl, wl)):
            if not isinstance(x, torch.Tensor):
                continue
            if x.is_floating_point() and (reductions == "all" or (reductions is not None and i in reductions)):
                torch.testing.assert_close(x, y, equal_nan=True, **self.emulated_tol(y, sample, grad_outputs))
            else:
                assert_bitwise(x, y, f"{what}[{i}]")


class ImageListBadInput:
    """The argument checks of an op on per-image lists (``class TestBadInput(ImageListBadInput)`` in the
    op's test file): ``args()`` gives two valid images of 6 and 4 rows with 2 and 1 pseudo boxes; the
    subclass names the op and its list arguments, and the cases:

    - ``op``, ``flat_op`` (staticmethods): the Python function and the flat operator, which takes the
      first ``flat_inputs`` arguments concatenated, then the rows and the pseudo boxes per image
      (``count_names``);
    - ``names``: the list arguments in order; ``float_names``: those whose ``shape_cases`` values are
      taken in float64;
    - ``shape_cases``: ``(name, value, match)``, a ValueError; ``dtype_cases``: ``(name, method)``, the
      argument converted by the tensor method (``"int"``, ...), a TypeError naming it;
    - ``device_name``: the argument moved to CUDA, a ValueError naming it.
    """
    op: Callable = None
    flat_op: Callable = None
    flat_inputs: int = 0
    count_names: Tuple[str, str] = ()
    names: Tuple[str, ...] = ()
    float_names: Tuple[str, ...] = ()
    shape_cases: List[tuple] = []
    dtype_cases: List[Tuple[str, str]] = []
    device_name: str = None

    def pytest_generate_tests(self, metafunc):
        cases = {"list_name": (self.names[1:], None),
                 "shape_case": (self.shape_cases, [f"{c[0]}-{i}" for i, c in enumerate(self.shape_cases)]),
                 "dtype_case": (self.dtype_cases, [f"{name}-{method}" for name, method in self.dtype_cases])}
        for arg, (values, ids) in cases.items():
            if arg in metafunc.fixturenames:
                metafunc.parametrize(arg, values, ids=ids)

    def args(self):
        raise NotImplementedError

    def kwargs(self) -> Dict[str, List[torch.Tensor]]:
        return dict(zip(self.names, self.args()))

    def call(self, **change):
        kw = self.kwargs()
        kw.update(change)
        return type(self).op(**kw)

    def test_list_length(self, list_name):
        with pytest.raises(ValueError, match=list_name):
            self.call(**{list_name: self.kwargs()[list_name][:1]})

    def test_not_a_list(self):
        first, second = self.names[:2]
        with pytest.raises(TypeError, match=first):
            self.call(**{first: torch.zeros(2, 6, 4)})
        with pytest.raises(TypeError, match=rf"{second}\[1\]"):
            self.call(**{second: [self.kwargs()[second][0], 3]})

    def test_shapes(self, shape_case):
        name, value, match = shape_case
        if name in self.float_names:
            value = [v.double() for v in value]
        with pytest.raises(ValueError, match=match):
            self.call(**{name: value})

    def test_dtypes(self, dtype_case):
        name, method = dtype_case
        with pytest.raises(TypeError, match=name):
            self.call(**{name: [getattr(x, method)() for x in self.kwargs()[name]]})

    @requires_cuda
    def test_device(self):
        with pytest.raises(ValueError, match=self.device_name):
            self.call(**{self.device_name: [x.cuda() for x in self.kwargs()[self.device_name]]})

    def flat_args(self) -> List[torch.Tensor]:
        return [torch.cat(t) for t in self.args()[:self.flat_inputs]]

    def test_flat_op_counts(self):
        rows, pseudo = self.count_names
        for counts, match in ((([6, 3], [2, 1]), rows), (([6, 4], [2, -1]), pseudo), (([6, 4], [3]), pseudo)):
            with pytest.raises(ValueError, match=match):
                type(self).flat_op(*self.flat_args(), *counts)
