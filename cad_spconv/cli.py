"""The ``cad-spconv`` command line.

Each subcommand lives in its own module with ``configure(parser)`` and ``main(args) -> int``;
heavy imports stay inside ``main`` so ``--help`` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("cad_spconv.demo", "convert a model, run dense and CAD on an image, print savings"),
    "eval": ("cad_spconv.evaluate", "evaluate a converted segmentation model on Cityscapes"),
    "train-mask": ("cad_spconv.train_mask", "train the learned mask estimator (paper recipe)"),
    "bench": ("cad_spconv.bench", "time dense coarsest, dense finest and CAD on the same weights"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cad-spconv",
        description="Content-adaptive downsampling for CNNs on spconv (Hesse et al., CVPRW 2023).")
    parser.add_argument("--version", action="version", version=f"cad-spconv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        mod = importlib.import_module(module)
        mod.configure(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args._main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
