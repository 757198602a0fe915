"""How far the paper's code's anchor rule (``semantics="reference"``) is from the paper's
semantics (the default): Guarantee 2 under each, and the difference of their outputs.

Converts DeepLabV3 (ResNet backbone, random weights with random batch-norm statistics, or
``--checkpoint``) 8 -> 16 under both semantics, runs the edge mask (the reference's 4x4-block rule
for both, so only the anchor differs) on the given frames in float64 and reports per frame:

- Guarantee 2: max |CAD backbone output on the stride-16 lattice - dense stride-16 backbone|,
  relative to the largest feature, for each semantics;
- the largest difference of the two semantics' backbone outputs, relative to the largest
  feature, and the share of pixels whose predicted class differs.

    python -m experiments.semantics --images ../shared/data/cityscapes_frames/*.png --out DIR
"""
from __future__ import annotations

import sys

from experiments.common import (INPUT_ERRORS, ExperimentError, ExperimentParser, provenance,
                                reports_errors)


def build_parser():
    p = ExperimentParser(prog="python -m experiments.semantics",
                         description=__doc__.split("\n\n")[0])
    p.add_argument("--images", nargs="+", required=True, help="RGB frames")
    p.add_argument("--model", default="deeplabv3_resnet50")
    p.add_argument("--checkpoint", help="weights (default: random, seeded)")
    p.add_argument("--size", type=int, nargs=2, default=(256, 512), metavar=("H", "W"))
    p.add_argument("--threshold", type=float, default=0.35)
    p.add_argument("--dilation", type=int, default=11)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (semantics.json)")
    return p


@reports_errors("semantics")
def main(argv=None) -> int:
    import os

    import torch
    import torch.nn.functional as F

    from adapters import convert
    from cad_apps.checkpoints import build_segmentation_model
    from cad_apps.data import read_image
    from cad_apps.io import check_output_path, error_text, write_json_atomic
    from cad_spconv import images as img
    from cad_spconv import masks

    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.size) < 1 or args.dilation < 1:
        parser.error("--size and --dilation must be >= 1")
    frames = {}
    try:  # every input checked before the models are built
        check_output_path(args.out, folder=True)
        for path in args.images:
            if not os.path.isfile(path):
                raise ValueError(f"--images {path}: no such file")
            frames[path] = read_image(path, "RGB")
    except INPUT_ERRORS as e:
        raise ExperimentError(error_text(e)) from None
    torch.manual_seed(args.seed)
    model, _ = build_segmentation_model(args.model, args.checkpoint)
    if args.checkpoint is None:  # random statistics, so that a wrong read cannot hide
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    model = model.double().eval()
    dense16, _ = build_segmentation_model(args.model, args.checkpoint, output_stride=16)
    dense16.load_state_dict(model.state_dict())
    dense16 = dense16.double().eval()
    cads = {s: convert(model, 8, 16, semantics=s).eval() for s in ("paper", "reference")}
    report = {"experiment": "semantics", **provenance(args, "cpu"), "model": args.model,
              "checkpoint": args.checkpoint, "size": list(args.size),
              "threshold": args.threshold, "frames": {}}
    for path, frame in frames.items():
        rgb = torch.from_numpy(frame.copy()).permute(2, 0, 1)
        x = F.interpolate(img.normalize(rgb)[None], size=tuple(args.size), mode="bilinear",
                          align_corners=False).double()
        keep = masks.reference_blocks(masks.edge(x, args.threshold, args.dilation), 8, 4)
        with torch.no_grad():
            ref16 = dense16.backbone(x)["out"]
            feats, preds = {}, {}
            for s, cad in cads.items():
                feats[s] = cad.forward_features(x, keep).dense()
                preds[s] = cad(x, keep)["out"].argmax(1)
        scale = float(ref16.abs().max())
        rec = {"level0_share": float(cads["paper"].last_plan.level_fractions()[0, 0])}
        for s in cads:
            err = float((feats[s][:, :, ::2, ::2] - ref16).abs().max())
            rec[f"guarantee2_rel_error_{s}"] = err / scale
        diff = float((feats["paper"] - feats["reference"]).abs().max())
        rec["features_rel_difference"] = diff / float(feats["paper"].abs().max())
        rec["pixels_with_another_class"] = float((preds["paper"] != preds["reference"]).double().mean())
        report["frames"][os.path.basename(path)] = rec
        print(f"{os.path.basename(path)}: " + ", ".join(f"{k} {v:.3g}" for k, v in rec.items()))
    write_json_atomic(os.path.join(args.out, "semantics.json"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
