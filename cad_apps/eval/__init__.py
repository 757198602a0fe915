"""``cad-spconv eval``: a converted segmentation model on Cityscapes (Hesse et al., Sec. 4.2).

One path for every setting: the torchvision model (output stride 8, dilated) is converted with
:func:`adapters.convert` and run with a keep mask. ``--mask none`` keeps nothing (the dense
coarsest-stride baseline), ``--mask all`` keeps everything (the dense finest-stride baseline),
``edge:T``, ``learned:P`` and ``oracle`` are the paper's masks; ``random:F``,
``inverted-edge:T`` and ``shuffled-edge:T`` are the "inadequate mask" ablation.

Per image it records multiply-adds (absolute, per part, and as fractions of the dense
torchvision networks at the finest / coarsest output stride on the same image size), the
fraction of cells kept, the time of the forward pass (CUDA events on GPU, ``perf_counter`` on
CPU) and the image's confusion matrix; the summary holds mIoU
and per-class IoU over all images. The JSON file is rewritten atomically after every step, so an
interrupted run resumes where it stopped (images already in the file are skipped). Under
``torchrun --nproc_per_node=N`` each process evaluates a shard and rank 0 merges and writes.

Heavy imports live inside functions so ``cad-spconv --help`` stays fast.
"""
from __future__ import annotations

import sys

from ..io import OutputBusyError, error_text
from .config import (FORMAT, MASK_HELP, EvalConfig, MaskSpec, add_setting_arguments,
                     config_from_args, configure, parse_mask)
from .loop import LimitLoweredError, evaluate
from .results import format_summary, load_results, summarize
from .segmenter import Segmenter, dense_macs, estimator_from_state, load_mask_estimator

__all__ = ["FORMAT", "MASK_HELP", "EvalConfig", "MaskSpec", "parse_mask", "configure",
           "add_setting_arguments", "config_from_args", "main", "evaluate", "Segmenter", "dense_macs",
           "load_mask_estimator", "estimator_from_state", "summarize", "format_summary", "load_results",
           "LimitLoweredError", "INPUT_ERRORS"]


#: what bad input raises (printed as one line, exit 2, by eval and the experiment scripts)
INPUT_ERRORS = (ValueError, OSError, KeyError, OutputBusyError)


def main(args) -> int:
    try:
        cfg = config_from_args(args)
        result = evaluate(cfg)
    except INPUT_ERRORS as e:
        print(f"cad-spconv eval: error: {error_text(e)}", file=sys.stderr)
        return 2
    if result is not None:  # rank 0
        print(format_summary(result))
    return 0
