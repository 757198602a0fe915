"""What an evaluation run is: the ``--mask`` grammar, the settings, the command-line options."""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

from ..io import file_sha256

__all__ = ["FORMAT", "MASK_HELP", "DEFAULT_MASK", "DEFAULT_MODEL", "DTYPES", "MaskSpec",
           "parse_mask", "check_mask_value", "EvalConfig", "configure", "add_setting_arguments",
           "config_from_args", "absolute", "comparable_mask"]

FORMAT = "cad-spconv-eval/2"
DEFAULT_MASK = "edge:0.35"
MASK_HELP = ("edge:T (the reference code's gradient edges >= T, paper: 0.15/0.35/0.95; under "
             "--semantics reference its 4x4-block rule) | learned (the estimator in --checkpoint)"
             " | learned:PATH | oracle | none (nothing kept: the backbone at the coarsest stride, "
             "head at the finest) | all (everything kept: the dense finest-stride network) | "
             "random:F (a level-0 share F at random) | inverted-edge:T | shuffled-edge:T (the "
             "edge mask's level fractions at random places); default " + DEFAULT_MASK)
DTYPES = ("float32", "float64", "float16", "bfloat16")
DEFAULT_MODEL = "deeplabv3_resnet101"  # without --model and --checkpoint (random weights)
# settings that change the results; a resumed run must match them
_FINGERPRINT = ("model", "checkpoint", "split", "finest_stride", "coarsest_stride", "dense",
                "semantics", "mask", "dilation", "sparse_head", "dtype", "im2col_dilated", "seed",
                "files_sha256", "mask_rule")
# masks that read --dilation (the edge family, and the oracle)
DILATED_MASKS = ("edge", "inverted-edge", "shuffled-edge", "oracle")
# masks whose rule changed (2026-12-05): random draws per image from --seed and the frame id
# (was one generator for the run), the inverse taken on the finest grid (was per pixel); files
# written before, which lack "mask_rule", are refused for these masks and kept for the others
MASK_RULES = {"random": "per-image draws", "shuffled-edge": "per-image draws",
              "inverted-edge": "finest-grid complement"}


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
            return f"learned:{self.path}" if self.path else "learned"
        return self.kind


def check_mask_value(number: float, what: str, upper: Optional[float] = None) -> float:
    """An edge threshold (or, with ``upper=1``, a kept fraction): finite and >= 0 (and <=
    ``upper``), else a ``ValueError`` naming ``what`` (the option and its value)."""
    if not math.isfinite(number) or number < 0 or (upper is not None and number > upper):
        raise ValueError(f"{what}: the value must be >= 0"
                         + (f" and <= {upper:g}" if upper is not None else ""))
    return number


def parse_mask(text: str) -> MaskSpec:
    """Parse ``edge:0.35``, ``learned:PATH``, ``oracle``, ``none``, ``all``, ``random:0.3``,
    ``inverted-edge:0.35``, ``shuffled-edge:0.35``."""
    kind, sep, value = str(text).partition(":")
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
        check_mask_value(number, f"--mask {text!r}", upper=1 if kind == "random" else None)
        return MaskSpec(kind, fraction=number) if kind == "random" else MaskSpec(kind, threshold=number)
    if kind == "learned":  # no path: the estimator inside the segmentation checkpoint
        if sep and not value:
            raise ValueError("--mask learned:PATH needs the estimator's file after the colon; "
                             "`--mask learned` alone uses the estimator inside --checkpoint")
        return MaskSpec(kind, path=value or None)
    raise ValueError(f"unknown --mask {text!r}; expected {MASK_HELP}")


