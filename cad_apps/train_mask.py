"""``cad-spconv train-mask``: train the learned mask estimator with the paper's recipe.

Hesse et al., CVPRW 2023, Sec. 3 / supplement C.2 and the reference code: a torchvision
segmentation model (DeepLabV3 + ResNet, head at stride 8) and the shallow
:class:`~cad_spconv.learned_mask.MaskEstimator` are trained end to end on the blend of a dense
stride-8 path and a dense stride-16 path (shared weights) with the hard Gumbel mask; loss
``task_weight * CE + budget_weight * (rho - rho_hat)^2``; SGD (momentum 0.9), poly schedule,
learning rates ``lr`` for the head, ``0.1 lr`` for the backbone, ``0.01 lr`` for the estimator.
Evaluation is ``cad-spconv eval`` on the validation split: the converted (*sparse*) network with
the estimator's argmax mask, reporting mIoU, kept fraction and exact multiply-adds.

Plain loops (no ``torch.distributed``); every iteration's batch, augmentation and Gumbel noise
derive from ``(seed, iteration)``, so a resumed run (``--resume``) continues exactly where the
checkpoint (written atomically: temporary file + ``os.replace``) left off.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from .data import NUM_CLASSES  # the Cityscapes trainIds, which training and evaluation read
from .io import save_torch_atomic, settings_difference, write_json_atomic

TINY = "fcn_tiny"  # a smoke-test model with random weights
CHECKPOINT = "last.pt"
HISTORY = "history.json"


class DivergedError(RuntimeError):
    """The training loss (or the weights) stopped being finite: the run diverged."""


@dataclass
class TrainConfig:
    """Hyper-parameters; the defaults are the reference code's (Cityscapes, 768 crops)."""

    iters: int = 30000
    batch_size: int = 8
    crop_size: int = 768
    lr: float = 0.1
    backbone_lr_mult: float = 0.1
    estimator_lr_mult: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    bn_momentum: float = 0.01          # backbone batch norms, as the reference
    separate_statistics: bool = True   # the two paths keep their own BN running statistics
    rho: float = 0.5
    tau: float = 1.0
    task_weight: float = 1.0
    budget_weight: float = 1.0
    freeze_model: bool = False
    scale_range: tuple = (1.0, 1.0)    # the reference does not rescale Cityscapes
    color_jitter: float = 0.5          # brightness, contrast, saturation (torchvision ColorJitter)
    hflip: bool = True
    seed: int = 0
    save_every: int = 500
    ignore_index: int = 255
    workers: int = 0

    def check(self):
        # messages name the command's options: most users meet these through train-mask
        if self.iters < 0 or self.batch_size < 1 or self.crop_size < 1:
            raise ValueError(f"--iters >= 0, --batch-size >= 1 and --crop-size >= 1 are "
                             f"required, got {self.iters}, {self.batch_size} and "
                             f"{self.crop_size}")
        if self.workers < 0:  # torch says num_workers, and only once OUT was cleared
            raise ValueError(f"--workers must be >= 0 (0 loads the data in the main process), "
                             f"got {self.workers}")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"--rho (target fraction of low-resolution cells) must lie in "
                             f"[0, 1], got {self.rho}")
        if not self.tau > 0:  # NaN too
            raise ValueError(f"--tau must be > 0, got {self.tau}")
        for name in ("lr", "backbone_lr_mult", "estimator_lr_mult", "momentum", "weight_decay",
                     "task_weight", "budget_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):  # NaN / Inf train NaN weights
                flag = name if name == "momentum" else "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (lo, hi) with 0 < lo <= hi, got {self.scale_range}")
        if not 0 <= self.color_jitter < 1:
            raise ValueError(f"--color-jitter must lie in [0, 1), got {self.color_jitter}")
        if not 0 < self.bn_momentum <= 1:
            raise ValueError(f"bn_momentum must lie in (0, 1], got {self.bn_momentum}")
        if self.save_every < 0:
            raise ValueError(f"--save-every must be >= 0 (0: only at the end), got "
                             f"{self.save_every}")


