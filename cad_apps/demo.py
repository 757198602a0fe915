"""``cad-spconv demo``: DeepLabV3-ResNet101 with content-adaptive downsampling on one image.

Converts torchvision's DeepLabV3-ResNet101 (output stride 8; random weights unless
``--checkpoint``) so that ``layer3`` adapts from stride 8 to 16 (Hesse et al., CVPRW 2023,
Sec. 4.2), computes the paper's edge masks on an image (a built-in synthetic street scene of
256x512 pixels, or ``--image``), prints per threshold the cells kept at stride 8, the sites after
the adaptive step and the multiply-adds saved against the dense stride-8 network, runs the dense
and the adaptive model once (timed, multiply-adds counted) and writes an overlay PNG.
"""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser):
    parser.add_argument("--image", help="an RGB image file (default: a synthetic street scene)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="resize to H W (default: 256 512 for the synthetic scene, the "
                             "file's own size for --image; large images take long on CPU)")
    parser.add_argument("--checkpoint", help="segmentation weights: a file (torchvision or the "
                        "paper's DeepLabV3Plus-Pytorch checkpoints) or a full torchvision weights "
                        "name in the torch cache (e.g. DeepLabV3_ResNet101_Weights.DEFAULT); "
                        "random weights without it")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.15, 0.35, 0.95],
                        help="edge thresholds to report (paper: 0.15 0.35 0.95)")
    parser.add_argument("--threshold", type=float, default=0.35,
                        help="the threshold the adaptive model is run with (default 0.35)")
    parser.add_argument("--dilation", type=int, default=11, help="mask dilation (paper: 11)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--out", default="demo_overlay.png", help="overlay PNG to write")
    parser.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    try:
        return _main(args)
    except (ValueError, OSError, KeyError) as e:
        import sys
        print(f"cad-spconv demo: error: {e}", file=sys.stderr)
        return 2


