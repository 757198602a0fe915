"""Exact multiply-add counts: the paper's "#MA" (Hesse et al., CVPRW 2023, Sec. 4 and C.1).

Conventions (``SEMANTICS.md``): a conv costs ``prod(kernel) * C_in / groups * C_out`` per output
site (all taps, as a dense counter counts padded taps; bias free); a transposed conv the same
per *input* site; a linear layer ``in * out`` per row. Batch norm, activations, adds, pooling
and interpolation are not counted. A dense conv has ``H_out * W_out`` sites per image (read from
its output in a forward hook); a :class:`~cad_spconv.nn.CADConv2d` has the sites of its output
``CADTensor``, counted per image, so images with different masks get different counts.

Counts are python ints, exact. Only modules are seen: a conv called as ``F.conv2d`` inside a
``forward`` is not counted (torchvision models do not do that).

The paper's tables were counted with ptflops, which also counts the elementwise work: a conv's
bias (``C_out`` per output site), batch norm (2 per element with affine parameters, else 1),
activations (1 per output element), pooling (1 per input element), ``nn.Upsample`` (1 per
output element), a linear layer's bias. The same forward tallies these too
(``result()["ptflops"]``), per site on multi-resolution tensors, so a converted model's count is
what ptflops would give its dense equivalent (all kept: the dense finest-stride network, exactly).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Union

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .nn import CADPointwise
from .tensor import CADTensor

__all__ = ["count_macs", "MacCounter", "module_parts"]

# ptflops' elementwise modules: (types, counted on the input instead of the output, factor)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.PReLU, nn.GELU)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
          nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)

Reference = Union[int, Mapping]


def _conv_per_site(conv: _ConvNd) -> int:
    return math.prod(conv.kernel_size) * (conv.in_channels // conv.groups) * conv.out_channels


def module_parts(model: nn.Module, extra: Optional[Mapping[str, nn.Module]] = None) -> dict:
    """``id(module) -> part name`` for every submodule.

    Parts are ``model.parts()`` when the model has it (converted models: ``"dense"``,
    ``"sparse"``, ``"head"``, ``"aux"``), else the model's top-level children by name;
    ``extra`` (e.g. ``{"mask": estimator}``) takes precedence. Modules of the model outside any
    part (and the model itself, when it is a single layer) belong to ``"other"``.
    """
    owner: dict[int, str] = {}
    for name, module in (extra or {}).items():
        for m in module.modules():
            owner.setdefault(id(m), name)
    parts_fn = getattr(model, "parts", None)
    if callable(parts_fn):
        groups = parts_fn()
        if not isinstance(groups, Mapping):
            raise TypeError(f"{type(model).__name__}.parts() must return a mapping name -> "
                            f"module, got {type(groups).__name__}")
    else:
        groups = dict(model.named_children())
    for name, group in groups.items():
        modules: Iterable[nn.Module]
        if isinstance(group, nn.Module):
            modules = group.modules()
        elif group is None:
            continue
        else:
            modules = (m for g in group for m in g.modules())
        for m in modules:
            owner.setdefault(id(m), name)
    for m in model.modules():
        owner.setdefault(id(m), "other")
    return owner


class MacCounter:
    """Counts the multiply-adds of every forward run inside ``with MacCounter(...)``.

    ``model``: the model whose convs / linears are hooked; ``batch_size``: images per forward
    (per-image counts need every counted layer to see the batch on dim 0); ``extra``: further
    modules to count under their own part name (``{"mask": estimator}``). Use it to count an
    evaluation loop without a second forward; :func:`count_macs` wraps one forward.
    """

    def __init__(self, model: nn.Module, batch_size: int,
                 extra: Optional[Mapping[str, nn.Module]] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.batch_size = int(batch_size)
        self.extra = dict(extra or {})
        self._handles = []
        self.reset()

    def reset(self):
        """Forget all counts."""
        B = self.batch_size
        self.layers: dict[str, list[int]] = {}
        self.part_of: dict[str, str] = {}
        self.sparse = {"actual": [0] * B, "all_kept": [0] * B, "none_kept": [0] * B}
        self.sparse_layers_seen = False
        self.elementwise: dict[str, list[int]] = {}  # ptflops' extra work, per part

    # ------------------------------------------------------------------ hooks
    def __enter__(self) -> "MacCounter":
        owner = module_parts(self.model, self.extra)
        named = [("", self.model)] + [(f"{k}.", m) for k, m in self.extra.items()]
        roots = [m for _, m in named]
        # an activation inside a CADPointwise sees site rows, not a batch: counted by the wrapper
        wrapped = {id(m.module) for r in roots for m in r.modules() if isinstance(m, CADPointwise)}
        seen: set[int] = set()
        for prefix, root in named:
            for name, m in root.named_modules():
                if id(m) in seen:
                    continue
                seen.add(id(m))
                part = owner.get(id(m), "other")
                if isinstance(m, (_ConvNd, nn.Linear)):
                    qual = (prefix + name).rstrip(".") or type(m).__name__
                    self._handles.append(m.register_forward_hook(self._hook(qual, part)))
                if isinstance(m, CADPointwise) or (
                        id(m) not in wrapped and isinstance(m, _ACTIVATIONS + _POOLS + _NORMS
                                                            + (nn.Upsample,))):
                    self._handles.append(m.register_forward_hook(self._elementwise_hook(part)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def _add(self, name: str, part: str, per_image: list[int]):
        row = self.layers.setdefault(name, [0] * self.batch_size)
        for i, v in enumerate(per_image):
            row[i] += v
        self.part_of[name] = part

    def _uniform(self, name: str, n: int, per_sample: int) -> list[int]:
        if n != self.batch_size:
            raise ValueError(f"{name} ran on a batch of {n}, the count was set up for "
                             f"{self.batch_size} images: per-image counts need every conv/linear "
                             "to see the image batch on dim 0")
        return [per_sample] * n

    def _hook(self, name: str, part: str):
        def hook(module, inputs, output):
            self._bias(module, part, output)
            if isinstance(output, CADTensor):
                self._add(name, part, self._sparse(name, module, output))
            elif isinstance(module, _ConvTransposeNd):
                x = inputs[0]
                per = math.prod(x.shape[2:]) * _conv_per_site(module)
                self._add(name, part, self._uniform(name, x.shape[0], per))
            elif isinstance(module, _ConvNd):
                per = math.prod(output.shape[2:]) * _conv_per_site(module)
                self._add(name, part, self._uniform(name, output.shape[0], per))
            else:  # nn.Linear
                rows = math.prod(output.shape[1:-1]) if output.dim() > 1 else 1
                n = output.shape[0] if output.dim() > 1 else 1
                per = rows * module.in_features * module.out_features
                self._add(name, part, self._uniform(name, n, per))
        return hook

    def _per_image_elements(self, t) -> list[int]:
        """Elements of every image of a dense batch or a CADTensor."""
        if isinstance(t, CADTensor):
            sites = t.plan.sites_per_image(t.step).tolist()
            return [int(n) * t.num_channels for n in sites]
        return self._uniform(type(t).__name__, t.shape[0], math.prod(t.shape[1:]))

    def _add_elementwise(self, part: str, per_image: list[int]):
        row = self.elementwise.setdefault(part, [0] * self.batch_size)
        for i, v in enumerate(per_image):
            row[i] += v

    def _elementwise_hook(self, part: str):
        def hook(module, inputs, output):
            if isinstance(module, CADPointwise):
                if not isinstance(module.module, _ACTIVATIONS):
                    return
                counted = self._per_image_elements(output)
            elif isinstance(module, _POOLS):
                counted = self._per_image_elements(inputs[0])
            elif isinstance(module, _NORMS):
                counted = self._per_image_elements(output)
                if getattr(module, "affine", False):  # as ptflops 0.7.5 (not LayerNorm's
                    counted = [2 * v for v in counted]  # elementwise_affine)
            else:  # activations, nn.Upsample
                counted = self._per_image_elements(output)
            self._add_elementwise(part, counted)
        return hook

    def _bias(self, module, part: str, output):
        """ptflops counts a bias as one addition per output element."""
        if getattr(module, "bias", None) is None:
            return
        if isinstance(module, nn.Linear):
            rows = math.prod(output.shape[1:-1]) if output.dim() > 1 else 1
            n = output.shape[0] if output.dim() > 1 else 1
            self._add_elementwise(part, [rows * module.out_features] * n)
        else:
            self._add_elementwise(part, self._per_image_elements(output))

    def _sparse(self, name: str, module, out: CADTensor) -> list[int]:
        per_site = _conv_per_site(module)
        sites = out.plan.sites_per_image(out.step).tolist()
        if len(sites) != self.batch_size:
            self._uniform(name, len(sites), 0)  # raises the batch-size error
        H, W = out.plan.grid
        s = 2 ** out.step
        per_image = [per_site * int(n) for n in sites]
        for i in range(self.batch_size):
            self.sparse["actual"][i] += per_image[i]
            self.sparse["all_kept"][i] += per_site * H * W
            self.sparse["none_kept"][i] += per_site * (-(-H // s)) * (-(-W // s))
        self.sparse_layers_seen = True
        return per_image

    # ------------------------------------------------------------------ results
    def result(self, finest: Optional[Reference] = None,
               coarsest: Optional[Reference] = None) -> dict:
        """The counts so far (see :func:`count_macs` for the keys)."""
        B = self.batch_size
        per_image = [0] * B
        per_image_parts: dict[str, list[int]] = {}
        for name, row in self.layers.items():
            part = per_image_parts.setdefault(self.part_of[name], [0] * B)
            for i, v in enumerate(row):
                part[i] += v
                per_image[i] += v
        out = {
            "total": sum(per_image),
            "parts": {k: sum(v) for k, v in per_image_parts.items()},
            "per_image": per_image,
            "per_image_parts": per_image_parts,
            "layers": {k: sum(v) for k, v in self.layers.items()},
            "num_images": B,
        }
        ptf_parts = {p: [a + b for a, b in zip(v, self.elementwise.get(p, [0] * B))]
                     for p, v in per_image_parts.items()}
        for p, v in self.elementwise.items():
            ptf_parts.setdefault(p, list(v))
        ptf_per_image = [sum(v[i] for v in ptf_parts.values()) for i in range(B)]
        out["ptflops"] = {"total": sum(ptf_per_image),
                          "parts": {k: sum(v) for k, v in ptf_parts.items()},
                          "per_image": ptf_per_image, "per_image_parts": ptf_parts}
        if self.sparse_layers_seen:
            out["sparse_layers"] = {k: sum(v) for k, v in self.sparse.items()}
            out["sparse_layers_per_image"] = {k: list(v) for k, v in self.sparse.items()}
        for key, ref in (("vs_finest", finest), ("vs_coarsest", coarsest)):
            if ref is not None:
                total = ref["total"] if isinstance(ref, Mapping) else ref
                if isinstance(ref, Mapping) and ref.get("num_images", B) != B:
                    raise ValueError(
                        f"{key[3:]} was counted on a batch of {ref['num_images']}, this count "
                        f"on a batch of {B}: "
                        "count the reference on the same batch (a ratio of totals is only "
                        "meaningful for the same images)")
                if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
                    raise ValueError(f"{key[3:]} must be a positive int or a count_macs result, "
                                     f"got {ref!r}")
                out[key] = out["total"] / total
        return out


def count_macs(model: nn.Module, images: torch.Tensor, keep=None, *,
               finest: Optional[Reference] = None, coarsest: Optional[Reference] = None) -> dict:
    """Exact multiply-adds of one forward of ``model`` on ``images`` (``[B, C, H, W]``).

    Runs ``model(images)`` (``keep=None``: plain torchvision models) or ``model(images, keep)``
    (converted models; ``keep`` in any form they accept) under ``torch.no_grad()``, in the
    model's current mode. If ``keep`` is an ``nn.Module`` (a mask estimator) its layers are
    counted as part ``"mask"``.

    Returns a dict of python ints:

    - ``"total"``: the whole batch;
    - ``"parts"``: per part: ``model.parts()`` of converted models (``"dense"`` before the first
      adaptive step, ``"sparse"``, ``"head"``, ``"aux"``) plus ``"mask"``; for plain models the
      top-level children (``"backbone"``, ``"classifier"``, ... or ``"layer1"``, ``"fc"``, ...);
      ``"other"`` for counted layers outside every part;
    - ``"per_image"`` (list, one per image) and ``"per_image_parts"`` (part -> list);
    - ``"layers"``: qualified layer name -> count (a layer run twice counts twice);
    - ``"num_images"``;
    - when converted layers ran, ``"sparse_layers"``: their ``"actual"`` count and what they
      would cost with everything kept (``"all_kept"``, the dense finest-stride cost) or nothing
      kept (``"none_kept"``, the dense coarsest-stride cost), and ``"sparse_layers_per_image"``;
    - ``"ptflops"``: the same forward counted as ptflops counts (see the module docstring):
      ``"total"``, ``"parts"``, ``"per_image"``, ``"per_image_parts"``;
    - with ``finest`` / ``coarsest`` (an int or a ``count_macs`` result *for the same batch*,
      e.g. of the dense model at the finest / coarsest stride): ``"vs_finest"`` /
      ``"vs_coarsest"``, the ratio of ``"total"`` to theirs.
    """
    if not isinstance(images, torch.Tensor) or images.dim() < 2:
        got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a batched tensor [B, C, H, W] (or [B, ...] for other "
                         f"models), got {got}")
    extra = {"mask": keep} if isinstance(keep, nn.Module) else None
    counter = MacCounter(model, images.shape[0], extra)
    with counter, torch.no_grad():
        if keep is None:
            model(images)
        else:
            model(images, keep)
    return counter.result(finest, coarsest)
