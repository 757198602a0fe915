"""``cad-spconv bench``: dense coarsest stride, dense finest stride and CAD on the same weights.

CAD pays only if fewer multiply-adds become less time. For every input this times, in one
process and in alternating order, the dense backbone at the coarsest stride, the dense backbone
at the finest stride (torchvision's dilated network) and the content-adaptive backbone (output
densified at the finest stride, as the paper's head reads it) at the same masks, and reports

- ``mac_fraction``: CAD multiply-adds / dense finest-stride multiply-adds (whole backbone);
- time ratios, and the per-MAC efficiency ``eff = t_dense_finest * mac_fraction / t_cad``
  (1.0 = the sparse path is as efficient per multiply-add as the dense vendor conv);
- the share of CAD time spent on geometry (level plan, rulebooks, lattice splits), timed by
  rebuilding exactly what the forward built;
- peak memory of one forward (CUDA: allocator peak; CPU: resident-set peak, sampled);
- Guarantee 2 as a sanity check: the CAD output at the coarse sites equals the dense
  coarsest-stride output.

CPU times are wall clock (median of ``--reps`` after ``--warmup``); CUDA times use events
around a synchronised run. Dense models run in NCHW and channels-last and the faster one is the
reference. Results go to JSON and, with ``--markdown``, to a table headed by the exact command.

Heavy imports stay inside the functions: ``cad-spconv --help`` must stay fast.
"""
from __future__ import annotations

import argparse
import collections
import os
import platform
import shlex
import sys
import threading
import time

OP_MODEL = "conv3x3"  # one 3x3 conv after the adaptive step (op-level timing)
DTYPES = ("float32", "float16", "bfloat16")
FORMATS = ("nchw", "channels_last")


def configure(parser: argparse.ArgumentParser):
    from adapters.builders import CLASSIFIER_MODELS, SEGMENTATION_MODELS
    from cad_spconv.engines import engine_names

    parser.add_argument("--model", default="deeplabv3_resnet101",
                        choices=SEGMENTATION_MODELS + CLASSIFIER_MODELS + (OP_MODEL,),
                        help="backbone to time, random weights (timing does not depend on them); "
                             "conv3x3: one 3x3 conv after the adaptive step, --channels wide "
                             "(default: deeplabv3_resnet101)")
    parser.add_argument("--images", nargs="*", default=[], metavar="IMAGE",
                        help="RGB images (e.g. Cityscapes frames), resized to --size; edge masks "
                             "from cad_spconv.masks.edge. Without images: smooth random images "
                             "with --random-keep block masks")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"),
                        help="input size (default: 512 1024)")
    parser.add_argument("--batch", type=int, default=1,
                        help="images per forward (default: 1); the images are taken in order and "
                             "repeated to fill the last batch")
    parser.add_argument("--threshold", type=float, default=0.35,
                        help="edge mask threshold (default: 0.35)")
    parser.add_argument("--dilation", type=int, default=11,
                        help="edge mask dilation in pixels (default: 11)")
    parser.add_argument("--edge-operator", default="reference", choices=("reference", "sobel"),
                        help="edge detector of cad_spconv.masks.edge (default: reference)")
    parser.add_argument("--random-keep", type=float, default=0.3,
                        help="without --images: kept fraction of the random block masks")
    parser.add_argument("--finest-stride", type=int, default=8)
    parser.add_argument("--coarsest-stride", type=int, default=16)
    parser.add_argument("--channels", type=int, default=256, help="conv3x3 model: channels")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="float16 needs a GPU (default: float32)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--engine", default="auto",
                        help="CAD conv engine(s), comma separated, each a timed variant: "
                             f"{', '.join(engine_names())} (default: auto; tuned times the "
                             "engines per layer shape during the warm-up)")
    parser.add_argument("--tf32", default="on", choices=("on", "off"),
                        help="CUDA float32: TF32 for cuDNN convs, matmuls and spconv alike "
                             "(default: on, PyTorch's default for convs)")
    parser.add_argument("--fold-bn", action="store_true",
                        help="fold eval batch norms into the convs (adapters.fold_batchnorm) in "
                             "every variant, dense and CAD alike")
    parser.add_argument("--dense-format", default="both", choices=("both",) + FORMATS,
                        help="memory format of the dense models; 'both' times both and takes the "
                             "faster as the reference (default)")
    parser.add_argument("--clock", default="wall", choices=("wall", "process"),
                        help="CPU timing: wall clock (default), or the CPU seconds of this "
                             "process (all threads), a proxy that other processes on a busy "
                             "machine disturb less (use it with --threads 1)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per variant (default: 5)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs per variant first (default: 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile one forward per variant (torch.profiler) "
                             "and report its N most expensive ops by self time (default: off)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results here")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="append a results table headed by the command (e.g. BENCHMARKS.md)")
    parser.add_argument("--label", default=None, help="title of the markdown section")
    parser.add_argument("--seed", type=int, default=0)


