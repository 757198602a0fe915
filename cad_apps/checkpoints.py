"""Segmentation weights: every published layout, detected and loaded strictly, nothing downloaded.

Accepted sources (``spec``): a file, or a torchvision weights name (``"DEFAULT"``,
``"COCO_WITH_VOC_LABELS_V1"``, ``"DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1"``) read
from the torch hub cache. The file's layout is detected from its keys:

- ``"torchvision"`` / ``"state_dict"``: a torchvision state dict (plain, or under
  ``"state_dict"`` / ``"model"``; a ``module.`` prefix from DataParallel is removed);
- ``"reference"``: the paper's code (Hesse et al., CVPRW 2023, on DeepLabV3Plus-Pytorch), a dict
  ``{"model_state", "optimizer_state", "scheduler_state", "cur_itrs", "best_score"}``: DeepLabV3
  with its head under ``classifier.classifier.`` (the OS8 / OS16 baselines), or DeepLabV3+
  (``classifier.project`` / ``aspp`` / ``classifier``);
- ``"reference-edge"``: the paper's edge model (``deeplabv3_batch_ap_resnet101``): ``layer3`` /
  ``layer4`` stored as graph convolutions: 1x1 convs as ``Conv1d`` weights ``[C_out, C_in, 1]``,
  the 3x3 conv as a ``DeformConv2d`` weight ``conv2.conv.weight [C, C, 9, 1]`` (taps row-major),
  batch norms as ``BatchNorm1d`` (same keys), the shortcut as ``downsample.conv1`` /
  ``downsample.norm1``;
- ``"reference-learned"``: the paper's learned-mask model as trained
  (``deeplabv3_ad_resnet101``): ``backbone.layer{3,4}_{high,low}_res.*`` (plain convs; weights
  and batch-norm affine shared, running statistics separate), ``backbone.fc.*`` (unused) and
  the mask estimator ``backbone.mask_estimator.{0,2,5,7}``. As the reference evaluates it, the
  ``low_res`` copies become ``layer3`` / ``layer4``; the estimator is returned alongside.

The model is inferred from the keys where it can be (head: DeepLabV3 / DeepLabV3+ / FCN; depth
from the number of ``layer3`` blocks: 6 -> ResNet-50, 23 -> 101, 36 -> 152), the output stride
it was trained at from the file name (``os8`` / ``os16``; the edge and learned models are
stride-8 models). Anything else is an error that names what is missing, unexpected or
unreadable.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

__all__ = ["CheckpointInfo", "CheckpointMismatchError", "CheckpointError", "LAYOUTS",
           "resolve_checkpoint", "read_checkpoint", "load_into", "build_segmentation_model",
           "read_mask_estimator", "read_mask_estimator_file", "MaskEstimatorFile",
           "load_weights_only"]

#: the layouts :func:`read_checkpoint` recognises
LAYOUTS = ("torchvision", "state_dict", "reference", "reference-edge", "reference-learned")
_DEPTH = {6: "resnet50", 23: "resnet101", 36: "resnet152"}


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint (empty, truncated, foreign, unsafe)."""


class CheckpointMismatchError(KeyError):
    """The checkpoint's keys or shapes do not match the model."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0])


@dataclass
class CheckpointInfo:
    """What was loaded. ``format``: one of :data:`LAYOUTS`. ``model``: the model name inferred
    from the keys (``None`` where they do not say). ``trained_output_stride``: from the file
    name or the layout (``None`` if unknown). ``estimator``: the learned mask estimator's state
    dict (keys ``0.weight`` ... ``7.bias``) where the file holds one, and
    ``estimator_strides`` the (finest, coarsest) strides it was trained for where the file says
    (``train-mask`` checkpoints do, in ``meta``). ``metadata``: scalar entries such as
    ``best_score``."""

    source: str
    format: str
    num_classes: Optional[int]
    has_aux: bool
    model: Optional[str] = None
    trained_output_stride: Optional[int] = None
    estimator: Optional[dict] = None
    estimator_strides: Optional[tuple[int, int]] = None
    metadata: dict = field(default_factory=dict)


@dataclass
class MaskEstimatorFile:
    """A mask estimator read from a file: its state dict (keys ``0.weight`` ... ``7.bias``), the
    file, and the (finest, coarsest) strides it was trained for where the file says."""

    state: dict
    path: str
    strides: Optional[tuple[int, int]] = None


def _trained_strides(obj) -> Optional[tuple[int, int]]:
    """The (finest, coarsest) strides in a ``train-mask`` checkpoint's ``meta``, else ``None``."""
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return None
    f, c = meta.get("finest_stride"), meta.get("coarsest_stride")
    return (f, c) if isinstance(f, int) and isinstance(c, int) else None


