"""An independent dense emulation of whole converted networks (SEMANTICS.md), for the adapter
tests, written without ``adapters`` or the library's sparse code.

Every multi-resolution layer is emulated by ``dense_reference``: fill the finest grid through
the owner map, run the dense torch op with taps ``d * 2**step`` apart, sample at the output
sites. The network structure is read off the torchvision model: strides and dilations are
derived here from the canonical (standard, stride-32) architecture:

- a stride-2 unit whose canonical output stride ``s_out`` is ``<= finest`` runs densely;
  ``finest < s_out <= coarsest``: an adaptive step; ``s_out > coarsest``: stride 1;
- a conv's dilation in the coarsest-stride network is ``max(1, s_in / coarsest)``, ``s_in``
  the canonical stride of its input.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import dense_reference as ref


# ---------------------------------------------------------------------- test helpers
TOL = {torch.float64: 1e-9, torch.float32: 1e-4}


def prepare(model: nn.Module, dtype=torch.float64, seed=0) -> nn.Module:
    """Eval mode, ``dtype``, random batch-norm statistics and affine parameters (so that a
    wrong read cannot hide behind identity normalisation), and random biases for every conv
    that has one (torchvision's VGG initialises them to 0: a converted conv that dropped its
    bias would pass). The biases have their own generator, so the batch-norm draws are those
    of a model without conv biases."""
    gen = torch.Generator().manual_seed(seed)
    bias_gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_((torch.rand(n, generator=gen) - 0.5) * 0.6)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.copy_((torch.rand(m.out_channels, generator=bias_gen) - 0.5) * 0.6)
    return model.to(dtype).eval()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


def assert_rel(actual, expected, dtype=torch.float64):
    err = rel_err(actual, expected)
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:g}"


def mixed_masks(seed: int, batch: int, grid, num_levels: int, kind: str = "keep"):
    """Keep masks at the finest grid whose quadtrees mix every level in every image (so a test
    cannot pass on a trivial plan), different per image.

    Returns (spec for the converted model, level map [B, H, W] for the emulator); kind:
    'keep' (one bool mask [B, 1, H, W]), 'levels' (a list of L per-level masks), 'map' (the
    level map itself, as ``LevelPlan.from_level_map``: integer maps are never keep masks).
    """
    rng = np.random.default_rng(seed)
    H, W = grid
    for _ in range(200):
        masks = []
        for _ in range(num_levels if kind == "levels" else 1):
            m = np.zeros((batch, H, W), dtype=bool)
            for b in range(batch):
                h, w = rng.integers(1, max(2, H // 3) + 1), rng.integers(1, max(2, W // 3) + 1)
                y, x = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
                m[b, y:y + h, x:x + w] = True
                m[b] |= rng.uniform(size=(H, W)) < 0.02
            masks.append(m)
        levels = ref.levels_from_masks(masks, num_levels)
        mixed = all(len(np.unique(levels[b])) == num_levels + 1 for b in range(batch))
        if mixed and (batch == 1 or not (levels[0] == levels[1]).all()):
            break
    else:
        raise AssertionError(f"no mixed mask found for grid {grid}, L={num_levels}")
    if kind == "keep":
        spec = torch.from_numpy(masks[0])[:, None]
    elif kind == "levels":
        spec = [torch.from_numpy(m) for m in masks]
    else:
        from cad_spconv import LevelPlan
        spec = LevelPlan.from_level_map(torch.from_numpy(levels), num_levels)
    return spec, levels


def to_device(spec, device):
    if isinstance(spec, list):
        return [m.to(device) for m in spec]
    return spec.to(device)


# ---------------------------------------------------------------------- two representations
class Dense:
    """A dense map [B, C, H, W] (the part before the first adaptive step, or a dense head)."""

    def __init__(self, x):
        self.x = x

    def conv(self, m: nn.Conv2d, stride=1, dilation=1):
        k = m.kernel_size[0]
        return Dense(F.conv2d(self.x, m.weight, m.bias, stride, dilation * (k // 2), dilation,
                              m.groups))

    def map(self, fn):
        return Dense(fn(self.x))

    def add(self, other):
        return Dense(self.x + other.x)

    def global_pool(self):
        return self.x.mean((2, 3))

    def broadcast(self, v):
        return Dense(v[:, :, None, None].expand(-1, -1, *self.x.shape[-2:]))

    def dense(self):
        return self.x


class Multi:
    """Site features [N, C] of a level map at a step (the emulated multi-resolution tensor)."""

    def __init__(self, feats, levels: np.ndarray, step: int, semantics: str = "paper"):
        self.feats, self.levels, self.step, self.semantics = feats, levels, step, semantics

    @classmethod
    def enter(cls, x: torch.Tensor, levels: np.ndarray, semantics: str = "paper"):
        assert x.shape[0] == levels.shape[0] and tuple(x.shape[-2:]) == levels.shape[1:]
        return cls(ref.Geometry(levels, 0).sample(x), levels, 0, semantics)

    def _like(self, feats, step=None):
        return Multi(feats, self.levels, self.step if step is None else step, self.semantics)

    def conv(self, m: nn.Conv2d, stride=1, dilation=1):
        rule = ref.conv if self.semantics == "paper" else ref.conv_reference_semantics
        out = rule(self.feats, self.levels, self.step, stride, m.weight, m.bias, dilation,
                   m.groups)
        return self._like(out, self.step + (stride == 2))

    def map(self, fn):  # per site: batch norm, ReLU, ...
        return self._like(fn(self.feats[:, :, None, None])[:, :, 0, 0])

    def add(self, other):
        assert other.step == self.step
        return self._like(self.feats + other.feats)

    def max_pool_2x2(self):
        return self._like(ref.max_pool_2x2(self.feats, self.levels, self.step), self.step + 1)

    def global_pool(self):
        return ref.global_avg_pool(self.feats, self.levels, self.step)

    def broadcast(self, v):
        geo = ref.Geometry(self.levels, self.step)
        b = torch.as_tensor(geo.sites[:, 0], device=v.device)
        return self._like(v[b])

    def dense(self):
        return ref.Geometry(self.levels, self.step).fill(self.feats)


def bn(x, m: nn.BatchNorm2d):
    return x.map(lambda t: F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias,
                                        False, 0.0, m.eps))


def relu(x):
    return x.map(torch.relu)


# ---------------------------------------------------------------------- ResNet
def _block(x, block, stride, d_in, d_out):
    """torchvision Bottleneck / BasicBlock; the 3x3 conv that carries the stride reads at
    ``d_in``, any 3x3 conv after it at ``d_out``."""
    if hasattr(block, "conv3"):  # Bottleneck: stride on conv2
        out = relu(bn(x.conv(block.conv1), block.bn1))
        out = relu(bn(out.conv(block.conv2, stride, d_in), block.bn2))
        out = bn(out.conv(block.conv3), block.bn3)
    else:  # BasicBlock: stride on conv1
        out = relu(bn(x.conv(block.conv1, stride, d_in), block.bn1))
        out = bn(out.conv(block.conv2, 1, d_out), block.bn2)
    short = x if block.downsample is None else bn(x.conv(block.downsample[0], stride),
                                                 block.downsample[1])
    return relu(out.add(short))


def resnet_trunk(stages: dict, images, levels, finest, coarsest, capture=(),
                 semantics="paper"):
    """Emulated stem + stages. ``stages``: children of a ResNet (conv1 .. layerN).
    Returns (last output, {stage name: output})."""
    x = Dense(images)
    x = relu(bn(x.conv(stages["conv1"], 2), stages["bn1"]))
    x = Dense(F.max_pool2d(x.x, 3, 2, 1))
    s = 4
    captured = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        if name not in stages:
            break
        for i, block in enumerate(stages[name]):
            unit = name != "layer1" and i == 0
            s_out = 2 * s if unit else s
            if s_out <= finest:
                x = _block(x, block, 2 if unit else 1, 1, 1)
            else:
                if isinstance(x, Dense):
                    x = Multi.enter(x.x, levels, semantics)
                stride = 2 if unit and s_out <= coarsest else 1
                x = _block(x, block, stride, max(1, s // coarsest), max(1, s_out // coarsest))
            s = s_out
        captured[name] = x
    return x, {k: v for k, v in captured.items() if k in capture}


def resnet_classifier(model, images, levels, finest, coarsest, semantics="paper"):
    x, _ = resnet_trunk(dict(model.named_children()), images, levels, finest, coarsest,
                        semantics=semantics)
    return model.fc(x.global_pool())


# ---------------------------------------------------------------------- segmentation heads
def deeplab_head(head, x, rates, head_dilation=1):
    """DeepLabHead = ASPP(rates) -> conv3x3 (dilation ``head_dilation``) -> BN -> ReLU ->
    conv1x1, on Dense or Multi."""
    y = aspp_block(head[0], x, rates)
    y = relu(bn(y.conv(head[1], 1, head_dilation), head[2]))
    return y.conv(head[4])


def aspp_block(aspp, x, rates):
    """torchvision's ASPP with atrous ``rates``, on Dense or Multi."""
    branches = [relu(bn(x.conv(aspp.convs[0][0]), aspp.convs[0][1]))]
    for branch, rate in zip(list(aspp.convs)[1:-1], rates):
        branches.append(relu(bn(x.conv(branch[0], 1, rate), branch[1])))
    pool = aspp.convs[-1]
    v = x.global_pool()[:, :, None, None]
    v = torch.relu(pool[2](pool[1](v)))[:, :, 0, 0]
    branches.append(x.broadcast(v))
    if isinstance(x, Dense):
        cat = Dense(torch.cat([b.x for b in branches], 1))
    else:
        cat = x._like(torch.cat([b.feats for b in branches], 1))
    return relu(bn(cat.conv(aspp.project[0]), aspp.project[1]))


