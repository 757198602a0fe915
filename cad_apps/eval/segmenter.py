"""A segmentation model and one mask setting: batches in, logits, masks, times and exact
multiply-adds out."""
from __future__ import annotations

import time

import torch

from .config import DEFAULT_MODEL, EvalConfig, parse_mask

__all__ = ["Segmenter", "check_im2col_device", "dense_macs", "load_mask_estimator",
           "estimator_from_state", "num_classes_of"]


def dense_macs(model, output_stride: int, size, num_classes: int = 19) -> dict:
    """``count_macs`` of the plain segmentation network at ``output_stride`` on one ``size``
    image: the dense baselines the paper compares against (its stride-16 network runs the head
    at stride 16 too). ``model``: a torchvision segmentation model with a ResNet backbone (its
    own strides are set to ``output_stride`` for the count and restored), or a model name of
    :data:`adapters.builders.SEGMENTATION_MODELS`. Run on the meta device: only shapes matter,
    so it is instant and allocates nothing."""
    from torch.func import functional_call

    from adapters.builders import segmentation_model
    from adapters.output_stride import output_stride as at_stride
    from cad_spconv.macs import MacCounter

    if isinstance(model, str):
        with torch.device("meta"):
            model = segmentation_model(model, num_classes, output_stride=output_stride)
    meta = {k: torch.empty_like(v, device="meta")
            for k, v in {**dict(model.named_parameters()), **dict(model.named_buffers())}.items()}
    dtype = next(iter(meta.values())).dtype if meta else torch.float32
    images = torch.empty(1, 3, int(size[0]), int(size[1]), device="meta", dtype=dtype)
    was = model.training
    model.eval()
    try:
        with at_stride(model.backbone, output_stride), MacCounter(model, 1) as counter:
            functional_call(model, meta, (images,))
    finally:
        model.train(was)
    return counter.result()