# ---------------------------------------------------------------------- files
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


# how a command picks the model a bare torchvision weights name (DEFAULT) belongs to
NAME_NEEDS_MODEL = ("a torchvision weights name such as DEFAULT needs --model, or give the full "
                    "name, e.g. DeepLabV3_ResNet101_Weights.DEFAULT")
NAME_NEEDS_FULL_NAME = ("this command has no --model: give a torchvision weights name in full, "
                        "e.g. DeepLabV3_ResNet101_Weights.DEFAULT")


def resolve_checkpoint(spec: str | os.PathLike, model_name: str | None = None,
                       name_fix: str | None = NAME_NEEDS_MODEL) -> str:
    """Path of the weights file ``spec`` names (a path, or torchvision weights in the cache).
    ``name_fix``: what the error says for a name-like ``spec`` without ``model_name`` (how this
    command picks the model; ``None``: names do not apply)."""
    path = os.path.expanduser(os.fspath(spec))
    if os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} is a directory; give the .pth file in it")
    if os.path.isfile(path):
        return path
    weights = _torchvision_weights(str(spec), model_name)
    if weights is None:
        if model_name:
            raise FileNotFoundError(f"checkpoint {str(spec)!r} is neither a file nor a "
                                    f"torchvision weights name of {model_name}: check the path "
                                    "or the name")
        name_like = os.sep not in str(spec) and "." not in os.path.basename(str(spec))
        raise FileNotFoundError(f"checkpoint {str(spec)!r} is not a file: check the path"
                                + (f" ({name_fix})" if name_like and name_fix else ""))
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.isfile(cached):
        raise FileNotFoundError(
            f"torchvision weights {weights} are not in the torch cache ({cached}); this tool does "
            f"not download. Fetch them once on a machine with internet, e.g. "
            f"`curl -L -o {cached} {weights.url}`, or pass the file's path")
    return cached


def load_weights_only(path: str, resave: str = "re-save it as a plain state dict: "
                      "`torch.save(model.state_dict(), path)`"):
    """``torch.load`` restricted to tensors and plain data (no code runs). The paper's files also
    hold numpy scalars (``best_score``), which are allowed explicitly. A file that is empty,
    truncated or not a checkpoint raises :class:`CheckpointError` saying so; one that pickles
    other objects says ``resave`` (how to keep its tensors only)."""
    import numpy as np
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish; "
                              "fetch the file again")
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    safe = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    safe += [type(np.dtype(t)) for t in ("f8", "f4", "i8", "i4", "u1", "b1")]
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip file (PK), older versions a pickle (protocol byte 0x80)
    if head != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{path} is not a PyTorch checkpoint that can be read weights-only "
                              f"(it starts with {head!r}, neither the zip format of torch.save "
                              "nor a pickle): check the path; a file of a very old PyTorch must "
                              "be re-saved with a current one (torch.save(state_dict, path))")
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle and zip errors come in many types
        full = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch's bold type, not for one line
        text = (full.strip().splitlines() or [type(e).__name__])[0]
        if not any(w in full.lower() for w in ("weights_only", "unsupported global", "global")):
            raise CheckpointError(
                f"cannot read {path} ({type(e).__name__}: {text}): the file is truncated or not "
                "a PyTorch checkpoint; fetch it again") from None
        # torch's first line announces options for loading untrusted code; what matters is the
        # object that is not plain data, named further down
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", full)
        detail = re.search(r"WeightsUnpickler error: ([^\n]*)", full)
        what = (f"it pickles a {found.group(1)}, which is not plain data" if found else
                detail.group(1).strip() if detail else text)
        raise CheckpointError(
            f"cannot read {path} as a weights-only checkpoint ({what}); {resave}") from None


