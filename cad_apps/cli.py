"""The ``cad-spconv`` command line.

Each subcommand lives in its own module with ``configure(parser)`` and ``main(args) -> int``.
Only the module of the subcommand being run is imported (and only it pulls in torch), so
``cad-spconv --help`` answers at once.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

# name -> (module, one-line help)
COMMANDS = {
    "demo": ("cad_apps.demo", "convert a model, run dense and CAD on an image, print savings"),
    "eval": ("cad_apps.eval", "evaluate a segmentation model (dense or CAD) on Cityscapes"),
    "train-mask": ("cad_apps.train_mask", "train the learned mask estimator (paper recipe)"),
    "bench": ("cad_apps.bench", "time dense coarsest, dense finest and CAD on the same weights"),
    "keypoints": ("cad_apps.keypoints.cli", "keypoint description study (D2-Net on HPatches): extract | evaluate"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cad-spconv")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown (not installed)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported and configured (all of them when
    ``command`` is ``"*"``, for tools that need every option)."""
    parser = argparse.ArgumentParser(
        prog="cad-spconv",
        description="Content-adaptive downsampling for CNNs on spconv (Hesse et al., CVPRW 2023).")
    parser.add_argument("--version", action="version", version=f"cad-spconv {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if command in (name, "*"):
            mod = importlib.import_module(module)
            mod.configure(p)
            p.set_defaults(_main=mod.main)
    return parser


def _command_in(argv) -> str | None:
    for arg in argv:
        if arg in COMMANDS:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    before = _file_state(_resume_file(args))
    try:
        return int(args._main(args) or 0)
    except KeyboardInterrupt:  # results are written atomically: nothing half-written to report
        name = args.command + (f" {args.keypoints_command}" if args.command == "keypoints"
                               and getattr(args, "keypoints_command", None) else "")
        advice = _resume_advice(args, argv, before)
        print(f"cad-spconv {name}: interrupted; files written so far are complete"
              + (f"; {advice}" if advice else ""), file=sys.stderr)
        return 130


def _is_overwrite(arg: str) -> bool:
    # argparse also takes an unambiguous prefix (--overw) for --overwrite
    return len(arg) > 3 and "--overwrite".startswith(arg)


def _resumes_from_out(args) -> bool:
    return args.command == "eval" or (args.command == "keypoints"
                                      and getattr(args, "keypoints_command", None) == "extract")


def _resume_file(args):
    """The file an interrupted run resumes from (None for commands that do not resume)."""
    if _resumes_from_out(args):
        return args.out
    if args.command == "train-mask":
        return os.path.join(args.out, "last.pt")
    return None


def _file_state(path):
    """What identifies one version of ``path``: a save (written atomically: a new inode) or any
    rewrite changes it. Not a clock comparison: a file's mtime comes from the kernel's coarse
    clock, which can read a few ms behind ``time.time()`` taken before the write."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _saved_by_this_run(path, before) -> bool:
    """Whether the run wrote ``path`` (``before``: its state when the run began; a file that is
    unchanged is an earlier run's)."""
    now = _file_state(path)
    return now is not None and now != before and os.path.isfile(path)


def _resume_advice(args, argv, before) -> str:
    """How to continue an interrupted run, from its own arguments: re-running a command with
    --overwrite would discard what was saved, and train-mask resumes only with --resume (which
    --overwrite excludes); both resume only from a save of this run (``before``: the state of
    the file it resumes from when it began). '' for commands that do not resume (bench, demo,
    keypoints evaluate)."""
    saved = _saved_by_this_run(_resume_file(args), before)
    if _resumes_from_out(args):
        if getattr(args, "overwrite", False):
            if not saved:
                # the file there is still the earlier run's (--overwrite replaces it at the
                # first write), whose settings a resume would refuse
                return "nothing of this run was saved yet: run the same command again"
            again = [a for a in argv if not _is_overwrite(a)]
            return ("resume with the same command without --overwrite: "
                    f"cad-spconv {shlex.join(again)}")
        return "resume with the same command"
    if args.command == "train-mask":
        if not args.resume and not saved:
            # a checkpoint there is an earlier run's (--overwrite replaces it at the first save)
            return ("nothing of this run was saved yet (a save comes every --save-every "
                    "iterations): run the same command again")
        if args.overwrite:
            again = ["--resume" if _is_overwrite(a) else a for a in argv]
            return ("resume from its last save with --resume in place of --overwrite: "
                    f"cad-spconv {shlex.join(again)}")
        if args.resume:
            return "resume from its last save with the same command"
        return ("resume from its last save with the same command plus --resume: "
                f"cad-spconv {shlex.join(argv + ['--resume'])}")
    return ""


if __name__ == "__main__":
    sys.exit(main())
