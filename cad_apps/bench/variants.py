"""What ``cad-spconv bench`` times: dense models at both strides (per memory format) and the CAD
model per engine, all on one set of random weights."""
from __future__ import annotations

__all__ = ["Variant", "build_variants", "FORMATS", "OP_MODEL", "to_format"]

OP_MODEL = "conv3x3"  # one 3x3 conv after the adaptive step (op-level timing)
FORMATS = ("nchw", "channels_last")


class Variant:
    """One timed configuration: ``setup(images, keep)`` (untimed: memory format, inputs) returns
    the arguments of ``run`` (timed; returns a dense map, or a CADTensor for op-level runs).
    CAD runs leave the plan and rulebook cache of their last forward in ``last`` while
    ``capture`` is on (the memory passes turn it off: a forward frees its geometry with its
    tensors, and holding it would add it to the measured peak). ``plans``: whether ``run``
    builds the level plan and its step geometry (models) or gets them from ``setup`` (the
    one-conv model), which decides what the geometry share replays. ``reuse_output``: CAD
    densifies into buffers it keeps (:meth:`densify`)."""

    def __init__(self, name, kind, setup, run, macs, engine=None, fmt=None, plans=True,
                 reuse_output=False):
        self.name, self.kind = name, kind
        self.setup, self.run, self.macs = setup, run, macs
        self.engine, self.fmt = engine, fmt
        self.plans = plans
        self.last = None
        self.capture = True
        self.kept_outputs = {} if reuse_output else None

    def densify(self, tensor):
        """``tensor.dense(consume=True)`` (the map in the features' own buffer, where
        ``forward_features(..., room_for_dense=True)`` gave it room); with ``reuse_output``
        into one kept buffer per shape and dtype (``dense(out=...)``, as a video loop would):
        the first result that is not a view of the features becomes the buffer."""
        if self.kept_outputs is None:  # in the features' buffer where it has room
            return tensor.dense(consume=True)
        f = tensor.features
        key = (tensor.batch_size, tuple(tensor.plan.grid), f.shape[1], f.dtype, f.device)
        buf = self.kept_outputs.get(key)
        out = tensor.dense(out=buf)
        if buf is None and out.untyped_storage().data_ptr() != f.untyped_storage().data_ptr():
            self.kept_outputs[key] = out
        return out

    def kept_output_bytes(self) -> int:
        """Bytes of the kept output buffers (part of CAD's peak memory)."""
        return sum(t.untyped_storage().nbytes() for t in (self.kept_outputs or {}).values())

    def keep_geometry(self, tensor):
        if self.capture:
            self.last = (tensor.plan, tensor.cache)
        return tensor


def _tamed(model, seed: int):
    """``model`` with batch-norm statistics that keep its features near unit scale.

    Fresh random weights come with running statistics mean 0 / variance 1, so in eval mode each
    batch norm passes its input through and features grow block after block: ResNet-101 at
    1024x2048 overflows float16 (inf, then NaN). One training-mode pass over noise sets each
    running statistic to what that layer sees, as training would. Timing does not depend on the
    values; this only keeps every dtype finite (and Guarantee 2 comparable)."""
    import torch
    from torch import nn

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one pass, exactly that pass's statistics
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 96, 160, generator=gen))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def _formats(args):
    return FORMATS if args.dense_format == "both" else (args.dense_format,)


def to_format(x, fmt):
    import torch

    return x.contiguous(memory_format=torch.channels_last if fmt == "channels_last"
                        else torch.contiguous_format)