def _is_scalar(v) -> bool:
    import numpy as np
    return isinstance(v, (int, float, str, np.generic))


def _unwrap(obj, path: str) -> tuple[dict, str, dict]:
    """(state dict, layout guess, metadata) of a loaded object."""
    metadata: dict = {}
    if isinstance(obj, dict) and isinstance(obj.get("model_state"), dict):
        fmt, state = "reference", obj["model_state"]
        metadata = {k: (float(v) if not isinstance(v, (int, str)) else v) for k, v in obj.items()
                    if k != "model_state" and _is_scalar(v)}
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        fmt, state = "state_dict", obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        fmt, state = "state_dict", obj["model"]
    elif isinstance(obj, dict):
        fmt, state = "state_dict", obj
    else:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    if not state:
        raise CheckpointError(f"{path} holds an empty state dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries {bad[:5]} are not tensors; not a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return state, fmt, metadata


# ---------------------------------------------------------------------- the paper's layouts
def _is_learned(state: dict) -> bool:
    return any("_low_res." in k or "_high_res." in k for k in state)


def _is_edge(state: dict) -> bool:
    return any(k.endswith("conv2.conv.weight") or ".downsample.conv1." in k for k in state)


def _from_graph_layers(state: dict) -> dict:
    """The edge model's graph ``layer3`` / ``layer4`` in torchvision's layout (Conv1d -> 1x1
    conv, the DeformConv2d weight's 9 row-major taps -> 3x3, BatchNorm1d keys unchanged,
    ``downsample.conv1`` / ``norm1`` -> ``downsample.0`` / ``1``)."""
    out = {}
    for k, v in state.items():
        if k.endswith("conv2.conv.weight"):
            if v.dim() != 4 or tuple(v.shape[2:]) != (9, 1):
                raise CheckpointMismatchError(f"{k}: expected a [C, C, 9, 1] graph-conv weight, "
                                              f"got {tuple(v.shape)}")
            k, v = k[:-len("conv.weight")] + "weight", v.reshape(v.shape[0], v.shape[1], 3, 3)
        k = k.replace(".downsample.conv1.", ".downsample.0.").replace(".downsample.norm1.",
                                                                        ".downsample.1.")
        if k.endswith(".weight") and v.dim() == 3 and v.shape[-1] == 1:  # Conv1d 1x1
            v = v[..., None]
        out[k] = v
    return out


def _from_learned(state: dict, path: str) -> tuple[dict, dict]:
    """(the model in torchvision's layout from the ``low_res`` copies, the estimator)."""
    out, estimator = {}, {}
    for k, v in state.items():
        m = re.match(r"backbone\.(layer[34])_(high|low)_res\.(.*)", k)
        if m:
            if m.group(2) == "low":
                out[f"backbone.{m.group(1)}.{m.group(3)}"] = v
        elif k.startswith("backbone.mask_estimator."):
            estimator[k[len("backbone.mask_estimator."):]] = v
        elif not k.startswith("backbone.fc."):  # ImageNet's classifier, never used
            out[k] = v
    if not estimator:
        raise CheckpointMismatchError(f"{path} has the learned model's two paths but no "
                                      "backbone.mask_estimator.* keys")
    return out, estimator


def _infer_model(state: dict) -> Optional[str]:
    blocks = {int(m.group(1)) for k in state
              for m in [re.match(r"backbone\.layer3\.(\d+)\.", k)] if m}
    depth = _DEPTH.get(max(blocks) + 1) if blocks else None
    if depth is None:
        return None
    if any(k.startswith("classifier.aspp.") for k in state):
        return f"deeplabv3plus_{depth}"
    if any(k.startswith("classifier.0.convs.") for k in state):
        return f"deeplabv3_{depth}"
    if "classifier.0.weight" in state and state["classifier.0.weight"].dim() == 4:
        return f"fcn_{depth}"
    return None


def _unsupported(state: dict) -> Optional[str]:
    """Why no ``--model`` can load ``state`` (keys :func:`_infer_model` found no model in), or
    ``None`` where naming the model may help."""
    if not any(k.startswith("backbone.") for k in state):
        shown = ", ".join(sorted(state)[:3])
        return (f"not a segmentation checkpoint (no backbone.* keys; it holds {shown}, ..."
                + (": an ImageNet classifier?" if "fc.weight" in state else "")
                + "); pass the weights of a segmentation model (DeepLabV3 / DeepLabV3+ / FCN "
                "with a ResNet-50 / 101 / 152 backbone)")
    blocks = {int(m.group(1)) for k in state
              for m in [re.match(r"backbone\.layer3\.(\d+)\.", k)] if m}
    if blocks and max(blocks) + 1 not in _DEPTH:
        basic = not any(re.match(r"backbone\.layer3\.\d+\.conv3\.", k) for k in state)
        n = max(blocks) + 1
        return (f"its backbone's layer3 has {n} {'basic' if basic else 'bottleneck'} "
                f"block{'s' * (n != 1)}; only ResNet-50 / 101 / 152 "
                "backbones (6 / 23 / 36 bottleneck blocks) are supported"
                + (" (train-mask's fcn_tiny smoke-test model is evaluated by train-mask itself, "
                   "in OUT/eval.json)" if basic else ""))
    return None


def read_checkpoint(spec, model_name: str | None = None,
                    name_fix: str | None = NAME_NEEDS_MODEL) -> tuple[dict, CheckpointInfo]:
    """Read a checkpoint into a state dict of the matching torchvision-style model, and describe
    it (:class:`CheckpointInfo`); ``name_fix`` as :func:`resolve_checkpoint`'s."""
    path = resolve_checkpoint(spec, model_name, name_fix)
    loaded = load_weights_only(path)
    state, fmt, metadata = _unwrap(loaded, path)
    estimator = None
    if _is_learned(state):
        fmt = "reference-learned"
        state, estimator = _from_learned(state, path)
    elif _is_edge(state):
        fmt = "reference-edge"
        state = _from_graph_layers(state)
    if fmt.startswith("reference") or any(k.startswith("classifier.classifier.") for k in state):
        if fmt == "state_dict":
            fmt = "reference"
        if not any(k.startswith("classifier.aspp.") for k in state):  # DeepLabV3: head renamed
            state = {"classifier." + k[len("classifier.classifier."):]
                     if k.startswith("classifier.classifier.") else k: v for k, v in state.items()}
    elif os.path.dirname(os.path.abspath(path)) == os.path.join(torch.hub.get_dir(), "checkpoints"):
        fmt = "torchvision"
    head = next((state[k] for k in ("classifier.4.weight", "classifier.classifier.3.weight")
                 if k in state), None)
    m = re.search(r"os(8|16|32)(?!\d)", os.path.basename(path))
    trained = int(m.group(1)) if m else (8 if fmt in ("reference-edge", "reference-learned")
                                         else None)
    info = CheckpointInfo(source=path, format=fmt,
                          num_classes=int(head.shape[0]) if head is not None else None,
                          has_aux=any(k.startswith("aux_classifier.") for k in state),
                          model=_infer_model(state), trained_output_stride=trained,
                          estimator=estimator, metadata=metadata,
                          estimator_strides=_trained_strides(loaded) if estimator else None)
    return state, info


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
        if any(k.startswith("aux_classifier.") for k in unexpected):
            lines.append("  (the checkpoint has an auxiliary head: build the model with aux_loss=True)")
        elif missing and unexpected:
            lines.append(f"  (not one of the layouts read here: {', '.join(LAYOUTS)}; or another "
                         "model: check --model)")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state, strict=True)