# DeepLabV3's ASPP pooling branch batch-normalises one pooled value per channel and image: torch
# refuses that in training for a batch of 1 ("Expected more than 1 value per channel")
POOLING_BATCH = ("DeepLabV3's ASPP pooling branch batch-normalises one value per channel and "
                 "image, which cannot be trained on a batch of 1: use --batch-size 2 or more, or "
                 "--freeze-model (only the estimator is trained; the model stays in eval mode)")


def _pooling_batch_problem(model_name: str, config: TrainConfig) -> Optional[str]:
    if model_name.startswith("deeplabv3") and config.batch_size < 2 and not config.freeze_model:
        return f"--model {model_name} with --batch-size {config.batch_size}: {POOLING_BATCH}"
    return None


# ---------------------------------------------------------------------------------- data
def _image_target(item):
    """``(image, target)`` of a dataset item: a dict with ``"image"`` / ``"target"``
    (:class:`cad_apps.data.CityscapesSegmentation`) or a tuple ``(image, target, ...)``."""
    if isinstance(item, dict):
        return item["image"], item["target"]
    return item[0], item[1]


def _iteration_seed(seed: int, iteration: int, stream: int) -> int:
    return (seed * 1_000_003 + iteration * 7919 + stream) % (2 ** 63)


class _BatchPlan:
    """Batch ``i`` of the run: images drawn epoch by epoch from seeded permutations, random
    scale / crop / flip from a per-iteration generator. Indexable, so a ``DataLoader`` with
    workers yields the same batches as a plain loop, and a resumed run the same as a fresh one."""

    def __init__(self, dataset, config: TrainConfig):
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError("the training set must support len() and indexing "
                            "(a map-style dataset yielding (image, target, name))")
        if len(dataset) == 0:
            raise ValueError("the training set is empty")
        self.dataset = dataset
        self.config = config

    def __len__(self):
        return self.config.iters

    def _index(self, position: int) -> int:
        import torch

        n = len(self.dataset)
        epoch, offset = divmod(position, n)
        g = torch.Generator().manual_seed(_iteration_seed(self.config.seed, epoch, 1))
        return int(torch.randperm(n, generator=g)[offset])

    def __getitem__(self, iteration: int):
        import torch

        c = self.config
        g = torch.Generator().manual_seed(_iteration_seed(c.seed, iteration, 2))
        images, targets = [], []
        for j in range(c.batch_size):
            image, target = _image_target(self.dataset[self._index(iteration * c.batch_size + j)])
            image, target = _augment(image, target, c, g)
            images.append(image)
            targets.append(target)
        return torch.stack(images), torch.stack(targets)


