"""The reference code's training model for the learned mask (Hesse et al., CVPRW 2023, Sec. 3).

The layers before the adaptive step run once; the rest runs twice, dense at the finest stride
(the ``high_res`` path) and dense at the coarsest stride (the ``low_res`` path, nearest
upsampled); the two are blended with the hard Gumbel mask before the head. As in the paper's
code the two paths share every weight and batch-norm affine parameter, but keep their own
batch-norm running statistics (``separate_statistics``, default), and the budget term uses a
second, independent Gumbel sample of the same logits. Evaluation then uses the sparse
(converted) network with the estimator's argmax mask and the ``low_res`` statistics, as the
reference evaluates its published model.

:func:`reference_state` / :func:`load_reference_state` write and read the model in the layout
of the paper's published learned-mask checkpoint, which ``cad-spconv eval`` loads. The
auxiliary classifier of a model trained with ``aux_loss=True`` is not used (it reads ``layer3``
of the dense network, which the blend does not have) and not stored.

Only heads that read the one feature map of the last backbone layer are supported (torchvision's
DeepLabV3 and FCN): DeepLabV3+'s decoder also reads low-level ``layer1`` features, which the
two-path blend does not provide.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from adapters.output_stride import CANONICAL_STRIDE, output_stride
from cad_spconv.learned_mask import MaskEstimator, upsample_cells
from cad_spconv.plan import num_adaptive_steps

__all__ = ["BlendedSegmenter", "features_before_adaptive", "reference_state",
           "load_reference_state", "AUX_PREFIX"]

#: state-dict prefix of torchvision's auxiliary head (``aux_loss=True``): unused, not stored
AUX_PREFIX = "aux_classifier."


def features_before_adaptive(model: nn.Module, images: torch.Tensor,
                             finest_stride: int) -> torch.Tensor:
    """The dense feature map entering the first adaptive step of a torchvision segmentation
    model with a ResNet backbone (``layer2`` output for ``finest_stride`` 8)."""
    backbone = model.backbone
    x = images
    with output_stride(backbone, finest_stride):
        for name, module in backbone.named_children():
            if CANONICAL_STRIDE.get(name, finest_stride + 1) > finest_stride:
                break
            x = module(x)
    return x


def _shared_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that holds the same ``Parameter`` objects but its own buffers."""
    twin = copy.deepcopy(module)
    originals = dict(module.named_modules())
    for name, sub in twin.named_modules():
        for pname, _ in list(sub.named_parameters(recurse=False)):
            setattr(sub, pname, getattr(originals[name], pname))
    return twin


class BlendedSegmenter(nn.Module):
    """The reference code's training model for the learned mask.

    ``model``: a torchvision segmentation model with a ResNet backbone (``DeepLabV3`` / ``FCN``:
    ``model.backbone`` is an ``IntermediateLayerGetter``, ``model.classifier`` the head, built
    for features at ``finest_stride``, e.g. ASPP rates 12/24/36 at stride 8). The layers after
    the first adaptive step run at ``finest_stride`` (``model``'s own modules) and at
    ``coarsest_stride`` (:attr:`low_res`: the same parameters; with ``separate_statistics``
    their own batch-norm running statistics, else the very same modules). The auxiliary
    classifier, if any, is not used.

    ``forward(images)`` returns ``{"out": logits [B, K, H, W], "low_res": [B, 1, h, w] hard
    mask of the blend, "rate_sample": a second hard sample (for the budget term), "rho_hat":
    its mean}``.
    """

    def __init__(self, model: nn.Module, estimator: MaskEstimator, finest_stride: int = 8,
                 coarsest_stride: int = 16, separate_statistics: bool = True):
        super().__init__()
        factor = 2 ** num_adaptive_steps(finest_stride, coarsest_stride)
        if estimator.downsample != factor:
            raise ValueError(f"the estimator downsamples by {estimator.downsample}, the model by "
                             f"{factor} ({finest_stride} -> {coarsest_stride}); build it with "
                             f"MaskEstimator(downsample={factor})")
        backbone = getattr(model, "backbone", None)
        if backbone is None or not hasattr(model, "classifier"):
            raise TypeError("expected a torchvision segmentation model (DeepLabV3 / FCN) with "
                            "`backbone` (ResNet IntermediateLayerGetter) and `classifier`")
        returned = getattr(backbone, "return_layers", {})
        extra = sorted(set(returned.values()) - {"out", "aux"})
        if extra or not isinstance(model.classifier, nn.Sequential):
            raise TypeError(
                f"{type(model).__name__}'s head ({type(model.classifier).__name__}) "
                + (f"also reads the backbone features {extra}; " if extra else
                   "is not a plain sequential head on one feature map; ")
                + "two-path training blends only the last backbone layer's features, so it "
                "supports DeepLabV3 and FCN heads only (DeepLabV3+'s decoder needs the "
                "low-level layer1 features): use a deeplabv3_* or fcn_* model")
        names = [n for n, _ in backbone.named_children()]
        unknown = [n for n in names if n not in CANONICAL_STRIDE]
        if unknown:
            raise TypeError(f"unexpected backbone children {unknown}: a torchvision ResNet is needed")
        self.model = model
        self.estimator = estimator
        self.finest_stride = finest_stride
        self.coarsest_stride = coarsest_stride
        self.factor = factor
        self.post = [n for n in names if CANONICAL_STRIDE[n] > finest_stride]
        if not self.post:
            raise ValueError(f"no backbone layer downsamples beyond stride {finest_stride}")
        self.separate_statistics = separate_statistics
        self.low_res = nn.ModuleDict({
            n: _shared_copy(getattr(backbone, n)) if separate_statistics else getattr(backbone, n)
            for n in self.post})
        # the coarse path's backbone: the model's, with the post layers swapped for low_res
        coarse = copy.copy(backbone)
        coarse._modules = dict(backbone._modules, **self.low_res)
        self.__dict__["_coarse_backbone"] = coarse  # not a child: its modules are registered

    def _post(self, x: torch.Tensor, backbone: nn.Module, stride: int) -> torch.Tensor:
        with output_stride(backbone, stride):
            for name in self.post:
                x = getattr(backbone, name)(x)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The dense feature map entering the first adaptive step."""
        return features_before_adaptive(self.model, images, self.finest_stride)

    def forward(self, images: torch.Tensor, tau: float | None = None) -> dict:
        x = self.features(images)
        grid = x.shape[-2:]
        logits = self.estimator.logits(x)
        low = self.estimator.sample_logits(logits, tau)
        rate = self.estimator.sample_logits(logits, tau)  # the reference's second sample
        fine = self._post(x, self.model.backbone, self.finest_stride)
        coarse = self._post(x, self.__dict__["_coarse_backbone"], self.coarsest_stride)
        coarse = upsample_cells(coarse, self.factor, grid)
        m = upsample_cells(low, self.factor, grid)
        blended = m * coarse + (1 - m) * fine
        out = self.model.classifier(blended)
        out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": out, "low_res": low, "rate_sample": rate, "rho_hat": rate.mean()}


def reference_state(blended: BlendedSegmenter) -> dict:
    """The model in the layout of the paper's learned-mask checkpoint: ``backbone.<pre>``,
    ``backbone.<layer>_high_res.*`` (the finest path), ``backbone.<layer>_low_res.*`` (the
    coarse path: shared weights, its own statistics), ``backbone.mask_estimator.*``, the head
    under ``classifier.classifier.*``. An auxiliary head (``aux_classifier.*``, unused) is not
    stored, as in the paper's checkpoint."""
    out = {}
    for k, v in blended.model.state_dict().items():
        if k.startswith(AUX_PREFIX):
            continue
        if k.startswith("classifier."):
            out["classifier." + k] = v
        elif k.startswith("backbone."):
            layer, _, rest = k[len("backbone."):].partition(".")
            out[f"backbone.{layer}_high_res.{rest}" if layer in blended.post else k] = v
    for layer, module in blended.low_res.items():
        for k, v in module.state_dict().items():
            out[f"backbone.{layer}_low_res.{k}"] = v
    for k, v in blended.estimator.state_dict().items():
        out[f"backbone.mask_estimator.{k}"] = v
    return out


