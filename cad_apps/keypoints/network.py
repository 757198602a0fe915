"""D2-Net's dense descriptor network (Dusmanu et al., CVPR 2019) and its variants in the paper's
keypoint study (Hesse et al., CVPRW 2023, Sec. 4.3).

The network is VGG16 ``conv1_1`` ... ``conv4_3`` + ReLU, i.e. torchvision's
``vgg16().features[:23]`` (three 2x2 max pools: output stride 8). D2-Net's ``d2_tf.pth`` stores
it under ``dense_feature_extraction.model.<i>.{weight,bias}`` with ``<i>`` the index in that
very ``nn.Sequential`` (D2-Net's own copy swaps the third pool for a 2x2/1 average pool and
dilates ``conv4_x``; the paper's code loads the same tensors into an undilated VGG16).

- **Dense output stride** ``s`` in 1, 2, 4, 8: the last ``log2(8 / s)`` pools are removed and every
  conv after a removed pool is dilated by the product of the strides removed before it
  (2, 4, 8), as the paper's code does (dilated residual networks, Yu et al.). D2-Net's own
  output-stride-4 network keeps the third pool as a 2x2/1 average pool in front of the dilated
  ``conv4_x`` instead, so D2-Net's published numbers are not those of dense stride 4 here.
- **Adaptive** ``F -> 8``: :func:`adapters.convert` with ``finest_stride=F``: the pools from
  stride ``F`` on become adaptive max pools, the convs after them read at dilation-scaled
  spacing (``docs/SEMANTICS.md``). Everything kept equals the dense stride-``F`` network;
  nothing kept equals the dense stride-8 network.

Parameters are shared with the given stack, never copied.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

import torch
from torch import nn

__all__ = ["D2_PREFIX", "STRIDES", "vgg16_conv4_3", "random_features", "d2_features_state_dict",
           "load_d2_weights", "dense_at_stride", "adaptive_network", "DescriptorNetwork"]

D2_PREFIX = "dense_feature_extraction.model."
#: output strides of the study
STRIDES = (1, 2, 4, 8)
_NUM_LAYERS = 23  # vgg16().features[:23]: conv1_1 ... conv4_3 + ReLU


#: vgg16().features up to conv4_3: channels of the convs, "M" = 2x2 max pool
_VGG16_CONV4_3 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)


def vgg16_conv4_3(device=None) -> nn.Sequential:
    """The layers of torchvision's ``vgg16().features[:23]`` (same types, same indices, so
    its state dict loads), initialised as torchvision does (Kaiming normal, fan-out; zero
    bias), without building the classifier."""
    layers, cin = [], 3
    for v in _VGG16_CONV4_3:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(cin, v, kernel_size=3, padding=1, device=device)
        if conv.weight.device.type != "meta":
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
        cin = v
    return nn.Sequential(*layers)


def random_features(seed: int = 0) -> nn.Sequential:
    """The stack with random weights drawn from ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return vgg16_conv4_3().eval()


def d2_features_state_dict(checkpoint: Mapping) -> dict:
    """Map a D2-Net checkpoint (``{"model": state_dict}`` or the state dict itself) onto the
    keys of ``vgg16().features[:23]``. Missing, extra or mis-shaped tensors raise
    :class:`~cad_apps.checkpoints.CheckpointMismatchError`."""
    from ..checkpoints import CheckpointMismatchError

    sd = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else None
    if not isinstance(sd, Mapping):
        raise CheckpointMismatchError(
            "a D2-Net checkpoint is a dict with a 'model' state dict (d2_tf.pth)")
    expected = vgg16_conv4_3(device="meta").state_dict()
    out, extra = {}, []
    for key, value in sd.items():
        if key.startswith(D2_PREFIX):
            new = key[len(D2_PREFIX):]
            if new not in expected:
                extra.append(key)
            else:
                out[new] = value
        elif key.startswith("dense_feature_extraction."):
            extra.append(key)
        # detection / localization modules of D2-Net hold no tensors; other keys are ignored
    missing = [D2_PREFIX + k for k in expected if k not in out]
    if missing or extra:
        raise CheckpointMismatchError("not a D2-Net VGG16 checkpoint (expected the tensors of "
                         f"'{D2_PREFIX}<i>.weight/bias' for vgg16().features[:23]): "
                         + (f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}" if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}" if extra else ""))
    for k, v in out.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(expected[k].shape):
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise CheckpointMismatchError(f"{D2_PREFIX}{k} has shape {shape}, VGG16 needs "
                             f"{tuple(expected[k].shape)}")
    return out


def load_d2_weights(path: str) -> nn.Sequential:
    """``vgg16().features[:23]`` with the weights of a D2-Net checkpoint file (``d2_tf.pth``).
    A file that is not a readable checkpoint of tensors raises
    :class:`~cad_apps.checkpoints.CheckpointError`, one of other tensors
    :class:`~cad_apps.checkpoints.CheckpointMismatchError` (both naming ``--weights``)."""
    from ..checkpoints import CheckpointError, CheckpointMismatchError, load_weights_only
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--weights {path} does not exist; download D2-Net's d2_tf.pth "
                                "(https://dusmanu.com/files/d2-net/d2_tf.pth) or use --random-weights")
    try:  # the checks eval's --checkpoint gets: empty, truncated, not a checkpoint, pickled code
        ckpt = load_weights_only(path, resave=(
            "expected D2-Net's d2_tf.pth. If it is a checkpoint you trust that also pickles "
            "other objects, keep its tensors only: python -c \"import torch; torch.save("
            "{'model': torch.load('IN.pth', weights_only=False)['model']}, 'OUT.pth')\""))
    except CheckpointError as e:
        raise CheckpointError(f"--weights: {e}") from None
    try:
        state = d2_features_state_dict(ckpt)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(f"--weights {path}: {e}; give D2-Net's d2_tf.pth "
                                      "(https://dusmanu.com/files/d2-net/d2_tf.pth)") from None
    stack = vgg16_conv4_3()
    stack.load_state_dict(state)
    return stack.eval()