def _color_jitter(image, strength: float, g):
    """torchvision's ``ColorJitter(strength, strength, strength)`` on an ImageNet-normalised
    image: brightness, contrast and saturation factors uniform in ``[1 - s, 1 + s]``, applied in
    a random order, on the [0, 1] image; the random numbers come from ``g``."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    from cad_spconv.images import IMAGENET_MEAN, IMAGENET_STD
    mean = image.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (image * std + mean).clamp(0, 1)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    factors = 1 - strength + 2 * strength * torch.rand(3, generator=g)
    for i in torch.randperm(3, generator=g).tolist():
        rgb = ops[i](rgb, float(factors[i]))
    return (rgb - mean) / std


def _augment(image, target, c: TrainConfig, g):
    """Colour jitter, random scale (bilinear / nearest), random crop with padding (0 / ignore),
    flip."""
    import torch
    import torch.nn.functional as F

    if image.dim() != 3 or target.dim() != 2 or image.shape[-2:] != target.shape:
        raise ValueError(f"expected image [3, H, W] and target [H, W] of the same size, got "
                         f"{tuple(image.shape)} and {tuple(target.shape)}")
    if c.color_jitter:
        image = _color_jitter(image, c.color_jitter, g)
    lo, hi = c.scale_range
    s = lo + (hi - lo) * float(torch.rand((), generator=g))
    H, W = target.shape
    h, w = max(1, round(H * s)), max(1, round(W * s))
    if (h, w) != (H, W):
        image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        target = F.interpolate(target[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    ph, pw = max(0, c.crop_size - h), max(0, c.crop_size - w)
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph))
        target = F.pad(target, (0, pw, 0, ph), value=c.ignore_index)
    h, w = target.shape
    y = int(torch.randint(h - c.crop_size + 1, (), generator=g))
    x = int(torch.randint(w - c.crop_size + 1, (), generator=g))
    image = image[:, y:y + c.crop_size, x:x + c.crop_size]
    target = target[y:y + c.crop_size, x:x + c.crop_size]
    if c.hflip and float(torch.rand((), generator=g)) < 0.5:
        image, target = image.flip(-1), target.flip(-1)
    return image.contiguous(), target.contiguous()


# ---------------------------------------------------------------------------------- checkpoints
# ---------------------------------------------------------------------------------- training
def _param_groups(blended, config: TrainConfig):
    model, estimator = blended.model, blended.estimator
    groups = [{"params": list(estimator.parameters()), "lr": config.lr * config.estimator_lr_mult,
               "lr_mult": config.estimator_lr_mult}]
    if not config.freeze_model:  # the auxiliary head, if any, is not used: not trained
        head = [p for n, p in model.named_parameters()
                if not n.startswith(("backbone.", "aux_classifier."))]
        groups += [
            {"params": list(model.backbone.parameters()), "lr": config.lr * config.backbone_lr_mult,
             "lr_mult": config.backbone_lr_mult},
            {"params": head, "lr": config.lr, "lr_mult": 1.0},
        ]
    return groups


def train(blended, dataset, config: TrainConfig, out_dir: Optional[str] = None,
          resume: bool = False, device="cpu", progress: bool = True,
          meta: Optional[dict] = None) -> list:
    """Train ``blended`` (a :class:`~cad_apps.blended.BlendedSegmenter`) on ``dataset``
    (map-style; items ``{"image": [3,H,W] normalised, "target": [H,W] int64, ...}`` as
    :class:`cad_apps.data.CityscapesSegmentation` yields, or ``(image, target, ...)``).

    With ``out_dir`` a checkpoint ``last.pt`` is written atomically every ``save_every``
    iterations and at the end, in the layout of the paper's published learned-mask checkpoint
    (``model_state``, ``optimizer_state``, ``scheduler_state``, ``cur_itrs``; plus ``history``,
    ``config`` and ``meta``), so ``cad-spconv eval --checkpoint last.pt --mask learned`` runs it;
    ``history.json`` next to it. ``resume=True`` continues from ``out_dir/last.pt`` and refuses
    a checkpoint written with other settings (``config`` or ``meta``), naming them. Returns the
    history: one dict per iteration (``iteration``, ``loss``, ``task_loss``, ``budget_loss``,
    ``rho_hat``, ``lr``). A non-finite loss raises :class:`DivergedError` at that step (its
    update is never saved), and non-finite weights before a save: the last save and its history
    stay as they were.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from cad_spconv.learned_mask import budget_loss

    from .blended import load_reference_state, reference_state

    config.check()
    from torchvision.models.segmentation.deeplabv3 import ASPPPooling

    if config.batch_size < 2 and not config.freeze_model and any(
            isinstance(m, ASPPPooling) for m in blended.modules()):
        raise ValueError(f"batch_size {config.batch_size}: {POOLING_BATCH}")
    device = torch.device(device)
    blended.to(device)
    for m in blended.model.backbone.modules():  # both paths: low_res shares these or copies
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = config.bn_momentum
    for m in blended.low_res.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = config.bn_momentum
    if config.freeze_model:
        blended.model.eval()
        blended.low_res.eval()
        blended.model.requires_grad_(False)
    else:
        blended.model.train()
        blended.low_res.train()
    blended.estimator.train()
    optimizer = torch.optim.SGD(_param_groups(blended, config), lr=config.lr,
                                momentum=config.momentum, weight_decay=config.weight_decay)
    start, history = 0, []
    ckpt_path = os.path.join(out_dir, CHECKPOINT) if out_dir else None
    settings = {"config": asdict(config), "meta": meta or {}}
    if resume:
        if not ckpt_path or not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}; start without "
                                    "--resume or point --out at the run's folder")
        from .checkpoints import CheckpointError, load_weights_only

        state = load_weights_only(ckpt_path)
        if not isinstance(state, dict) or not {"config", "model_state", "optimizer_state",
                                                "cur_itrs", "history"} <= set(state) or not (
                isinstance(state["model_state"], dict)
                and isinstance(state["optimizer_state"], dict)):
            raise CheckpointError(f"--resume: {ckpt_path} is not a train-mask checkpoint (no "
                                  "config, weights, optimizer and history); start over with "
                                  "--overwrite or point --out at a train-mask run")
        _check_same_settings(ckpt_path, {"config": state.get("config", {}),
                                         "meta": state.get("meta", {})}, settings)
        from .checkpoints import CheckpointMismatchError

        again = ("start over with --overwrite, or point --out at the run of this model and "
                 "these weights")
        try:
            load_reference_state(blended, state["model_state"], source=f"--resume: {ckpt_path}")
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(f"{e}\n  {again}") from None
        try:
            optimizer.load_state_dict(state["optimizer_state"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"--resume: the optimizer state in {ckpt_path} does not match the parameters "
                f"trained now ({type(e).__name__}: {e}); it was written for another model or "
                f"another --freeze-model setting (or by an earlier train-mask that kept an "
                f"auxiliary head's parameters in the optimizer); {again}") from None
        start, history = int(state["cur_itrs"]), list(state["history"])
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)

    saved = {"iteration": start if resume else None}
    # a run started over (--overwrite) replaces the old checkpoint only at its first save
    old_run = not resume and bool(ckpt_path) and os.path.exists(ckpt_path)

    def diverged(what: str, iteration: int):
        fix = f"start again with a lower --lr (now {config.lr:g})"
        if saved["iteration"] is None:
            kept = "nothing was saved"
            if old_run:
                kept += f" ({ckpt_path} still holds the run started over)"
                fix += " and --overwrite"
        else:  # a resume would refuse the new --lr: the run starts over
            kept = f"{ckpt_path} still holds iteration {saved['iteration']}"
            fix += " and --overwrite"
        return DivergedError(f"training diverged: {what} at iteration {iteration}; {kept}; "
                             f"{fix}")

    def checkpoint(iteration: int):
        if not out_dir:
            return
        model_state = reference_state(blended)
        bad = [k for k, v in model_state.items()
               if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # the last step's update was not finite: never save such weights
            raise diverged(f"{len(bad)} weight tensors are not finite (e.g. {bad[0]})", iteration)
        save_torch_atomic({"cur_itrs": iteration, "model_state": model_state,
                           "optimizer_state": optimizer.state_dict(),
                           "scheduler_state": {"last_epoch": iteration}, "history": history,
                           **settings}, ckpt_path)
        write_json_atomic(os.path.join(out_dir, HISTORY), history, compact_depth=1)
        saved["iteration"] = iteration

    plan = _BatchPlan(dataset, config)
    loader = torch.utils.data.DataLoader(
        plan, batch_size=None, sampler=range(start, config.iters), num_workers=config.workers)
    bar = tqdm(loader, total=config.iters, initial=start, disable=not progress,
               desc="train-mask", dynamic_ncols=True)
    iteration = start
    for images, targets in bar:
        lr = config.lr * (1 - iteration / config.iters) ** 0.9  # poly schedule, as the reference
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        images, targets = images.to(device), targets.to(device)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_iteration_seed(config.seed, iteration, 3))  # Gumbel noise
            out = blended(images, config.tau)
        task = F.cross_entropy(out["out"], targets, ignore_index=config.ignore_index)
        budget = budget_loss(out["rate_sample"], config.rho)
        loss = config.task_weight * task + config.budget_weight * budget
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1
        record = {"iteration": iteration, "loss": loss.item(), "task_loss": task.item(),
                  "budget_loss": budget.item(), "rho_hat": out["rho_hat"].item(), "lr": lr}
        # checked at the step's one sync (.item()): its update is never saved, as the raise
        # comes before any save and a save refuses non-finite weights anyway
        if not math.isfinite(record["loss"]):
            bar.close()
            raise diverged(f"the loss is {record['loss']} (task {record['task_loss']}, budget "
                           f"{record['budget_loss']})", iteration)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", rho_hat=f"{record['rho_hat']:.2f}")
        if config.save_every and iteration % config.save_every == 0 and iteration < config.iters:
            checkpoint(iteration)
    bar.close()
    checkpoint(iteration)
    return history