def load_mask_estimator(spec: str, finest_stride: int, coarsest_stride: int):
    """The learned mask estimator (:class:`~cad_spconv.learned_mask.MaskEstimator`) from a
    checkpoint, its input channels read from the weights, for a model at these strides (an
    estimator whose checkpoint records others is refused: :func:`check_estimator_strides`)."""
    from ..checkpoints import read_mask_estimator_file
    found = read_mask_estimator_file(spec)
    check_estimator_strides(found.strides, finest_stride, coarsest_stride, found.path)
    return estimator_from_state(found.state, coarsest_stride // finest_stride, found.path)


def check_estimator_strides(trained, finest: int, coarsest: int, source: str) -> None:
    """Refuse an estimator trained for other strides (``trained``: (finest, coarsest) from its
    checkpoint, ``None`` where the file does not say): its pooling and the low-resolution
    path's statistics belong to those strides."""
    if trained is not None and tuple(trained) != (finest, coarsest):
        raise ValueError(f"the mask estimator in {source} was trained for strides "
                         f"{trained[0]}->{trained[1]}, this run uses {finest}->{coarsest}; pass "
                         f"--finest-stride {trained[0]} --coarsest-stride {trained[1]}, or an "
                         f"estimator trained for {finest}->{coarsest}")


def estimator_from_state(state: dict, downsample: int, source: str):
    """A :class:`~cad_spconv.learned_mask.MaskEstimator` (eval mode) holding ``state``."""
    from cad_spconv.learned_mask import MaskEstimator

    from ..checkpoints import load_into
    estimator = MaskEstimator(in_channels=int(state["0.weight"].shape[1]), downsample=downsample)
    load_into(estimator, state, source=source)
    return estimator.eval()


def check_im2col_device(cfg: EvalConfig, device) -> None:
    """``--im2col-dilated`` computes on the CPU only: refused elsewhere, where it would change
    nothing."""
    device = torch.device(device)
    if cfg.im2col_dilated and device.type != "cpu":
        raise ValueError(f"--im2col-dilated computes dilated convs as GEMMs on the CPU; on "
                         f"{device} they stay torch's convs: drop --im2col-dilated or pass "
                         "--device cpu")


class Segmenter:
    """A segmentation model and one setting: the converted network with a mask, or (``--dense
    S``) the plain network. :meth:`predict` runs a batch, :meth:`dense_macs` gives the dense
    baselines (counted once per image size)."""

    def __init__(self, cfg: EvalConfig, device, model=None):

        from ..checkpoints import build_segmentation_model
        self.cfg = cfg.check()
        self.mask = None if cfg.dense is not None else parse_mask(cfg.mask_text)
        self.device = torch.device(device)
        check_im2col_device(cfg, self.device)  # before building anything
        low = cfg.dtype in ("float16", "bfloat16")
        self.autocast = getattr(torch, cfg.dtype) if low else None
        self.dtype = torch.float32 if low else getattr(torch, cfg.dtype)
        info, given = None, model is not None
        if model is None:
            # seeded, so random weights (no --checkpoint) agree across resumed runs and ranks
            torch.manual_seed(cfg.seed)
            model, info = build_segmentation_model(cfg.model, cfg.checkpoint,
                                                   output_stride=cfg.dense)
        self.checkpoint_info = info
        # a model handed in (train-mask's) is named by its class, not by the default builder
        self.model_name = cfg.model or (info.model if info is not None else None) or (
            type(model).__name__ if given or cfg.checkpoint is not None
            else DEFAULT_MODEL)
        self.num_classes = num_classes_of(model)
        if self.num_classes != 19:
            raise ValueError(f"the model predicts {self.num_classes} classes; Cityscapes "
                             "evaluation needs the 19 trainId classes (a Cityscapes-trained checkpoint)")
        estimator = None
        if self.mask is not None and self.mask.kind == "learned":
            estimator = self._estimator(info, model)
        # channels-last weights and inputs: the fast layout of oneDNN / cuDNN, and the GEMM
        # layout of the lattice engine (no weight copies kept)
        self.model = model.to(self.device, self.dtype).to(
            memory_format=torch.channels_last).eval()
        self.cad = None
        if cfg.dense is None:
            from adapters import convert
            self.cad = convert(self.model, finest_stride=cfg.finest_stride,
                               coarsest_stride=cfg.coarsest_stride, sparse_head=cfg.sparse_head,
                               semantics=cfg.semantics).eval()
        if cfg.im2col_dilated:
            self._im2col_dilated()
        self.estimator = None if estimator is None else estimator.to(self.device, self.dtype)
        self._dense: dict = {}

    def _im2col_dilated(self):
        """``--im2col-dilated``: the network's dense dilated convs as im2col GEMMs, in place
        (a converted model's dense modules are its source's). Refused where it would change
        nothing: a network without such a conv (the head converted by --sparse-head; the
        device is checked first)."""
        from adapters import Im2colConv2d, im2col_dilated_convs

        im2col_dilated_convs(self.network, inplace=True)
        # a model handed in may be swapped already (overlays passes one model to a Segmenter
        # per mask, and a converted model's dense head is its source's)
        if not any(isinstance(m, Im2colConv2d) for m in self.network.modules()):
            raise ValueError(f"--im2col-dilated: {self.model_name} has no dense conv with "
                             "dilation >= 6 to compute as GEMMs"
                             + (" (--sparse-head converts the head)" if self.cfg.sparse_head
                                else "") + ": drop --im2col-dilated")

    def _estimator(self, info, model):
        """The learned mask estimator, checked against ``model`` (still on the CPU) before any
        image: features of other channels would fail only inside the first forward."""
        from ..train_mask import feature_channels
        cfg = self.cfg
        factor = cfg.coarsest_stride // cfg.finest_stride
        if self.mask.path:
            source = self.mask.path
            estimator = load_mask_estimator(source, cfg.finest_stride, cfg.coarsest_stride)
        elif info is None or info.estimator is None:
            raise ValueError("--mask learned uses the mask estimator inside --checkpoint, and "
                             + ("there is no --checkpoint" if info is None else
                                f"{info.source} holds none") + "; give its file: "
                             "--mask learned:PATH")
        else:
            source = info.source
            check_estimator_strides(info.estimator_strides, cfg.finest_stride,
                                    cfg.coarsest_stride, source)
            estimator = estimator_from_state(info.estimator, factor, source)
        weight = next(model.parameters())
        # the probe runs on the CPU in float32 (where models are built); a model handed in
        # elsewhere is train-mask's, which built its estimator for these very features
        if weight.device.type == "cpu" and weight.dtype == torch.float32:
            channels = feature_channels(model, cfg.finest_stride)
            if channels != estimator.in_channels:
                raise ValueError(
                    f"--mask {self.mask}: the estimator in {source} takes "
                    f"{estimator.in_channels}-channel features, and {self.model_name} gives "
                    f"{channels} channels at --finest-stride {cfg.finest_stride}, where the "
                    "adaptive step begins; pass an estimator trained for this model and stride "
                    "(train-mask --model ... --finest-stride ...), or the model it was trained for")
        return estimator

    # masks --------------------------------------------------------------------------------
    def keep_for(self, images, targets, ids):
        """The ``keep`` argument for this batch (a bool mask, or the learned estimator);
        ``None`` for a dense run. ``ids``: the images' frame ids, which seed the random masks
        (``random``, ``shuffled-edge``) image by image, so an image's mask depends only on
        ``--seed`` and its id: not on the batch, the warm-up, a resume or the rank."""

        from cad_spconv import masks
        if self.mask is None:
            return None
        B, _, H, W = images.shape
        kind, cfg = self.mask.kind, self.cfg
        if kind == "none":
            return torch.zeros(B, 1, H, W, dtype=torch.bool, device=images.device)
        if kind == "all":
            return torch.ones(B, 1, H, W, dtype=torch.bool, device=images.device)
        if kind == "learned":
            return self.estimator
        if kind == "random":  # the fraction is the level-0 share of the finest grid
            return torch.cat([masks.random(1, (H, W), self.mask.fraction, cfg.finest_stride,
                                           generator=self._generator(i), device=images.device)
                              for i in ids])
        if kind == "oracle":
            none = torch.zeros(B, 1, H, W, dtype=torch.bool, device=images.device)
            coarse, fine = self._run(images, none), self._run(images, ~none)
            return masks.oracle(coarse, fine, targets, cfg.dilation)
        keep, stride = masks.edge(images, self.mask.threshold, cfg.dilation), cfg.finest_stride
        if cfg.semantics == "reference":  # the reference's edges_os16till8 rule (4x4 blocks)
            keep, stride = masks.reference_blocks(keep, cfg.finest_stride, 4), 1
        if kind == "edge":
            return keep
        if kind == "inverted-edge":
            return masks.invert(keep, stride)  # the complement on the finest grid
        if kind == "shuffled-edge":  # the edge mask's level fractions at random places
            return torch.cat([masks.random_like(keep[b:b + 1], stride, self.cad.num_levels,
                                                generator=self._generator(i))
                              for b, i in enumerate(ids)])
        raise AssertionError(kind)

    def _generator(self, frame_id: str) -> torch.Generator:
        """The random masks' generator of one image: seeded by ``--seed`` and its frame id."""
        import hashlib

        digest = hashlib.sha256(f"{self.cfg.seed}/{frame_id}".encode()).digest()
        return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little"))

    def _run(self, images, keep):
        import contextlib

        amp = (torch.autocast(self.device.type, dtype=self.autocast) if self.autocast
               else contextlib.nullcontext())
        with torch.no_grad(), amp:
            out = self.model(images) if self.cad is None else self.cad(images, keep)
        out = out["out"] if isinstance(out, dict) else out
        return out.float() if self.autocast else out

    @property
    def label(self) -> str:
        """The setting in a few characters (progress bars)."""
        return f"dense{self.cfg.dense}" if self.cad is None else str(self.mask)

    def macs_parts(self) -> dict:
        """What each multiply-add figure of a record covers (for the results file)."""
        common = ("convs and linear layers, k*k*C_in/groups*C_out per output site (batch "
                  "norm, activations, pooling and interpolation not counted)")
        if self.cad is None:
            parts = {"backbone": "the ResNet backbone", "classifier": "the head"}
        else:
            parts = {"dense": "the backbone before the first adaptive step",
                     "sparse": "the backbone from the first adaptive step (multi-resolution)",
                     "head": "the head (ASPP / decoder)", "mask": "the learned mask estimator"}
        return {"convention": common, "parts": parts,
                "macs_paper_ptflops": "the paper's count: the backbone (+ mask estimator) as "
                         "ptflops counts it (also biases, batch norm, activations and pooling, "
                         "per site)",
                "macs_dense_finest / macs_dense_coarsest": "the plain network at the finest / "
                         "coarsest output stride (head at that stride), whole model"}

    @property
    def network(self):
        """The module that runs: the converted model, or the plain one (``--dense``)."""
        return self.model if self.cad is None else self.cad

    def predict(self, images, targets, ids, timed: bool = True):
        """``(logits, keep, seconds, macs)`` for a batch (``ids``: its frame ids, see
        :meth:`keep_for`).

        ``seconds``: the plain forward (mask computation included, except for the oracle, whose
        mask is given), ``None`` when not ``timed``. ``macs``: per image ``{"total": int,
        <part>: int}`` (converted: dense, sparse, head, mask; plain: backbone, classifier)
        from a counted forward; hooks would distort the timing, so a timed run counts in a
        second forward, an untimed one takes the logits from the counted forward.
        """
        from cad_spconv.macs import MacCounter
        images = images.to(self.device, self.dtype, non_blocking=True).contiguous(
            memory_format=torch.channels_last)
        targets = targets.to(self.device, non_blocking=True)
        oracle = self.mask is not None and self.mask.kind == "oracle"
        given = self.keep_for(images, targets, ids) if oracle else None
        seconds = logits = None
        if timed:
            cuda = self.device.type == "cuda"
            if cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            keep = given if oracle else self.keep_for(images, targets, ids)
            logits = self._run(images, keep)
            if cuda:
                end.record()
                torch.cuda.synchronize(self.device)
                seconds = start.elapsed_time(end) / 1e3
            else:
                seconds = time.perf_counter() - t0
        else:
            keep = given if oracle else self.keep_for(images, targets, ids)
        B = images.shape[0]
        extra = {"mask": keep} if isinstance(keep, torch.nn.Module) else None
        with MacCounter(self.network, B, extra) as counter:
            counted = self._run(images, keep)
        logits = counted if logits is None else logits
        r = counter.result()
        macs = [{"total": int(r["per_image"][b]),
                 **{p: int(v[b]) for p, v in sorted(r["per_image_parts"].items())}}
                for b in range(B)]
        # what the paper's tables count: the backbone (+ the mask estimator), with ptflops
        paper_parts = ("backbone",) if self.cad is None else ("dense", "sparse", "mask")
        ptf = r["ptflops"]["per_image_parts"]
        for b in range(B):
            macs[b]["paper_backbone_ptflops"] = int(sum(ptf[p][b] for p in paper_parts
                                                        if p in ptf))
        return logits, keep, seconds, macs

    def warm_up(self, images, targets, ids):
        """One untimed, uncounted forward (its masks are the batch's own: nothing is drawn
        that a later batch would miss)."""
        images = images.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        self._run(images, self.keep_for(images, targets.to(self.device), ids))

    def level_fractions(self):
        """``[B, L+1]`` fractions of finest cells per level, from the last forward (``None``
        for the plain network)."""
        return None if self.cad is None else self.cad.last_plan.level_fractions()

    def dense_macs(self, size) -> tuple[int, int]:
        """(finest, coarsest) multiply-adds of the dense networks on one image of ``size``."""
        key = (int(size[0]), int(size[1]))
        if key not in self._dense:
            self._dense[key] = tuple(
                dense_macs(self.model, s, key, self.num_classes)["total"]
                for s in (self.cfg.finest_stride, self.cfg.coarsest_stride))
        return self._dense[key]


def num_classes_of(model) -> int:
    """Classes of a segmentation model's last conv (DeepLabV3 / FCN head, or DeepLabV3+'s
    decoder); -1 where there is none."""
    from torch import nn
    head = getattr(model, "classifier", None)
    last = head if isinstance(head, nn.Sequential) else getattr(head, "classifier", None)
    last = last[-1] if isinstance(last, nn.Sequential) and len(last) else None
    return int(getattr(last, "out_channels", -1))
