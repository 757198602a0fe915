"""Fig. 6 of the paper (Sec. 4.3): MMA@3 on HPatches vs multiply-adds for D2-Net descriptors of
SIFT keypoints, dense at output stride 8 / 4 / 2 / 1 and content-adaptive F -> 8 (F = 4, 2, 1)
with the dilation settings of the paper's code, plus the inadequate-mask ablation (random and
inverted plans at the keypoint plans' budget, F = 1).

    python -m experiments.keypoints --data-root hpatches-sequences-release \\
        --weights d2_tf.pth --out runs/keypoints            # the paper's full sweep
    python -m experiments.keypoints --synthetic --random-weights --settings quick \\
        --synthetic-size 128 192 --num-keypoints 32 --normalize \\
        --out runs/keypoints_synthetic                     # a synthetic run on CPU

Every setting is one ``cad-spconv keypoints extract`` folder under ``<out>/features/<label>``
(resumed when the command is run again); the evaluation of all folders is written to
``<out>/keypoints.json`` and the figure to ``<out>/keypoints.png``.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys


#: the dilation settings evaluated by the paper's code (its HPatches notebook), finest first
REFERENCE_SETTINGS = {
    4: [(3,), (5,), (7,), (11,), (21,), (31,)],
    2: [(3, 21), (5, 21), (7, 21), (11, 21), (15, 21), (21, 21), (27, 27), (31, 31), (37, 37),
        (11, 37), (15, 37), (17, 37), (19, 37), (21, 37), (27, 37), (19, 31), (19, 33), (19, 35)],
    1: [(3, 19, 35), (5, 19, 35), (9, 19, 35), (11, 19, 35), (15, 19, 35), (19, 19, 35),
        (19, 35, 35), (19, 41, 41), (19, 51, 51), (25, 51, 51)],
}
QUICK_SETTINGS = {4: [(3,), (11,), (31,)], 2: [(3, 21), (21, 21), (37, 37)],
                  1: [(3, 19, 35), (19, 35, 35), (25, 51, 51)]}
DENSE_STRIDES = (8, 4, 2, 1)
ABLATION_STRIDE = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", help="HPatches sequences folder (or --synthetic)")
    p.add_argument("--synthetic", action="store_true",
                   help="write a small synthetic HPatches-format set to <out>/synthetic_hpatches "
                        "(from --scenes, else procedural scenes) and use it; reused by later "
                        "runs into the same --out with the same --scenes, --synthetic-size and "
                        "--seed, refused with others")
    p.add_argument("--scenes", nargs="*", default=[], metavar="PNG",
                   help="images the synthetic sequences are cut from")
    p.add_argument("--synthetic-size", type=int, nargs=2, default=(64, 96), metavar=("H", "W"))
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--weights", help="D2-Net checkpoint d2_tf.pth")
    w.add_argument("--random-weights", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settings", default="paper", choices=("paper", "quick"),
                   help="paper: every dilation setting of the paper's code; quick: three per stride")
    p.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the random / inverted masks")
    p.add_argument("--semantics", default="paper", choices=("paper", "reference"))
    p.add_argument("--num-keypoints", type=int, default=512,
                   help="SIFT keypoints per image (paper: 512; fewer on small synthetic images "
                        "keep the paper's keypoint density)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--engine", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--title", help="plot title")
    p.add_argument("--normalize", action="store_true",
                   help="match L2-normalised descriptors (cosine; not the paper's protocol; "
                        "for random weights, whose raw dot products favour a few descriptors)")
    return p


def settings(which: str, ablation: bool) -> list[tuple[str, int, tuple, str]]:
    """``(label, finest stride, dilations, mask)`` of every run."""
    table = REFERENCE_SETTINGS if which == "paper" else QUICK_SETTINGS
    runs = [(f"dense_os{s}", s, (), "keypoints") for s in DENSE_STRIDES]
    for stride in (4, 2, 1):
        for dil in table[stride]:
            runs.append((f"adaptive_os{stride}_{'_'.join(map(str, dil))}", stride, dil, "keypoints"))
    if ablation:
        for mask in ("random", "inverted"):
            for dil in table[ABLATION_STRIDE]:
                runs.append((f"{mask}_os{ABLATION_STRIDE}_{'_'.join(map(str, dil))}",
                             ABLATION_STRIDE, dil, mask))
    return runs


def _synthetic_settings(args) -> dict:
    """What the synthetic set of ``--synthetic`` is made from (the scenes by their bytes)."""
    from cad_apps.io import file_sha256

    return {"synthetic_size": [int(v) for v in args.synthetic_size], "seed": args.seed,
            "scenes": [os.path.abspath(p) for p in args.scenes],
            "scenes_sha256": [file_sha256(p) if os.path.isfile(p) else None for p in args.scenes]}


def _synthetic_path(args) -> str:
    return os.path.join(args.out, "synthetic_hpatches")


def synthetic_root(args) -> str:
    """Write (once) the synthetic set of ``--synthetic``; its settings are recorded beside it
    (``<out>/synthetic_hpatches.settings.json``, written last) and a set of other settings, or
    of unknown ones (an older or interrupted write), is refused."""
    import json

    import cv2
    import numpy as np

    from cad_apps.io import settings_difference, write_json_atomic
    from cad_apps.keypoints.hpatches import list_sequences, synthetic_scene, write_synthetic

    root = _synthetic_path(args)
    record = root + ".settings.json"
    mine = _synthetic_settings(args)
    if os.path.isdir(root) and os.listdir(root):
        fix = f"choose another --out, or delete {root} to rebuild it"
        try:
            with open(record) as f:
                theirs = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{root}: the settings of this synthetic set are not recorded "
                             f"(written by an older version, or interrupted); {fix}") from None
        except ValueError as e:
            raise ValueError(f"{record} is not valid JSON ({e}); {fix}") from None
        # the scenes count by their bytes: paths differ between checkouts (recorded for reading)
        shown = settings_difference({k: v for k, v in theirs.items() if k != "scenes"},
                                    {k: v for k, v in mine.items() if k != "scenes"},
                                    "in the folder")
        if shown:
            raise ValueError(f"{root} holds a synthetic set of other settings ({shown}); {fix}")
        list_sequences(root)
        return root
    h, w = args.synthetic_size
    scenes = []
    for path in args.scenes:
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"--scenes: cannot read {path}")
        scale = max(3 * h / bgr.shape[0], 3 * w / bgr.shape[1])
        size = (max(3 * w, round(bgr.shape[1] * scale)), max(3 * h, round(bgr.shape[0] * scale)))
        scenes.append(np.ascontiguousarray(cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)[:, :, ::-1]))
    if not scenes:
        scenes = [synthetic_scene((3 * h, 3 * w), i) for i in range(2)]
    write_synthetic(root, scenes, image_size=(h, w), seed=args.seed)
    write_json_atomic(record, mine)
    return root


def check_args(args) -> None:
    """What the options must be, checked before any work (``ValueError`` naming the option)."""
    if args.synthetic == bool(args.data_root):
        raise ValueError("give exactly one of --data-root and --synthetic")
    if args.synthetic and min(args.synthetic_size) < 8:
        raise ValueError("--synthetic-size must be two integers >= 8 (height and width of the "
                         "synthetic images; the network needs 8 pixels a side), got "
                         + " ".join(map(str, args.synthetic_size)))


def main(argv=None) -> int:
    from cad_apps.eval import INPUT_ERRORS
    from cad_apps.keypoints import network
    from cad_apps.io import check_not_busy, error_text
    from cad_apps.keypoints.evaluate import report_notes, run_evaluate
    from cad_apps.keypoints.extract import SUMMARY, ExtractConfig, run_extract

    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        data_root = _synthetic_path(args) if args.synthetic else args.data_root
        # every setting's options are checked before the first one runs (a bad --seed used to
        # surface at the first ablation setting, hours into the paper's sweep)
        runs = [(label, ExtractConfig(
            data_root=data_root, out=os.path.join(args.out, "features", label),
            finest_stride=stride, dilations=dil, weights=args.weights,
            random_weights=args.random_weights, seed=args.seed, mask=mask,
            semantics=args.semantics, num_points=args.num_keypoints, device=args.device,
            dtype=args.dtype, engine=args.engine, progress=args.progress).validate())
            for label, stride, dil, mask in settings(args.settings, args.ablation)]
        for _, cfg in runs:  # a folder another run extracts into: refused now, not at its turn
            check_not_busy(os.path.join(os.path.abspath(cfg.out), SUMMARY))
        # a foreign --weights is refused before the synthetic set is written, and the file is
        # read once, not once per setting (each setting gets its own copy of the stack)
        stack = None if args.weights is None else network.load_d2_weights(args.weights)
        if args.synthetic:
            synthetic_root(args)
        folders, labels = [], []
        for i, (label, cfg) in enumerate(runs, 1):
            print(f"[{i}/{len(runs)}] {label}", flush=True)
            run_extract(cfg, stack=None if stack is None else copy.deepcopy(stack))
            folders.append(cfg.out)
            labels.append(label)
        weights = "random weights" if args.random_weights else os.path.basename(args.weights)
        data = "synthetic set" if args.synthetic else os.path.basename(os.path.normpath(data_root))
        report = run_evaluate(data_root, folders, os.path.join(args.out, "keypoints.json"),
                              os.path.join(args.out, "keypoints.png"), labels,
                              args.title or f"D2-Net ({weights}) on {data}"
                              + (", cosine matching" if args.normalize else "")
                              + "\nMMA@3 vs multiply-adds (Fig. 6)", args.normalize)
    except INPUT_ERRORS as e:  # as `cad-spconv keypoints`: a KeyError is a foreign --weights
        print(f"experiments.keypoints: error: {error_text(e)}", file=sys.stderr)
        return 2
    print(f"{'setting':>28}  {'MMA@3 all':>9}  {'i':>6}  {'v':>6}  {'G mult-adds':>11}")
    for label, r in report["features"].items():
        m = r["mma@3"]
        print(f"{label:>28}  {m['all']:9.4f}  {m['i'] or 0:6.4f}  {m['v'] or 0:6.4f}  "
              f"{r['macs_per_image'] / 1e9:11.3f}")
    for note in report_notes(report):
        print(note)
    print(f"wrote {os.path.join(args.out, 'keypoints.json')} and keypoints.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
