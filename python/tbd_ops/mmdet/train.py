"""Train a detector from a config with mmengine's Runner (what mmdet's ``tools/train.py`` does).

    python -m tbd_ops.mmdet.train CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp]
                                         [--cfg-options key=value ...] [--launcher pytorch]

``CONFIG`` is a path, or ``tbd_ops::<dir>/<file>.py`` for a config shipped with
tbd_ops (``tbd/`` TBD distillers, ``pseco/`` PseCo; ``--list-configs`` prints them
with their paths: a config of your own names one as ``_base_`` by its path, since
mmengine resolves ``pkg::`` names only for OpenMMLab packages); ``tbd_ops.mmdet``
is imported before the config is read, so its modules are registered either way.
Distributed: ``torchrun --nproc-per-node 8 -m tbd_ops.mmdet.train CONFIG --launcher pytorch``.
"""
import argparse
import os
from pathlib import Path
from typing import List, Optional

__all__ = ["config_path", "shipped_configs", "main"]

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"


def config_path(name: str) -> str:
    """The file of a config: ``tbd_ops::tbd/x.py`` names one shipped with tbd_ops, anything else is a path."""
    if name.startswith("tbd_ops::"):
        path = CONFIG_ROOT / name[len("tbd_ops::"):]
        if not path.is_file():
            raise FileNotFoundError(f"config {name!r}: tbd_ops ships no {path.relative_to(CONFIG_ROOT)}; "
                                    f"shipped configs: {', '.join(shipped_configs())}")
        return str(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"config {name!r}: no such file")
    return name


def parse_args(argv: Optional[List[str]] = None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(prog="python -m tbd_ops.mmdet.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?",
                        help="config file path, or tbd_ops::<dir>/<file>.py for a shipped config")
    parser.add_argument("--list-configs", action="store_true",
                        help="print the shipped configs (tbd_ops::<dir>/<file>.py) and their paths, then exit")
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default: ./work_dirs/<config name>)")
    parser.add_argument("--resume", nargs="?", type=str, const="auto",
                        help="resume from this checkpoint, or (no value) from the latest one in the work dir")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction,
                        help="override settings of the config, key=value (e.g. model.teacher_ckpt=t.pth)")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    args = parser.parse_args(argv)
    if args.config is None and not args.list_configs:
        parser.error("the config is required (or --list-configs)")
    os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def shipped_configs() -> List[str]:
    """The ``tbd_ops::<dir>/<file>.py`` names of the configs shipped with tbd_ops."""
    return sorted(f"tbd_ops::{p.relative_to(CONFIG_ROOT).as_posix()}" for p in CONFIG_ROOT.glob("*/*.py"))


def main(argv: Optional[List[str]] = None):
    args = parse_args(argv)
    if args.list_configs:
        # A config of your own starts from one of these by its path: _base_ = "<path>"
        for name in shipped_configs():
            print(f"{name}  {config_path(name)}")
        return None
    import tbd_ops.mmdet  # noqa: F401  (registers the detectors, losses and assigners)
    from mmengine.config import Config
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    path = config_path(args.config)
    try:
        cfg = Config.fromfile(path)
    except AssertionError as e:  # mmengine's answer to _base_ = "tbd_ops::..."
        if "does not support to load tbd_ops config" not in str(e):
            raise
        raise ValueError(f"config {path!r}: a _base_ (or other inherited config) named 'tbd_ops::...' cannot be "
                         "read by mmengine, which resolves 'pkg::' names only for OpenMMLab packages: name the "
                         "shipped config by its path (python -m tbd_ops.mmdet.train --list-configs prints "
                         "them)") from e
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir", None) is None:
        cfg.work_dir = os.path.join("./work_dirs", Path(path).stem)
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume is not None:
        cfg.resume, cfg.load_from = True, args.resume
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    runner.train()
    return runner


if __name__ == "__main__":
    main()