def main(args, command: str | None = None) -> int:
    import torch

    command = command or _command_line()
    cfg = _check_args(args)
    threads = torch.get_num_threads()
    flags = _math_flags()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)  # random weights must not hit the slow denormal path
        if cfg["device"].type == "cuda":
            # one math mode for every variant: PyTorch runs cuDNN convs (the dense models, the
            # lattice engine's dense part) in TF32 by default but matmuls (1x1 convs, gather
            # GEMMs) and spconv in full FP32; --tf32 sets all three alike
            tf32 = args.tf32 == "on"
            _set_math_flags(tf32, tf32, cudnn_benchmark=True, spconv_tf32=tf32)
        return _run(args, cfg, command)
    finally:  # leave the process as it was (tests call main in-process)
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
        _set_math_flags(**flags)


def _math_flags() -> dict:
    import torch

    flags = {"cudnn_tf32": torch.backends.cudnn.allow_tf32,
             "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
             "cudnn_benchmark": torch.backends.cudnn.benchmark}
    from cad_spconv.backend import spconv_status

    if spconv_status()[0]:  # a run may import spconv and set its flag: snapshot it first
        from spconv import constants

        flags["spconv_tf32"] = constants.SPCONV_ALLOW_TF32
    return flags


def _set_math_flags(cudnn_tf32: bool, matmul_tf32: bool, cudnn_benchmark: bool,
                    spconv_tf32: bool | None = None):
    import torch

    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if spconv_tf32 is not None:
        from cad_spconv.backend import spconv_status

        if spconv_status()[0]:
            from spconv import constants

            constants.SPCONV_ALLOW_TF32 = spconv_tf32


def _run(args, cfg, command) -> int:
    import torch

    torch.manual_seed(args.seed)
    device, dtype = cfg["device"], cfg["dtype"]
    load_before = _loadavg()
    batches, names = _inputs(args)
    keeps, mask_seconds = _masks(args, batches, device)
    bench = _build(args, device, dtype)
    results = []
    with torch.inference_mode():
        for i, (images, keep) in enumerate(zip(batches, keeps)):
            images = images.to(device)
            print(f"[{i + 1}/{len(batches)}] {names[i]}", file=sys.stderr, flush=True)
            res = _bench_input(args, bench, images, keep, device, dtype)
            res["input"] = names[i]
            res["mask_seconds"] = mask_seconds[i]
            results.append(res)
    report = {
        "command": command,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                   if not k.startswith("_") and k != "command"},
        "environment": _environment(device, load_before),
        "inputs": results,
        "summary": _summary(results, bench["engines"]),
    }
    if "tuned" in bench["engines"]:
        from cad_spconv.engines import tuned_choices

        report["tuned"] = [dict(c, dtype=str(c["dtype"])) for c in tuned_choices()]
        picks = collections.Counter(c["engine"] for c in report["tuned"])
        print(f"tuned: {len(report['tuned'])} layer shapes -> "
              + ", ".join(f"{e} x{n}" for e, n in picks.most_common()), flush=True)
    _print_report(report)
    if args.json:
        import json
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown(report))
    return 0