# meta keys train-mask records the data by: its images by name, wherever the folder is (a
# copy on node-local scratch, a symlink or a moved folder is the same data); data_root is
# recorded for reading only
DATA_KEYS = ("train_images", "train_ids_sha256")


def _check_same_settings(path: str, stored: dict, now: dict) -> None:
    """Refuse to resume a run written with other settings or on other data, naming them (the
    number of data loader workers and the checkpoint interval do not change results, nor does
    where the data folder is: the data are known by their images' names)."""
    free = ("workers", "save_every", "data_root")
    # runs written before the data were recorded lack DATA_KEYS in their meta: they resume as
    # before (unchecked); their next save records the data
    recorded = stored.get("meta", {})
    unrecorded = {k for k in DATA_KEYS if k not in recorded}
    shown = ", ".join(d for d in (
        settings_difference({k: v for k, v in stored.get(g, {}).items() if k not in free},
                            {k: v for k, v in now.get(g, {}).items() if k not in free
                             and not (g == "meta" and k in unrecorded)},
                            "in the checkpoint") for g in ("config", "meta")) if d)
    if shown:
        raise ValueError(f"--resume: {path} was written with other settings ({shown}); resume "
                         "with the same settings and data, or start a new run in another --out (or "
                         "--overwrite this one)")