# --------------------------------------------------------------------------- configuration
@dataclass
class EvalConfig:
    """One evaluation. ``model``: inferred from ``checkpoint`` when ``None`` (random weights of
    ``deeplabv3_resnet101`` without one). ``dense``: evaluate the plain network at that output
    stride (8, 16, 32) exactly as the paper's code does, no mask; else the converted network
    ``finest_stride -> coarsest_stride`` with ``mask`` (default ``edge:0.35``) under
    ``semantics`` (``"paper"`` or ``"reference"``, ``adapters.convert``)."""

    data_root: str
    out: str
    model: Optional[str] = None
    checkpoint: Optional[str] = None
    split: str = "val"
    finest_stride: int = 8
    coarsest_stride: int = 16
    dense: Optional[int] = None
    semantics: str = "paper"
    mask: Optional[str] = None
    dilation: int = 11
    sparse_head: bool = False
    device: Optional[str] = None
    dtype: str = "float32"
    im2col_dilated: bool = False
    batch_size: int = 1
    num_workers: int = 2
    limit: Optional[int] = None
    seed: int = 0
    warmup: int = 1
    timing: bool = True
    save_predictions: Optional[str] = None
    overwrite: bool = False
    progress: bool = True

    def check(self) -> "EvalConfig":
        """Refuse impossible settings before any work, naming the option and the fix."""
        from cad_spconv.plan import SEMANTICS, num_adaptive_steps

        if self.dense is not None:
            if self.dense not in (8, 16, 32):
                raise ValueError(f"--dense takes the output stride of the plain network: 8, 16 "
                                 f"or 32, got {self.dense}")
            if self.mask is not None:
                raise ValueError(f"--dense {self.dense} evaluates the plain network, which takes "
                                 f"no mask; drop --mask {self.mask}")
            # settings of the content-adaptive network only: refused, not recorded unused
            fields = type(self).__dataclass_fields__
            unused = [f"--{k.replace('_', '-')}" + ("" if isinstance(getattr(self, k), bool)
                                                    else f" {getattr(self, k)}") for k in (
                "sparse_head", "semantics", "finest_stride", "coarsest_stride", "dilation")
                if getattr(self, k) != fields[k].default]
            if unused:
                raise ValueError(f"--dense {self.dense} evaluates the plain network; "
                                 f"{', '.join(unused)} set(s) the content-adaptive one: drop it")
        else:
            parse_mask(self.mask_text)
            num_adaptive_steps(self.finest_stride, self.coarsest_stride)
        if self.semantics not in SEMANTICS:
            raise ValueError(f"--semantics must be one of {', '.join(SEMANTICS)}, got "
                             f"{self.semantics!r}")
        kind = None if self.dense is not None else parse_mask(self.mask_text).kind
        if (self.semantics == "reference" and kind in ("edge", "inverted-edge", "shuffled-edge")
                and (self.finest_stride, self.coarsest_stride) != (8, 16)):
            raise ValueError("under --semantics reference the edge mask is the paper code's "
                             "edges_os16till8 rule (4x4 blocks of stride-8 cells), defined for "
                             "--finest-stride 8 --coarsest-stride 16 only")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name, low in (("batch_size", 1), ("num_workers", 0), ("warmup", 0), ("dilation", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got "
                                 f"{getattr(self, name)}")
        # not after the model is built; only for the masks that dilate (the others never read
        # it, and results files written before the check may record an even value for them)
        if kind in DILATED_MASKS and self.dilation % 2 == 0:
            raise ValueError(f"--dilation must be odd (a square window centred on each pixel; "
                             f"paper: 11), got {self.dilation}: use {self.dilation - 1} or "
                             f"{self.dilation + 1}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        return self

    @property
    def mask_text(self) -> Optional[str]:
        """The mask setting (``None`` for a dense run)."""
        return None if self.dense is not None else (self.mask or DEFAULT_MASK)

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["mask"] = None if self.dense is not None else comparable_mask(
            str(parse_mask(self.mask_text)))
        d["checkpoint"] = absolute(self.checkpoint)
        # the bytes, not only the paths: retrained weights at the same path are another setting
        spec = None if self.dense is not None else parse_mask(self.mask_text)
        files = {"checkpoint": self.checkpoint,
                 "mask": spec.path if spec is not None and spec.kind == "learned" else None}
        d["files_sha256"] = {k: file_sha256(v) if v and os.path.isfile(v) else None
                             for k, v in files.items()}
        d["mask_rule"] = MASK_RULES.get(spec.kind) if spec is not None else None
        return {k: d[k] for k in _FINGERPRINT}


def absolute(path: Optional[str]) -> Optional[str]:
    """A file's path made absolute, so that two spellings of one file are one setting; anything
    else (a torchvision weights name, no file) as given."""
    return os.path.abspath(path) if path and os.path.isfile(path) else path


def comparable_mask(text: Optional[str]) -> Optional[str]:
    """A mask setting with the path of ``learned:PATH`` :func:`absolute`."""
    kind, _, path = (text or "").partition(":")
    return f"learned:{absolute(path)}" if kind == "learned" and path else text


def add_setting_arguments(p: argparse.ArgumentParser) -> None:
    """The options that define an evaluation setting except the mask and the output: shared by
    ``cad-spconv eval`` and the experiment scripts (which run several masks)."""
    from adapters.builders import SEGMENTATION_MODELS

    p.add_argument("--data-root", required=True, help="Cityscapes folder holding leftImg8bit/ and gtFine/")
    p.add_argument("--split", default="val", choices=("train", "val", "test"))
    p.add_argument("--model", default=None, choices=SEGMENTATION_MODELS,
                   help="the model (default: read from --checkpoint; without one "
                        "deeplabv3_resnet101 with random weights)")
    p.add_argument("--checkpoint", help="weights: a file (torchvision, or any of the paper's "
                   "published layouts: the OS8 / OS16 baselines, the edge and the learned model) "
                   "or a torchvision weights name in the torch cache; without it the weights are "
                   "random")
    p.add_argument("--finest-stride", type=int, default=8)
    p.add_argument("--coarsest-stride", type=int, default=16)
    p.add_argument("--dense", type=int, default=None, metavar="S", choices=(8, 16, 32),
                   help="evaluate the plain network at output stride S (8, 16 or 32) as the "
                        "paper's code does (head at S with its rates, one bilinear upsampling); "
                        "no mask")
    p.add_argument("--semantics", default="paper", choices=("paper", "reference"),
                   help="paper (default): coarse sites tap from their top-left cell (Guarantee "
                        "2); reference: from their block's centre, and the edge mask's 4x4-block "
                        "rule, as the paper's code (to reproduce its published models)")
    p.add_argument("--dilation", type=int, default=11,
                   help="square dilation in pixels of the edge masks (edge, inverted-edge, "
                        "shuffled-edge) and the oracle mask, odd (paper: 11); the other masks "
                        "ignore it")
    p.add_argument("--sparse-head", action="store_true",
                   help="convert the head too (default: the head runs densified at the finest "
                        "stride, as in the paper)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="float32 / float64: weights and features; float16 / bfloat16: "
                        "torch.autocast (weights float32, convs in that dtype)")
    p.add_argument("--im2col-dilated", action="store_true",
                   help="CPU: compute the dense convs with dilation >= 6 (DeepLabV3's ASPP) as "
                        "im2col GEMMs (adapters.im2col_dilated_convs): in bfloat16 oneDNN's "
                        "dilated convs are slow on some CPUs (BENCHMARKS.md); also under "
                        "the autocast of --dtype bfloat16 / float16")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=2, help="data loading processes")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of random weights (without --checkpoint) and random masks")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed forward passes before timing (default: 1)")
    p.add_argument("--no-timing", dest="timing", action="store_false",
                   help="skip the separate timed forward pass (halves the cost; time_s is null)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def configure(parser: argparse.ArgumentParser):
    add_setting_arguments(parser)
    parser.add_argument("--mask", default=None, help=MASK_HELP)
    parser.add_argument("--out", default="results.json", help="JSON results (resumed if it exists)")
    parser.add_argument("--save-predictions", metavar="DIR",
                        help="write <DIR>/<city>/<frame>_pred_trainIds.png per image, and "
                             "DIR/cad-spconv-eval.json naming the run (a folder of another "
                             "run is refused without --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over instead of resuming --out (and take over the "
                             "--save-predictions folder of another run)")


def config_from_args(args) -> EvalConfig:
    names = EvalConfig.__dataclass_fields__
    given = {k: getattr(args, k) for k in names if hasattr(args, k)}
    if given.get("warmup") not in (None, 0) and given.get("timing") is False:
        raise ValueError("--warmup sets the untimed passes before timing, and --no-timing skips "
                         "timing: drop one of them")
    if given.get("warmup") is None:
        given.pop("warmup", None)  # the dataclass default
    return EvalConfig(**given)
