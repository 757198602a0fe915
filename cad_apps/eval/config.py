"""What an evaluation run is: the ``--mask`` grammar, the settings, the command-line options."""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

__all__ = ["FORMAT", "MASK_HELP", "MaskSpec", "parse_mask", "EvalConfig", "configure",
           "add_setting_arguments", "config_from_args"]

FORMAT = "cad-spconv-eval/1"
MASK_HELP = ("edge:T (Sobel edges > T, paper: 0.15/0.35/0.95) | learned:PATH | oracle | none "
             "(dense coarsest stride) | all (dense finest stride) | random:F (a fraction F of "
             "finest cells kept at random) | inverted-edge:T | shuffled-edge:T (the edge mask's "
             "budget at random places)")
# settings that change the results; a resumed run must match them
_FINGERPRINT = ("model", "checkpoint", "split", "finest_stride", "coarsest_stride", "mask",
                "dilation", "sparse_head", "dtype", "seed")


# --------------------------------------------------------------------------- mask specification
@dataclass(frozen=True)
class MaskSpec:
    """A parsed ``--mask`` value."""

    kind: str  # edge | learned | oracle | none | all | random | inverted-edge | shuffled-edge
    threshold: float | None = None
    path: str | None = None
    fraction: float | None = None

    def __str__(self):
        if self.kind in ("edge", "inverted-edge", "shuffled-edge"):
            return f"{self.kind}:{self.threshold:g}"
        if self.kind == "random":
            return f"random:{self.fraction:g}"
        if self.kind == "learned":
            return f"learned:{self.path}"
        return self.kind


def parse_mask(text: str) -> MaskSpec:
    """Parse ``edge:0.35``, ``learned:PATH``, ``oracle``, ``none``, ``all``, ``random:0.3``,
    ``inverted-edge:0.35``, ``shuffled-edge:0.35``."""
    kind, _, value = str(text).partition(":")
    kind = kind.strip().lower()
    if kind in ("none", "all", "oracle"):
        if value:
            raise ValueError(f"--mask {kind} takes no value, got {text!r}")
        return MaskSpec(kind)
    if kind in ("edge", "inverted-edge", "shuffled-edge", "random"):
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--mask {kind}:X needs a number, got {text!r} (e.g. {kind}:0.35)") from None
        if not math.isfinite(number) or number < 0 or (kind == "random" and number > 1):
            raise ValueError(f"--mask {text!r}: the value must be >= 0"
                             + (" and <= 1" if kind == "random" else ""))
        return MaskSpec(kind, fraction=number) if kind == "random" else MaskSpec(kind, threshold=number)
    if kind == "learned":
        if not value:
            raise ValueError("--mask learned:PATH needs the mask estimator's checkpoint path")
        return MaskSpec(kind, path=value)
    raise ValueError(f"unknown --mask {text!r}; expected {MASK_HELP}")


# --------------------------------------------------------------------------- configuration
@dataclass
class EvalConfig:
    data_root: str
    out: str
    model: str = "deeplabv3_resnet101"
    checkpoint: Optional[str] = None
    split: str = "val"
    finest_stride: int = 8
    coarsest_stride: int = 16
    mask: str = "edge:0.35"
    dilation: int = 11
    sparse_head: bool = False
    device: Optional[str] = None
    dtype: str = "float32"
    batch_size: int = 1
    num_workers: int = 2
    limit: Optional[int] = None
    seed: int = 0
    warmup: int = 1
    timing: bool = True
    save_predictions: Optional[str] = None
    overwrite: bool = False
    progress: bool = True

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["mask"] = str(parse_mask(self.mask))
        d["checkpoint"] = os.path.abspath(self.checkpoint) if self.checkpoint and os.path.isfile(
            self.checkpoint) else self.checkpoint
        return {k: d[k] for k in _FINGERPRINT}


def add_setting_arguments(p: argparse.ArgumentParser) -> None:
    """The options that define an evaluation setting except the mask and the output: shared by
    ``cad-spconv eval`` and the experiment scripts (which run several masks)."""
    from adapters.builders import SEGMENTATION_MODELS

    p.add_argument("--data-root", required=True, help="Cityscapes folder holding leftImg8bit/ and gtFine/")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--model", default="deeplabv3_resnet101", choices=SEGMENTATION_MODELS)
    p.add_argument("--checkpoint", help="weights: a file (torchvision or the paper's "
                   "DeepLabV3Plus-Pytorch checkpoints) or a torchvision weights name in the torch "
                   "cache; without it the weights are random")
    p.add_argument("--finest-stride", type=int, default=8)
    p.add_argument("--coarsest-stride", type=int, default=16)
    p.add_argument("--dilation", type=int, default=11,
                   help="square dilation of edge / oracle masks in pixels (paper: 11)")
    p.add_argument("--sparse-head", action="store_true",
                   help="convert the head too (default: the head runs densified at the finest "
                        "stride, as in the paper)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of random weights (without --checkpoint) and random masks")
    p.add_argument("--warmup", type=int, default=1, help="untimed forward passes before timing")
    p.add_argument("--no-timing", dest="timing", action="store_false",
                   help="skip the separate timed forward pass (halves the cost; time_s is null)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def configure(parser: argparse.ArgumentParser):
    add_setting_arguments(parser)
    parser.add_argument("--mask", default="edge:0.35", help=MASK_HELP)
    parser.add_argument("--out", default="results.json", help="JSON results (resumed if it exists)")
    parser.add_argument("--save-predictions", metavar="DIR",
                        help="write <DIR>/<city>/<frame>_pred_trainIds.png per image")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over instead of resuming --out")


def config_from_args(args) -> EvalConfig:
    names = EvalConfig.__dataclass_fields__
    return EvalConfig(**{k: getattr(args, k) for k in names if hasattr(args, k)})