# ---------------------------------------------------------------------------------- models
def build_model(name: str, num_classes: int, weights=None):
    """A torchvision segmentation model at output stride 8 (head built for stride 8, as
    torchvision's DeepLabV3 / FCN), weights loaded through
    :func:`cad_apps.checkpoints.build_segmentation_model` (torchvision files, the paper's
    checkpoints, plain state dicts; random without ``weights``). ``fcn_tiny`` (random weights
    only) is an FCN on a narrow ResNet of torchvision ``BasicBlock``s (widths 16/32/64/64, one
    block per stage) for smoke tests."""
    from torch import nn
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.resnet import BasicBlock
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    from adapters.output_stride import set_output_stride

    if name == TINY:
        if weights is not None:
            raise ValueError("fcn_tiny is a smoke-test model with random weights only")
        widths, layers, inplanes = (16, 32, 64, 64), {}, 16
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                     nn.BatchNorm2d(planes))
            layers[f"layer{i + 1}"] = nn.Sequential(BasicBlock(inplanes, planes, stride, down))
            inplanes = planes
        trunk = nn.Sequential()
        trunk.add_module("conv1", nn.Conv2d(3, 16, 7, 2, 3, bias=False))
        trunk.add_module("bn1", nn.BatchNorm2d(16))
        trunk.add_module("relu", nn.ReLU(inplace=True))
        trunk.add_module("maxpool", nn.MaxPool2d(3, 2, 1))
        for k, v in layers.items():
            trunk.add_module(k, v)
        backbone = IntermediateLayerGetter(trunk, return_layers={"layer4": "out"})
        set_output_stride(backbone, 8)
        return FCN(backbone, FCNHead(inplanes, num_classes), None)
    from .checkpoints import build_segmentation_model

    return build_segmentation_model(name, weights, num_classes)[0]


def feature_channels(model, finest_stride: int) -> int:
    """Channels of the feature map entering the first adaptive step (a tiny probe forward)."""
    import torch

    from .blended import features_before_adaptive

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            probe = torch.zeros(1, 3, 4 * finest_stride, 4 * finest_stride)
            return int(features_before_adaptive(model, probe, finest_stride).shape[1])
    finally:
        model.train(was)


# ---------------------------------------------------------------------------------- CLI
def trainable_models() -> tuple:
    """The ``--model`` choices: the segmentation models whose head reads only the last backbone
    layer (DeepLabV3, FCN), which the two-path blend feeds, and ``fcn_tiny``."""
    from adapters.builders import SEGMENTATION_MODELS

    return tuple(m for m in SEGMENTATION_MODELS if not m.startswith("deeplabv3plus")) + (TINY,)