def build_variants(args, device, dtype) -> dict:
    """Variants for ``args.model``, all sharing one set of random weights: the dense network at
    the finest and the coarsest stride (per memory format), CAD per engine, and where the dtype
    is not float32 the dense finest network in NCHW float32 (the usual baseline, reported;
    not with ``args.no_float32_baseline``).

    ``args.scope``: ``"backbone"`` times the backbones (CAD: ``forward_features``, densified at
    the finest stride); ``"model"`` the whole models (segmentation: the plain networks with
    their heads at their stride, CAD with the head densified at the finest stride or, with
    ``args.sparse_head``, on the multi-resolution tensor). ``args.compile_dense``: the
    channels-last dense networks also under ``adapters.compiled_for_inference``, of the same
    kinds (the report's fastest dense configuration is chosen among them all), and per engine
    ``e`` a CAD variant ``cad[e,compiled]`` with its batch norms folded and its dense stages
    compiled alike (``adapters.optimize_for_inference``); ``engines`` lists them all."""
    if args.model == OP_MODEL:
        return _build_conv(args, device, dtype)
    import copy

    import torch
    from torch import nn
    from torchvision.models._utils import IntermediateLayerGetter

    from adapters import convert
    from adapters.builders import SEGMENTATION_MODELS, classifier_model, segmentation_model
    from adapters.output_stride import STAGES, STEM

    f, c = args.finest_stride, args.coarsest_stride
    whole = args.scope == "model"
    segmentation = args.model in SEGMENTATION_MODELS
    if segmentation:
        source = _tamed(segmentation_model(args.model, output_stride=f), args.seed)
        dense = {}
        for s in (f, c):
            if whole:  # the plain network at stride s, its head at s (the paper's baselines)
                net = segmentation_model(args.model, output_stride=s, trained_output_stride=s)
                net.load_state_dict(source.state_dict())
            else:
                arch = args.model.split("_", 1)[1]
                net = IntermediateLayerGetter(classifier_model(arch, output_stride=s),
                                              {"layer4": "out"})
                net.load_state_dict(source.backbone.state_dict())
            dense[s] = net
    else:
        source = _tamed(classifier_model(args.model, output_stride=f), args.seed)
        dense = {}
        for s in (f, c):
            net = classifier_model(args.model, output_stride=s)
            net.load_state_dict(source.state_dict())
            dense[s] = net if whole else nn.Sequential(*[getattr(net, n) for n in STEM + STAGES])
    sparse_head = bool(whole and segmentation and args.sparse_head)
    cads = {e: convert(source, f, c, engine=e, sparse_head=sparse_head) for e in args.engines}
    if args.fold_bn:  # every variant alike (each fold copies its model)
        from adapters import fold_batchnorm

        dense = {s: fold_batchnorm(m.eval()) for s, m in dense.items()}
        cads = {e: fold_batchnorm(m.eval()) for e, m in cads.items()}
    reference = None
    if dtype != torch.float32 and not args.no_float32_baseline:  # the usual baseline, reported
        reference = copy.deepcopy(dense[f]).eval().to(device=device)
    if args.im2col_dilated:  # the timed variants alike, after the fold (each swap copies its
        # model); not the float32 reference, where oneDNN's dilated convs are the faster route
        from adapters import im2col_dilated_convs

        dense = {s: im2col_dilated_convs(m) for s, m in dense.items()}
        cads = {e: im2col_dilated_convs(m) for e, m in cads.items()}
    for m in list(dense.values()) + list(cads.values()):
        m.eval().to(device=device, dtype=dtype)
    # channels-last runs get channels-last weights too, as PyTorch recommends (model.to(
    # memory_format=...)); for CAD they make the GEMM weights views, not kept copies
    cl = torch.channels_last
    models = {(s, fmt): (m if fmt == "nchw" else copy.deepcopy(m).to(memory_format=cl))
              for s, m in dense.items() for fmt in _formats(args)}
    cads = {e: m.to(memory_format=cl) for e, m in cads.items()}
    if args.compile_dense:  # CAD's dense stages compiled alike, its batch norms folded (as
        # inductor's freezing folds the dense networks'): one more CAD variant per engine
        from adapters import optimize_for_inference

        cads.update({f"{e},compiled": optimize_for_inference(m, compile_dense=True)
                     for e, m in list(cads.items())})

    def call(m):
        return (lambda x: m(x)["out"]) if segmentation else m

    variants = []
    for s, kind in ((c, "dense_coarse"), (f, "dense_fine")):
        for fmt in _formats(args):
            m = models[(s, fmt)]
            variants.append(Variant(
                f"dense{s}[{fmt}]", kind,
                (lambda fmt: lambda images, keep: (to_format(images.to(dtype), fmt),))(fmt),
                call(m), (lambda m: lambda images, keep: _count(m, images.to(dtype)))(m),
                fmt=fmt))
    if args.compile_dense:  # one more candidate for the fastest dense configuration
        from adapters import compiled_for_inference

        for s, kind in ((c, "dense_coarse"), (f, "dense_fine")):
            m = models.get((s, "channels_last")) or copy.deepcopy(dense[s]).to(memory_format=cl)
            variants.append(Variant(
                f"dense{s}[channels_last,compiled]", kind,
                lambda images, keep: (to_format(images.to(dtype), "channels_last"),),
                compiled_for_inference(call(m)),
                (lambda m: lambda images, keep: _count(m, images.to(dtype)))(m),
                fmt="channels_last, torch.compile"))
    if reference is not None:
        variants.append(Variant(
            f"dense{f}[nchw,float32]", "dense_reference",
            lambda images, keep: (images.to(torch.float32).contiguous(),), call(reference),
            (lambda m: lambda images, keep: _count(m, images.to(torch.float32)))(reference),
            fmt="nchw"))
    for e, m in cads.items():  # e: an engine, or "<engine>,compiled"
        v = Variant(f"cad[{e}]", "cad",
                    lambda images, keep: (to_format(images.to(dtype), "channels_last"), keep),
                    None, (lambda m: lambda images, keep: _count(m, images.to(dtype), keep,
                                                                 whole))(m),
                    engine=e.split(",")[0], reuse_output=args.reuse_output)
        if whole:
            _capture_geometry(m, v)
            v.run = (lambda m: lambda x, keep: (m(x, keep)["out"] if segmentation
                                                else m(x, keep)))(m)
        else:
            v.run = (lambda m, v: lambda x, keep: v.densify(v.keep_geometry(
                m.forward_features(x, keep, room_for_dense=v.kept_outputs is None))))(m, v)
        variants.append(v)
    return {"variants": variants, "engines": list(cads)}


