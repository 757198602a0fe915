"""Mask overlays (paper Fig. 3): where each mask keeps the finest resolution, on a few images.

For every image and mask setting the converted model is run once and its level plan is drawn
over the image: tinted cells stay at the finest stride (8), the rest is merged into coarse sites
(16). Edge, random and inverted masks, the oracle (needs the ground truth) and learned masks
(``learned:PATH``) all work.

    python -m experiments.overlays --data-root R --checkpoint P --out runs/overlays \\
        --masks edge:0.15 edge:0.35 edge:0.95 oracle

Writes ``<out>/overlays.png`` (rows: images, columns: the image and one overlay per mask) and
``<out>/overlays.json`` (fractions of cells per level, per image and mask).
"""
from __future__ import annotations

import dataclasses
import os
import sys

from experiments.common import (INPUT_ERRORS, ExperimentError, _pyplot, base_parser, check_mask,
                                provenance, reports_errors)


def build_parser():
    p = base_parser(__doc__.split("\n\n")[0], "overlays", evaluates=False)
    p.add_argument("--masks", nargs="+", default=["edge:0.15", "edge:0.35", "edge:0.95", "oracle"])
    p.add_argument("--num-images", type=int, default=3)
    p.set_defaults(timing=False)
    return p


@reports_errors("overlays")
def main(argv=None) -> int:
    import numpy as np
    import torch

    from cad_apps.checkpoints import build_segmentation_model
    from cad_apps.data import CityscapesSegmentation, collate, denormalize
    from cad_apps.distributed import resolve_device
    from cad_apps.eval import Segmenter, config_from_args
    from cad_apps.io import check_output_path, error_text, write_json_atomic

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.limit is not None:
        parser.error("--limit does not apply: overlays draws the first --num-images images")
    if args.num_images < 1:
        parser.error(f"--num-images must be >= 1, got {args.num_images}")
    for m in args.masks:  # everything checked before the model is built
        check_mask("--masks", m)
    try:
        # the shared options under a mask every setting allows, then each mask with them
        base = dataclasses.replace(config_from_args(args), out="", mask="none").check()
        for m in args.masks:
            dataclasses.replace(base, mask=m).check()
        device = resolve_device(base.device)
        check_output_path(args.out, folder=True)
        dataset = CityscapesSegmentation(args.data_root, args.split, limit=args.num_images)
        batch = collate([dataset[i] for i in range(len(dataset))])
    except INPUT_ERRORS as e:
        raise ExperimentError(error_text(e)) from None
    torch.manual_seed(base.seed)  # the same random weights as `cad-spconv eval` builds
    try:
        model, _ = build_segmentation_model(args.model, args.checkpoint)
    except INPUT_ERRORS as e:
        raise ExperimentError(error_text(e)) from None
    levels = {}
    report = {"experiment": "overlays", **provenance(args, device), "images": dataset.ids,
              "masks": {}}
    for mask in args.masks:
        maps, fractions = [], []
        try:
            seg = Segmenter(dataclasses.replace(base, mask=mask), device, model=model)
            for i in range(len(dataset)):  # one image at a time: Cityscapes frames are large
                seg.warm_up(batch["image"][i:i + 1], batch["target"][i:i + 1],
                            batch["id"][i:i + 1])
                maps.append(seg.cad.last_plan.levels[0].cpu())
                fractions.append(seg.cad.last_plan.level_fractions()[0].cpu())
        except INPUT_ERRORS as e:
            raise ExperimentError(f"--masks {mask}: {error_text(e)}") from None
        levels[mask] = torch.stack(maps)
        fractions = torch.stack(fractions)
        report["masks"][mask] = {"level_fractions": fractions.tolist(),
                                 "level0_share_mean": float(fractions[:, 0].mean())}
    write_json_atomic(os.path.join(args.out, "overlays.json"), report)

    plt = _pyplot()
    n, m = len(dataset), len(args.masks)
    fig, axes = plt.subplots(n, m + 1, figsize=(2.6 * (m + 1), 1.5 * n + 0.4), dpi=150,
                             squeeze=False)
    for i in range(n):
        img = denormalize(batch["image"][i]).permute(1, 2, 0).numpy()
        H, W = img.shape[:2]
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(dataset.ids[i].split("/")[-1], fontsize=6)
        for j, mask in enumerate(args.masks):
            lv = levels[mask][i].numpy()
            cell = args.finest_stride
            kept = np.kron(lv == 0, np.ones((cell, cell), dtype=bool))[:H, :W]
            shade = img.copy()
            shade[kept] = 0.45 * shade[kept] + 0.55 * np.array([1.0, 0.15, 0.1])
            shade[~kept] = 0.35 + 0.65 * shade[~kept]  # merged (coarse) regions bright
            axes[i, j + 1].imshow(shade)
            frac = report["masks"][mask]["level_fractions"][i][0]
            axes[i, j + 1].set_title(f"{mask}: {frac:.0%} at stride {cell}", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    if args.title:
        fig.suptitle(args.title, fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "overlays.png"))
    plt.close(fig)
    for mask, r in report["masks"].items():
        print(f"{mask:>20}: {r['level0_share_mean']:.1%} of cells at the finest resolution "
              f"(stride {args.finest_stride})")
    print(f"wrote {os.path.join(args.out, 'overlays.png')} and overlays.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
