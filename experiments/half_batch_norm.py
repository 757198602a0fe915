"""The in-place eval batch norm of half-precision features on CPU (BENCHMARKS.md).

    python -m experiments.half_batch_norm [--threads 2] [--reps 15] [--dtype bfloat16]
    python -m experiments.half_batch_norm --model [--autocast] [--frame PATH] [--reps 12]

A converted network normalizes each conv's fresh output in place: ``f * scale + shift`` with
per-channel ``scale`` and ``shift`` computed in float32, as PyTorch's batch norm does, so the
result is rounded once. The features are bfloat16 / float16 there, and on CPU an elementwise op
that mixes the two dtypes runs unvectorized. The table times, per feature matrix shape (sites
of DeepLabV3-ResNet101 converted 8->16 at 512x1024, and one larger matrix), the routes:

- ``mixed addcmul``: one ``addcmul`` of the half features with float32 scale and shift, into
  the features (c026a14; rounds once);
- ``float32 chunks``: the features in float32 chunks of 4 MiB: copy in, ``addcmul``, copy
  back (5eecd3d; rounds once);
- ``kernel in place``: torch's batch-norm kernel as ``x * scale + shift`` (mean 0, variance 1,
  eps 0) with its output aliased onto the features (what ``batch_norm`` does on CPU now;
  rounds once on contiguous features);
- ``scale, shift rounded``: one ``addcmul`` in the half dtype with scale and shift rounded to
  it first (before c026a14; two extra roundings, which cancel badly where a channel's mean is
  large against its spread);
- ``torch batch_norm``: ``F.batch_norm`` on the matrix as a channels-last map (the dense
  network's kernel, out of place; rounds once).

``--model`` times whole forwards of the converted DeepLabV3-ResNet101 (random weights with
tamed statistics, as ``cad-spconv bench``; 512x1024, edge mask 0.35, dilation 11, head dense
at stride 8) with the kernel in place, the float32 chunks and the rounded route, alternating
in one process: what rounding once costs in a network. ``--autocast`` keeps the weights
float32 and runs the forward under ``torch.autocast``, as ``cad-spconv eval --dtype`` does:
the batch norms' statistics are float32 there, and the in-place routes are compared with
torch's out-of-place batch norm (what the converted network ran before the in-place route
took autocast features). Median of ``--reps`` after one warm-up each.

Since the blocks-on-grid change, a batch norm whose statistics have the features' dtype (the
bfloat16 weights of ``--model`` without ``--autocast``) runs torch's kernel with the statistics
themselves, in place, and none of the routes above: ``--model`` compares them under
``--autocast`` only (float32 statistics).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from experiments.benchmark import DEFAULT_FRAMES
from experiments.common import ExperimentParser, table_header
from experiments.gemm_routes import median_ms

# (sites, channels): layer3's 256 / 1024, layer4's 512 / 2048 at ~5700 sites; one 16M matrix
SHAPES = [(5700, 256), (5700, 1024), (5700, 2048), (65536, 256)]
FRAME = os.path.join(DEFAULT_FRAMES, "frankfurt_000000_002196_leftImg8bit.png")


def _rounded(f, scale, shift):
    return torch.addcmul(shift.to(f.dtype), f, scale.to(f.dtype), out=f)


def _float32_chunks(f, scale, shift, elements=1 << 20):
    rows = max(1, elements // max(1, f.shape[1]))
    buffer = torch.empty(min(rows, f.shape[0]), f.shape[1], dtype=scale.dtype)
    for start in range(0, f.shape[0], rows):
        part = f[start:start + rows]
        work = buffer[:part.shape[0]]
        work.copy_(part)
        torch.addcmul(shift, work, scale, out=work)
        part.copy_(work)
    return f


def _ops(args, dtype) -> int:
    from cad_spconv.functional import _affine_half_on_cpu

    gen = torch.Generator().manual_seed(0)
    print(f"{args.dtype} features, float32 scale and shift; ms per call")
    print("| sites | channels | mixed addcmul | float32 chunks | kernel in place | "
          "scale, shift rounded | torch batch_norm | kernel / chunks | kernel / rounded |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, c in SHAPES:
        f = torch.randn(n, c, generator=gen).to(dtype)
        scale, shift = torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)
        stats = [t.to(dtype) for t in (torch.zeros(c), torch.ones(c), scale, shift)]
        mixed = median_ms(lambda: torch.addcmul(shift, f, scale, out=f), args.reps)
        chunks = median_ms(lambda: _float32_chunks(f, scale, shift), args.reps)
        kernel = median_ms(lambda: _affine_half_on_cpu(f, scale, shift), args.reps)
        rounded = median_ms(lambda: _rounded(f, scale, shift), args.reps)
        as_map = f.t()[None, :, :, None]  # [1, C, N, 1], channels-last strides
        dense = median_ms(lambda: F.batch_norm(as_map, *stats, False), args.reps)
        print(f"| {n} | {c} | {mixed:.2f} | {chunks:.2f} | {kernel:.2f} | {rounded:.2f} | "
              f"{dense:.2f} | {kernel / chunks:.2f} | {kernel / rounded:.2f} |")
    return 0


def _model(args, dtype) -> int:
    from torchvision.models.segmentation import deeplabv3_resnet101

    import cad_spconv.functional as CF
    from adapters import convert
    from cad_apps.bench.measure import _median, _time_once
    from cad_apps.bench.variants import _tamed
    from cad_apps.data import read_image
    from cad_spconv import masks
    from cad_spconv.images import normalize
    from cad_spconv.nn import CADBatchNorm2d

    rgb = torch.from_numpy(read_image(args.frame, "RGB").copy()).permute(2, 0, 1)
    x = F.interpolate(normalize(rgb)[None], size=(512, 1024), mode="bilinear",
                      align_corners=False)
    keep = masks.edge(x, 0.35, 11)
    net = _tamed(deeplabv3_resnet101(weights=None, weights_backbone=None, num_classes=19), 0)
    cl = torch.channels_last
    model = convert(net, finest_stride=8, coarsest_stride=16).eval()
    norms = [m for m in model.modules() if isinstance(m, CADBatchNorm2d) and m.inplace]
    kernel = CF._affine_half_on_cpu
    half_routes = {"float32 chunks": _float32_chunks, "scale, shift rounded": _rounded}

    def use(route):  # sets the route up; returns the forward's context
        CF._affine_half_on_cpu = half_routes.get(route, kernel)
        for m in norms:
            m.inplace = route != "out of place (torch batch_norm)"
        return (torch.autocast("cpu", dtype=dtype) if args.autocast
                else contextlib.nullcontext())

    if args.autocast:  # weights float32, convs in dtype: the batch norms' statistics float32
        routes = ["kernel in place", "float32 chunks", "out of place (torch batch_norm)"]
        x = x.contiguous(memory_format=cl)
    else:
        routes = ["kernel in place", "float32 chunks", "scale, shift rounded"]
        model.to(dtype)
        x = x.to(dtype).contiguous(memory_format=cl)
    model.to(memory_format=cl)
    times = {name: [] for name in routes}
    cpu = torch.device("cpu")
    try:
        with torch.no_grad():
            for rep in range(args.reps + 1):
                for name in routes:
                    with use(name):
                        t = _time_once(model, (x, keep), cpu)
                    if rep:  # the first of each is the warm-up
                        times[name].append(t)
    finally:
        use("kernel in place")
    how = "autocast, weights float32" if args.autocast else "weights and features"
    print(f"{os.path.basename(args.frame)}, {args.dtype} ({how}); whole-model forward, ms "
          f"(median of {args.reps})")
    print("| route | median | min | max |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1e3 * _median(t):.0f} | {1e3 * min(t):.0f} | {1e3 * max(t):.0f} |")
    first = _median(times[routes[0]])
    for name in routes[1:]:
        print(f"{routes[0]} / {name}: {first / _median(times[name]):.3f}")
    return 0


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.half_batch_norm",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=None,
                        help="timed runs per route (default 15, with --model 12)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--model", action="store_true",
                        help="whole-model forwards with each route (see above)")
    parser.add_argument("--frame", default=FRAME, help="the image for --model")
    parser.add_argument("--autocast", action="store_true",
                        help="with --model: float32 weights under torch.autocast, as cad-spconv "
                             "eval --dtype runs; compares the in-place route with torch's "
                             "out-of-place batch norm")
    args = parser.parse_args(argv)
    if args.reps is None:
        args.reps = 12 if args.model else 15
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.autocast and not args.model:
        parser.error("--autocast is an option of --model")
    if args.model and not os.path.isfile(args.frame):
        parser.error(f"--frame {args.frame}: no such file; pass an image with --frame")
    torch.set_num_threads(args.threads)
    print(table_header(args))
    dtype = getattr(torch, args.dtype)
    return _model(args, dtype) if args.model else _ops(args, dtype)


if __name__ == "__main__":
    raise SystemExit(main())