def _model_name(name: str) -> str:
    if name.startswith("deeplabv3plus"):
        raise argparse.ArgumentTypeError(
            f"{name}: two-path training supports DeepLabV3 and FCN only (it blends the last "
            "backbone layer's stride-8 and stride-16 features before the head; DeepLabV3+'s "
            "decoder also needs the low-level layer1 features); choose one of "
            + ", ".join(trainable_models()))
    return name


def configure(parser: argparse.ArgumentParser):
    d = TrainConfig()
    data = parser.add_argument_group("data")
    data.add_argument("--data-root", help="Cityscapes root (leftImg8bit/, gtFine/)")
    data.add_argument("--synthetic", action="store_true",
                      help="train and evaluate on a tiny synthetic Cityscapes written to OUT/synthetic")
    data.add_argument("--crop-size", type=int, default=d.crop_size)
    data.add_argument("--eval-images", type=int, default=None,
                      help="evaluate on the first N (>= 1) validation images only (--no-eval: "
                           "no evaluation)")
    m = parser.add_argument_group("model")
    m.add_argument("--model", type=_model_name, choices=trainable_models(),
                   default="deeplabv3_resnet101",
                   help="DeepLabV3 or FCN (DeepLabV3+ cannot be trained in two paths: its "
                        "decoder needs low-level features)")
    m.add_argument("--num-classes", type=int, default=NUM_CLASSES,
                   help=f"must be {NUM_CLASSES}, the Cityscapes trainIds (the only choice; "
                        "--weights must predict them too)")
    m.add_argument("--weights", help="segmentation weights: a checkpoint file (torchvision, the "
                   "paper's code, a state dict) or a torchvision weights name from the hub cache")
    m.add_argument("--estimator-weights",
                   help="initial estimator: a train-mask checkpoint or a reference-code checkpoint")
    m.add_argument("--finest-stride", type=int, default=8)
    m.add_argument("--coarsest-stride", type=int, default=16)
    t = parser.add_argument_group("training (defaults: the reference code)")
    t.add_argument("--iters", type=int, default=d.iters)
    t.add_argument("--batch-size", type=int, default=d.batch_size)
    t.add_argument("--lr", type=float, default=d.lr, help="head learning rate")
    t.add_argument("--backbone-lr-mult", type=float, default=d.backbone_lr_mult)
    t.add_argument("--estimator-lr-mult", type=float, default=d.estimator_lr_mult)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--rho", type=float, default=d.rho,
                   help="target fraction of low-resolution cells (paper: 0.5)")
    t.add_argument("--tau", type=float, default=d.tau, help="Gumbel-Softmax temperature")
    t.add_argument("--task-weight", type=float, default=d.task_weight)
    t.add_argument("--budget-weight", type=float, default=d.budget_weight)
    t.add_argument("--freeze-model", action="store_true",
                   help="train the estimator only (model frozen, in eval mode)")
    t.add_argument("--color-jitter", type=float, default=d.color_jitter,
                   help="brightness / contrast / saturation jitter (reference: 0.5; 0 = off)")
    t.add_argument("--shared-statistics", dest="separate_statistics", action="store_false",
                   help="one set of batch-norm running statistics for both paths (the "
                        "reference keeps two)")
    t.add_argument("--workers", type=int, default=d.workers)
    t.add_argument("--seed", type=int, default=d.seed)
    o = parser.add_argument_group("output")
    o.add_argument("--out", required=True, help="run folder: checkpoints, history, evaluation")
    o.add_argument("--save-every", type=int, default=d.save_every)
    o.add_argument("--resume", action="store_true",
                   help="continue from OUT/last.pt (the settings must be the same)")
    o.add_argument("--overwrite", action="store_true",
                   help="start over in an OUT that already holds a run")
    o.add_argument("--no-eval", action="store_true", help="skip the sparse evaluation")
    o.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    o.add_argument("--no-progress", action="store_true")