def fcn_head(head, x, head_dilation=1):
    y = relu(bn(x.conv(head[0], 1, head_dilation), head[1]))
    return y.conv(head[4])


def segmentation(model, images, levels, finest, coarsest, sparse_head, given_stride=8,
                 semantics="paper"):
    """Emulated FCN / DeepLabV3 (torchvision builds them at output stride ``given_stride``).
    A head running at a finer stride than ``given_stride`` dilates its plain 3x3 conv by the
    ratio (the paper code's classifier_dilation).
    Returns ({key: logits before upsampling, dense}, {key: upsampled})."""
    stages = dict(model.backbone.named_children())
    aux = model.aux_classifier is not None
    out, cap = resnet_trunk(stages, images, levels, finest, coarsest, ("layer3",) if aux else (),
                            semantics)
    canonical = {"layer3": 16, "layer4": 32}
    logits = {}
    for key, head, layer, x in [("out", model.classifier, "layer4", out)] + (
            [("aux", model.aux_classifier, "layer3", cap["layer3"])] if aux else []):
        if sparse_head and isinstance(x, Multi):
            head_stride = min(canonical[layer], coarsest)
        else:
            head_stride = finest
            x = Dense(x.dense()) if isinstance(x, Multi) else x
        head_dilation = max(1, given_stride // head_stride)
        if hasattr(head[0], "convs"):  # DeepLabHead
            given_rates = [b[0].dilation[0] for b in list(head[0].convs)[1:-1]]
            y = deeplab_head(head, x, [r * given_stride // head_stride for r in given_rates],
                             head_dilation)
        else:
            y = fcn_head(head, x, head_dilation)
        logits[key] = y
    size = images.shape[-2:]
    up = {k: F.interpolate(v.dense(), size=size, mode="bilinear", align_corners=False)
          for k, v in logits.items()}
    return logits, up


def deeplabv3plus(model, images, levels, finest, coarsest, sparse_head, given_stride=8,
                  semantics="paper"):
    """Emulated DeepLabV3+ (adapters.deeplabv3plus): trunk, ASPP (densified at the finest
    stride, or on the multi-resolution map and then densified), decoder dense on layer1.
    Returns the upsampled logits."""
    stages = dict(model.backbone.named_children())
    out, cap = resnet_trunk(stages, images, levels, finest, coarsest, ("layer1",), semantics)
    head = model.classifier
    given_rates = [b[0].dilation[0] for b in list(head.aspp.convs)[1:-1]]
    if sparse_head:
        head_stride = min(32, coarsest)
        a = aspp_block(head.aspp, out, [r * given_stride // head_stride for r in given_rates])
    else:
        a = aspp_block(head.aspp, Dense(out.dense()), [r * given_stride // finest for r in given_rates])
    low = cap["layer1"].x if isinstance(cap["layer1"], Dense) else cap["layer1"]
    ratio = 1 if sparse_head else max(1, given_stride // finest)  # classifier_dilation
    conv = head.classifier[0]
    pre = head.project(low)
    up = F.interpolate(a.dense(), size=pre.shape[-2:], mode="bilinear", align_corners=False)
    y = F.conv2d(torch.cat([pre, up], 1), conv.weight, None, 1, ratio, ratio)
    logits = head.classifier[3](head.classifier[2](head.classifier[1](y)))
    return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------- VGG
def vgg_features(features, images, levels, finest, coarsest, semantics="paper"):
    """Emulated VGG stack: the pools from ``finest`` on are adaptive, convs keep dilation 1."""
    num_pools = sum(isinstance(m, nn.MaxPool2d) for m in features)
    first_adaptive = int(np.log2(finest))
    assert 2 ** num_pools == coarsest
    x, pools_seen = Dense(images), 0
    for m in features:
        if isinstance(m, nn.MaxPool2d):
            if pools_seen < first_adaptive:
                x = Dense(F.max_pool2d(x.x, 2, 2))  # dense part: torchvision's floor mode
            else:
                if isinstance(x, Dense):
                    x = Multi.enter(x.x, levels, semantics)
                x = x.max_pool_2x2()
            pools_seen += 1
        elif isinstance(m, nn.Conv2d):
            x = x.conv(m)
        elif isinstance(m, nn.BatchNorm2d):
            x = bn(x, m)
        elif isinstance(m, nn.ReLU):
            x = relu(x)
        else:
            raise AssertionError(type(m))
    return x


# ---------------------------------------------------------------------- self-checks