# ---------------------------------------------------------------------- setup
def _command_line() -> str:
    if sys.argv[1:2] == ["bench"]:
        return "cad-spconv bench " + shlex.join(sys.argv[2:])
    return shlex.join(["python", sys.argv[0]] + sys.argv[1:])


def _check_args(args) -> dict:
    import torch

    from cad_spconv.engines import engine_names

    if args.reps < 1 or args.warmup < 0:
        raise SystemExit("bench: --reps must be >= 1 and --warmup >= 0")
    if args.profile < 0:
        raise SystemExit("bench: --profile takes the number of ops to report (>= 0)")
    if args.batch < 1:
        raise SystemExit("bench: --batch must be >= 1")
    f, c = args.finest_stride, args.coarsest_stride
    if f < 1 or c <= f or c % f or (c // f) & (c // f - 1):
        raise SystemExit(f"bench: --coarsest-stride must be the --finest-stride times a power of "
                         f"two > 1, got {f} and {c}")
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    bad = [e for e in engines if e not in engine_names()]
    if not engines or bad:
        raise SystemExit(f"bench: unknown engine {bad[0] if bad else args.engine!r}; choose from "
                         f"{', '.join(engine_names())}")
    args.engines = engines
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"bench: --device must be cpu or cuda[:i], got {args.device}")
    dtype = getattr(torch, args.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise SystemExit("bench: float16 has no fast CPU convolutions; use --dtype bfloat16 or "
                         "float32 on CPU, float16 on a GPU")
    for path in args.images:
        if not os.path.isfile(path):
            raise SystemExit(f"bench: image not found: {path}")
    return {"device": device, "dtype": dtype}


def _inputs(args):
    """Batches of ImageNet-normalised float32 images ``[B, 3, H, W]`` on the CPU, and names."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .data import normalize

    H, W = args.size
    if args.images:
        from PIL import Image

        images, names = [], []
        for path in args.images:
            rgb = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
            img = normalize(rgb)[None]
            if tuple(img.shape[-2:]) != (H, W):
                img = F.interpolate(img, size=(H, W), mode="bilinear", align_corners=False)
            images.append(img)
            names.append(os.path.basename(path))
    else:
        gen = torch.Generator().manual_seed(args.seed)
        count = max(args.batch, 3)
        coarse = torch.randn(count, 3, H // 32 + 1, W // 32 + 1, generator=gen)
        images = list(F.interpolate(coarse, size=(H, W), mode="bilinear").split(1))
        names = [f"random{i}" for i in range(count)]
    B = args.batch
    n = -(-len(images) // B) * B
    images = [images[i % len(images)] for i in range(n)]
    names = [names[i % len(names)] for i in range(n)]
    batches = [torch.cat(images[i:i + B]) for i in range(0, n, B)]
    batch_names = ["+".join(names[i:i + B]) for i in range(0, n, B)]
    return batches, batch_names


def _masks(args, batches, device):
    """Keep masks per batch (bool, image resolution, on ``device``) and the seconds each took."""
    import torch

    keeps, seconds = [], []
    for images in batches:
        images = images.to(device)
        _sync(device)
        t0 = time.perf_counter()
        if args.images:
            from cad_spconv.masks import edge

            keep = edge(images, args.threshold, args.dilation, operator=args.edge_operator)
        else:
            keep = _random_blocks(images.shape, args, device)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
        keeps.append(keep)
    del torch
    return keeps, seconds


def _random_blocks(shape, args, device):
    """Blobs of kept cells (random 4x4-cell blocks at the finest grid), image resolution."""
    import torch

    B, _, H, W = shape
    cell = args.finest_stride * 4
    gen = torch.Generator().manual_seed(args.seed + 1)
    blocks = torch.rand(B, 1, -(-H // cell), -(-W // cell), generator=gen) < args.random_keep
    keep = blocks.repeat_interleave(cell, 2).repeat_interleave(cell, 3)[..., :H, :W]
    return keep.to(device)


# ---------------------------------------------------------------------- variants
class Variant:
    """One timed configuration: ``setup(images, keep)`` (untimed: memory format, inputs) returns
    the arguments of ``run`` (timed; returns a dense map, or a CADTensor for op-level runs).
    CAD runs leave the plan and rulebook cache of their last forward in ``last``."""

    def __init__(self, name, kind, setup, run, macs, engine=None, fmt=None):
        self.name, self.kind = name, kind
        self.setup, self.run, self.macs = setup, run, macs
        self.engine, self.fmt = engine, fmt
        self.last = None

    def keep_geometry(self, tensor):
        self.last = (tensor.plan, tensor.cache)
        return tensor


def _formats(args):
    return FORMATS if args.dense_format == "both" else (args.dense_format,)


def _to_format(x, fmt):
    import torch

    return x.contiguous(memory_format=torch.channels_last if fmt == "channels_last"
                        else torch.contiguous_format)


def _build(args, device, dtype) -> dict:
    """Variants for ``args.model``: dense at both strides (per memory format) and CAD per
    engine, all sharing one set of random weights."""
    if args.model == OP_MODEL:
        return _build_conv(args, device, dtype)
    from torch import nn
    from torchvision.models._utils import IntermediateLayerGetter

    from adapters import convert
    from adapters.builders import SEGMENTATION_MODELS, classifier_model, segmentation_model
    from adapters.output_stride import STAGES, STEM

    f, c = args.finest_stride, args.coarsest_stride
    if args.model in SEGMENTATION_MODELS:
        source = segmentation_model(args.model, output_stride=f)
        arch = args.model.split("_", 1)[1]
        trunks = {s: IntermediateLayerGetter(classifier_model(arch, output_stride=s),
                                             {"layer4": "out"}) for s in (f, c)}
        for trunk in trunks.values():
            trunk.load_state_dict(source.backbone.state_dict())
        dense = trunks
    else:
        source = classifier_model(args.model, output_stride=f)
        dense = {}
        for s in (f, c):
            net = classifier_model(args.model, output_stride=s)
            net.load_state_dict(source.state_dict())
            dense[s] = nn.Sequential(*[getattr(net, n) for n in STEM + STAGES])
    cads = {e: convert(source, f, c, engine=e) for e in args.engines}
    if args.fold_bn:  # every variant alike (each fold copies its model)
        from adapters import fold_batchnorm

        dense = {s: fold_batchnorm(m.eval()) for s, m in dense.items()}
        cads = {e: fold_batchnorm(m.eval()) for e, m in cads.items()}
    for m in list(dense.values()) + list(cads.values()):
        m.eval().to(device=device, dtype=dtype)
    segmentation = args.model in SEGMENTATION_MODELS
    dense_call = {s: (lambda m: (lambda x: m(x)["out"]))(m) if segmentation else m
                  for s, m in dense.items()}

    variants = []
    for s, kind in ((c, "dense_coarse"), (f, "dense_fine")):
        for fmt in _formats(args):
            variants.append(Variant(
                f"dense{s}[{fmt}]", kind,
                (lambda fmt: lambda images, keep: (_to_format(images.to(dtype), fmt),))(fmt),
                dense_call[s], (lambda m: lambda images, keep: _count(m, images))(dense[s]),
                fmt=fmt))
    for e, m in cads.items():
        v = Variant(f"cad[{e}]", "cad",
                    lambda images, keep: (_to_format(images.to(dtype), "channels_last"), keep),
                    None, (lambda m: lambda images, keep: _count(m, images.to(dtype), keep))(m),
                    engine=e)
        v.run = (lambda m, v: lambda x, keep: v.keep_geometry(m.forward_features(x, keep)).dense())(m, v)
        variants.append(v)
    return {"variants": variants, "engines": args.engines}


def _count(model, images, keep=None) -> int:
    """Multiply-adds of the backbone (dense trunk, or the CAD model's forward_features)."""
    import torch

    from cad_spconv.macs import MacCounter

    with MacCounter(model, images.shape[0]) as counter, torch.inference_mode():
        if keep is None:
            model(images)
        else:
            model.forward_features(images, keep)
    return counter.result()["total"]


def _build_conv(args, device, dtype) -> dict:
    """One 3x3 conv of the step after the adaptive downsampling(s). Dense finest stride: the
    conv with dilation ``2**L`` on the finest grid; dense coarsest stride: the plain conv on the
    coarse grid (the finest features subsampled, so Guarantee 2 holds exactly); CAD: the conv on
    the step-``L`` sites (plan geometry and rulebook built inside the timed run)."""
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
        return lambda images, keep: (_to_format(finest(images)[:, :, ::s, ::s], fmt),)

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
        v = Variant(f"cad[{e}]", "cad", cad_setup, None, macs_cad, engine=e)
        # a fresh tensor (and rulebook cache) per run: the rulebook is built inside the timing
        v.run = (lambda e, v: lambda rows, plan: v.keep_geometry(
            CF.conv2d(CADTensor(rows, plan, L), w, engine=e)))(e, v)
        variants.append(v)
    return {"variants": variants, "engines": args.engines}


# ---------------------------------------------------------------------- measuring
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, args, device, clock=time.perf_counter) -> float:
    import torch

    if device.type == "cuda":
        with torch.cuda.device(device):  # events record on the current device's stream
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
    t0 = clock()
    fn(*args)
    return clock() - t0


def _median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


class _RssSampler:
    """Peak resident set size above the level at start, sampled every ~0.5 ms (CPU runs)."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return False

    @property
    def delta(self) -> int:
        return self.peak - self.base


def _release_free_heap():
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), where available."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_memory(fn, args, device):
    """Bytes a run needs above what was allocated before it (``None`` where unmeasurable)."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn(*args)
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - base
    if not os.path.exists("/proc/self/statm"):
        return None
    _release_free_heap()  # else the run reuses freed pages and the RSS does not grow
    with _RssSampler() as sampler:
        out = fn(*args)
        del out
    return sampler.delta


def _replay_geometry(plan, books, engine, device):
    """Rebuild the geometry one CAD forward builds: the level plan from the keep mask, every
    step's sites / owners / areas, and every rulebook with what its engine reads (for
    ``tuned``: what the engines it picked for that rulebook read)."""
    from cad_spconv.engines import prepare, tuned_engines
    from cad_spconv.plan import LevelPlan

    def run():
        fresh = LevelPlan(plan.levels.clone(), plan.num_levels)
        for step in range(fresh.num_levels + 1):
            fresh.geometry(step)
        for key, book in books:
            fresh_book = key.build(fresh)
            for e in (tuned_engines(book) or ["auto"]) if engine == "tuned" else [engine]:
                prepare(fresh_book, e, device)
    return run


def _plan_seconds(keep, grid, num_levels, device):
    """Seconds to turn the keep mask into a level plan (reduction to the grid + quadtree)."""
    from cad_spconv.plan import make_plan

    return lambda: make_plan(keep, grid, num_levels, device=device)


def _bench_input(args, bench, images, keep, device, dtype) -> dict:
    import torch

    from cad_spconv.tensor import CADTensor

    clock = time.process_time if args.clock == "process" else time.perf_counter
    states = {v.name: v.setup(images, keep) for v in bench["variants"]}
    outputs, failed = {}, {}
    for v in bench["variants"]:
        try:
            for _ in range(max(1, args.warmup)):
                outputs[v.name] = v.run(*states[v.name])
        except Exception as exc:  # e.g. an engine without this dtype: report, go on
            if v.kind != "cad":
                raise
            failed[v.name] = f"{type(exc).__name__}: {exc}"
            print(f"bench: {v.name} failed and is left out: {failed[v.name]}", file=sys.stderr)
    variants = [v for v in bench["variants"] if v.name not in failed]
    if not any(v.kind == "cad" for v in variants):
        raise SystemExit("bench: every CAD variant failed: " + "; ".join(failed.values()))
    # keep one output per kind for the checks, drop the rest before timing
    cad_out = outputs[next(v.name for v in variants if v.kind == "cad")]
    coarse_out = outputs[next(v.name for v in variants if v.kind == "dense_coarse")]
    outputs.clear()
    samples = {v.name: [] for v in variants}
    for r in range(args.reps):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate
        for v in order:
            samples[v.name].append(_time_once(v.run, states[v.name], device, clock))
    res = {"variants": {}, "failed": failed}
    for v in variants:
        entry = {"kind": v.kind, "seconds": _median(samples[v.name]),
                 "samples": samples[v.name], "macs": int(v.macs(images, keep))}
        if v.fmt:
            entry["format"] = v.fmt
        if v.engine:
            entry["engine"] = v.engine
        res["variants"][v.name] = entry
    if not args.no_memory:
        from cad_spconv.engines import cached_bytes

        for v in variants:
            entry = res["variants"][v.name]
            entry["peak_bytes"] = _peak_memory(v.run, states[v.name], device)
            if v.kind == "cad" and entry["peak_bytes"] is not None:
                # allocated in the warm-up and kept (workspaces, weight layouts): part of what
                # a CAD forward needs, so counted in its peak (all CAD variants' together)
                entry["engine_cache_bytes"] = cached_bytes(device)
                entry["peak_bytes"] += entry["engine_cache_bytes"]
    # geometry share, per CAD variant: replay exactly what its last forward built
    for v in variants:
        if v.kind != "cad" or v.last is None:
            continue
        plan, cache = v.last
        replay = _replay_geometry(plan, cache.items(), v.engine, device)
        planning = _plan_seconds(keep, plan.grid, plan.num_levels, device)
        n = max(3, args.reps)
        entry = res["variants"][v.name]
        entry["geometry_seconds"] = (
            _median([_time_once(replay, (), device, clock) for _ in range(n)])
            + _median([_time_once(planning, (), device, clock) for _ in range(n)]))
        entry["rulebooks"] = len(cache)
        entry["level_fractions"] = plan.level_fractions().mean(0).tolist()
    if args.profile:
        for v in variants:
            res["variants"][v.name]["profile_ms"] = _profile(v.run, states[v.name], device,
                                                             args.profile)
    # Guarantee 2: CAD at the coarse sites == dense coarsest stride
    dense_cad = cad_out.dense() if isinstance(cad_out, CADTensor) else cad_out
    s = args.coarsest_stride // args.finest_stride
    sampled = dense_cad[:, :, ::s, ::s].float()
    ref = coarse_out.float()
    if sampled.shape == ref.shape:
        err = (sampled - ref).abs().max() / ref.abs().max().clamp_min(1e-30)
        res["guarantee2_rel_error"] = float(err)
    del torch
    return res


def _profile(fn, args, device, top: int) -> dict:
    """Self time per op (ms) of one profiled run: the ``top`` most expensive ops and the rest
    summed as ``"(other)"``, plus ``"(total)"``. On CUDA, device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    _sync(device)
    with profile(activities=activities) as prof:
        fn(*args)
        _sync(device)
    per_op = {}
    for event in prof.key_averages():
        us = (getattr(event, "self_device_time_total", None) if device.type == "cuda"
              else event.self_cpu_time_total)
        if us:
            per_op[event.key] = per_op.get(event.key, 0.0) + us / 1e3
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    out = dict(ranked[:top])
    out["(other)"] = sum(ms for _, ms in ranked[top:])
    out["(total)"] = sum(per_op.values())
    return out


# ---------------------------------------------------------------------- reporting
def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(device, load_before) -> dict:
    import torch

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["math_flags"] = _math_flags()
    try:
        from cad_spconv.backend import spconv_status

        env["spconv"] = spconv_status()[1]
    except Exception as exc:  # informational only
        env["spconv"] = repr(exc)
    return env


def _best(variants: dict, kind: str):
    """(name, entry) of the fastest variant of a kind (dense: the faster memory format)."""
    cands = [(n, e) for n, e in variants.items() if e["kind"] == kind]
    return min(cands, key=lambda ne: ne[1]["seconds"])


def _input_summary(res: dict, engines) -> dict:
    v = res["variants"]
    _, coarse = _best(v, "dense_coarse")
    fine_name, fine = _best(v, "dense_fine")
    out = {"dense_coarse_seconds": coarse["seconds"], "dense_fine_seconds": fine["seconds"],
           "dense_fine_format": fine.get("format"), "cad": {}}
    for e in engines:
        if f"cad[{e}]" not in v:
            continue
        cad = v[f"cad[{e}]"]
        frac = cad["macs"] / fine["macs"]
        t = cad["seconds"]
        out["cad"][e] = {
            "seconds": t, "mac_fraction": frac,
            "vs_dense_fine": t / fine["seconds"], "vs_dense_coarse": t / coarse["seconds"],
            "eff": fine["seconds"] * frac / t,
            "geometry_share": cad.get("geometry_seconds", float("nan")) / t,
        }
    res["summary"] = out
    return out


def _summary(results, engines) -> dict:
    """Per engine over all inputs: sums of the median times, and ratios of the sums."""
    per = [_input_summary(r, engines) for r in results]
    fine = sum(p["dense_fine_seconds"] for p in per)
    coarse = sum(p["dense_coarse_seconds"] for p in per)
    out = {"dense_fine_seconds": fine, "dense_coarse_seconds": coarse, "cad": {}}
    for e in engines:
        if any(e not in p["cad"] for p in per):
            continue  # failed on some input: no total
        t = sum(p["cad"][e]["seconds"] for p in per)
        fine_macs = sum(r["variants"][_best(r["variants"], "dense_fine")[0]]["macs"]
                        for r in results)
        cad_macs = sum(r["variants"][f"cad[{e}]"]["macs"] for r in results)
        geo = sum(r["variants"][f"cad[{e}]"].get("geometry_seconds", float("nan"))
                  for r in results)
        frac = cad_macs / fine_macs
        out["cad"][e] = {"seconds": t, "mac_fraction": frac, "vs_dense_fine": t / fine,
                         "vs_dense_coarse": t / coarse, "eff": fine * frac / t,
                         "geometry_share": geo / t}
    return out


def _ms(s) -> str:
    return f"{1e3 * s:.0f}" if s >= 0.1 else f"{1e3 * s:.1f}"


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:.0f}"


def _rows(report):
    """Table rows (one per input and engine, then the totals)."""
    engines = list(report["config"]["engines"])
    rows = []
    for r in report["inputs"]:
        s = r["summary"]
        v = r["variants"]
        fine_name = _best(v, "dense_fine")[0]
        for e in [e for e in engines if e in s["cad"]]:
            c = s["cad"][e]
            cad = v[f"cad[{e}]"]
            kept = cad.get("level_fractions", [float("nan")])[0]
            rows.append([r["input"], e, f"{kept:.1%}", f"{c['mac_fraction']:.3f}",
                         _ms(s["dense_coarse_seconds"]),
                         f"{_ms(s['dense_fine_seconds'])} ({s['dense_fine_format']})",
                         _ms(c["seconds"]), f"{c['vs_dense_fine']:.3f}", f"{c['eff']:.2f}",
                         f"{c['geometry_share']:.1%}",
                         f"{_mib(v[fine_name].get('peak_bytes'))} / {_mib(cad.get('peak_bytes'))}",
                         f"{r.get('guarantee2_rel_error', float('nan')):.1e}"])
    t = report["summary"]
    for e in [e for e in engines if e in t["cad"]]:
        c = t["cad"][e]
        rows.append(["**all**", e, "", f"{c['mac_fraction']:.3f}", _ms(t["dense_coarse_seconds"]),
                     _ms(t["dense_fine_seconds"]), _ms(c["seconds"]),
                     f"**{c['vs_dense_fine']:.3f}**", f"**{c['eff']:.2f}**",
                     f"{c['geometry_share']:.1%}", "", ""])
    return rows


HEADER = ["input", "engine", "kept cells", "MAC fraction", "dense c [ms]", "dense f [ms]",
          "CAD [ms]", "CAD / dense f", "eff", "geometry", "peak MiB dense f / CAD",
          "Guar. 2 err"]


def markdown(report) -> str:
    """A markdown section: title, exact command, machine, table."""
    cfg, env = report["config"], report["environment"]
    title = cfg.get("label") or (f"{cfg['model']} {cfg['size'][0]}x{cfg['size'][1]} batch "
                                 f"{cfg['batch']}, {env['device']} {cfg['dtype']}")
    f, c = cfg["finest_stride"], cfg["coarsest_stride"]
    load = lambda v: "n/a" if v is None else "/".join(f"{x:.1f}" for x in v)  # noqa: E731
    lines = [
        f"\n### {title}\n",
        f"`{report['command']}`\n",
        f"{env['time']}; {env.get('gpu', env['cpu'])}; torch {env['torch']}, "
        f"{env['threads']} threads; load average {load(env['loadavg_before'])} before, "
        f"{load(env['loadavg_after'])} after"
        + (f"; {' '.join(f'{k}={v}' for k, v in env['malloc_env'].items())}"
           if env["malloc_env"] else "") + ".",
        f"Dense c / dense f: the dense backbone at stride {c} / {f} (faster memory format); CAD: "
        f"stride {f}->{c}, output densified at stride {f}; median of {cfg['reps']} runs after "
        f"{cfg['warmup']} warm-up, variants alternating"
        + (", CPU seconds of the process (--clock process), not wall clock"
           if cfg.get("clock") == "process" and env["device"] == "cpu" else "")
        + ". eff = t_dense_f x MAC fraction / t_CAD; "
        "geometry = plan + rulebooks share of the CAD time.\n",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    failed = sorted({f"{name}: {why}" for r in report["inputs"]
                     for name, why in r.get("failed", {}).items()})
    if failed:
        lines += ["", "Left out (failed): " + "; ".join(failed)]
    return "\n".join(lines) + "\n"


def _print_report(report):
    widths = [max(len(h), *(len(r[i]) for r in _rows(report))) for i, h in enumerate(HEADER)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    for row in _rows(report):
        print("  ".join(x.replace("*", "").ljust(w) for x, w in zip(row, widths)))
    for r in report["inputs"]:
        times = ", ".join(f"{n} {_ms(e['seconds'])}" for n, e in r["variants"].items())
        print(f"  {r['input']}: {times} ms")
    for r in report["inputs"]:
        profiles = {n: e["profile_ms"] for n, e in r["variants"].items() if "profile_ms" in e}
        if profiles:
            print(profile_table(profiles, title=f"profile, {r['input']} (self time, ms)"))


def profile_table(profiles: dict, title: str = "profile (self time, ms)") -> str:
    """Markdown table of ``{variant: {op: ms}}``: one row per op, one column per variant."""
    names = list(profiles)
    ops = sorted({op for p in profiles.values() for op in p if not op.startswith("(")},
                 key=lambda op: -max(p.get(op, 0.0) for p in profiles.values()))
    lines = [title, "", "| op | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for op in ops + ["(other)", "(total)"]:
        cells = [f"{profiles[n][op]:.1f}" if op in profiles[n] else "" for n in names]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
