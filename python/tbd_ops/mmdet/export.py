"""Export the student of a distiller's checkpoint as a checkpoint of the plain student detector.

    python -m tbd_ops.mmdet.export DISTILLER_CKPT OUT

A distiller's checkpoint (what the Runner saved for ``TBDSingleStageDetector``
or ``TBDTwoStageDetector``) holds the student's weights plus those of the TBD
loss (``tbd_loss.*``: the feature adapters and the task weight generator),
which a plain detector does not have. The export keeps the student's weights
and the ``meta`` (minus the training state: optimizer, schedulers, message
hub), so that the file loads into the student's own config (``load_from``,
``tools/test.py``, inference) with no stray keys.
"""
import argparse
from typing import List, Optional

import torch

__all__ = ["export_student", "main"]

DISTILLATION_PREFIXES = ("tbd_loss.",)


def export_student(checkpoint: str, out: str) -> dict:
    """Writes the student's part of the distiller checkpoint ``checkpoint`` to ``out``; returns its state dict."""
    from .checkpoint import _state_dict_of, load_checkpoint_weights_only

    ckpt = load_checkpoint_weights_only(checkpoint)
    state = _state_dict_of(ckpt, checkpoint)
    student = {k: v for k, v in state.items() if not k.startswith(DISTILLATION_PREFIXES)}
    if len(student) == len(state):
        raise ValueError(f"checkpoint {checkpoint!r} has no tbd_loss.* weights: it is not a TBD distiller's "
                         "checkpoint (nothing to export)")
    meta = dict(ckpt.get("meta", {})) if isinstance(ckpt, dict) else {}
    meta["exported_from"] = str(checkpoint)
    torch.save(dict(meta=meta, state_dict=student), out)
    return student


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tbd_ops.mmdet.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a TBD distiller's checkpoint (e.g. work_dirs/.../epoch_12.pth)")
    parser.add_argument("out", help="where to write the student's checkpoint")
    args = parser.parse_args(argv)
    try:
        student = export_student(args.checkpoint, args.out)
    except (OSError, ValueError) as e:  # no such file, not a distiller's checkpoint, ...: no traceback
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    print(f"wrote {args.out}: {len(student)} tensors of the student")


if __name__ == "__main__":
    main()
