"""The products engine against the lattice engine, and where the sparse head loses (BENCHMARKS.md
"Products first").

    python -m experiments.products_first layers [--dtype bfloat16] [--reps 5] [--threads 2]
        [--device cuda] [--engines torch,products]
    python -m experiments.products_first head [--dtype bfloat16] [--reps 4] [--threads 2]
    python -m experiments.products_first batch [--dtype bfloat16] [--reps 4] [--threads 2]

``layers``: one 3x3 conv at step 1 (the stride-16 part of a ResNet converted 8->16) on the sites
of a Cityscapes frame's edge mask (frankfurt_000000_002196 or ``--frame``, threshold 0.35,
512x1024 -> a 64x128 grid at stride 8), run by the lattice split (the ``"lattice"`` engine
without its hand-over to ``"products"``) and the ``"products"`` engine in turn, for C_in ->
C_out from 256 -> 256 to the ASPP's 2048 -> 256 at dilations 1 to 18; median of ``--reps``
after one warm-up, ms, and the ratio products / lattice (what
``lattice.products_pay`` decides on). ``--engines A,B`` times other engines (ratio B / A), and
``--device cuda`` runs on a GPU, timed with CUDA events (whether ``"auto"`` there should hand
such layers to ``"products"`` instead of ``"torch"``: ``--device cuda --engines
torch,products``).

``batch``: the ASPP's 3x3 conv (2048 -> 256) at dilations 6 / 12 / 18 on a batch of four
frames (the three frames of ``--frame``'s folder and ``--frame`` again) and on the same four
images one at a time, both engines, in one process: whether a batch costs what its images do.

``head``: DeepLabV3-ResNet101 (random weights) converted 8->16 with and without ``sparse_head``
on the same frame; the head's leaf modules timed by forward hooks, the dense head on the
densified stride-8 map (channels-last) against the sparse head on the CAD tensor, with the
engine ``"auto"`` picks; median of ``--reps`` after one warm-up, ms.
"""
from __future__ import annotations

import argparse
import glob
import os
import time

import torch

from cad_apps.bench.measure import _median, _time_once
from experiments.common import ExperimentParser, table_header

FRAME = "../shared/data/cityscapes_frames/frankfurt_000000_002196_leftImg8bit.png"
SHAPES = [(256, 256), (512, 256), (1024, 256), (2048, 256), (2048, 512)]
DILATIONS = (1, 2, 6, 18)


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.products_first",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("layers", "head", "batch"))
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frame", default=FRAME,
                        help="the Cityscapes frame whose edge mask gives the sites")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="layers: where to run them (cuda: timed with CUDA events)")
    parser.add_argument("--engines", default="lattice,products",
                        help="layers: the two engines to compare, A,B (ratio B / A); "
                             "'lattice' is the lattice split without its products rule")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    engines = args.engines.split(",")
    if len(engines) != 2 or len(set(engines)) != 2:
        parser.error(f"--engines takes two different engines, A,B; got {args.engines!r}")
    from cad_spconv.engines import check_engine

    for name in engines:
        try:
            check_engine(name)
        except ValueError as err:
            parser.error(f"--engines: {err}")
    args.engines = engines
    if args.device == "cuda" and args.mode != "layers":  # head and batch time on the CPU
        parser.error(f"--device applies to the layers mode; {args.mode} runs on the CPU")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA device (torch.cuda.is_available() "
                     "is False); run on a GPU machine or leave --device out")
    if not os.path.isfile(args.frame):
        parser.error(f"--frame {args.frame}: no such file (the default is relative to the "
                     f"project root: run from there, or name the frame)")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(table_header(args, args.device))
    return {"layers": _layers, "head": _head, "batch": _batch}[args.mode](args)


def _frame(path: str, extra=()):
    """The frame as the bench loads it, its edge mask, and the bench's parsed arguments."""
    from cad_apps.bench import _check_args, _inputs, _masks, configure

    bench = argparse.ArgumentParser()
    configure(bench)
    b = bench.parse_args(["--threshold", "0.35", "--images", path, *extra])
    _check_args(b)
    batches, _ = _inputs(b)
    keeps, _ = _masks(b, batches, torch.device("cpu"))
    return batches[0], keeps[0]


def _median_ms(samples) -> float:
    return 1e3 * _median(samples)


def _layers(args) -> int:
    from .common import lattice_split_only

    # "lattice" times the lattice split, also where its rule hands the layer to "products"
    with lattice_split_only():
        return _split_layers(args)