def _pools(stack: nn.Sequential) -> list[int]:
    pools = [i for i, m in enumerate(stack) if isinstance(m, nn.MaxPool2d)]
    for i, m in enumerate(stack):
        if isinstance(m, nn.Conv2d):
            plain = (m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == 1
                     and m.kernel_size[0] == m.kernel_size[1] and m.kernel_size[0] % 2 == 1
                     and m.padding == (m.kernel_size[0] // 2,) * 2)
            if not plain:
                raise ValueError(f"layer {i} ({m}) is not a plain 'same' conv: expected an undilated "
                                 "VGG stack such as vgg16().features[:23]")
        elif isinstance(m, nn.MaxPool2d):
            if m.kernel_size not in (2, (2, 2)) or m.stride not in (2, (2, 2)):
                raise ValueError(f"layer {i} ({m}) is not a 2x2/2 max pool")
        elif not isinstance(m, (nn.ReLU, nn.BatchNorm2d)):
            raise ValueError(f"layer {i} ({type(m).__name__}) is not part of a VGG stack")
    if len(pools) != 3:
        raise ValueError(f"expected a VGG stack with 3 max pools (output stride 8, as "
                         f"vgg16().features[:23]), got {len(pools)}")
    return pools


def dense_at_stride(stack: nn.Sequential, output_stride: int) -> nn.Sequential:
    """The dense network at ``output_stride`` (1, 2, 4 or 8): the last ``log2(8 / s)`` pools
    dropped, the convs after them dilated (2, 4, 8). Shares the parameters of ``stack``."""
    if output_stride not in STRIDES:
        raise ValueError(f"output stride must be one of {STRIDES}, got {output_stride}")
    pools = _pools(stack)
    num_removed = (8 // output_stride).bit_length() - 1  # log2(8 / s)
    removed = pools[len(pools) - num_removed:] if num_removed else []
    layers, dilation = [], 1
    for i, m in enumerate(stack):
        if i in removed:
            dilation *= 2
            continue
        if isinstance(m, nn.Conv2d) and dilation > 1:
            k = m.kernel_size[0]
            shell = nn.Conv2d(m.in_channels, m.out_channels, k, padding=dilation * (k // 2),
                              dilation=dilation, bias=m.bias is not None, device="meta")
            shell.weight = m.weight
            shell.bias = m.bias
            m = shell
        layers.append(m)
    return nn.Sequential(*layers).train(stack.training)


def adaptive_network(stack: nn.Sequential, finest_stride: int, engine: str = "auto",
                     semantics: str = "paper"):
    """``adapters.convert(stack, finest_stride, 8)``; ``semantics="reference"`` asks the adapter
    for the paper code's centre-anchored sites."""
    from adapters import convert

    _pools(stack)
    if finest_stride not in STRIDES[:-1]:
        raise ValueError(f"the adaptive network needs a finest stride of 1, 2 or 4, got {finest_stride}")
    if semantics == "paper":
        return convert(stack, finest_stride=finest_stride, coarsest_stride=8, engine=engine)
    if semantics != "reference":
        raise ValueError(f"semantics must be 'paper' or 'reference', got {semantics!r}")
    try:
        return convert(stack, finest_stride=finest_stride, coarsest_stride=8, engine=engine,
                       semantics="reference")
    except TypeError as e:
        if "semantics" not in str(e):
            raise
        raise ValueError("--semantics reference needs adapters.convert(..., semantics='reference') "
                         "(the paper code's centre-anchored sites), which this version of the "
                         "library does not have yet; use --semantics paper") from None


class DescriptorNetwork(nn.Module):
    """Dense D2-Net features on the stride-``F`` grid, dense or content-adaptive.

    ``dilations`` (one per adaptive level, i.e. ``log2(8 / F)`` of them) select the adaptive
    network ``F -> 8``; without them it is the dense network at output stride ``F``.
    ``forward(images, plan=None)`` returns ``[B, C, H / F, W / F]``; ``plan`` (a
    :class:`~cad_spconv.LevelPlan` or anything the converted model accepts) is required by the
    adaptive network.
    """

    def __init__(self, stack: nn.Sequential, finest_stride: int, adaptive: bool,
                 engine: str = "auto", semantics: str = "paper"):
        super().__init__()
        if finest_stride not in STRIDES:
            raise ValueError(f"--finest-stride must be one of {STRIDES}, got {finest_stride}")
        if adaptive and finest_stride == 8:
            raise ValueError("the adaptive network needs --finest-stride 1, 2 or 4 (8 is the "
                             "coarsest stride); drop --dilations for the dense stride-8 network")
        self.finest_stride = finest_stride
        self.adaptive = adaptive
        self.num_levels = (8 // finest_stride).bit_length() - 1 if adaptive else 0
        self.net = (adaptive_network(stack, finest_stride, engine, semantics) if adaptive
                    else dense_at_stride(stack, finest_stride))

    def forward(self, images: torch.Tensor, plan: Optional[object] = None) -> torch.Tensor:
        if self.adaptive:
            if plan is None:
                raise ValueError("the adaptive network needs a level plan (keypoint masks)")
            semantics = getattr(self.net, "semantics", "paper")
            if getattr(plan, "semantics", semantics) != semantics:
                plan = plan.with_semantics(semantics)  # same sites; the model's tap anchors
            return self.net(images, plan)
        if plan is not None:
            raise ValueError("the dense network takes no level plan")
        return self.net(images)
