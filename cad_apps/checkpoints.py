"""Load segmentation weights into torchvision models, without downloading anything.

Accepted sources (``spec``):

- a file path: a plain state dict (torchvision weight files), a dict with ``"state_dict"`` or
  ``"model"``, or a checkpoint of the paper's code (Hesse et al., CVPRW 2023), which builds on
  DeepLabV3Plus-Pytorch: a dict with ``"model_state"`` whose head keys sit under
  ``classifier.classifier.`` (19 Cityscapes classes, trained at output stride 16 or 8);
- a torchvision weights name (``"COCO_WITH_VOC_LABELS_V1"``, ``"DEFAULT"`` or the full
  ``"DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1"``), read from the torch hub cache.

The paper's DeepLabV3 head has the same layout as torchvision's (ASPP with ``convs`` and
``project``, 3x3 conv, BN, ReLU, 1x1 classifier), so its keys map one to one. Its stride-16 models
use ASPP rates 6/12/18 at stride 16; torchvision's stride-8 model uses 12/24/36 at stride 8, which
is the same geometry in image pixels, so both kinds of checkpoint load into the stride-8
torchvision model that :func:`adapters.convert` turns into the adaptive (8 -> 16) network.
Any key mismatch is an error that names the missing and unexpected keys.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["CheckpointInfo", "CheckpointMismatchError",
           "resolve_checkpoint", "read_checkpoint", "load_into", "build_segmentation_model",
           "read_mask_estimator"]



class CheckpointMismatchError(KeyError):
    """The checkpoint's keys or shapes do not match the model."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class CheckpointInfo:
    """What was loaded. ``format``: ``"torchvision"``, ``"deeplabv3plus-pytorch"`` (the paper's
    code) or ``"state_dict"``. ``trained_output_stride`` is read from the file name (``os16``,
    ``os8``) when present; ``metadata`` keeps scalar entries such as ``best_score``."""

    source: str
    format: str
    num_classes: int | None
    has_aux: bool
    trained_output_stride: int | None = None
    metadata: dict = field(default_factory=dict)


def _torchvision_weights(spec: str, model_name: str | None):
    from torchvision.models import get_model_weights, get_weight
    if "." in spec:
        try:
            return get_weight(spec)
        except (ValueError, KeyError, AttributeError):
            return None
    if model_name is None:
        return None
    try:
        enum = get_model_weights(model_name)
    except (ValueError, KeyError):
        return None
    if spec == "DEFAULT":
        return enum.DEFAULT
    return getattr(enum, spec, None)


def resolve_checkpoint(spec: str | os.PathLike, model_name: str | None = None) -> str:
    """Path of the weights file ``spec`` names (a path, or torchvision weights in the cache)."""
    path = os.path.expanduser(os.fspath(spec))
    if os.path.isfile(path):
        return path
    weights = _torchvision_weights(str(spec), model_name)
    if weights is None:
        hint = f" or a torchvision weights name of {model_name}" if model_name else ""
        raise FileNotFoundError(f"checkpoint {str(spec)!r} is neither a file{hint}")
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(cached):
        raise FileNotFoundError(
            f"torchvision weights {weights} are not in the torch cache ({cached}); this tool does "
            f"not download. Fetch them once on a machine with internet, e.g. "
            f"`curl -L -o {cached} {weights.url}`, or pass the file's path")
    return cached


def _torch_load(path: str):
    """``torch.load`` restricted to tensors and plain data (no code runs). The paper's files also
    hold numpy scalars (``best_score``), which are allowed explicitly."""
    import numpy as np
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    safe = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    safe += [type(np.dtype(t)) for t in ("f8", "f4", "i8", "i4", "u1", "b1")]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        raise ValueError(
            f"cannot read {path} as a weights-only checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}); re-save it as a plain state dict: "
            "`torch.save(model.state_dict(), path)`") from None


_PAPER_PREFIXES = (("module.", ""),)
_PAPER_RENAMES = (("classifier.classifier.", "classifier."),)


