"""Benchmark of tbd_ops.channel_max_spatial_softmax (p_c) vs eager PyTorch vs torch.compile.

Inputs are classification logits of a detector head at 1333x800, FPN strides 8..128:

  RetinaNet: K = A * C = 9 anchors x 80 classes = 720 channels
  FCOS / GFL: K = C = 80 channels

one level (P3, 100x167 or P5, 25x42) or the whole pyramid P3-P7 (100x167, 50x84, 25x42, 13x21, 7x11)
passed as a list, batch 2 and 16, float32 (and float16 / bfloat16 on CUDA). Eager baseline:
``x.amax(1)`` then ``softmax`` over the flattened H*W (what a user would write).

Bytes the op must move (for GB/s):
  fwd: read N*K*H*W logits, write N*H*W probabilities;
  bwd: read N*H*W output gradients, write the N*K*H*W input gradient;
  fwd+bwd: the sum.

    python benchmarks/bench_channel_max_spatial_softmax.py [--device cpu|cuda] [--quick]
"""
from typing import List, Sequence, Tuple

import torch

import harness
import tbd_ops
from harness import Case, Config, Inputs

OP = "channel_max_spatial_softmax"
LABEL = "p_c"

# FPN levels of a 1333x800 image (H, W), strides 8, 16, 32, 64, 128.
LEVELS = {"P3": (100, 167), "P4": (50, 84), "P5": (25, 42), "P6": (13, 21), "P7": (7, 11)}
PYRAMID = ("P3", "P4", "P5", "P6", "P7")
MODELS = {"RetinaNet": 720, "FCOS": 80}  # K channels: A*C = 9*80, C = 80


def eager(x, temperature: float = 1.0, scale_by_hw: bool = False):
    """The fastest plain PyTorch: amax over channels, softmax over the flattened H*W."""
    if isinstance(x, (list, tuple)):
        return [eager(t, temperature, scale_by_hw) for t in x]
    n, _, h, w = x.shape
    z = x.amax(1).view(n, h * w)
    p = torch.softmax(z if temperature == 1.0 else z / temperature, dim=1).view(n, h, w)
    return p * (h * w) if scale_by_hw else p


def make_case(model: str, k: int, levels: Sequence[str], n: int, dtype: torch.dtype) -> Case:
    shapes = [LEVELS[lv] for lv in levels]
    hw = sum(h * w for h, w in shapes)
    es = torch.empty(0, dtype=dtype).element_size()
    as_list = len(levels) > 1

    def make_inputs(device: torch.device) -> Inputs:
        # Logits around the focal-loss prior bias (-4.6) so that the softmax is not flat.
        xs = [(torch.randn(n, k, h, w, device=device) * 2.0 - 4.0).to(dtype) for h, w in shapes]
        return Inputs((xs if as_list else xs[0],))

    def bytes_moved(mode: str) -> int:
        fwd = (n * k * hw + n * hw) * es
        bwd = (n * hw + n * k * hw) * es
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]

    lv_name = f"{levels[0]}-{levels[-1]}" if as_list else levels[0]
    return Case(op=OP, label=LABEL, name=f"{model} K{k} {lv_name} b{n}",
                params={"model": model, "K": k, "levels": lv_name, "HW": hw, "N": n},
                make_inputs=make_inputs, ours=tbd_ops.channel_max_spatial_softmax, eager=eager,
                bytes_moved=bytes_moved, dtype=dtype)


def cases(cfg: Config) -> Tuple[List[Case], List[str]]:
    if cfg.quick:
        return [make_case("FCOS", 80, ("P5",), 2, torch.float32),
                make_case("FCOS", 80, ("P6", "P7"), 2, torch.float32)], []
    gpu = cfg.device.type == "cuda"
    out = [make_case(model, k, levels, n, torch.float32)
           for model, k in MODELS.items()
           for levels in (("P3",), ("P5",), PYRAMID)
           for n in ((2, 16) if gpu or cfg.full else (2,))]
    if gpu:
        out += [make_case(model, k, PYRAMID, 16, dt) for dt in (torch.float16, torch.bfloat16)
                for model, k in MODELS.items()]
    notes = [] if gpu or cfg.full else ["p_c on CPU: batch 2, float32 (batch 16 with --full; fp16/bf16 on CUDA)"]
    return out, notes


if __name__ == "__main__":
    import sys
    sys.exit(harness.exit_code(harness.main([sys.modules[__name__]], tag=LABEL)))
