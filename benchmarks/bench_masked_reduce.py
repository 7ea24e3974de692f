"""Benchmark of tbd_ops.masked_sq_dist and tbd_ops.masked_l1 vs eager PyTorch vs torch.compile.

Problem: the masked feature distance of TFD (SPEC 1.6) and of the scale consistency loss
(SPEC 2.3): a = teacher feature, b = adapted student feature, both [N, 256, H, W], and K spatial
masks [N, K, H, W] (K = 2: TFD's M_c and M_r in one call; K = 1: one mask). The levels are the
FPN of an 800x1333 image padded to a multiple of 32 (MMDetection's pad_size_divisor=32):
P3-P7 = 100x168, 50x84, 25x42, 13x21, 7x11; one level (P3, P5) or the whole pyramid passed as
a list. Batch 2 on CPU, 2 and 16 on CUDA; float32 (and bfloat16 / float16 on CUDA).

Eager baseline: the fastest plain PyTorch a user would write (no float64),

    d = a - b;  s = (d * d).sum(1)          # [N, H, W]  (masked_l1: d.abs().sum(1))
    out = torch.bmm(masks.flatten(2), s.flatten(1)[..., None])[..., 0]    # [N, K]

with the channel sum accumulated in float32 for 16-bit inputs (``sum(1, dtype=float32)``).
It forms the [N, C, H, W] difference (and, with autograd, keeps it for backward).

Gradients: ``a`` and ``b`` require grad, ``masks`` does not (in TBD and PseCo the masks are
detached teacher maps); and, as in TBD's feature distillation, only ``b`` (the "grad b" case of
masked_sq_dist on the pyramid).

Bytes the op must move (for GB/s), es = element size of the inputs:
  fwd: read a and b (2*N*C*HW*es) and masks (N*K*HW*es), write out (N*K*4);
  bwd: read the output gradient (N*K*4), a, b and masks (2*N*C*HW*es + N*K*HW*es),
       write the gradients of a and b (2*N*C*HW*es; "grad b": N*C*HW*es);
  fwd+bwd: the sum.

    python benchmarks/bench_masked_reduce.py [--device cpu|cuda] [--quick]
"""
from typing import List, Sequence, Tuple

import torch

import harness
import tbd_ops
from harness import Case, Config, Inputs

OPS = {"masked_sq_dist": "msd", "masked_l1": "ml1"}  # op -> label

# FPN levels (H, W) of 800x1333 padded to 800x1344, strides 8..128.
LEVELS = {"P3": (100, 168), "P4": (50, 84), "P5": (25, 42), "P6": (13, 21), "P7": (7, 11)}
PYRAMID = ("P3", "P4", "P5", "P6", "P7")
CHANNELS = 256


def _eager(term):
    def fn(a, b, masks):
        if isinstance(a, (list, tuple)):
            return [fn(x, y, m) for x, y, m in zip(a, b, masks)]
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        s = term(a - b).sum(1, dtype=acc)  # [N, H, W]
        return torch.bmm(masks.flatten(2).to(acc), s.flatten(1).unsqueeze(2)).squeeze(2)
    return fn


EAGER = {"masked_sq_dist": _eager(lambda d: d * d), "masked_l1": _eager(torch.abs)}


def make_case(op: str, k: int, levels: Sequence[str], n: int, dtype: torch.dtype = torch.float32,
              c: int = CHANNELS, shapes: Sequence[Tuple[int, int]] = None, name: str = None,
              grads: str = "a,b") -> Case:
    shapes = list(shapes) if shapes is not None else [LEVELS[lv] for lv in levels]
    hw = sum(h * w for h, w in shapes)
    es = torch.empty(0, dtype=dtype).element_size()
    as_list = len(shapes) > 1
    grad_args = {"a,b": (0, 1), "b": (1,)}[grads]

    def make_inputs(device: torch.device) -> Inputs:
        a = [torch.randn(n, c, h, w, device=device).to(dtype) for h, w in shapes]
        b = [(x.float() + 0.5 * torch.randn(n, c, h, w, device=device)).to(dtype) for x, (h, w) in zip(a, shapes)]
        m = [torch.rand(n, k, h, w, device=device) for h, w in shapes]
        m = [(x / x.sum((2, 3), keepdim=True)).to(dtype) for x in m]  # normalized like TFD's M_c, M_r
        return Inputs((a, b, m) if as_list else (a[0], b[0], m[0]))

    def bytes_moved(mode: str) -> int:
        out = n * k * len(shapes) * 4
        fwd = (2 * n * c * hw + n * k * hw) * es + out
        bwd = out + (2 * n * c * hw + n * k * hw) * es + len(grad_args) * n * c * hw * es
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    lv_name = (f"{levels[0]}-{levels[-1]}" if as_list else levels[0]) if levels else f"{len(shapes)} levels"
    suffix = "" if grads == "a,b" else f" grad {grads}"
    return Case(op=op, label=OPS[op], name=name or f"K{k} {lv_name} b{n}{suffix}",
                params={"K": k, "C": c, "levels": lv_name, "HW": hw, "N": n, "grads": grads},
                make_inputs=make_inputs, ours=getattr(tbd_ops, op), eager=EAGER[op],
                bytes_moved=bytes_moved, dtype=dtype, grad_args=grad_args)


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    if cfg.quick:
        small = [(20, 28), (10, 14), (5, 7)]
        return [make_case("masked_sq_dist", 2, ("P5",), 2, c=64, name="quick C64 K2 P5 b2"),
                make_case("masked_l1", 1, (), 2, c=32, shapes=small, name="quick C32 K1 3 levels b2")], []
    gpu = cfg.device.type == "cuda"
    batches = (2, 16) if gpu or cfg.full else (2,)
    out = [make_case("masked_sq_dist", k, levels, n)
           for n in batches for levels in (("P3",), ("P5",), PYRAMID) for k in (1, 2)]
    out += [make_case("masked_l1", k, PYRAMID, n) for n in batches for k in (1, 2)]
    # TBD's feature distillation: the teacher's features (a) are detached, only b gets a gradient.
    out += [make_case("masked_sq_dist", 2, PYRAMID, n, grads="b") for n in batches]
    if gpu:
        out += [make_case(op, 2, PYRAMID, 16, dt) for op in OPS for dt in (torch.bfloat16, torch.float16)]
    notes = [] if gpu or cfg.full else ["masked reductions on CPU: batch 2, float32 "
                                        "(batch 16 with --full; bf16/fp16 on CUDA)"]
    return out, notes


if __name__ == "__main__":
    import sys
    sys.exit(harness.exit_code(harness.main([sys.modules[__name__]], tag="masked")))