def build_segmentation_model(model_name: str | None = None, checkpoint=None,
                             num_classes: int = 19, output_stride: int | None = None,
                             name_fix: str | None = NAME_NEEDS_MODEL
                             ) -> tuple[nn.Module, CheckpointInfo | None]:
    """The segmentation model of a checkpoint, in eval mode, with no download.

    ``model_name``: one of :data:`adapters.builders.SEGMENTATION_MODELS`; inferred from the
    checkpoint when ``None`` (an error if it disagrees with the checkpoint). The model is built
    at the output stride its weights were trained at (file name; default 8), or at
    ``output_stride`` with the head geometry of the paper's code for that stride
    (:func:`adapters.builders.segmentation_model`). Without ``checkpoint`` the weights are
    random (``num_classes`` outputs). ``name_fix``: see :func:`resolve_checkpoint`."""
    from adapters.builders import SEGMENTATION_MODELS, segmentation_model

    info, state, aux = None, None, False
    if checkpoint is not None:
        state, info = read_checkpoint(checkpoint, model_name, name_fix)
        if info.num_classes is not None:
            num_classes = info.num_classes
        aux = info.has_aux
        if model_name is None:
            model_name = info.model
            if model_name is None:
                raise CheckpointMismatchError(f"{info.source}: " + (_unsupported(state) or (
                    "cannot tell the model from its keys; pass it (--model, one of "
                    f"{', '.join(SEGMENTATION_MODELS)})")))
        elif info.model is not None and info.model != model_name:
            raise CheckpointMismatchError(
                f"{info.source} holds a {info.model} ({info.format} layout), not a {model_name}: "
                f"use --model {info.model} or leave --model out")
    if model_name is None:
        model_name = "deeplabv3_resnet101"
    trained = (info.trained_output_stride if info is not None else None) or 8
    model = segmentation_model(model_name, num_classes=num_classes, aux_loss=aux,
                               output_stride=output_stride or trained,
                               trained_output_stride=trained)
    if state is not None:
        load_into(model, state, source=info.source)
    return model.eval(), info