def _main(args) -> int:
    import time

    import torch

    from adapters import convert

    from cad_spconv import masks
    from .checkpoints import NAME_NEEDS_FULL_NAME, build_segmentation_model
    from .data import colorize, denormalize, normalize
    from .eval import dense_macs
    from .eval.segmenter import num_classes_of
    from cad_spconv.macs import MacCounter
    from cad_spconv.plan import LevelPlan

    from .distributed import resolve_device
    from .io import check_output_path

    device = torch.device(resolve_device(args.device))
    if args.size is not None and min(args.size) < 16:
        raise ValueError(f"--size {args.size[0]} {args.size[1]}: both sides must be at least 16 "
                         "pixels (two cells at stride 8)")
    check_output_path(args.out, suffix=".png")
    from .eval.config import check_mask_value

    for t in args.thresholds:  # as eval checks --mask edge:T
        check_mask_value(t, f"--thresholds {t:g}")
    check_mask_value(args.threshold, f"--threshold {args.threshold:g}")
    torch.manual_seed(args.seed)
    image, source = load_image(args.image, args.size, args.seed)
    x = normalize(image)[None].to(device)
    H, W = x.shape[-2:]
    # the model the checkpoint holds (DeepLabV3-ResNet-101 without one), at output stride 8
    # whatever stride it was trained at: the dense network the adaptive one is compared with
    model, info = build_segmentation_model(None, args.checkpoint, output_stride=8,
                                           name_fix=NAME_NEEDS_FULL_NAME)
    name = info.model if info is not None and info.model else "deeplabv3_resnet101"
    if args.checkpoint is None:
        weights = "random weights (pass --checkpoint for trained ones: predictions are noise, " \
                  "sites and multiply-adds are exact either way)"
    else:
        weights = f"weights from {info.source}"
    model = model.to(device).eval()
    # the demo reads only "out": an auxiliary head (torchvision's trained weights have one)
    # would cost multiply-adds that the dense baselines below leave out
    model.aux_classifier = None
    cad = convert(model, finest_stride=8, coarsest_stride=16).eval()
    print(f"{name}, {weights}")
    print(f"image: {source}, {H}x{W}; adaptive downsampling 8 -> 16 in layer3, edge masks "
          f"dilated {args.dilation}x{args.dilation}")

    # Multiply-adds of a plan, exactly, without running the model: with one adaptive step every
    # converted layer runs either before it (H0*W0 sites, fixed) or after it (the plan's sites),
    # so the count is affine in the sites after the step; both ends are the dense networks
    # (all kept = stride 8; none kept = stride-16 backbone with the head at stride 8).
    classes = num_classes_of(model)
    fine, coarse = dense_macs(name, 8, (H, W), classes), dense_macs(name, 16, (H, W), classes)
    H0, W0 = -(-H // 8), -(-W // 8)
    n_fine, n_coarse = H0 * W0, (-(-H0 // 2)) * (-(-W0 // 2))
    macs_all = fine["total"]
    macs_none = coarse["parts"]["backbone"] + fine["parts"]["classifier"]

    if n_fine == n_coarse:
        raise ValueError(f"the image ({H}x{W}) is too small: it needs more than one cell at stride 16")
    per_site, rest = divmod(macs_all - macs_none, n_fine - n_coarse)
    assert rest == 0, "the layers after the adaptive step cost a whole number per site"

    def macs_of(plan):
        return macs_none + per_site * (plan.num_sites(1) - n_coarse)

    print(f"\nfinest grid {H0}x{W0} = {n_fine} sites at stride 8, {n_coarse} at stride 16; "
          f"dense stride 8: {macs_all / 1e9:.1f} GMA, dense stride 16 network: "
          f"{coarse['total'] / 1e9:.1f} GMA")
    print(f"{'threshold':>9} {'kept at stride 8':>17} {'sites after step':>17} {'multiply-adds':>14} "
          f"{'saved vs stride 8':>18}")
    plans = {}
    for t in args.thresholds:
        keep = masks.edge(x, t, args.dilation)
        plan = LevelPlan.from_keep(keep, (H0, W0), 1)
        plans[t] = plan
        kept = float(plan.level_fractions()[0, 0])
        m = macs_of(plan)
        print(f"{t:>9g} {kept:>17.1%} {plan.num_sites(1):>17d} {m / 1e9:>11.1f} G "
              f"{1 - m / macs_all:>18.1%}")

    keep = masks.edge(x, args.threshold, args.dilation)
    with torch.no_grad():
        # the counted runs are the warm-ups (a cold run of either pays one-off costs; CAD's
        # first also builds its rulebooks); then one timed run each: a glimpse, not a benchmark
        with MacCounter(cad, 1) as counter:
            cad_out = cad(x, keep)["out"]
        dense_out = model(x)["out"]
        t0 = time.perf_counter()
        model(x)
        t_dense = _synced(t0, device)
        t0 = time.perf_counter()
        cad(x, keep)
        t_cad = _synced(t0, device)
    counted = counter.result()["total"]
    plan = cad.last_plan
    predicted = macs_of(plan)
    if counted != predicted:
        raise AssertionError(f"counted {counted} multiply-adds, the plan predicts {predicted}")
    agree = float((dense_out.argmax(1) == cad_out.argmax(1)).double().mean())
    print(f"\nthreshold {args.threshold:g} on {device}: dense stride 8 {t_dense:.2f} s, adaptive "
          f"{t_cad:.2f} s (one warm run each, not a benchmark: see `cad-spconv bench`); counted "
          f"{counted / 1e9:.2f} GMA, as the plan predicts; {agree:.1%} of pixels get the dense "
          "stride-8 class")

    _write_overlay(args.out, denormalize(x[0]).permute(1, 2, 0).cpu().numpy(), plans,
                   colorize(cad_out.argmax(1)[0].cpu()), args.threshold)
    print(f"wrote {args.out} (tinted: cells kept at stride 8)")
    return 0


def _synced(t0: float, device) -> float:
    import time

    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def load_image(path, size, seed):
    """uint8 ``[3, H, W]`` and a description."""
    import os

    import numpy as np
    import torch
    from PIL import Image
    from .data import read_image
    if path is None:
        H, W = size or (256, 512)
        return synthetic_street(H, W, seed), f"synthetic street scene (seed {seed})"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--image {path}: no such file")
    arr = read_image(path, "RGB")
    if size is not None:
        arr = np.asarray(Image.fromarray(arr).resize((size[1], size[0]), Image.BILINEAR))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1), path


def synthetic_street(H: int, W: int, seed: int = 0):
    """uint8 ``[3, H, W]``: a street-like scene drawn in the Cityscapes colours (the same
    generator as the test fixture), flat regions and sharp object boundaries."""
    import numpy as np
    import torch

    from .data import _classes, _street_scene
    rng = np.random.default_rng(seed)
    labels = _street_scene(rng, H, W)
    palette = np.zeros((256, 3), dtype=np.int16)
    for c in _classes():
        if c.id >= 0:
            palette[c.id] = c.color
    rgb = np.clip(palette[labels] + rng.integers(-3, 4, size=(H, W, 3)), 0, 255).astype(np.uint8)
    return torch.from_numpy(rgb).permute(2, 0, 1)


def _write_overlay(path, image, plans, prediction, chosen):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    H, W = image.shape[:2]
    panels = [("image", image)]
    for t, plan in plans.items():
        kept = np.kron(plan.levels[0].cpu().numpy() == 0, np.ones((8, 8), dtype=bool))[:H, :W]
        shade = image.copy()
        shade[kept] = 0.45 * shade[kept] + 0.55 * np.array([1.0, 0.15, 0.1])
        shade[~kept] = 0.35 + 0.65 * shade[~kept]
        frac = float(plan.level_fractions()[0, 0])
        panels.append((f"edge {t:g}: {frac:.0%} at stride 8", shade))
    panels.append((f"adaptive prediction (edge {chosen:g})", prediction / 255.0))
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, rows * 4 * H / W + 0.6), dpi=110,
                             squeeze=False)
    for ax, (title, img) in zip(axes.flat, panels):
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    from .io import write_atomic
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
