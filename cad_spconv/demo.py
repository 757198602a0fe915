"""``cad-spconv demo``: a toy residual CNN, dense and content-adaptive, on a synthetic image."""
from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser):
    parser.add_argument("--size", type=int, nargs=2, default=(96, 160), metavar=("H", "W"),
                        help="synthetic image size (default: 96 160)")
    parser.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    import torch
    from torch import nn

    from .nn import CADBatchNorm2d, CADConv2d, CADPointwise
    from .tensor import CADTensor

    torch.manual_seed(args.seed)
    H, W = args.size
    # a street-like synthetic image: flat sky/road with a few sharp objects
    img = torch.zeros(1, 3, H, W)
    img[:, :, H // 2:] = 0.3
    img[:, :, H // 3:H // 2 + 8, W // 5:W // 5 + 12] = 1.0
    img[:, :, H // 2:H - 10, 3 * W // 5:3 * W // 5 + 20] = 0.7
    edges = (img[:, :, 1:, 1:] - img[:, :, :-1, :-1]).abs().amax(1) > 0.1
    keep = nn.functional.pad(edges, (0, 1, 0, 1))

    stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU()).eval()
    layers = [nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
              nn.Conv2d(64, 64, 3, 1, 1), nn.BatchNorm2d(64), nn.ReLU()]
    dense = nn.Sequential(*layers).eval()
    cad = nn.Sequential(*[CADConv2d.from_module(m) if isinstance(m, nn.Conv2d) else
                          CADBatchNorm2d.from_module(m) if isinstance(m, nn.BatchNorm2d) else
                          CADPointwise(m) for m in layers]).eval()
    with torch.no_grad():
        feats = stem(img)
        x = CADTensor.from_dense(feats, keep[:, None], num_levels=1)
        y = cad(x)
        ref = dense(feats)
    H0, W0 = feats.shape[-2:]
    macs_cad = sum(m.macs_per_site * n for m, n in _sites_per_conv(cad, x))
    macs_fine = sum(m.macs_per_site for m in cad if isinstance(m, CADConv2d)) * H0 * W0
    macs_coarse = sum(m.macs_per_site for m in cad if isinstance(m, CADConv2d)) * ref.shape[-1] * ref.shape[-2]
    kept = x.plan.level_fractions()[0, 0].item()
    guarantee = (y.dense("step") - ref).abs().max().item()
    print(f"image {H}x{W}, finest grid {H0}x{W0} (stride 8), coarsest stride 16")
    print(f"cells kept at stride 8: {kept:.1%}; sites after the adaptive step: {y.num_sites} "
          f"(dense stride 8: {H0 * W0}, stride 16: {ref.shape[-2] * ref.shape[-1]})")
    print(f"multiply-adds of the adaptive part: CAD {macs_cad:,} | dense stride 8 {macs_fine:,} | "
          f"dense stride 16 {macs_coarse:,} ({macs_cad / macs_fine:.1%} of stride 8)")
    print(f"guarantee 2 check (CAD at coarse sites vs dense stride 16): max |diff| = {guarantee:.2e}")
    return 0


def _sites_per_conv(model, x):
    out = []
    for m in model:
        x = m(x)
        if isinstance(m, type(model[0])):
            out.append((m, x.num_sites))
    return out
