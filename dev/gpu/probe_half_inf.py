"""Probe for the float16 finding (BENCHMARKS.md, "GPU"): which call turns an -Inf input into a
finite output, cuDNN's float16 conv or our lattice engine? Dense convs alone, both engines, and
a trace of every conv and GEMM the lattice engine runs against the same call in float64 (on an
H200, 2026-12-04: the cuDNN conv itself returned 0.0). Prints one line per case; exits 0 either
way (a probe, not a test).

    python dev/gpu/probe_half_inf.py          # on the device, after gpu_session's setup
    python dev/gpu/probe_half_inf.py cpu      # the same cases on CPU (to try the script)
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from cad_spconv import functional as CF  # noqa: E402
from tests.support import dense_reference as ref  # noqa: E402
from tests.support.inputs import make_input  # noqa: E402


def dense_probe(dtype, dilation, device):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 24, 24, device=device, dtype=dtype)
    x[0, :, 12, 12] = float("-inf")
    w = torch.randn(8, 8, 3, 3, device=device, dtype=dtype)
    want = F.conv2d(x.double(), w.double(), None, 1, dilation, dilation)
    for layout in ("nchw", "channels_last"):
        xi = x.contiguous(memory_format=torch.channels_last) if layout != "nchw" else x
        got = F.conv2d(xi, w, None, 1, dilation, dilation)
        lost = (~torch.isfinite(want) & torch.isfinite(got))
        print(f"dense F.conv2d {dtype} dilation {dilation} {layout}: reference non-finite "
              f"{int((~torch.isfinite(want)).sum())}, finite here {int(lost.sum())}, "
              f"values there {got[lost][:4].tolist()}")


CASE, STEPS = ((17, 23), 3, "map"), 4  # the failing test's case (test_half_precision_routes)


def poisoned(dtype, device, step):
    """The test's weights and input at ``step``, -Inf at image 2's coarsest site, and the
    float64 reference conv (stride 1) of that input."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(8, 8, 3, 3, generator=gen).to(device, dtype)
    x, levels = make_input(CASE, step, 8, torch.float32, device, seed=step)
    f = x.features.to(dtype)
    geo = x.plan.geometry(step)
    rows = (geo.coords[:, 0] == 2).nonzero()[:, 0]
    c = geo.coords[rows]
    lv = x.plan.levels[c[:, 0], c[:, 1], c[:, 2]]
    f[rows[lv.argmax()]] = float("-inf")
    return w, x.replace_feature(f), ref.conv(f.double(), levels, step, 1, w.double())


def lattice_probe(dtype, device):
    stride = 1
    for step in range(STEPS):
        w, bad, want = poisoned(dtype, device, step)
        for engine in ("lattice", "torch"):
            got = CF.conv2d(bad, w, None, stride, 1, 1, engine).features
            lost = (~torch.isfinite(want) & torch.isfinite(got))
            print(f"{engine} {dtype} step {step}: reference non-finite "
                  f"{int((~torch.isfinite(want)).sum())}, finite here {int(lost.sum())}, "
                  f"values there {got[lost][:4].tolist()}")


def lattice_trace(dtype, device, steps=(1, 3)):
    """Where the lattice engine loses the -Inf: every dense conv and GEMM it runs, checked
    against the same call in float64 on the CPU, and which part of the split owns the rows
    that came out finite."""
    import types
    from cad_spconv.engines import lattice as L
    from cad_spconv.functional import conv_book

    def checked(name, fn, ref_fn):
        def call(*args, **kw):
            got = fn(*args, **kw)
            want = ref_fn(*[a.detach().cpu().double() if torch.is_tensor(a) else a
                            for a in args],
                          **{k: v for k, v in kw.items() if k != "out"})
            lost = ~torch.isfinite(want) & torch.isfinite(got.detach().cpu().double())
            shapes = [tuple(a.shape) if torch.is_tensor(a) else a for a in args]
            print(f"    {name}{shapes} ref non-finite {int((~torch.isfinite(want)).sum())}, "
                  f"finite here {int(lost.sum())} {got.detach().cpu()[lost][:4].tolist()}")
            return got
        return call

    real_f, real_mm = L.F, L.matmul_nk
    L.F = types.SimpleNamespace(conv2d=checked("conv2d", F.conv2d, F.conv2d))
    L.matmul_nk = checked("matmul_nk", real_mm,
                          lambda x, w, b=None, *a, **k: F.linear(x, w, b))
    try:
        stride = 1
        for step in steps:
            w, bad, want = poisoned(dtype, device, step)
            print(f"  lattice trace {dtype} step {step}:")
            got = CF.conv2d(bad, w, None, stride, 1, 1, "lattice").features
            lost = (~torch.isfinite(want) & torch.isfinite(got)).any(1).nonzero()[:, 0]
            book = conv_book(bad, (3, 3), 1, stride)
            for args in book.lattice_args():
                split = book.lattice(*args)
                owners = {"lattice": split.out_rows, "rest": split.rest_rows}
                owners.update({f"phase{i}": p.out_rows for i, p in enumerate(split.phases)})
                where = {k: int(torch.isin(lost, v).sum()) for k, v in owners.items()
                         if v is not None}
                print(f"    split{args}: lost rows {lost.tolist()[:8]} in {where}")
    finally:
        L.F, L.matmul_nk = real_f, real_mm


if __name__ == "__main__":
    device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("probe_half_inf: no CUDA here (pass cpu to try it on CPU)")
    for dtype in (torch.float16, torch.bfloat16):
        for dilation in (1, 2, 4):
            dense_probe(dtype, dilation, device)
        lattice_probe(dtype, device)
    lattice_trace(torch.float16, device)