def _capture_geometry(model, variant):
    """Keep the plan and rulebook cache of each whole-model forward in ``variant.last`` (for
    the geometry replay): the tensor the model enters its first adaptive step with."""
    enter = model._enter

    def entering(*args, **kwargs):
        tensor = enter(*args, **kwargs)
        variant.keep_geometry(tensor)
        return tensor

    model._enter = entering


def _count(model, images, keep=None, whole=False) -> int:
    """Multiply-adds of what a variant runs (dense model, CAD ``forward_features`` or, with
    ``whole``, the whole CAD model)."""
    import torch

    from cad_spconv.macs import MacCounter

    with MacCounter(model, images.shape[0]) as counter, torch.inference_mode():
        if keep is None:
            model(images)
        elif whole:
            model(images, keep)
        else:
            model.forward_features(images, keep)
    return counter.result()["total"]


def _build_conv(args, device, dtype) -> dict:
    """One 3x3 conv of the step after the adaptive downsampling(s). Dense finest stride: the
    conv with dilation ``2**L`` on the finest grid; dense coarsest stride: the plain conv on the
    coarse grid (the finest features subsampled, so Guarantee 2 holds exactly); CAD: the conv on
    the step-``L`` sites, its rulebook built inside the timed run (the plan and its geometry in
    the untimed setup)."""
    import torch
    import torch.nn.functional as F

    from cad_spconv import functional as CF
    from cad_spconv.plan import make_plan
    from cad_spconv.tensor import CADTensor

    C, f, c = args.channels, args.finest_stride, args.coarsest_stride
    L = (c // f).bit_length() - 1
    gen = torch.Generator().manual_seed(args.seed)
    w = (torch.randn(C, C, 3, 3, generator=gen) / (3 * C ** 0.5)).to(device=device, dtype=dtype)
    proj = torch.randn(C, 3, 1, 1, generator=gen).to(device=device, dtype=dtype)

    def finest(images):  # a C-channel map on the finest grid
        x = F.avg_pool2d(images.to(dtype), f, f, ceil_mode=True)
        return F.conv2d(x, proj)

    def dense_setup(stride, fmt):
        s = 2 ** L if stride == c else 1
        return lambda images, keep: (to_format(finest(images)[:, :, ::s, ::s], fmt),)

    dense_run = {f: lambda x: F.conv2d(x, w, padding=2 ** L, dilation=2 ** L),
                 c: lambda x: F.conv2d(x, w, padding=1)}

    def cad_setup(images, keep):
        x = finest(images)
        plan = make_plan(keep, x.shape[-2:], L)
        coords = plan.geometry(L).coords
        rows = x.permute(0, 2, 3, 1)[coords[:, 0], coords[:, 1], coords[:, 2]].contiguous()
        return rows, plan

    def macs_dense(stride):
        def count(images, keep):
            x = dense_setup(stride, "nchw")(images, keep)[0]
            return 9 * C * C * x.shape[0] * x.shape[2] * x.shape[3]
        return count

    def macs_cad(images, keep):
        return 9 * C * C * cad_setup(images, keep)[1].num_sites(L)

    variants = []
    for s, kind in ((c, "dense_coarse"), (f, "dense_fine")):
        for fmt in _formats(args):
            variants.append(Variant(f"dense{s}[{fmt}]", kind, dense_setup(s, fmt), dense_run[s],
                                    macs_dense(s), fmt=fmt))
    for e in args.engines:
        v = Variant(f"cad[{e}]", "cad", cad_setup, None, macs_cad, engine=e, plans=False)
        # a fresh tensor (and rulebook cache) per run: the rulebook is built inside the timing
        v.run = (lambda e, v: lambda rows, plan: v.keep_geometry(
            CF.conv2d(CADTensor(rows, plan, L), w, engine=e)))(e, v)
        variants.append(v)
    return {"variants": variants, "engines": args.engines}