# prefixes under which the mask estimator's layers ("0.weight" ... "7.bias") are stored: the
# reference code's end-to-end model, a wrapper module, or the bare estimator
_ESTIMATOR_PREFIXES = ("", "backbone.mask_estimator.", "mask_estimator.", "estimator.")


def read_mask_estimator(spec) -> tuple[dict, str]:
    """State dict of a learned mask estimator (keys ``0.weight`` ... ``7.bias``, the layout of
    :class:`cad_spconv.learned_mask.MaskEstimator`) and the file it came from
    (:func:`read_mask_estimator_file`)."""
    found = read_mask_estimator_file(spec)
    return found.state, found.path


def read_mask_estimator_file(spec) -> MaskEstimatorFile:
    """A learned mask estimator's state dict, file, and the strides it was trained for where
    the file says (:class:`MaskEstimatorFile`).

    Accepts the paper's end-to-end checkpoint (``model_state`` with ``backbone.mask_estimator.``),
    a ``train-mask`` checkpoint, a dict with a ``"mask_estimator"`` / ``"estimator"`` /
    ``"state_dict"`` entry, or a bare estimator state dict.
    """
    path = resolve_checkpoint(spec, name_fix=None)  # an estimator has no torchvision weights
    obj = load_weights_only(path)
    strides = _trained_strides(obj)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key in ("model_state", "mask_estimator", "estimator", "state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    flat = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()
            if isinstance(v, torch.Tensor)}
    for prefix in _ESTIMATOR_PREFIXES:
        if prefix + "0.weight" in flat and prefix + "7.bias" in flat:
            return MaskEstimatorFile({k[len(prefix):]: v for k, v in flat.items()
                                      if k.startswith(prefix)
                                      and re.fullmatch(r"\d+\.(weight|bias)", k[len(prefix):])},
                                     path, strides)
    shown = ", ".join(sorted(flat)[:8])
    raise CheckpointMismatchError(
        f"{path} holds no mask estimator (expected keys 0.weight ... 7.bias, optionally under "
        f"{', '.join(repr(p) for p in _ESTIMATOR_PREFIXES[1:])}); found: {shown or 'no tensors'}")
