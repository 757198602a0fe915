"""Small checkpoints in the layouts of the paper's four published Cityscapes files, written from
this description of their keys and shapes (not from the paper's code):

- every file is a dict ``{"cur_itrs", "model_state", "optimizer_state", "scheduler_state",
  "best_score"}`` (``best_score`` a numpy float64), keys without ``module.``, the DeepLabV3 head
  under ``classifier.classifier.*``, no auxiliary head;
- baselines (``..._os16_seed1``, ``..._os8_seed1``): torchvision's DeepLabV3 keys otherwise;
- edge model (``...batch_ap..._os8_modeedges_os16till8...``): in ``layer3`` / ``layer4`` the 1x1
  convs are ``Conv1d`` weights ``[C_out, C_in, 1]``, the 3x3 conv is ``conv2.conv.weight``
  ``[C, C, 9, 1]`` (taps row-major), batch norms keep their keys (``BatchNorm1d``), the
  shortcut is ``downsample.conv1`` / ``downsample.norm1``;
- learned model (``..._ad_resnet101_...shared.pth``): ``backbone.layer{3,4}_{high,low}_res.*``
  with torchvision's 4-D keys (weights and batch-norm affine equal in both copies, running
  statistics different), ``backbone.fc`` (2048 -> 1000) and ``backbone.mask_estimator.{0,2,5,7}``
  (3x3 convs with bias: C->128, 128->64, 64->64, 64->2).

The models here are DeepLabV3-ResNet-50 (6 ``layer3`` blocks), same key patterns, cheaper.
"""
from __future__ import annotations

import numpy as np
import torch

from cad_spconv.learned_mask import MaskEstimator


def wrap(model_state: dict) -> dict:
    return {"cur_itrs": 30000, "model_state": model_state,
            "optimizer_state": {"state": {}, "param_groups": []},
            "scheduler_state": {"last_epoch": 30000}, "best_score": np.float64(0.7)}


def head_moved(state: dict) -> dict:
    """torchvision DeepLabV3 keys -> the reference's (head under classifier.classifier.)."""
    return {("classifier.classifier." + k[len("classifier."):] if k.startswith("classifier.")
             else k): v for k, v in state.items()}


def baseline_state(model) -> dict:
    return head_moved(model.state_dict())


def edge_state(model) -> dict:
    """``layer3`` / ``layer4`` as graph layers."""
    out = {}
    for k, v in head_moved(model.state_dict()).items():
        if k.startswith(("backbone.layer3.", "backbone.layer4.")):
            if k.endswith("conv2.weight"):
                k, v = k[:-len("weight")] + "conv.weight", v.reshape(v.shape[0], v.shape[1], 9, 1)
            elif v.dim() == 4:  # 1x1 convs (conv1, conv3, the shortcut's conv)
                v = v[..., 0]
            k = k.replace(".downsample.0.", ".downsample.conv1.").replace(".downsample.1.",
                                                                            ".downsample.norm1.")
        out[k] = v
    return out


def learned_state(model, estimator: MaskEstimator, seed: int = 0) -> dict:
    """The two-path training model: ``model``'s layer3/4 statistics become the ``low_res``
    copies; the ``high_res`` copies get other running statistics."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in head_moved(model.state_dict()).items():
        for layer in ("layer3", "layer4"):
            prefix = f"backbone.{layer}."
            if k.startswith(prefix):
                rest = k[len(prefix):]
                out[f"backbone.{layer}_low_res.{rest}"] = v
                high = v
                if rest.endswith(("running_mean", "running_var")):
                    high = v + torch.rand(v.shape, generator=gen, dtype=v.dtype)
                out[f"backbone.{layer}_high_res.{rest}"] = high
                break
        else:
            out[k] = v
    out["backbone.fc.weight"] = torch.randn(1000, 2048, generator=gen)
    out["backbone.fc.bias"] = torch.randn(1000, generator=gen)
    for k, v in estimator.state_dict().items():
        out[f"backbone.mask_estimator.{k}"] = v
    return out


def save(path, model_state: dict) -> str:
    torch.save(wrap(model_state), path)
    return str(path)
