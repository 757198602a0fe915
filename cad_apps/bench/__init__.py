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

CPU times are wall clock (median of ``--reps`` rounds after ``--warmup``; every round runs
each variant once, in a seeded random order); CUDA times use events
around a synchronised run. Dense models run in NCHW and channels-last and the faster one is the
reference. Results go to JSON and, with ``--markdown``, to a table headed by the exact command.

Heavy imports stay inside the functions: ``cad-spconv --help`` must stay fast.
"""
from __future__ import annotations

import argparse
import collections
import os
import shlex
import sys
import time

from .measure import bench_input, math_flags, set_math_flags, sync
from .report import environment, loadavg, markdown, print_report, summary
from .variants import FORMATS, OP_MODEL, build_variants

DTYPES = ("float32", "float16", "bfloat16")
FORMAT = "cad-spconv-bench/1"  # the "format" of a --json report: what a re-run may replace


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
    parser.add_argument("--keep", default="mask", choices=("mask", "none", "all"),
                        help="mask: edge masks of --images, else random blocks (default); none / "
                             "all: nothing / everything kept (CAD equals the dense network at the "
                             "coarsest / finest stride)")
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
    parser.add_argument("--scope", default="backbone", choices=("backbone", "model"),
                        help="time the backbones (default; CAD densified at the finest stride) "
                             "or the whole models (segmentation: the plain networks with their "
                             "heads at their stride; CAD with the head at the finest stride)")
    parser.add_argument("--sparse-head", action="store_true",
                        help="with --scope model: run the CAD head on the multi-resolution tensor")
    parser.add_argument("--fold-bn", action="store_true",
                        help="fold eval batch norms into the convs (adapters.fold_batchnorm) in "
                             "every variant, dense and CAD alike")
    parser.add_argument("--im2col-dilated", action="store_true",
                        help="run the dense convs with dilation >= 6 (DeepLabV3's ASPP) as "
                             "im2col GEMMs (adapters.im2col_dilated_convs) in every variant, "
                             "dense and CAD alike (with --scope model and a segmentation "
                             "model): oneDNN's bfloat16 convs slowed 4-14x at dilations 6-36 "
                             "on an AMX Xeon")
    parser.add_argument("--compile-dense", action="store_true",
                        help="also time the channels-last dense networks under torch.compile "
                             "(inductor, weights frozen: batch norm folded, activations fused "
                             "into the convs), one more candidate for the fastest dense "
                             "configuration, and CAD alike per engine (cad[ENGINE,compiled]: "
                             "batch norms folded, its dense stages compiled, "
                             "adapters.optimize_for_inference); the compile happens in the "
                             "warm-up")
    parser.add_argument("--reuse-output", action="store_true",
                        help="backbone scope: CAD densifies into one buffer kept across runs "
                             "(x.dense(out=...), as a video loop would; its bytes count in "
                             "CAD's peak memory); the dense networks allocate their outputs as "
                             "always")
    parser.add_argument("--dense-format", default="both", choices=("both",) + FORMATS,
                        help="memory format of the dense models; 'both' times both and takes the "
                             "faster as the reference (default)")
    parser.add_argument("--no-float32-baseline", action="store_true",
                        help="with --dtype bfloat16 / float16: leave out the dense finest network "
                             "in NCHW float32 (reported beside the same-dtype baseline, not part "
                             "of any ratio to it; on CPU it takes about half of a run)")
    parser.add_argument("--clock", default="wall", choices=("wall", "process"),
                        help="CPU timing: wall clock (default), or the CPU seconds of this "
                             "process (all threads), a proxy that other processes on a busy "
                             "machine disturb less (use it with --threads 1)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per variant (default: 5)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs per variant first, at least 1 (default: 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile one forward per variant (torch.profiler) "
                             "and report its N most expensive ops by self time (default: off)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="write the results here; an existing file is replaced only if it "
                             "is a bench result (else see --overwrite)")
    parser.add_argument("--markdown", default=None, metavar="PATH",
                        help="append a results table headed by the command to this .md file "
                             "(e.g. BENCHMARKS.md)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --json file even if it is not a bench result")
    parser.add_argument("--label", default=None, help="title of the markdown section")
    parser.add_argument("--seed", type=int, default=0)


def main(args, command: str | None = None) -> int:
    import contextlib

    import torch

    from cad_apps.io import OutputBusyError, OutputLock

    from cad_spconv.engines import clear_tuned
    from cad_spconv.engines.layouts import clear_caches

    command = command or _command_line()
    cfg = _check_args(args)
    clear_caches()  # what earlier runs in this process kept would count as this run's memory
    clear_tuned()
    threads = torch.get_num_threads()
    flags = math_flags()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        torch.set_flush_denormal(True)  # random weights must not hit the slow denormal path
        if cfg["device"].type == "cuda":
            # one math mode for every variant: PyTorch runs cuDNN convs (the dense models, the
            # lattice engine's dense part) in TF32 by default but matmuls (1x1 convs, gather
            # GEMMs) and spconv in full FP32; --tf32 sets all three alike
            tf32 = args.tf32 == "on"
            set_math_flags(tf32, tf32, cudnn_benchmark=True, spconv_tf32=tf32)
        # one writer per --json: a second bench into the same file would replace this one's
        # result at its end without a word (the markdown's lock is taken only to append)
        with OutputLock(args.json, "--json") if args.json else contextlib.nullcontext():
            return _run(args, cfg, command)
    except OutputBusyError as e:
        raise SystemExit(f"bench: {e}") from None
    finally:  # leave the process as it was (tests call main in-process)
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
        set_math_flags(**flags)


def _run(args, cfg, command) -> int:
    import torch

    torch.manual_seed(args.seed)
    device, dtype = cfg["device"], cfg["dtype"]
    load_before = loadavg()
    batches, names = _inputs(args)
    keeps, mask_seconds = _masks(args, batches, device)
    try:
        bench = build_variants(args, device, dtype)
    except (ValueError, TypeError) as e:  # a model the strides or options do not fit
        raise SystemExit(f"bench: {e}") from None
    results = []
    with torch.inference_mode():
        for i, (images, keep) in enumerate(zip(batches, keeps)):
            images = images.to(device)
            print(f"[{i + 1}/{len(batches)}] {names[i]}", file=sys.stderr, flush=True)
            res = bench_input(args, bench, images, keep, device, dtype, order_seed=i)
            res["input"] = names[i]
            res["mask_seconds"] = mask_seconds[i]
            results.append(res)
    report = {
        "format": FORMAT,
        "command": command,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()
                   if not k.startswith("_") and k != "command"},
        "environment": environment(device, load_before),
        "inputs": results,
        "summary": summary(results, bench["engines"]),
    }
    if "tuned" in bench["engines"]:
        from cad_spconv.engines import tuned_choices

        report["tuned"] = [dict(c, dtype=str(c["dtype"])) for c in tuned_choices()]
        picks = collections.Counter(c["engine"] for c in report["tuned"])
        print(f"tuned: {len(report['tuned'])} layer shapes -> "
              + ", ".join(f"{e} x{n}" for e, n in picks.most_common()), flush=True)
    # written before printed (a closed stdout must not lose the run), each through a temporary
    # file: an interrupted run never leaves a half-written result
    from cad_apps.io import OutputLock, write_atomic, write_json_atomic

    if args.json:
        write_json_atomic(args.json, report)
    if args.markdown:
        # read, append, replace under the file's lock: two benches appending at once keep both
        with OutputLock(args.markdown, "--markdown", wait=300):
            old = ""
            if os.path.exists(args.markdown):
                with open(args.markdown) as f:
                    old = f.read()

            def write(tmp):
                with open(tmp, "w") as f:
                    f.write(old + markdown(report))

            write_atomic(args.markdown, write)
    try:
        print_report(report)
    except BrokenPipeError:  # e.g. `| head`: the results are written already
        sys.stdout = None
    return 0


# ---------------------------------------------------------------------- setup
def _command_line() -> str:
    if sys.argv[1:2] == ["bench"]:
        return "cad-spconv bench " + shlex.join(sys.argv[2:])
    return shlex.join(["python", sys.argv[0]] + sys.argv[1:])


def _check_args(args) -> dict:
    import torch

    from adapters.builders import SEGMENTATION_MODELS
    from cad_spconv.engines import engine_names

    if args.reps < 1 or args.warmup < 1:
        raise SystemExit("bench: --reps and --warmup must be >= 1 (the warm-up's outputs are "
                         "what Guarantee 2 is checked on)")
    if args.profile < 0:
        raise SystemExit("bench: --profile takes the number of ops to report (>= 0)")
    if args.batch < 1:
        raise SystemExit("bench: --batch must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"bench: --threads must be >= 1 (leave it out for torch's choice), "
                         f"got {args.threads}")
    if args.channels < 1:
        raise SystemExit(f"bench: --channels must be >= 1, got {args.channels}")
    if args.model == "conv3x3":  # one conv: no model, head or batch norm to apply these to
        given = [flag for flag, on in (("--scope model", args.scope == "model"),
                                       ("--sparse-head", args.sparse_head),
                                       ("--fold-bn", args.fold_bn),
                                       ("--im2col-dilated", args.im2col_dilated),
                                       ("--compile-dense", args.compile_dense)) if on]
        if given:
            raise SystemExit(f"bench: --model conv3x3 is one conv (no head, no batch norm, no "
                             f"dense dilated conv, no network to compile): "
                             f"leave out {', '.join(given)}")
    if args.reuse_output and (args.scope == "model" or args.model == "conv3x3"):
        raise SystemExit("bench: --reuse-output keeps the buffer CAD's backbone densifies into; "
                         "a whole model densifies inside its forward and conv3x3 returns the "
                         "multi-resolution tensor: leave it out with "
                         + ("--scope model" if args.scope == "model" else "--model conv3x3"))
    if args.im2col_dilated and args.model != "conv3x3" and (
            args.scope != "model" or args.model not in SEGMENTATION_MODELS):
        raise SystemExit("bench: --im2col-dilated swaps the dense dilated convs of a "
                         "segmentation head (dilation >= 6; the backbones' are at most 4): use "
                         "it with --scope model and a segmentation --model")
    if args.compile_dense and args.im2col_dilated:
        raise SystemExit("bench: --compile-dense and --im2col-dilated are two routes for the "
                         "dense networks' convs (inductor picks its own for the dilated ones): "
                         "give one of them")
    if args.sparse_head and args.scope != "model":
        raise SystemExit("bench: --sparse-head runs the whole model's head sparsely; add "
                         "--scope model (the default scope times the backbones only)")
    if args.images and args.keep == "mask":  # the edge masks' settings, checked before any work
        from cad_spconv import masks
        try:  # masks.edge's own checks, on a tiny image
            masks.edge(torch.zeros(1, 3, 4, 4), args.threshold, args.dilation,
                       operator=args.edge_operator)
        except ValueError as e:
            raise SystemExit(f"bench: --threshold / --dilation: {e}") from None
    from cad_spconv.plan import num_adaptive_steps

    from ..distributed import resolve_device
    try:
        num_adaptive_steps(args.finest_stride, args.coarsest_stride)
        device = torch.device(resolve_device(args.device))
    except ValueError as e:
        raise SystemExit(f"bench: {e}") from None
    if min(args.size) < 16:
        raise SystemExit(f"bench: --size {args.size[0]} {args.size[1]}: both sides must be at "
                         "least 16 pixels")
    if not 0.0 <= args.random_keep <= 1.0:
        raise SystemExit(f"bench: --random-keep is a fraction in [0, 1], got {args.random_keep}")
    engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    bad = [e for e in engines if e not in engine_names()]
    if not engines or bad:
        raise SystemExit(f"bench: unknown engine {bad[0] if bad else args.engine!r}; choose from "
                         f"{', '.join(engine_names())}")
    twice = sorted({e for e in engines if engines.count(e) > 1})
    if twice:
        raise SystemExit(f"bench: --engine names {', '.join(twice)} more than once; each engine "
                         "is one timed variant")
    args.engines = engines
    dtype = getattr(torch, args.dtype)
    if dtype == torch.float16 and device.type == "cpu":
        raise SystemExit("bench: float16 has no fast CPU convolutions; use --dtype bfloat16 or "
                         "float32 on CPU, float16 on a GPU")
    for path in args.images:
        if not os.path.isfile(path):
            raise SystemExit(f"bench: image not found: {path}")
    from ..io import check_output_path

    try:  # before the run: a bad path would otherwise lose the results at its end
        outs = [check_output_path(p, flag, suffix=suffix) for p, flag, suffix in (
            (args.json, "--json", ""), (args.markdown, "--markdown", ".md")) if p]
    except ValueError as e:
        raise SystemExit(f"bench: {e}") from None
    if len(outs) == 2 and os.path.realpath(outs[0]) == os.path.realpath(outs[1]):
        raise SystemExit(f"bench: --json and --markdown name the same file {outs[0]}; the "
                         "markdown would be appended to the JSON")
    if args.json and os.path.exists(args.json) and not args.overwrite:
        _check_replaceable(args.json)
    if args.markdown and os.path.exists(args.markdown):
        try:  # it is read and appended to at the end: a file that cannot be would lose the table
            with open(args.markdown, encoding="utf-8") as f:
                f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"bench: --markdown {args.markdown} cannot be read as text ({e}); "
                             "choose another --markdown") from None
    return {"device": device, "dtype": dtype}


_REPORT_KEYS = {"command", "config", "environment", "inputs", "summary"}


def _check_replaceable(path: str) -> None:
    """Refuse to replace an existing ``--json`` file that is not a bench report (an eval
    result, say): only bench's own output is replaced without ``--overwrite``."""
    import json

    fix = "choose another --json, or pass --overwrite to replace it"
    try:  # read and parsed once (reports written before FORMAT existed have _REPORT_KEYS)
        with open(path) as f:
            old = json.load(f)
    except OSError as e:
        raise SystemExit(f"bench: --json {path} exists and cannot be read ({e.strerror}); "
                         f"{fix}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise SystemExit(f"bench: --json {path} is not valid JSON ({e}); {fix}") from None
    if isinstance(old, dict) and (old.get("format") == FORMAT or (
            "format" not in old and _REPORT_KEYS <= set(old))):
        return
    raise SystemExit(f"bench: --json {path} is not a cad-spconv bench result; {fix}")


def _inputs(args):
    """Batches of ImageNet-normalised float32 images ``[B, 3, H, W]`` on the CPU, and names."""
    import torch
    import torch.nn.functional as F

    from cad_spconv.images import normalize

    H, W = args.size
    if args.images:
        from ..data import read_image

        images, names = [], []
        for path in args.images:
            try:
                rgb = torch.from_numpy(read_image(path, "RGB").copy()).permute(2, 0, 1)
            except ValueError as e:
                raise SystemExit(f"bench: {e}") from None
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
    keeps, seconds = [], []
    for index, images in enumerate(batches):
        images = images.to(device)
        sync(device)
        t0 = time.perf_counter()
        if args.keep in ("none", "all"):  # the two ends: the dense networks at c / at f
            import torch
            keep = torch.full((images.shape[0], 1, *images.shape[-2:]), args.keep == "all",
                              dtype=torch.bool, device=device)
        elif args.images:
            from cad_spconv.masks import edge

            keep = edge(images, args.threshold, args.dilation, operator=args.edge_operator)
        else:
            keep = _random_blocks(images.shape, args, device, index)
        sync(device)
        seconds.append(time.perf_counter() - t0)
        keeps.append(keep)
    return keeps, seconds


def _random_blocks(shape, args, device, index: int = 0):
    """Blobs of kept cells (random 4x4-cell blocks at the finest grid), image resolution; the
    ``index``-th batch's own draw (every batch the same mask would repeat one sample)."""
    import torch

    B, _, H, W = shape
    cell = args.finest_stride * 4
    gen = torch.Generator().manual_seed(args.seed + 1 + index)
    blocks = torch.rand(B, 1, -(-H // cell), -(-W // cell), generator=gen) < args.random_keep
    keep = blocks.repeat_interleave(cell, 2).repeat_interleave(cell, 3)[..., :H, :W]
    return keep.to(device)