def _split_layers(args) -> int:
    from cad_spconv import CADTensor, LevelPlan, functional as CF

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    first, second = args.engines
    _, keep = _frame(args.frame)
    plan = LevelPlan.from_keep(keep.to(device), (64, 128), 1)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{args.threads} threads")
    print(f"torch {torch.__version__}, {where}, {args.dtype}, {plan.num_sites(1)} sites at "
          f"step 1; ms")
    print(f"| C_in -> C_out | dilation | {first} | {second} | {second} / {first} |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for c_in, c_out in SHAPES:
        feats = torch.randn(plan.num_sites(1), c_in, generator=gen).to(device, dtype)
        w = (torch.randn(c_out, c_in, 3, 3, generator=gen) / 50).to(device, dtype).contiguous(
            memory_format=torch.channels_last)
        for d in DILATIONS:
            samples = {first: [], second: []}
            with torch.inference_mode():
                for rep in range(args.reps + 1):
                    for engine, times in samples.items():
                        x = CADTensor(feats, plan, 1)  # its own rulebook cache
                        CF.conv2d(x, w, None, 1, d, 1, engine)  # builds the tables
                        elapsed = _time_once(CF.conv2d, (x, w, None, 1, d, 1, engine),
                                             device)
                        if rep:
                            times.append(elapsed)
            ms = {k: _median_ms(v) for k, v in samples.items()}
            print(f"| {c_in} -> {c_out} | {d} | {ms[first]:.1f} | {ms[second]:.1f} | "
                  f"{ms[second] / ms[first]:.2f} |", flush=True)
    return 0


def _batch(args) -> int:
    from cad_spconv import CADTensor, LevelPlan, functional as CF

    from .common import lattice_split_only

    dtype = getattr(torch, args.dtype)
    frames = sorted(glob.glob(os.path.join(os.path.dirname(args.frame), "*.png")))[:3]
    keeps = [k.reshape(1, *k.shape[-2:]) for k in (_frame(f)[1] for f in frames + [args.frame])]
    together = LevelPlan.from_keep(torch.cat(keeps), (64, 128), 1)
    alone = [LevelPlan.from_keep(k, (64, 128), 1) for k in keeps]
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(256, 2048, 3, 3, generator=gen) / 50).to(dtype).contiguous(
        memory_format=torch.channels_last)
    feats = torch.randn(together.num_sites(1), 2048, generator=gen).to(dtype)
    parts = feats.split([p.num_sites(1) for p in alone])
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, 2048 -> 256, "
          f"{together.num_sites(1)} sites at step 1 in {len(keeps)} images; ms")
    print("| dilation | lattice, batch | lattice, one by one | products, batch | "
          "products, one by one | products / lattice (batch) |")
    print("|---|---|---|---|---|---|")
    with lattice_split_only(), torch.inference_mode():
        for d in (6, 12, 18):
            samples = {}
            for rep in range(args.reps + 1):
                for engine in ("lattice", "products"):
                    for how, plans, xs in (("batch", [together], [feats]),
                                           ("one by one", alone, parts)):
                        tensors = [CADTensor(x, p, 1) for x, p in zip(xs, plans)]
                        for t in tensors:  # builds the tables
                            CF.conv2d(t, w, None, 1, d, 1, engine)
                        start = time.perf_counter()
                        for t in tensors:
                            CF.conv2d(t, w, None, 1, d, 1, engine)
                        if rep:
                            samples.setdefault((engine, how), []).append(
                                time.perf_counter() - start)
            ms = {k: _median_ms(v) for k, v in samples.items()}
            print(f"| {d} | {ms['lattice', 'batch']:.1f} | {ms['lattice', 'one by one']:.1f} | "
                  f"{ms['products', 'batch']:.1f} | {ms['products', 'one by one']:.1f} | "
                  f"{ms['products', 'batch'] / ms['lattice', 'batch']:.2f} |", flush=True)
    return 0


def _leaf_times(head, run, reps) -> dict:
    """Median ms per leaf module of ``head`` over ``reps`` calls of ``run`` (after one)."""
    times: dict = {}
    hooks = []
    for name, module in head.named_modules():
        if next(module.children(), None) is None:
            def pre(m, inputs, name=name):
                times.setdefault(name, []).append(-time.perf_counter())

            def post(m, inputs, output, name=name):
                times[name][-1] += time.perf_counter()
            hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        for _ in range(reps + 1):
            run()
    finally:
        for h in hooks:
            h.remove()
    return {name: _median_ms(v[1:]) for name, v in times.items()}


def _head(args) -> int:
    import torchvision

    from adapters import convert_segmentation

    dtype = getattr(torch, args.dtype)
    image, keep = _frame(args.frame, ["--size", "512", "1024"])
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_resnet101(
        weights=None, weights_backbone=None, num_classes=19, aux_loss=False).eval()
    cl = torch.channels_last
    sparse = convert_segmentation(model, 8, 16, sparse_head=True).eval().to(dtype).to(
        memory_format=cl)
    dense = convert_segmentation(model, 8, 16, sparse_head=False).eval().to(dtype).to(
        memory_format=cl)
    with torch.inference_mode():
        x = sparse.forward_features(image.to(dtype).contiguous(memory_format=cl), keep)
        xd = x.dense().contiguous(memory_format=cl)
        a = _leaf_times(dense.classifier, lambda: dense.classifier(xd), args.reps)
        b = _leaf_times(sparse.classifier, lambda: sparse._run_head(sparse.classifier, x),
                        args.reps)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}; ms")
    print("| module | dense head | sparse head | sparse / dense |")
    print("|---|---|---|---|")
    for name in a:
        if name in b and max(a[name], b[name]) >= 0.5:
            print(f"| {name} | {a[name]:.1f} | {b[name]:.1f} | {b[name] / a[name]:.2f} |")
    print(f"| all | {sum(a.values()):.0f} | {sum(b.values()):.0f} | "
          f"{sum(b.values()) / sum(a.values()):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