def load_reference_state(blended: BlendedSegmenter, state: dict,
                         source: str = "the checkpoint") -> None:
    """Inverse of :func:`reference_state`: every key it writes must be in ``state`` with the same
    shape, and nothing else (else :class:`cad_apps.checkpoints.CheckpointMismatchError`, a
    ``KeyError``, naming the keys, and nothing is loaded). The auxiliary head, which
    :func:`reference_state` leaves out, is optional: loaded where ``state`` holds it and the
    model has one, kept as it is otherwise."""
    from .checkpoints import CheckpointMismatchError

    expected = reference_state(blended)
    given = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)}
    aux = {k: v for k, v in state.items() if k.startswith(AUX_PREFIX)}
    own_aux = {k: v for k, v in blended.model.state_dict().items() if k.startswith(AUX_PREFIX)}
    if not own_aux:
        aux = {}  # a head the model does not have: unused, ignored
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    unexpected += [k for k in aux if k not in own_aux]
    if aux:
        missing += [k for k in own_aux if k not in aux]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ref[k].shape)}"
              for ref, part in ((expected, given), (own_aux, aux))
              for k, v in part.items()
              if k in ref and (not hasattr(v, "shape") or tuple(v.shape) != tuple(ref[k].shape))]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the two-path {type(blended.model).__name__} "
                 f"(layers {', '.join(blended.post)} after the adaptive step, "
                 f"{'separate' if blended.separate_statistics else 'shared'} statistics):"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8
                                               else "")
                lines.append(f"  {len(keys)} {title}: {shown}")
        lines.append("  (written for another model, number of classes, strides or statistics "
                     "setting)")
        raise CheckpointMismatchError("\n".join(lines))
    model, low, est = dict(aux), {n: {} for n in blended.post}, {}
    for k, v in given.items():
        if k.startswith("classifier.classifier."):
            model[k[len("classifier."):]] = v
        elif k.startswith("backbone.mask_estimator."):
            est[k[len("backbone.mask_estimator."):]] = v
        elif k.startswith("backbone."):
            layer, _, rest = k[len("backbone."):].partition(".")
            name, _, path = layer.rpartition("_")
            if path == "res" and name.endswith(("_high", "_low")):
                base, which = name.rsplit("_", 1)
                if which == "high":
                    model[f"backbone.{base}.{rest}"] = v
                else:
                    low[base][rest] = v
            else:
                model[k] = v
        else:
            model[k] = v
    # the keys are checked above; only the unused auxiliary head may be left as it is
    result = blended.model.load_state_dict(model, strict=False)
    assert not result.unexpected_keys and all(k.startswith(AUX_PREFIX)
                                              for k in result.missing_keys), result
    blended.estimator.load_state_dict(est, strict=True)
    if blended.separate_statistics:
        for name, sd in low.items():
            blended.low_res[name].load_state_dict(sd, strict=True)
