"""A segmentation checkpoint for the synthetic Cityscapes folder, made on a CPU in a minute.

For demonstrating the experiment scripts without Cityscapes or trained weights only: random
weights predict noise, so every mIoU would be ~0. Here the random backbone is kept, its batch
norm statistics are recomputed on the synthetic training images (so activations are normalised)
and the last 1x1 conv of the head is fitted by logistic regression on the frozen stride-8
features. The synthetic classes have distinct colours, so this linear probe segments them and
resolution matters at object boundaries, as on real data. Nothing here reproduces the paper's
numbers; use the released checkpoints for that.

    python -m experiments.synthetic_model --data-root R --out synthetic.pth
    (make R first: python -c "from cad_apps.data import make_synthetic_cityscapes as m;
     m('R', 'train', 8, (128, 256)); m('R', 'val', 8, (128, 256), seed=1)")

Writes a checkpoint in the paper's format (``{"model_state": ...}``, head under
``classifier.classifier.``) that ``--checkpoint`` accepts.
"""
from __future__ import annotations

import argparse
import sys

from experiments.common import INPUT_ERRORS, ExperimentError, reports_errors


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--model", default="deeplabv3_resnet101")
    p.add_argument("--out", required=True, help="checkpoint to write")
    p.add_argument("--limit", type=int, default=None, help="use only the first N images")
    p.add_argument("--iterations", type=int, default=100, help="LBFGS iterations")
    p.add_argument("--seed", type=int, default=0, help="seed of the random backbone")
    return p


@reports_errors("synthetic_model")
def main(argv=None) -> int:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from cad_apps.checkpoints import build_segmentation_model
    from cad_apps.data import IGNORE_INDEX, NUM_CLASSES, CityscapesSegmentation
    from cad_apps.io import check_output_path, error_text, save_torch_atomic

    args = build_parser().parse_args(argv)
    try:  # the output and the data checked before any work
        out = check_output_path(args.out)
        ds = CityscapesSegmentation(args.data_root, args.split, limit=args.limit)
        images = [ds[i] for i in range(len(ds))]
        if len(images) < 2:
            raise ValueError("need at least 2 images (batch norm statistics of the ASPP pooling "
                             "branch, a 1x1 map, need a batch); drop --limit or add images")
        torch.manual_seed(args.seed)
        model, _ = build_segmentation_model(args.model)
    except INPUT_ERRORS as e:
        raise ExperimentError(error_text(e)) from None

    # 1. batch-norm statistics of the random network on these images (cumulative average)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    chunks = [images[i:i + 4] for i in range(0, len(images), 4)]
    if len(chunks[-1]) == 1:  # batches of >= 2 images: the ASPP pooling branch sees 1x1 maps
        chunks[-2] = chunks[-2] + chunks.pop()
    with torch.no_grad():
        for chunk in chunks:
            model(torch.stack([it["image"] for it in chunk]))
    model.eval()

    # 2. frozen head features at stride 8 (input of the last 1x1 conv), labels at cell centres
    head = model.classifier
    feats, labels = [], []
    grab = {}
    hook = head[-2].register_forward_hook(lambda mod, inp, out: grab.__setitem__("f", out))
    with torch.no_grad():
        for it in images:
            model(it["image"][None])
            f = grab["f"][0]                                  # [C, H0, W0]
            H, W = it["target"].shape
            ys = (torch.arange(f.shape[1]) * 8 + 4).clamp(max=H - 1)
            xs = (torch.arange(f.shape[2]) * 8 + 4).clamp(max=W - 1)
            t = it["target"][ys][:, xs]
            keep = t != IGNORE_INDEX
            feats.append(f.permute(1, 2, 0)[keep])
            labels.append(t[keep])
    hook.remove()
    X, y = torch.cat(feats).double(), torch.cat(labels)
    mean, std = X.mean(0), X.std(0).clamp(min=1e-6)

    # 3. multinomial logistic regression (a little weight decay), then fold the scaling in
    w = torch.zeros(NUM_CLASSES, X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(NUM_CLASSES, dtype=torch.float64, requires_grad=True)
    Xn = (X - mean) / std
    opt = torch.optim.LBFGS([w, b], max_iter=args.iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(Xn @ w.T + b, y) + 1e-4 * (w * w).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        loss = F.cross_entropy(Xn @ w.T + b, y)
        conv = head[-1]
        weight = (w / std).float()
        conv.weight.copy_(weight[:, :, None, None])
        conv.bias.copy_((b - (w / std) @ mean).float())
        acc = float(((Xn @ w.T + b).argmax(1) == y).double().mean())

    state = {("classifier.classifier." + k[len("classifier."):] if k.startswith("classifier.") else k): v
             for k, v in model.state_dict().items()}
    save_torch_atomic({"model_state": state,
                       "note": "synthetic linear probe on a random backbone"}, out)
    print(f"fitted the last layer on {len(y)} cells of {len(images)} images: loss {float(loss):.3f}, "
          f"cell accuracy {acc:.1%}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