def _config_from_args(args) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(args) -> int:
    from .io import OutputBusyError, error_text

    try:
        return _main(args)
    except (ValueError, OSError, KeyError, TypeError, OutputBusyError, DivergedError) as e:
        import sys
        print(f"cad-spconv train-mask: error: {error_text(e)}", file=sys.stderr)
        return 2


def _class_count_problem(model, source: str) -> Optional[str]:
    """Why ``model`` cannot be trained and evaluated on Cityscapes (``None`` if it can)."""
    head = model.classifier[-1]
    n = int(head.out_channels)
    if n == NUM_CLASSES:
        return None
    return (f"{source} predict {n} classes; train-mask trains and evaluates on Cityscapes, whose "
            f"labels are the {NUM_CLASSES} trainIds: use weights trained on Cityscapes "
            f"({NUM_CLASSES} classes)")


def _open_data(root: str, args):
    """The training split, and the validation split the evaluation after training reads
    (``None`` with ``--no-eval``): opened before training, so a missing split is reported
    before hours of work, not after."""
    from .data import CityscapesSegmentation

    train_set = CityscapesSegmentation(root, "train")
    if args.no_eval:
        return train_set, None
    try:
        val_set = CityscapesSegmentation(root, "val", limit=args.eval_images)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}; train-mask evaluates on the val split after training: "
                                "provide it, or pass --no-eval to train only") from None
    return train_set, val_set