def read_checkpoint(spec, model_name: str | None = None) -> tuple[dict, CheckpointInfo]:
    """Read a checkpoint into a torchvision-keyed state dict, and describe it."""
    path = resolve_checkpoint(spec, model_name)
    obj = _torch_load(path)
    metadata: dict = {}
    if isinstance(obj, dict) and "model_state" in obj:
        fmt = "deeplabv3plus-pytorch"
        state = obj["model_state"]
        metadata = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in obj.items()
                    if k != "model_state" and _is_scalar(v)}
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        fmt, state = "state_dict", obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        fmt, state = "state_dict", obj["model"]
    elif isinstance(obj, dict):
        fmt, state = "state_dict", obj
    else:
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: entries {bad[:5]} are not tensors; not a state dict")
    state = dict(state)
    if any(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if fmt == "deeplabv3plus-pytorch" or any(k.startswith("classifier.classifier.") for k in state):
        fmt = "deeplabv3plus-pytorch"
        for old, new in _PAPER_RENAMES:
            state = {new + k[len(old):] if k.startswith(old) else k: v for k, v in state.items()}
    elif os.path.dirname(os.path.abspath(path)) == os.path.join(torch.hub.get_dir(), "checkpoints"):
        fmt = "torchvision"
    head = state.get("classifier.4.weight")
    num_classes = int(head.shape[0]) if head is not None else None
    m = re.search(r"os(8|16|32)(?!\d)", os.path.basename(path))
    info = CheckpointInfo(source=path, format=fmt, num_classes=num_classes,
                          has_aux=any(k.startswith("aux_classifier.") for k in state),
                          trained_output_stride=int(m.group(1)) if m else None, metadata=metadata)
    return state, info


def _is_scalar(v) -> bool:
    import numpy as np
    return isinstance(v, (int, float, str, np.generic))


def load_into(model: nn.Module, state: dict, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly; on mismatch, name what is missing / unexpected."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match {type(model).__name__}:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", shapes)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
                lines.append(f"  {len(keys)} {title}: {shown}")
        if any("mask_estimator" in k for k in unexpected):
            lines.append("  (an end-to-end checkpoint of the paper's learned-mask model: its "
                         "layer3/4 are graph convolutions and do not load into torchvision)")
        elif any(k.startswith("aux_classifier.") for k in unexpected):
            lines.append("  (the checkpoint has an auxiliary head: build the model with aux_loss=True)")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def build_segmentation_model(model_name: str = "deeplabv3_resnet101", checkpoint=None,
                             num_classes: int = 19) -> tuple[nn.Module, CheckpointInfo | None]:
    """A torchvision segmentation model at output stride 8, in eval mode, with no download.

    Without ``checkpoint`` the weights are random (``num_classes`` outputs). With one, the class
    count and the auxiliary head follow the checkpoint.
    """
    from adapters.builders import segmentation_model
    info = None
    state = None
    aux = False
    if checkpoint is not None:
        state, info = read_checkpoint(checkpoint, model_name)
        if info.num_classes is not None:
            num_classes = info.num_classes
        aux = info.has_aux
    model = segmentation_model(model_name, num_classes=num_classes, aux_loss=aux)
    if state is not None:
        load_into(model, state, source=info.source)
    return model.eval(), info


# prefixes under which the mask estimator's layers ("0.weight" ... "7.bias") are stored: the
# reference code's end-to-end model, a wrapper module, or the bare estimator
_ESTIMATOR_PREFIXES = ("", "backbone.mask_estimator.", "mask_estimator.", "estimator.")


def read_mask_estimator(spec) -> tuple[dict, str]:
    """State dict of a learned mask estimator (keys ``0.weight`` ... ``7.bias``, the layout of
    :class:`cad_spconv.learned_mask.MaskEstimator`) and the file it came from.

    Accepts the paper's end-to-end checkpoint (``model_state`` with ``backbone.mask_estimator.``),
    a dict with a ``"mask_estimator"`` / ``"estimator"`` / ``"state_dict"`` entry, or a bare
    estimator state dict.
    """
    path = resolve_checkpoint(spec)
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key in ("model_state", "mask_estimator", "estimator", "state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    flat = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()
            if isinstance(v, torch.Tensor)}
    for prefix in _ESTIMATOR_PREFIXES:
        if prefix + "0.weight" in flat and prefix + "7.bias" in flat:
            return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)
                    and re.fullmatch(r"\d+\.(weight|bias)", k[len(prefix):])}, path
    shown = ", ".join(sorted(flat)[:8])
    raise CheckpointMismatchError(
        f"{path} holds no mask estimator (expected keys 0.weight ... 7.bias, optionally under "
        f"{', '.join(repr(p) for p in _ESTIMATOR_PREFIXES[1:])}); found: {shown or 'no tensors'}")
