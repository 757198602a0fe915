"""Reporting: the machine, per-input and total summaries, the markdown table, profiles."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Optional

from ..distributed import cpu_name
from .measure import math_flags

__all__ = ["environment", "source_revision", "cpu_flags", "native_bfloat16", "loadavg", "summary",
           "timing_spread", "noise_note", "paired_ratios", "markdown", "print_report",
           "profile_table", "HEADER"]


def loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# the instruction sets that decide which CPU kernels run (oneDNN picks by these)
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """Which of :data:`_ISA_FLAGS` this CPU reports (Linux ``/proc/cpuinfo``; empty elsewhere).
    The CPU model name alone does not say it: the 'AMD EPYC' machines here came with and
    without AVX-512 / bf16."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in _ISA_FLAGS if flag in have]
    except OSError:
        pass
    return []


# environment variables that change what a CPU run measures: the allocator (glibc's MALLOC_
# and GLIBC_TUNABLES; an allocator preloaded with LD_PRELOAD, such as tcmalloc or jemalloc, with
# their TCMALLOC_ and MALLOC_CONF settings; PyTorch's THP_MEM_ALLOC_ENABLE=1 puts tensors of
# 2 MiB and up on huge pages, which makes the first touch of a fresh large tensor cheaper), the
# thread runtime, and the
# instruction sets PyTorch's kernels, oneDNN and MKL may use (setting ATEN_CPU_CAPABILITY=avx2
# ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 runs an AVX-512 CPU on AVX2 code, which
# also switches the engines' AVX-512 choices off); CAD_SPCONV_ switches the library's own
# options (CAD_SPCONV_FUSED_GATHER: the fused kernel of engines.fused)
_TUNING_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD", "TCMALLOC_",
                        "THP_MEM_ALLOC_ENABLE", "ATEN_CPU_CAPABILITY", "ONEDNN_", "DNNL_", "MKL_",
                        "OMP_", "KMP_", "CAD_SPCONV_")


def tuning_env() -> dict:
    """The set environment variables of ``_TUNING_ENV_PREFIXES``, recorded with every run."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(_TUNING_ENV_PREFIXES)}


def recorded_tuning_env(env: dict) -> dict:
    """:func:`tuning_env` as a report's ``environment`` recorded it (reports before
    2026-12-05 recorded the ``MALLOC_`` variables only, as ``malloc_env``)."""
    return env.get("tuning_env", env.get("malloc_env")) or {}


def recorded_settings(env: dict) -> str:
    """A run's settings as machine lines print them: ``, NAME=value`` per tuning variable that
    was set, then the fused kernel's mode where the report recorded it."""
    text = "".join(f", {k}={v}" for k, v in recorded_tuning_env(env).items())
    return text + (f", fused kernel {env['fused_gather']}" if env.get("fused_gather") else "")


def native_bfloat16() -> bool:
    """Whether the CPU computes bfloat16 dot products natively (AVX512-BF16 or AMX); without,
    oneDNN emulates them and bfloat16 is no speed setting."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def source_revision() -> Optional[dict]:
    """The commit of the checkout this package runs from, and whether its tracked files differ
    from it (``{"commit": sha, "modified": bool}``), so that every result names the code that
    produced it; ``None`` outside a git checkout (an installed wheel) or without ``git``."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")):
        return None

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"),
                "modified": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device, load_before) -> dict:
    import torch

    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cpu_flags": cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "tuning_env": tuning_env(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "source": source_revision(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["math_flags"] = math_flags()
    from cad_spconv.engines import fused

    env["fused_gather"] = fused.describe()  # the fused kernel's mode and ISA
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
    nchw32 = next((e for e in v.values() if e["kind"] == "dense_reference"), None)
    if nchw32 is not None:
        out["dense_fine_nchw_float32_seconds"] = nchw32["seconds"]
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
            "peak_vs_dense_fine": (cad["peak_bytes"] / fine["peak_bytes"]
                                   if cad.get("peak_bytes") and fine.get("peak_bytes") else None),
            "tensor_peak_vs_dense_fine": (
                cad["peak_tensor_bytes"] / fine["peak_tensor_bytes"]
                if cad.get("peak_tensor_bytes") and fine.get("peak_tensor_bytes") else None),
        }
        if nchw32 is not None:
            out["cad"][e]["vs_dense_fine_nchw_float32"] = t / nchw32["seconds"]
        out["cad"][e]["paired"] = paired_ratios([res], e)
    res["summary"] = out
    return out