def _main(args) -> int:
    import copy

    import torch

    from cad_spconv.learned_mask import MaskEstimator

    from .blended import BlendedSegmenter
    from .data import make_synthetic_cityscapes
    from .distributed import resolve_device
    from .io import OutputLock, check_output_path

    device = torch.device(resolve_device(None if args.device == "auto" else args.device))
    if args.synthetic == bool(args.data_root):
        raise ValueError("give exactly one of --data-root or --synthetic")
    if args.model == TINY and args.weights:
        raise ValueError(f"{TINY} is a smoke-test model with random weights only; drop --weights "
                         "or choose another --model")
    if args.no_eval and args.eval_images is not None:
        raise ValueError("--eval-images sets the evaluation after training, which --no-eval "
                         "skips: drop one of them")
    if args.eval_images is not None and args.eval_images < 1:
        raise ValueError(f"--eval-images must be >= 1, got {args.eval_images}; to train without "
                         "evaluating pass --no-eval")
    if args.num_classes != NUM_CLASSES:
        raise ValueError(f"--num-classes {args.num_classes}: train-mask trains and evaluates on "
                         f"Cityscapes, whose labels are the {NUM_CLASSES} trainIds; drop "
                         f"--num-classes (default {NUM_CLASSES})")
    config = _config_from_args(args)
    config.check()
    problem = _pooling_batch_problem(args.model, config)
    if problem:  # before the model is built or any data written
        raise ValueError(problem)
    from cad_spconv.plan import num_adaptive_steps

    try:
        num_adaptive_steps(args.finest_stride, args.coarsest_stride)
    except ValueError as e:
        raise ValueError(f"--finest-stride {args.finest_stride} --coarsest-stride "
                         f"{args.coarsest_stride}: {e}") from None
    out = check_output_path(args.out, folder=True)
    ckpt = os.path.join(out, CHECKPOINT)
    eval_cfg = None
    if not args.no_eval:  # the evaluation's settings are checked before training too
        from .eval import EvalConfig

        eval_cfg = EvalConfig(
            data_root="", out=os.path.join(out, "eval.json"),
            model=None if args.model == TINY else args.model, split="val",
            finest_stride=args.finest_stride, coarsest_stride=args.coarsest_stride,
            mask=f"learned:{ckpt}", device=str(device), limit=args.eval_images, num_workers=0,
            timing=False, overwrite=True, progress=not args.no_progress).check()
    data = None
    if not args.synthetic:  # before anything in OUT is written or removed
        data = _open_data(args.data_root, args)
    lock = OutputLock(ckpt)
    # what this run makes for itself (OUT, or in it the lock file and synthetic data): a run
    # that diverges before its first save removes it, leaving nothing that looks like a run
    made = [out] if not os.path.exists(out) else [
        p for p in [lock.path + ".lock"] if not os.path.exists(p)]
    with lock:
        if os.path.exists(ckpt) and not (args.resume or args.overwrite):
            raise ValueError(f"{out} already holds a run ({ckpt}); continue it with --resume, "
                             "start over with --overwrite, or choose another --out")
        if args.resume and args.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        torch.manual_seed(config.seed)  # the initial weights (random heads, estimator) too
        model = build_model(args.model, args.num_classes, args.weights)
        problem = _class_count_problem(model, f"--weights {args.weights}")
        if problem:
            raise ValueError(problem)
        num_classes = NUM_CLASSES
        # an auxiliary head (weights trained with aux_loss=True) reads the dense layer3, which
        # the blend does not have: not trained, not stored, not evaluated
        if getattr(model, "aux_classifier", None) is not None:
            model.aux_classifier = None
        factor = args.coarsest_stride // args.finest_stride
        estimator = MaskEstimator(feature_channels(model, args.finest_stride), downsample=factor,
                                  tau=args.tau)
        if args.estimator_weights:
            from .checkpoints import load_into, read_mask_estimator_file
            from .eval.segmenter import check_estimator_strides

            found = read_mask_estimator_file(args.estimator_weights)
            check_estimator_strides(found.strides, args.finest_stride, args.coarsest_stride,
                                    found.path)
            load_into(estimator, found.state, source=found.path)
        blended = BlendedSegmenter(model, estimator, args.finest_stride, args.coarsest_stride,
                                   separate_statistics=config.separate_statistics)
        if args.overwrite and os.path.exists(ckpt):  # the old run's evaluation and data
            stale = os.path.join(out, "eval.json")
            if os.path.exists(stale):
                with OutputLock(stale):  # not while an eval of it is still writing
                    os.remove(stale)
            if args.synthetic and os.path.isdir(os.path.join(out, "synthetic")):
                shutil.rmtree(os.path.join(out, "synthetic"))
        root = args.data_root
        if args.synthetic:
            root = os.path.join(out, "synthetic")
            if not os.path.isdir(root):
                if made[:1] != [out]:  # else it goes with OUT
                    made.append(root)
                make_synthetic_cityscapes(root, "train", num_images=8, size=(64, 128), seed=args.seed)
                make_synthetic_cityscapes(root, "val", num_images=2, size=(64, 128), seed=args.seed + 1)
            data = _open_data(root, args)
        meta = {"model": args.model, "num_classes": num_classes, "weights": args.weights,
                "finest_stride": args.finest_stride, "coarsest_stride": args.coarsest_stride,
                # the data trained on: a resume on other data is refused
                "data_root": "synthetic" if args.synthetic else os.path.abspath(args.data_root),
                "train_images": len(data[0]),
                "train_ids_sha256": hashlib.sha256("\n".join(sorted(data[0].ids)).encode())
                .hexdigest()}
        try:
            history = train(blended, data[0], config, out,  # data: (train, val or None)
                            resume=args.resume, device=device, progress=not args.no_progress,
                            meta=meta)
        except DivergedError as e:
            if os.path.exists(ckpt) or not made:  # a save to start over from: the message names it
                raise
            for p in made:  # under the lock: no other run is in them
                if os.path.isdir(p):
                    shutil.rmtree(p)
                else:
                    os.remove(p)
            raise DivergedError(f"{e}; removed {', '.join(made)}, which this run had made")
    if history:
        last = history[-1]
        print(f"trained {last['iteration']} iterations: loss {last['loss']:.4f}, task "
              f"{last['task_loss']:.4f}, rho_hat {last['rho_hat']:.3f} (target {config.rho})")
    if args.no_eval:
        return 0
    # the sparse network with the estimator's argmax mask and the low_res statistics (as the
    # reference evaluates), read back from the checkpoint, through cad-spconv eval
    from .checkpoints import load_into, read_checkpoint
    from .eval import evaluate, format_summary

    state, _ = read_checkpoint(ckpt)
    evaluated = copy.deepcopy(model).eval()
    load_into(evaluated, state, source=ckpt)
    result = evaluate(replace(eval_cfg, data_root=root), model=evaluated)
    print(format_summary(result))
    return 0
