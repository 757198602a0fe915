"""VGG-style feature stacks (torchvision ``vgg16(...).features``, ``vgg16_bn(...).features`` or a
prefix such as D2-Net's ``features[:23]``) in content-adaptive form.

The 2x2/2 max pools are the adaptive downsampling steps (the paper's keypoint study, Sec. 4.3):
layers up to ``finest_stride`` run densely as given; from there each pool merges the 2x2 blocks
without kept cells into one site holding the max of its children, while kept sites pass through
unchanged; the convs after it read at the dilation-scaled spacing. A 2x2 pool cannot be turned
into a dilation, so ``coarsest_stride`` must be the stride the stack ends at (truncate the stack
after the pool that reaches the stride you want).

Border rule: torchvision's floor-mode pools drop the last row / column of an odd-sized map;
CAD blocks are clipped at the border instead, i.e. the adaptive pools act like
``ceil_mode=True`` pools (the finest grid keeps its size and every cell has an owner). Pools in
the dense part run as given.
"""
from __future__ import annotations

import torch
from torch import nn

from cad_spconv.engines import workspace_scope
from cad_spconv.nn import CADMaxPool2d
from cad_spconv.tensor import CADTensor

from .common import (POINTWISE, CADModel, UnsupportedModelError, cad_layer, check_plain_conv,
                     check_strides, expect_type, follow_mode)

__all__ = ["CADVGGFeatures", "convert_vgg_features"]


def _is_pool2(m: nn.Module) -> bool:
    def one(v):
        return v if isinstance(v, int) else (v[0] if v[0] == v[1] else None)
    return (type(m) is nn.MaxPool2d and one(m.kernel_size) == 2 and one(m.stride) == 2
            and one(m.padding) == 0 and one(m.dilation) == 1 and not m.return_indices)


class CADVGGFeatures(CADModel):
    """A plain conv / batch-norm / ReLU / 2x2-max-pool stack with content-adaptive pools.

    ``forward(images, keep)`` returns the features densified on the finest grid
    (``[B, C, H0, W0]``, stride ``finest_stride``), where D2-Net detects keypoints;
    ``forward_features`` returns the CADTensor (step ``num_levels``).
    """

    def __init__(self, features: nn.Sequential, finest_stride: int = 4, coarsest_stride: int = 8,
                 engine: str = "auto"):
        super().__init__(finest_stride, coarsest_stride)
        expect_type(features, "", nn.Sequential, "an nn.Sequential of VGG layers (e.g. "
                    "torchvision vgg16().features)")
        layers = list(features.named_children())
        pools = [i for i, (_, m) in enumerate(layers) if _is_pool2(m)]
        for name, m in layers:
            if not (_is_pool2(m) or type(m) in (nn.Conv2d, nn.BatchNorm2d) + POINTWISE):
                raise UnsupportedModelError(
                    f"cannot convert {name} ({type(m).__module__}.{type(m).__name__}: {m}): a VGG "
                    "feature stack may hold nn.Conv2d (stride 1, same padding), nn.BatchNorm2d, "
                    "elementwise ops and 2x2 stride-2 nn.MaxPool2d only")
        top = 2 ** len(pools)
        finest_allowed = tuple(2 ** i for i in range(len(pools)))
        check_strides(finest_stride, coarsest_stride, finest_allowed, top, "VGG features",
                      f"its adaptive steps are the {len(pools)} 2x2 max pools")
        if coarsest_stride != top:
            raise ValueError(
                f"VGG features: coarsest_stride must be the stride the stack ends at ({top}, after "
                f"{len(pools)} max pools), got {coarsest_stride}: a 2x2 pool past the coarsest "
                "stride cannot become a dilation; truncate the stack after the pool reaching "
                f"{coarsest_stride} (e.g. vgg16().features[:23] ends at stride 8, as in D2-Net)")
        first = pools[len(pools) - self.num_levels]  # the pool leaving finest_stride
        self.dense_names = [name for name, _ in layers[:first]]
        self.sparse_names = [name for name, _ in layers[first:]]
        for name, m in layers[:first]:
            if type(m) is nn.Conv2d:  # the finest stride counts the pools only
                check_plain_conv(m, name, "before the finest stride")
            self.add_module(name, m)
        for name, m in layers[first:]:
            self.add_module(name, CADMaxPool2d(2, 2) if _is_pool2(m)
                            else cad_layer(m, name, engine))

    @workspace_scope()  # the engines' workspaces are released at the end
    def forward_features(self, images: torch.Tensor, keep, *,
                         room_for_dense: bool = False) -> CADTensor:
        """The last layer's output. ``room_for_dense`` is taken for the interface the
        converted ResNets share; here it changes nothing (the last layer allocates its own
        output, so ``dense(consume=True)`` builds a fresh map)."""
        del room_for_dense
        self._check_images(images)
        x = images
        for name in self.dense_names:
            x = getattr(self, name)(x)
        x = self._enter(x, keep, images)
        for name in self.sparse_names:
            x = getattr(self, name)(x)
        return x

    def forward(self, images: torch.Tensor, keep) -> torch.Tensor:
        return self.forward_features(images, keep).dense()

    def parts(self) -> dict[str, nn.Module]:
        return {"dense": nn.ModuleList(getattr(self, n) for n in self.dense_names),
                "sparse": nn.ModuleList(getattr(self, n) for n in self.sparse_names),
                **self._mask_part()}


def convert_vgg_features(features: nn.Sequential, finest_stride: int = 4, coarsest_stride: int = 8,
                         engine: str = "auto") -> CADVGGFeatures:
    """Convert a VGG feature stack (see :func:`adapters.convert`)."""
    return follow_mode(CADVGGFeatures(features, finest_stride, coarsest_stride, engine), features)