#: a ratio is flagged when one of its variants' runs span more than this (max / min): the
#: machine was busy meanwhile. On the shared 2-core dev VMs one variant's five runs spanned up to
#: 4x, and a median of five then moved by several per cent from run to run.
NOISY_SPREAD = 1.5


def timing_spread(inputs) -> Optional[tuple[float, str]]:
    """``(max / min, "input: variant")`` of the variant whose timed runs spread most, among
    those the ratios use (the faster dense network of each stride and every CAD engine);
    ``None`` with fewer than two runs each."""
    worst = None
    for r in inputs:
        v = r["variants"]
        names = [_best(v, "dense_coarse")[0], _best(v, "dense_fine")[0],
                 *(n for n, e in v.items() if e["kind"] == "cad")]
        for n in names:
            runs = v[n].get("samples") or []
            if len(runs) > 1 and min(runs) > 0:
                spread = max(runs) / min(runs)
                if worst is None or spread > worst[0]:
                    worst = (spread, f"{r['input']}: {n}" if r.get("input") else n)
    return worst


def noise_note(report) -> Optional[str]:
    """A sentence on a run whose timings spread past :data:`NOISY_SPREAD`, else ``None``."""
    worst = timing_spread(report["inputs"])
    if worst is None or worst[0] <= NOISY_SPREAD:
        return None
    return (f"Noisy timings: the runs of {worst[1]} span {worst[0]:.2f}x (max / min); the "
            "machine was busy meanwhile and the ratios may be off by several per cent: rerun "
            "on an idle machine or with more --reps.")


def paired_ratios(inputs, engine: str) -> Optional[dict]:
    """CAD's time over the dense networks' (those the ratios use), paired by round: in round
    ``i`` every variant ran once, back to back (:func:`~cad_apps.bench.measure.bench_input`),
    so CAD's i-th runs (summed over the inputs) over dense's i-th runs share that round's
    machine state; the median of those ratios over the rounds. On a busy machine this holds
    where the ratio of medians drifts (a slow spell that hit one variant's runs more often).
    ``{"vs_dense_fine", "vs_dense_coarse"}``; ``None`` when a variant lacks per-run samples or
    the inputs' run counts differ."""
    def rounds(kind):
        runs = []
        for r in inputs:
            v = r["variants"]
            name = f"cad[{engine}]" if kind == "cad" else _best(v, kind)[0]
            if name not in v or not v[name].get("samples"):
                return None
            runs.append(v[name]["samples"])
        if len({len(x) for x in runs}) != 1:
            return None
        return [sum(x) for x in zip(*runs)]

    cad = rounds("cad")
    if cad is None:
        return None
    out = {}
    for key, kind in (("vs_dense_fine", "dense_fine"), ("vs_dense_coarse", "dense_coarse")):
        dense = rounds(kind)
        if dense is None or len(dense) != len(cad) or min(dense) <= 0:
            return None
        out[key] = statistics.median([c / d for c, d in zip(cad, dense)])
    return out


def summary(results, engines) -> dict:
    """Per engine over all inputs: sums of the median times, and ratios of the sums; the
    largest spread of the runs behind them (:func:`timing_spread`)."""
    per = [_input_summary(r, engines) for r in results]
    fine = sum(p["dense_fine_seconds"] for p in per)
    coarse = sum(p["dense_coarse_seconds"] for p in per)
    spread = timing_spread(results)
    out = {"dense_fine_seconds": fine, "dense_coarse_seconds": coarse, "cad": {},
           "timing_spread": None if spread is None else spread[0]}
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
                         "geometry_share": geo / t, "paired": paired_ratios(results, e)}
    return out


def _guarantee2(r) -> str:
    """A variant's (or, in results written before it was per engine, the input's) Guarantee 2
    error: absent for whole models (the heads run at different strides); None: non-finite."""
    if "guarantee2_rel_error" not in r:
        return "n/a"
    err = r["guarantee2_rel_error"]
    return "non-finite" if err is None else f"{err:.1e}"


def _ms(s) -> str:
    return f"{1e3 * s:.0f}" if s >= 0.1 else f"{1e3 * s:.1f}"


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2 ** 20:.0f}"


def _rows(report):
    """Table rows (one per input and engine, then the totals)."""
    # the engines asked for, then variants of them the bench added (e.g. "auto,compiled")
    engines = list(report["config"]["engines"])
    engines += [e for e in report["summary"]["cad"] if e not in engines]
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
                         _ms(c["seconds"]), f"{c['vs_dense_fine']:.3f}", _paired(c),
                         f"{c['eff']:.2f}",
                         f"{c['geometry_share']:.1%}",
                         f"{_mib(v[fine_name].get('peak_bytes'))} / {_mib(cad.get('peak_bytes'))}",
                         # n/a for whole models: the heads run at different strides
                         _guarantee2(cad if "guarantee2_rel_error" in cad else r)])
    t = report["summary"]
    for e in [e for e in engines if e in t["cad"]]:
        c = t["cad"][e]
        rows.append(["**all**", e, "", f"{c['mac_fraction']:.3f}", _ms(t["dense_coarse_seconds"]),
                     _ms(t["dense_fine_seconds"]), _ms(c["seconds"]),
                     f"**{c['vs_dense_fine']:.3f}**", _paired(c), f"**{c['eff']:.2f}**",
                     f"{c['geometry_share']:.1%}", "", ""])
    return rows


def _paired(cad) -> str:
    p = cad.get("paired")  # absent from results written before 2026-12-06 19:50
    return "n/a" if not p else f"{p['vs_dense_fine']:.3f} / {p['vs_dense_coarse']:.3f}"


HEADER = ["input", "engine", "kept cells", "MAC fraction", "dense c [ms]", "dense f [ms]",
          "CAD [ms]", "CAD / dense f", "paired: / dense f, / dense c", "eff", "geometry",
          "peak MiB dense f / CAD", "Guar. 2 err"]


def markdown(report) -> str:
    """A markdown section: title, exact command, machine, table."""
    cfg, env = report["config"], report["environment"]
    title = cfg.get("label") or (f"{cfg['model']} {cfg['size'][0]}x{cfg['size'][1]} batch "
                                 f"{cfg['batch']}, {env['device']} {cfg['dtype']}")
    f, c = cfg["finest_stride"], cfg["coarsest_stride"]
    load = lambda v: "n/a" if v is None else "/".join(f"{x:.1f}" for x in v)  # noqa: E731
    tuned = recorded_tuning_env(env)
    lines = [
        f"\n### {title}\n",
        f"`{report['command']}`\n",
        f"{env['time']}; {env.get('gpu', env['cpu'])}"
        + (f" ({', '.join(env['cpu_flags'])})" if env.get("cpu_flags") and "gpu" not in env
           else "") + f"; torch {env['torch']}, "
        f"{env['threads']} threads; load average {load(env['loadavg_before'])} before, "
        f"{load(env['loadavg_after'])} after"
        + (f"; {' '.join(f'{k}={v}' for k, v in tuned.items())}" if tuned else "") + ".",
        f"Dense c / dense f: the dense backbone at stride {c} / {f} (faster memory format); CAD: "
        f"stride {f}->{c}, output densified at stride {f}; median of {cfg['reps']} runs after "
        f"{cfg['warmup']} warm-up, variants alternating"
        + (", CPU seconds of the process (--clock process), not wall clock"
           if cfg.get("clock") == "process" and env["device"] == "cpu" else "")
        + ". Paired: the median over rounds of CAD's run over the dense network's in the same "
        "round (robust to a busy machine). eff = t_dense_f x MAC fraction / t_CAD; "
        "geometry = plan + rulebooks share of the CAD time.\n",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    failed = sorted({f"{name}: {why}" for r in report["inputs"]
                     for name, why in r.get("failed", {}).items()})
    if failed:
        lines += ["", "Left out (failed): " + "; ".join(failed)]
    note = noise_note(report)
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def print_report(report):
    widths = [max(len(h), *(len(r[i]) for r in _rows(report))) for i, h in enumerate(HEADER)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    for row in _rows(report):
        print("  ".join(x.replace("*", "").ljust(w) for x, w in zip(row, widths)))
    for r in report["inputs"]:
        times = ", ".join(f"{n} {_ms(e['seconds'])}" for n, e in r["variants"].items())
        print(f"  {r['input']}: {times} ms")
    note = noise_note(report)
    if note:
        print(note)
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
